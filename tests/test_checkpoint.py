"""Durability: a run killed with SIGKILL and resumed logs the same losses as an uninterrupted run (model,
optimizer, scheduler, RNG, data order), checkpoints appear atomically, save_total_limit holds, and the saved
model loads with plain transformers."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import OLD_CPU_RESUME, OLD_CPU_RESUME_REASON, run_worker, worker_command, worker_env


def _losses(out_dir) -> dict[int, float]:
    losses = {}
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]  # a resumed run's later line for a step wins
    return losses


def test_sigkill_and_resume_continue_exactly(tmp_path):
    full = run_worker(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    killed = run_worker(tmp_path / "killed", kill_at=5)
    assert killed.returncode == -9
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    resumed = run_worker(tmp_path / "killed", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = _losses(tmp_path / "full"), _losses(tmp_path / "killed")
    assert sorted(got) == list(range(1, 8))
    for step in range(5, 8):  # the steps after the checkpoint the resume started from
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    # save_total_limit = 2: the newest two checkpoints (6, and 7 saved at the end) remain, nothing staged.
    names = sorted(p.name for p in (tmp_path / "killed").iterdir() if p.name.startswith(("checkpoint", ".staging")))
    assert names == ["checkpoint-6", "checkpoint-7"]


@pytest.mark.skipif(OLD_CPU_RESUME, reason=OLD_CPU_RESUME_REASON)
def test_two_processes_resume_in_the_middle_of_epoch_1(tmp_path):
    """24 rows, 3 steps per epoch: checkpoint-4 lies inside epoch 1. On 2 processes accelerate wraps the sampler
    on resume (SkipBatchSampler(BatchSamplerShard(...)), neither forwards set_epoch); the resumed steps must
    still train epoch 1's and 2's rows: the losses of the uninterrupted 2-process run (which test_distributed.py
    matches to 1 process)."""
    full = run_worker(tmp_path / "full", processes=2)
    assert full.returncode == 0, full.stderr[-2000:]
    assert run_worker(tmp_path / "killed", kill_at=5, processes=2).returncode != 0
    resumed = run_worker(tmp_path / "killed", resume=True, processes=2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = (_losses(tmp_path / run) for run in ("full", "killed"))
    for step in range(5, 8):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


def test_checkpoint_loads_with_plain_transformers_and_carries_config(tmp_path):
    from transformers import AutoModelForCausalLM

    assert run_worker(tmp_path / "run", 2).returncode == 0
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
    proc = run_worker(tmp_path / "run", kill_at=3, kill_signal=sig)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{signal.Signals(sig).name}: saving a checkpoint" in proc.stderr + proc.stdout
    # The signal arrives at the end of step 3 (after the guard looked): step 4 completes, is saved, and the run
    # stops.
    state = json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and not (tmp_path / "run" / "checkpoint-5").exists()
    if sig == signal.SIGINT:  # and it resumes from there (the same checkpoint either way: once is enough)
        resumed = run_worker(tmp_path / "run", 6, resume=True)
        assert resumed.returncode == 0 and (tmp_path / "run" / "checkpoint-6").exists()


def test_signal_to_one_process_stops_all_at_the_same_step(tmp_path):
    """SIGTERM reaching rank 1 alone: both processes agree at the next step end, save together and stop."""
    proc = run_worker(tmp_path / "run", kill_at=3, kill_signal=signal.SIGTERM, processes=2, rank=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and not (tmp_path / "run" / "checkpoint-5").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_second_signal_stops_at_once(tmp_path, sig):
    """Step 4 takes two minutes (as a step can under torch_compile). The first signal asks for a save after it; a
    repeat within a second is the same request (a launcher forwarding what a scheduler sent every process); a
    second signal after that stops the process at once, as the signal would without vftrain, saving nothing:
    checkpoint-2 stays the last and intact."""
    out = tmp_path / "run"
    proc = subprocess.Popen(worker_command(out, stall_at=4), env=worker_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "stalled").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (out / "stalled").exists(), proc.communicate()[1][-2000:]
        proc.send_signal(sig)
        time.sleep(0.2)
        proc.send_signal(sig)  # the same request, delivered twice
        time.sleep(1.5)
        assert proc.poll() is None  # still in the long step: the first signal waits for its end
        sent = time.monotonic()
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert time.monotonic() - sent < 30
    if sig == signal.SIGINT:  # Ctrl-C's own behaviour in Python: KeyboardInterrupt, uncaught. Python then ends by
        # SIGINT, or with exit status 1 after the traceback (the H200's Python 3.12 with its packages does the latter)
        assert stderr.rstrip().endswith("KeyboardInterrupt") and proc.returncode in (-sig, 1), stderr[-3000:]
    else:  # SIGTERM's default action ends the process by SIGTERM
        assert proc.returncode == -sig, stderr[-3000:]
    # the worker sets up no logging: vftrain's lines go to stdout, as the CLI's do
    assert f"second signal ({sig.name}): stopping now, without saving" in stdout
    assert f"the last checkpoint, {out / 'checkpoint-2'}, is intact" in stdout
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "checkpoint-2")


def test_cli_stopped_by_a_signal_keeps_its_checkpoint_and_exits_with_the_signal(tmp_path):
    """vf-sft stopped by Ctrl-C saves the step's checkpoint, but the run is unfinished: no final model, no LoRA
    merge, no held-out generation, and exit status 130 (as the signal itself gives) with the flag that continues
    it, so that a script or scheduler does not take it for a finished run."""
    import sys

    from conftest import ROOT, TINY, addition_rows, write_jsonl

    write_jsonl(tmp_path / "data" / "train.jsonl", addition_rows(64))
    write_jsonl(tmp_path / "data" / "test.jsonl", addition_rows(8, start=100))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "vftrain.cli.sft", "--model", TINY, "--dataset", str(tmp_path / "data"),
           "--sft.output_dir", str(out), "--sft.max_steps", "1000", "--sft.batch_size", "8",
           "--sft.micro_batch_size", "8", "--sft.max_seq_len", "64", "--sft.logging_steps", "1",
           "--sft.save_steps", "1000", "--sft.use_lora", "true", "--sft.merge_lora", "true",
           "--sft.eval_split", "test", "--sft.eval_generation_rows", "8", "--sft.eval_steps", "1000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        metrics, deadline = out / "metrics.jsonl", time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and \
                not (metrics.exists() and '"loss"' in metrics.read_text()):
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "adapter_model.safetensors").exists()
    step = int(checkpoints[0].name.split("-")[1])
    assert f"stopped by SIGINT after step {step}; continue with --sft.resume_from_checkpoint {checkpoints[0]}" \
        in stderr
    assert not (out / "adapter_model.safetensors").exists() and not (out / "merged").exists()
    assert "held-out exact-match" not in stdout


def test_the_best_checkpoint_is_loaded_on_every_process(tmp_path):
    """load_best_model_at_end on 2 processes: rank 1 looked for the best checkpoint in the staging folder it was
    written to (renamed by rank 0), failed to find it and kept the last weights, while rank 0 loaded the best ones;
    the checkpoint's trainer_state.json named the staging folder too."""
    import torch

    out = tmp_path / "best"
    proc = run_worker(out, max_steps=4, processes=2, mode="best")
    assert proc.returncode == 0, proc.stderr[-4000:]
    final = [torch.load(out / f"weights-{rank}.pt")["final"] for rank in (0, 1)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    states = [json.loads((out / f"checkpoint-{s}" / "trainer_state.json").read_text()) for s in (1, 2, 3, 4)]
    best = states[-1]["best_model_checkpoint"]
    assert not best.endswith("checkpoint-4")  # the weights loaded are not the last step's
    assert ".staging" not in best and Path(best).parent == out and all(".staging" not in json.dumps(s) for s in states)
    from safetensors.torch import load_file

    saved = load_file(Path(best) / "model.safetensors")
    assert all(torch.equal(final[0][k], saved[k]) for k in saved if k in final[0])
