"""A NaN loss stops the run before the weights are touched (or skips the step); out-of-memory saves the
finished steps and names the knobs."""

from __future__ import annotations

import json
import math

import datasets
import pytest
import torch
from transformers import TrainerCallback

import vftrain as vf
import vftrain.sft.trainer as trainer_module
from conftest import TINY, addition_rows, run_worker, small_config
from vftrain.guards import NonFiniteLossError, OutOfMemory


class Snapshots(TrainerCallback):
    def __init__(self):
        self.params = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.params[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}


def _poisoned_trainer(tmp_path, monkeypatch, bad_step, **overrides):
    """A trainer whose loss is NaN during optimizer step `bad_step` (1-based)."""
    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(32)),
                            args=small_config(tmp_path, max_steps=3, micro_batch_size=4, **overrides))
    real = trainer_module.linear_cross_entropy_sum

    def poisoned(*args, **kwargs):
        loss, correct = real(*args, **kwargs)
        return (loss * float("nan"), correct) if trainer.state.global_step == bad_step - 1 else (loss, correct)

    monkeypatch.setattr(trainer_module, "linear_cross_entropy_sum", poisoned)
    snapshots = Snapshots()
    trainer.add_callback(snapshots)
    return trainer, snapshots


# The default fused AdamW skips a bad step on the device and the flag is read a step later (or at the first log);
# "adamw_torch" (not fused) reads it at once. Logging every 10 steps makes the fused case read it one step late.
OPTIMIZERS = [dict(optim="adamw_torch_fused", logging_steps=10), dict(optim="adamw_torch_fused", logging_steps=1),
              dict(optim="adamw_torch", logging_steps=10)]


@pytest.mark.parametrize("settings", OPTIMIZERS)
def test_nan_loss_stops_before_the_weights_change(tmp_path, monkeypatch, settings):
    trainer, snapshots = _poisoned_trainer(tmp_path, monkeypatch, bad_step=2, **settings)
    with pytest.raises(NonFiniteLossError, match="NaN/inf at optimizer step 2"):
        trainer.train()
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), snapshots.params[1][name]), name
        assert torch.isfinite(p).all()
    assert not list(tmp_path.glob("**/checkpoint-2"))


class OptimizerState(TrainerCallback):
    """The optimizer's state (moments, step counts) after every step."""

    def __init__(self, trainer):
        self.trainer, self.states = trainer, {}

    def on_step_end(self, args, state, control, **kwargs):
        inner = getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)
        self.states[state.global_step] = [{k: v.clone() for k, v in s.items()} for s in inner.state.values()]


@pytest.mark.parametrize("settings", OPTIMIZERS)
def test_nan_loss_skip_policy_skips_the_step(tmp_path, monkeypatch, settings):
    trainer, snapshots = _poisoned_trainer(tmp_path, monkeypatch, bad_step=2, nan_policy="skip", **settings)
    optimizer_state = OptimizerState(trainer)
    trainer.add_callback(optimizer_state)
    trainer.train()
    assert trainer.state.global_step == 3
    assert all(torch.equal(snapshots.params[2][n], snapshots.params[1][n]) for n in snapshots.params[1])
    assert not all(torch.equal(snapshots.params[3][n], snapshots.params[2][n]) for n in snapshots.params[1])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    before, after = optimizer_state.states[1], optimizer_state.states[2]
    assert len(before) == len(after) > 0  # the skipped step left moments and step counts as they were
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, after) for k in a)


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nan_on_one_process_is_acted_on_by_every_process(tmp_path, policy):
    """2 processes (DDP, gloo), the loss NaN on rank 1 only at step 2. The gradients are averaged, so the NaN is in
    both ranks' gradients: with "skip" both skip the step (weights unchanged, finite, the same on both ranks,
    and step 3 trains); with "stop" both stop with the message (none applies the step or hangs)."""
    out = tmp_path / "run"
    proc = run_worker(out, 3, processes=2, nan_at=2, rank=1, nan_policy=policy, snapshots=True)
    if policy == "stop":
        assert proc.returncode != 0 and "the loss became NaN/inf at optimizer step 2" in proc.stderr
        assert (out / "stopped-0").exists() and (out / "stopped-1").exists()  # both raised it
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = [torch.load(out / f"weights-{rank}.pt") for rank in (0, 1)]
    for w in weights:
        assert w["sums"][2] == w["sums"][1] != w["sums"][3]
        assert all(torch.isfinite(p).all() for p in w["final"].values())
    assert all(torch.equal(p, weights[1]["final"][name]) for name, p in weights[0]["final"].items())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite({r["step"]: r["loss"] for r in records if "loss" in r}[3])


def test_out_of_memory_saves_the_finished_steps_and_names_the_knobs(tmp_path, monkeypatch):
    """An OOM in step 3 leaves checkpoint-2 (the work is not lost) and a message naming what to change; a resume
    from it with the lowered setting finishes the run."""
    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(32)),
                            args=small_config(tmp_path, max_steps=4, micro_batch_size=8))
    real = trainer_module.linear_cross_entropy_sum

    def exhausted(*args, **kwargs):
        if trainer.state.global_step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "linear_cross_entropy_sum", exhausted)
    with pytest.raises(OutOfMemory) as caught:
        trainer.train()
    message = str(caught.value)
    assert message.startswith("out of GPU memory at optimizer step 3")
    for knob in ("micro_batch_size (now 8", "set micro_batch_tokens", "gradient_checkpointing = true",
                 "use_lora = true", "checkpoint-2", "resume_from_checkpoint latest"):
        assert knob in message
    assert (tmp_path / "out" / "checkpoint-2" / "model.safetensors").exists()

    monkeypatch.setattr(trainer_module, "linear_cross_entropy_sum", real)
    resumed = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(32)),
                            args=small_config(tmp_path, max_steps=4, micro_batch_size=4))
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4


def test_out_of_memory_under_a_budget_names_the_budget_not_micro_batch_size(tmp_path):
    """Under micro_batch_tokens a forward is sized by the budget (micro_batch_size may be a whole step's rows)."""
    from vftrain.guards import oom_message

    message = oom_message(vf.SFTConfig(output_dir=str(tmp_path), micro_batch_tokens=4096), step=2)
    assert "lower micro_batch_tokens (now 4096)" in message and "micro_batch_size" not in message
    assert "lower micro_batch_size (now 8" in oom_message(vf.SFTConfig(output_dir=str(tmp_path)), step=2)
