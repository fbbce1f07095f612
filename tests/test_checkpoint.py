"""Durability: a run killed with SIGKILL and resumed logs the same losses as an uninterrupted run (model,
optimizer, scheduler, RNG, data order), checkpoints appear atomically, save_total_limit holds, and the saved
model loads with plain transformers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _run(out_dir, max_steps, kill_at=0, resume=False, sig=signal.SIGKILL, processes=1, rank=None):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(HERE)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                str(29600 + os.getpid() % 1000)] if processes > 1 else [sys.executable]
    return subprocess.run([*launcher, str(HERE / "train_worker.py"), str(out_dir), str(max_steps), str(kill_at),
                           "1" if resume else "0", str(int(sig)), *([str(rank)] if rank is not None else [])],
                          env=env, capture_output=True, text=True, timeout=300)


def _losses(out_dir) -> dict[int, float]:
    losses = {}
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]  # a resumed run's later line for a step wins
    return losses


def test_sigkill_and_resume_continue_exactly(tmp_path):
    full = _run(tmp_path / "full", 7)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = _run(tmp_path / "killed", 7, kill_at=5)
    assert killed.returncode == -9
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    resumed = _run(tmp_path / "killed", 7, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = _losses(tmp_path / "full"), _losses(tmp_path / "killed")
    assert sorted(got) == list(range(1, 8))
    for step in range(5, 8):  # the steps after the checkpoint the resume started from
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    # save_total_limit = 2: the newest two checkpoints (6, and 7 saved at the end) remain, nothing staged.
    names = sorted(p.name for p in (tmp_path / "killed").iterdir() if p.name.startswith(("checkpoint", ".staging")))
    assert names == ["checkpoint-6", "checkpoint-7"]


def test_checkpoint_loads_with_plain_transformers_and_carries_config(tmp_path):
    from transformers import AutoModelForCausalLM

    assert _run(tmp_path / "run", 2).returncode == 0
    ckpt = tmp_path / "run" / "checkpoint-2"
    model = AutoModelForCausalLM.from_pretrained(str(ckpt))
    assert model.config.model_type == "qwen2"
    assert json.loads((ckpt / "vftrain_config.json").read_text())["config"]["save_steps"] == 2


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    """A save that dies half-way (here: the optimizer write fails) publishes nothing."""
    import datasets

    import vftrain as vf
    from conftest import TINY, addition_rows, small_config

    cfg = small_config(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(16)), args=cfg)
    calls = {"n": 0}
    original = trainer._save_optimizer_and_scheduler

    def fail_second(output_dir):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        original(output_dir)

    monkeypatch.setattr(trainer, "_save_optimizer_and_scheduler", fail_second)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    out = Path(cfg.output_dir)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    from transformers.trainer_utils import get_last_checkpoint

    assert get_last_checkpoint(str(out)).endswith("checkpoint-1")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_saves_a_checkpoint_and_exits_cleanly(tmp_path, sig):
    """Ctrl-C or a termination request (a scheduler's preemption) saves the step in progress and stops."""
    proc = _run(tmp_path / "run", 7, kill_at=3, sig=sig)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{signal.Signals(sig).name}: saving a checkpoint" in proc.stderr + proc.stdout
    # The signal arrives at the end of step 3 (after the guard looked): step 4 completes, is saved, and the run
    # stops.
    state = json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and not (tmp_path / "run" / "checkpoint-5").exists()
    resumed = _run(tmp_path / "run", 6, resume=True)  # and it resumes from there
    assert resumed.returncode == 0 and (tmp_path / "run" / "checkpoint-6").exists()


def test_signal_to_one_process_stops_all_at_the_same_step(tmp_path):
    """SIGTERM reaching rank 1 alone: both processes agree at the next step end, save together and stop."""
    proc = _run(tmp_path / "run", 7, kill_at=3, sig=signal.SIGTERM, processes=2, rank=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and not (tmp_path / "run" / "checkpoint-5").exists()
