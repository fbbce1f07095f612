"""A run folder reused the next day with one thing changed (an outside audit of resumes): the schedule, learning
rate, weight decay and logging / save steps the config gives now, rows changed under the same path, another
model, two runs at once in one folder, a final model cut short by a kill, a resume from an earlier checkpoint of a
finished run, and overwrite_output_dir with a continuation set aside or a checkpoint of another folder."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from transformers import TrainerCallback

import vftrain as vf
from conftest import ROOT, TINY, addition_rows, small_config, worker_env
from vftrain.errors import ConfigError

HD32 = str(ROOT / "assets" / "tiny-chat-hd32")


def _sft(tmp_path, rows=None, model=TINY, **overrides):
    args = small_config(tmp_path, **{**dict(save_strategy="steps", save_steps=2, max_steps=4), **overrides})
    return vf.SFTTrainer(model=model, train_dataset=rows or datasets.Dataset.from_list(addition_rows(64)), args=args)


def _metrics(tmp_path) -> dict[int, dict]:
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


class _Seen(TrainerCallback):
    """The learning rate and weight decay each step trains with (read from the optimizer before its step)."""

    def __init__(self):
        self.lrs, self.decays = {}, {}

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs[state.global_step + 1] = optimizer.param_groups[0]["lr"]
        self.decays[state.global_step + 1] = optimizer.param_groups[0]["weight_decay"]


def _resume(tmp_path, checkpoint="checkpoint-4", **overrides):
    trainer = _sft(tmp_path, **overrides)
    seen = _Seen()
    trainer.add_callback(seen)
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / checkpoint))
    return trainer, seen


def test_a_finished_cosine_run_continued_follows_the_new_schedule(tmp_path):
    """max_steps 4 -> 8 under cosine: step 5 trained at learning rate 0 (the old schedule's end), then followed the
    new one. Every resumed step now trains at the lr an 8-step run has there."""
    _sft(tmp_path, lr_scheduler_type="cosine").train()
    _, seen = _resume(tmp_path, max_steps=8, lr_scheduler_type="cosine")
    straight = _Seen()
    fresh = _sft(tmp_path / "straight", max_steps=8, lr_scheduler_type="cosine")
    fresh.add_callback(straight)
    fresh.train()
    assert seen.lrs[5] > 0
    assert [seen.lrs[s] for s in range(5, 9)] == pytest.approx([straight.lrs[s] for s in range(5, 9)])


def test_a_new_learning_rate_and_weight_decay_apply_at_once(tmp_path, caplog):
    """The checkpoint's optimizer state held the old ones, and they won without a word."""
    _sft(tmp_path, lr_scheduler_type="constant", weight_decay=0.0).train()
    with caplog.at_level("INFO", logger="vftrain"):
        _, seen = _resume(tmp_path, max_steps=6, lr_scheduler_type="constant", learning_rate=3e-4,
                          weight_decay=0.5)
    assert [seen.lrs[5], seen.lrs[6]] == [3e-4, 3e-4] and seen.decays[5] == 0.5
    assert "learning_rate: 0.001 -> 0.0003" in caplog.text and "they apply from its next step" in caplog.text


def test_new_logging_and_save_steps_apply(tmp_path):
    """transformers took them from the checkpoint's trainer_state.json."""
    _sft(tmp_path).train()
    _resume(tmp_path, max_steps=9, logging_steps=2, save_steps=3)
    assert sorted(_metrics(tmp_path)) == [1, 2, 3, 4, 6, 8, 9]  # 9: the last step's checkpoint logs its window
    assert sorted(int(p.name.split("-")[1]) for p in (tmp_path / "out").glob("checkpoint-*")) == [2, 4, 6, 9]


def test_rows_changed_under_the_same_path_are_said(tmp_path, caplog):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in addition_rows(64)))
    _sft(tmp_path, rows=vf.load_rows(str(data), "train")).train()
    data.write_text("".join(json.dumps(r) + "\n" for r in addition_rows(64, start=7)))
    with caplog.at_level("WARNING", logger="vftrain"):
        _sft(tmp_path, rows=vf.load_rows(str(data), "train"), max_steps=6).train(
            resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    assert "the training rows themselves" in caplog.text


def test_a_model_of_another_shape_is_refused_before_the_folder_changes(tmp_path):
    """A traceback after the later checkpoints were set aside and the logs trimmed."""
    _sft(tmp_path).train()
    before = sorted(os.listdir(tmp_path / "out"))
    with pytest.raises(ConfigError, match="other model settings .*hidden_size: 64 -> 128"):
        _sft(tmp_path, model=HD32, max_steps=6).train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert sorted(os.listdir(tmp_path / "out")) == before


def test_a_model_from_another_path_is_said(tmp_path, caplog):
    """A LoRA adapter continued on another base without a word (its loss fell from 4.4 to 0.2)."""
    import shutil

    _sft(tmp_path).train()
    moved = tmp_path / "moved"
    shutil.copytree(TINY, moved)
    with caplog.at_level("WARNING", logger="vftrain"):
        _sft(tmp_path, model=str(moved), max_steps=6).train(resume_from_checkpoint=str(tmp_path / "out/checkpoint-4"))
    assert f"a run of model {TINY!r}, with model {str(moved)!r}" in caplog.text


HOLD = """
import sys, time
from vftrain.checkpoint import claim
class Run: pass
run = Run()
assert claim(sys.argv[1], run) is None
print("held", flush=True)
time.sleep(120)
"""


def test_two_runs_at_once_in_one_folder_are_refused(tmp_path):
    """Both wrote every metrics line, the checkpoints and the model, and cleared each other's staging folder."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "out")], env=worker_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=r"is in use by a run still going \(pid \d+ on .* since "):
            _sft(tmp_path).train()
    finally:
        holder.kill()
        holder.wait()
    _sft(tmp_path).train()  # the lock went with its process
    first = _sft(tmp_path, max_steps=6)
    first.train(resume_from_checkpoint="latest")
    del first  # a trainer gone releases the folder (tests and notebooks build many in one process)
    import gc

    gc.collect()
    from vftrain.checkpoint import _CLAIMED

    assert os.path.realpath(tmp_path / "out") not in _CLAIMED


def test_a_finished_run_reloaded_through_the_api_claims_its_folder(tmp_path):
    """train() on a run whose newest checkpoint ends it loaded that checkpoint without the lock: a save_model() after
    it wrote into a folder another run was using."""
    import gc

    _sft(tmp_path).train()
    gc.collect()  # the trainer, gone, releases the folder
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "out")], env=worker_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match="is in use by a run still going"):
            _sft(tmp_path).train(resume_from_checkpoint="latest")
    finally:
        holder.kill()
        holder.wait()


def test_a_final_model_cut_short_is_not_a_finished_run(tmp_path, capsys):
    """A kill while the final model was written left half a safetensors file; a requeued job said "finished" and
    kept it. The CLI now saves the model again from the last checkpoint."""
    from vftrain.checkpoint import has_final_model
    from vftrain.cli.sft import main

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in addition_rows(64)))
    argv = ["--model", TINY, "--dataset", str(data), "--sft.output_dir", str(tmp_path / "out"), "--sft.max_steps",
            "2", "--sft.save_steps", "2", "--sft.batch_size", "8", "--sft.micro_batch_size", "8",
            "--sft.max_seq_len", "64", "--sft.use_cpu", "true", "--sft.resume_from_checkpoint", "latest"]
    assert main(argv) == 0
    weights = tmp_path / "out" / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:len(whole) // 2])
    assert not has_final_model(str(tmp_path / "out"))
    assert main(argv) == 0
    assert has_final_model(str(tmp_path / "out")) and weights.stat().st_size == len(whole)


def test_a_resume_that_ends_at_an_earlier_checkpoint_sets_the_later_run_aside(tmp_path):
    """max_steps 4 from checkpoint-4 of an 8-step run: 'finished', and the folder kept the 8-step continuation's
    checkpoints, logs and final model, which 'latest' would pick up later."""
    _sft(tmp_path, max_steps=8).train()
    trainer = _sft(tmp_path, max_steps=8)
    trainer.save_model()  # the 8-step run's final model
    trainer = _sft(tmp_path, max_steps=4)
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert max(_metrics(tmp_path)) == 4 and not (out / "model.safetensors").exists()
    [aside] = out.glob("superseded-*")
    assert sorted(p.name for p in aside.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    assert (aside / "model.safetensors").exists()


def test_overwrite_output_dir_deletes_a_set_aside_continuation_and_takes_another_folders_checkpoint(tmp_path):
    """superseded-* folders survived an overwrite; a checkpoint of another folder was refused with advice to set
    overwrite_output_dir, which was then refused as deleting the checkpoint it continues."""
    _sft(tmp_path, max_steps=6).train()
    _sft(tmp_path, max_steps=4).train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert list((tmp_path / "out").glob("superseded-*"))
    other = tmp_path / "other"
    _sft(other, max_steps=2).train()
    with pytest.raises(ConfigError, match="another folder's checkpoint"):
        _sft(tmp_path, max_steps=4).train(resume_from_checkpoint=str(other / "out" / "checkpoint-2"))
    _sft(tmp_path, max_steps=4, overwrite_output_dir=True).train(
        resume_from_checkpoint=str(other / "out" / "checkpoint-2"))
    assert not list((tmp_path / "out").glob("superseded-*")) and max(_metrics(tmp_path)) == 4


def test_an_rl_resume_with_another_reward_is_said(tmp_path, caplog):
    """`reward` meant exact_match up to the checkpoint and the new function after it, on one plot line, silently."""
    from rl_worker import config as rl_config

    def run(max_steps, reward_funcs):
        cfg = rl_config(str(tmp_path / "out"), max_steps, save_steps=2, reward_funcs=reward_funcs)
        return vf.RLTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(40)), args=cfg)

    run(2, ["exact_match"]).train()
    with caplog.at_level("WARNING", logger="vftrain"):
        run(3, [f"{__file__}:always_one"]).train(resume_from_checkpoint="latest")
    assert "with another objective (reward_funcs: ['exact_match'] ->" in caplog.text


def always_one(completion: str, reference: str) -> float:
    return 1.0


def test_fewer_epochs_than_a_finished_run_trained_is_a_finished_run(tmp_path, caplog):
    """num_train_epochs 2 -> 1 on a finished 2-epoch run: transformers logged a second summary of no steps (train_loss
    0.0), and the 'finished' line, where given, named max_steps."""
    rows = datasets.Dataset.from_list(addition_rows(32))
    _sft(tmp_path, rows=rows, max_steps=-1, num_train_epochs=2).train()
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    with caplog.at_level("INFO", logger="vftrain"):
        _sft(tmp_path, rows=rows, max_steps=-1, num_train_epochs=1).train(resume_from_checkpoint="latest")
    assert (tmp_path / "out" / "metrics.jsonl").read_text().splitlines() == lines
    assert "is step 8 of 4: the run is finished, nothing to train (a larger num_train_epochs" in caplog.text


@pytest.mark.skipif(torch.cuda.device_count() < 2 or importlib.util.find_spec("deepspeed") is None,
                    reason="vftrain runs DeepSpeed on several GPUs (tests/gpu.sh installs it where .whl/ds/ carries it)")
def test_a_new_learning_rate_applies_under_deepspeed(tmp_path):
    """DeepSpeed loads its optimizer's state, hyperparameters included, before transformers' scheduler load: a resume
    there kept the checkpoint's learning rate."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in addition_rows(64)))
    env = {**worker_env(), "CUDA_VISIBLE_DEVICES": "0,1"}  # worker_env hides the GPUs
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "vftrain.cli.sft", "--model", TINY, "--dataset", str(data), "--sft.output_dir", str(tmp_path / "out"),
               "--sft.deepspeed", str(ROOT / "examples" / "ds_zero3.json"), "--sft.save_steps", "2",
               "--sft.batch_size", "8", "--sft.micro_batch_size", "8", "--sft.max_seq_len", "64",
               "--sft.lr_scheduler_type", "constant", "--sft.resume_from_checkpoint", "latest"]
    for lr, steps in (("1e-3", "2"), ("1e-4", "4")):
        done = subprocess.run(command + ["--sft.learning_rate", lr, "--sft.max_steps", steps], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert {step: row["learning_rate"] for step, row in _metrics(tmp_path).items()} == pytest.approx(
        {1: 1e-3, 2: 1e-3, 3: 1e-4, 4: 1e-4})


def test_a_resumed_runs_train_loss_is_the_whole_runs(tmp_path):
    """transformers' train_loss covers the steps of one train() call: after a resume it was the mean of the resumed
    steps alone, in metrics.jsonl's last line, the summary and the returned TrainOutput."""
    constant = dict(lr_scheduler_type="constant", max_steps=6)
    straight = _sft(tmp_path / "straight", **constant).train()
    _sft(tmp_path, **{**constant, "max_steps": 4}).train()
    resumed = _sft(tmp_path, **constant).train(resume_from_checkpoint="latest")
    last = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    assert resumed.training_loss == pytest.approx(straight.training_loss, rel=1e-5)
    assert last["train_loss"] == pytest.approx(straight.training_loss, rel=1e-5)
