"""Guards that keep a run from being lost or silently spoiled: a NaN/inf loss, Ctrl-C, out-of-memory."""

from __future__ import annotations

import logging
import signal

import torch
from transformers import TrainerCallback

from vftrain.errors import VFTrainError

log = logging.getLogger("vftrain")


class NonFiniteLossError(VFTrainError):
    """The loss became NaN or inf; raised before the optimizer applies the step, so the weights are intact."""


class NonFiniteLossGuard(TrainerCallback):
    """Checks once per optimizer step (one host sync) whether any micro-batch had a non-finite loss, before the
    optimizer applies it: `nan_policy = "stop"` raises naming the step, `"skip"` drops the step's gradients
    (parameters without a gradient are left alone by the optimizer, momentum included)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.flag: torch.Tensor | None = None

    def see(self, loss_sum: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss_sum.detach())
        self.flag = bad if self.flag is None else self.flag | bad

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        flag, self.flag = self.flag, None
        if flag is None or not bool(flag):
            return
        step = state.global_step + 1
        if args.nan_policy == "skip":
            log.warning("non-finite loss at step %d: step skipped (nan_policy = 'skip')", step)
            for p in self.trainer.model.parameters():
                p.grad = None
            return
        raise NonFiniteLossError(
            f"the loss became NaN/inf at optimizer step {step}; the weights are not updated with it. Lower "
            "learning_rate, check the data of that step, or set nan_policy = 'skip'; resume from the last "
            "checkpoint with --sft.resume_from_checkpoint latest")


class GracefulInterrupt(TrainerCallback):
    """Ctrl-C (SIGINT) or a termination request (SIGTERM: a scheduler's preemption, torchrun stopping its workers):
    finish the current optimizer step, save a checkpoint, stop. A second Ctrl-C aborts.

    With several processes the decision is shared at every step end (one small all-reduce): a signal that reached
    only some of them still stops all of them at the same step, so the collective save cannot hang.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, agree=None):
        self.agree = agree  # flag -> whether any process has it set (None: one process)
        self.requested: int | None = None  # the signal received
        self.previous: dict = {}

    def on_train_begin(self, args, state, control, **kwargs):
        try:
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        except ValueError:  # not the main thread: leave signals alone
            self.previous = {}

    def _handle(self, signum, frame):
        if self.requested == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.requested is None:
            log.warning("%s: saving a checkpoint after this step, then stopping%s", signal.Signals(signum).name,
                        " (Ctrl-C again to abort)" if signum == signal.SIGINT else "")
        self.requested = self.requested or signum

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.requested is not None
        if self.agree is not None:
            stop = self.agree(stop)
        if stop:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


class OutOfMemory(VFTrainError):
    """A step did not fit in GPU memory; the message names the settings to change and any checkpoint saved."""


def oom_message(args, step: int, saved: str | None = None) -> str:
    """What to turn when optimizer step `step + 1` does not fit in GPU memory (and where the run was saved)."""
    knobs = [f"lower micro_batch_size (now {args.micro_batch_size} rows per forward)"]
    if args.packing:
        knobs.append(f"lower micro_batch_tokens (now {args.micro_batch_tokens})" if args.micro_batch_tokens else
                     f"set micro_batch_tokens (a hard cap on tokens per forward, at least max_seq_len = "
                     f"{args.max_seq_len})")
    if not args.gradient_checkpointing:
        knobs.append("set gradient_checkpointing = true")
    if not args.use_lora:
        knobs.append("set use_lora = true")
    if args.world_size > 1 and not (args.fsdp or args.deepspeed):
        knobs.append("shard the model over the GPUs with fsdp = true")
    if args.max_seq_len > 4096:
        knobs.append(f"lower max_seq_len (now {args.max_seq_len})")
    if args.master_weights and not args.use_lora:
        knobs.append("set master_weights = false (8 bytes less per parameter; pure bf16 loses small updates)")
    where = (f"; the {step} finished steps are saved in {saved}: resume with --sft.resume_from_checkpoint latest"
             if saved else "")
    return f"out of GPU memory at optimizer step {step + 1}: " + ", or ".join(knobs) + where
