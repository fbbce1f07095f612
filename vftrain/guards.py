"""Guards that keep a run from being lost or silently spoiled: a NaN/inf loss, Ctrl-C, out-of-memory."""

from __future__ import annotations

import logging
import os
import signal
import time

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from vftrain.errors import VFTrainError

log = logging.getLogger("vftrain")


class NonFiniteLossError(VFTrainError):
    """The loss became NaN or inf; raised before the optimizer applies the step, so the weights are intact."""


def close_process_group() -> None:
    """End the process group at the end of a run, every process together. Without the pause at the end a successful
    2-process CPU run exited with SIGABRT ("terminate called without an active exception") about once in 20: after
    the last barrier, gloo's worker thread still drops the collectives it holds (the barrier keeps those in flight
    before it), and freeing their tensors takes the GIL; a worker thread that asks for it once the main thread has
    reached interpreter shutdown is ended inside a C++ destructor (a core dump's stack: ~AsyncBarrierWork,
    ~AsyncAllgatherWork, decref_pyobject, take_gil, pthread_exit; PyTorch PR 179291 describes the same). Sleeping
    hands that thread the GIL while the interpreter is alive."""
    if not torch.distributed.is_initialized():
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    time.sleep(0.05)


def any_process(accelerator):
    """`flag -> whether any process has it set`: one small all-reduce, which every process must reach at the same
    point; None with one process (nothing to agree on). `on_device=True` returns the summed flag as a device tensor
    without reading it (no host sync)."""
    if accelerator.num_processes == 1:
        return None

    def agree(flag, on_device: bool = False):
        value = torch.as_tensor(flag, device=accelerator.device).reshape(1).int()
        total = accelerator.reduce(value, reduction="sum")
        return total[0] > 0 if on_device else bool(total.item())

    return agree


class NonFiniteLossGuard(TrainerCallback):
    """Whether any micro-batch on any process had a non-finite loss, decided once per optimizer step before the
    optimizer applies it: `nan_policy = "stop"` raises naming the step, `"skip"` drops the step. Either way the
    weights and the optimizer's state are left as they were.

    Without a host sync where the optimizer allows it: torch's fused optimizers (the default `adamw_torch_fused`)
    take a `found_inf` tensor, as `torch.amp.GradScaler` uses them, and skip the step on the device when it is set
    (moments and step count included). The flag is then read on the host one step later, or at the first log, save
    (any checkpoint: `VFTrainer._save_checkpoint` reads it too), epoch end or stop, from a pinned copy behind a CUDA event: reading it at once would make the host wait for the whole step
    before it can queue the next one (29% of a 0.5B step on an H200, benchmarks/RESULTS.md). A "stop" still leaves
    the weights as they were before the bad step: the step was skipped on the device, and the next one is refused
    before its optimizer step. Other optimizers and sharded models (FSDP, DeepSpeed) read the flag at once.

    The decision is shared: gradients are averaged over processes before this point, so a NaN on one process is
    in every process's gradients, and a process that applied them (or kept going while another stopped) would
    spoil every copy of the weights or hang the next collective.
    """

    def __init__(self, trainer, agree=None):
        self.trainer = trainer
        self.agree = agree  # flag -> whether any process has it set (None: one process)
        self.flag: torch.Tensor | None = None
        self.pending = None  # (host copy of a step's flag, CUDA event or None, step): not read yet
        self.skipped = False  # a step was skipped since the last logged loss

    def see(self, loss_sum: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss_sum.detach())
        self.flag = bad if self.flag is None else self.flag | bad

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.resolve(args)
        flag, self.flag = self.flag, None
        step = state.global_step + 1
        optimizer = self._device_skipping_optimizer()
        if optimizer is None:
            flag = False if flag is None else flag
            if self.agree(flag) if self.agree is not None else bool(flag):
                self._act(args, step)
            return
        if flag is None:
            optimizer.found_inf = None
            return
        if self.agree is not None:
            flag = self.agree(flag, on_device=True)
        optimizer.found_inf = flag.float()  # the fused kernel skips the step where this is 1
        host = torch.empty((), dtype=torch.bool, pin_memory=flag.is_cuda)
        host.copy_(flag, non_blocking=True)
        event = None
        if flag.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending = (host, event, step)

    def _device_skipping_optimizer(self):
        """The torch optimizer if it can skip a step on the device (`found_inf`), else None."""
        optimizer = getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)  # accelerate's wrapper
        if self.trainer.sharded or not getattr(optimizer, "_step_supports_amp_scaling", False):
            return None
        return optimizer

    def resolve(self, args) -> None:
        """Read the last device-skipped step's flag (its copy is long done: no wait) and act on it."""
        if self.pending is None:
            return
        host, event, step = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        if bool(host):
            self._act(args, step, applied=False)

    def _act(self, args, step: int, applied: bool = True) -> None:
        if args.nan_policy == "skip":
            log.warning("non-finite loss at step %d: step skipped (nan_policy = 'skip')", step)
            if applied:  # not yet applied: gradients gone, the optimizer leaves every parameter alone
                for p in self.trainer.model.parameters():
                    p.grad = None
            self.skipped = True
            return
        # DeepSpeed's engine steps inside accelerate's backward, before this check: its in-memory weights took the
        # update, but nothing is saved after this error.
        kept = "no checkpoint is written from the updated weights" if self.trainer.is_deepspeed_enabled else \
            "the weights are not updated with it"
        raise NonFiniteLossError(
            f"the loss became NaN/inf at optimizer step {step}; {kept}. Lower "
            "learning_rate, check the data of that step, or set nan_policy = 'skip'; resume from the last "
            f"checkpoint with --{_table(args)}.resume_from_checkpoint latest")

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log or control.should_save or control.should_evaluate or control.should_training_stop:
            self.resolve(args)  # nothing is logged or saved with a bad step unread

    def on_epoch_end(self, args, state, control, **kwargs):
        # The "epoch" save and logging strategies decide in on_epoch_end (transformers' DefaultFlowCallback, which
        # runs before this callback), then save and log: the last step of the epoch must be read first.
        self.resolve(args)

    def on_train_end(self, args, state, control, **kwargs):
        self.resolve(args)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The logged loss of the window with the skipped step is NaN, as it was. transformers then resets its running
        # loss by subtracting it from itself, which keeps the NaN: clear it, or every later logged loss is NaN too.
        if self.skipped and logs and "loss" in logs:
            self.trainer._tr_loss.zero_()
            self.skipped = False


class GracefulInterrupt(TrainerCallback):
    """Ctrl-C (SIGINT) or a termination request (SIGTERM: a scheduler's preemption, torchrun stopping its workers):
    finish the current optimizer step, save a checkpoint, stop. A second signal stops at once, as it would without
    this callback (Ctrl-C: KeyboardInterrupt; SIGTERM: the process ends), without saving the step in progress: the
    last checkpoint is left as it is (a save cut short is only ever a staging folder, `checkpoint.py`).

    Signals within `SAME_REQUEST_S` of the first count as that one: a scheduler that signals every process of a job
    while torchrun forwards the same signal to its workers delivers it twice.

    With several processes the decision is shared at every step end (one small all-reduce): a signal that reached
    only some of them still stops all of them at the same step, so the collective save cannot hang.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    SAME_REQUEST_S = 1.0

    def __init__(self, agree=None):
        self.agree = agree  # flag -> whether any process has it set (None: one process)
        self.requested: int | None = None  # the signal received
        self.requested_at = 0.0
        self.stopped_by: int | None = None  # the signal the run stopped for (SIGTERM when another process got it)
        self.output_dir: str | None = None
        self.previous: dict = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.output_dir = args.output_dir
        try:
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        except ValueError:  # not the main thread: leave signals alone
            self.previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.requested is None:
            self.requested, self.requested_at = signum, now
            log.warning("%s: saving a checkpoint after this step, then stopping (%s again to stop at once, without "
                        "saving)", name, "Ctrl-C" if signum == signal.SIGINT else name)
            return
        if now - self.requested_at < self.SAME_REQUEST_S:
            return
        last = get_last_checkpoint(self.output_dir) if self.output_dir and os.path.isdir(self.output_dir) else None
        log.error("second signal (%s): stopping now, without saving the step in progress; %s", name,
                  f"the last checkpoint, {last}, is intact: resume_from_checkpoint = {last} continues from it"
                  if last else "no checkpoint was saved in this run")
        self._restore()
        signal.raise_signal(signum)  # the signal's own behaviour: KeyboardInterrupt, or the process ends

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.requested is not None
        if self.agree is not None:
            stop = self.agree(stop)
        if stop:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_by = self.requested or signal.SIGTERM

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}


def _table(args) -> str:
    """The command line's table for this config: sft (vf-sft) or rl (vf-rl)."""
    return "rl" if getattr(args, "run_name_prefix", "sft") == "rl" else "sft"


class OutOfMemory(VFTrainError):
    """A step did not fit in GPU memory; the message names the settings to change and any checkpoint saved."""


def oom_message(args, step: int, saved: str | None = None) -> str:
    """What to turn when optimizer step `step + 1` does not fit in GPU memory (and where the run was saved)."""
    knobs = []
    if not args.micro_batch_tokens:  # under a budget the budget, not micro_batch_size, sizes a forward
        knobs.append(f"lower micro_batch_size (now {args.micro_batch_size} rows per forward)")
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
    if args.master_weights is True and not args.use_lora:
        knobs.append("set master_weights = 'kahan-bf16' (6 bytes less per parameter, updates kept) or false (8 "
                     "bytes less; pure bf16 loses small updates)")
    where = (f"; the {step} finished steps are saved in {saved}: resume with "
             f"--{_table(args)}.resume_from_checkpoint latest"
             if saved else "")
    return f"out of GPU memory at optimizer step {step + 1}: " + ", or ".join(knobs) + where
