"""A run's life in its output_dir, shared by the SFT and RL trainers (a mixin of `VFTrainer`): the folder claimed by
one run at a time (`start_run`), training started or continued from a checkpoint (`train`), checkpoints written
atomically (`_save_checkpoint`).

A resume restores what the checkpoint holds: the weights, the optimizer's moments, the step, the RNG and the data
position. Everything else is the config's, as the config file then saved beside the run says: the learning rate,
its schedule and length (max_steps, num_train_epochs), weight decay, Adam's betas and epsilon, and how often to
log, evaluate and save. transformers restores its optimizer's and scheduler's state dicts, hyperparameters
included, and its logging, eval and save steps from the checkpoint: a finished cosine run continued to more steps
trained its next step at learning rate 0, and a new learning_rate or logging_steps was ignored without a word.
"""

from __future__ import annotations

import hashlib
import logging
import os

import torch
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import TrainOutput

from vftrain import checkpoint
from vftrain.errors import ConfigError
from vftrain.guards import OutOfMemory, oom_message

log = logging.getLogger("vftrain")

# The config's settings that a resume applies from its first step, logged where they differ from the checkpoint's.
# An optimizer parameter group's settings that come from the config (those an optimizer updates, e.g.
# schedule-free's, are the checkpoint's); `lr` follows from the schedule at the resumed step.
CONFIG_GROUP_KEYS = ("initial_lr", "weight_decay", "betas", "eps")
SCHEDULE_FIELDS = ("learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "max_steps",
                   "num_train_epochs", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "logging_steps",
                   "eval_steps", "save_steps")
# RL's: what a step samples and how it is scored; a change there changes what `reward` means from that step on.
OBJECTIVE_FIELDS = ("reward_funcs", "reward_weights", "scale_rewards", "temperature", "top_p", "max_new_tokens",
                    "beta", "env", "env_args")


def same_resume_everywhere(resume: str | None) -> None:
    """Each process resolves 'latest' on its own: a checkpoint published between their lookups (an earlier job still
    finishing) made one process resume from it and another from the one before (or take the run for finished and
    leave the other waiting in a collective). Refused on every process, before anything in the folder moves; every
    process must call it at the same point."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, gather_object

    if PartialState().num_processes == 1:
        return
    first = broadcast_object_list([resume])[0]
    if any(gather_object([first != resume])):
        raise ConfigError(f"the processes found different checkpoints to resume from ({first} on the first); one "
                          "was being written as this run started: start it again once the earlier run has ended")


class RunFolder:
    def start_run(self, resume=None) -> None:
        """Claim output_dir for this run before anything is written there (`train` calls it; the CLI calls it
        earlier, before its held-out generation): another run's outputs refuse a new run unless
        `overwrite_output_dir` deletes them, and a run still going there refuses any; a resumed run's later log
        lines are dropped (`checkpoint.start_run`). Then the resolved config is written. Every process calls it (the
        checks raise on all of them)."""
        if self.run_started:
            return
        same_resume_everywhere(resume)
        if resume is not None and self.args.overwrite_output_dir and checkpoint.inside(self.args, resume):
            raise ConfigError("overwrite_output_dir deletes the checkpoints that resume_from_checkpoint would "
                              "continue; set one of them")
        model = self.accelerator.unwrap_model(self.model)
        bases = [c.base_model_name_or_path for c in getattr(model, "peft_config", {}).values()]
        checkpoint.check_inputs_kept(self.args, [p for p in (self.model_source, *bases) if isinstance(p, str)])
        checkpoint.check_same_model(self.args, resume, self.model_source, model.config)
        self._claim()
        if self.args.should_save:
            checkpoint.start_run(self.args, resume)
            self.save_resolved_config(self.args.output_dir)
        else:
            checkpoint.check_output_dir(self.args, resume)
        self.accelerator.wait_for_everyone()
        self.run_started = True

    def _claim(self) -> None:
        """output_dir locked for this run (`checkpoint.claim`) on the main process, or refused on every process."""
        busy = checkpoint.claim(self.args.output_dir, self) if self.args.should_save else None
        if self._agree(busy is not None) if self._agree else busy:  # every process raises, none waits for the rest
            raise ConfigError(busy or f"output_dir {self.args.output_dir!r} is in use by another run")

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """transformers' training loop, continued from `resume_from_checkpoint` (default: the config's; transformers
        reads neither): a checkpoint folder, or 'latest' (or True), the newest checkpoint in output_dir or a fresh
        start when there is none, as vf-sft reads it. A checkpoint that ends the run trains nothing (logged) and
        loads its weights, so that `save_model()` saves those. Out of GPU memory, the finished steps are saved (one
        process) and the error names the settings to change."""
        resume = self.resume_point(resume_from_checkpoint)
        if resume is None and self.state.global_step:  # transformers would start over, over this run's checkpoints
            raise ConfigError(f"train() already ran {self.state.global_step} steps on this trainer: continue with "
                              "train(resume_from_checkpoint='latest') and a larger max_steps, or build a new trainer "
                              "for a new run (another run_name or output_dir)")
        if checkpoint.finished(self.args, resume):
            if self.is_deepspeed_enabled:  # transformers loads its weights only into the engine training builds
                raise ConfigError(f"{resume} ends the run; under DeepSpeed train() cannot load its weights without "
                                  f"training: its model folder is {resume} (from_pretrained loads it)")
            if not checkpoint.newest(self.args, resume):  # the later continuation is set aside
                self.start_run(resume)
            elif not self.run_started:  # the folder stays as it is, claimed for the save_model() that may follow
                self._claim()
            self.state = TrainerState.load_from_json(os.path.join(resume, "trainer_state.json"))
            self._sharded_before_training()  # FSDP: sharded first, as the training loop does before it loads
            self._load_from_checkpoint(resume)
            return TrainOutput(self.state.global_step, float("nan"), {})  # no step taken: no training loss
        self.start_run(resume)
        self._warn_on_changes(resume)
        if resume is not None:
            self._load_extra_state(resume)
        try:
            out = super().train(resume, *args, **kwargs)
        except torch.OutOfMemoryError as exc:
            raise OutOfMemory(oom_message(self.args, self.state.global_step, self._save_after_oom())) from exc
        return TrainOutput(out.global_step, out.metrics.get("train_loss", out.training_loss), out.metrics)

    def _whole_run_loss(self, train_loss: float) -> float:
        """transformers' `train_loss` is the mean loss of this call's steps; after a resume, the whole run's, as a
        straight run's: the steps before it from the checkpoint's log (a loss line at every checkpoint,
        `LogAtSaves`). Left as transformers' where that log does not reach the resumed step."""
        start, end = getattr(self, "_initial_global_step", 0), self.state.global_step
        if not start or end <= start:
            return train_loss
        before = last = 0
        for entry in self.state.log_history:  # each loss line is the mean over the steps since the one before
            step = entry.get("step", 0)
            if "loss" in entry and last < step <= start:
                before, last = before + entry["loss"] * (step - last), step
        return (before + train_loss * (end - start)) / end if last == start else train_loss

    def resume_point(self, value: str | bool | None = None) -> str | None:
        """The checkpoint folder `value` (default: args.resume_from_checkpoint) names, None for a fresh start."""
        from vftrain.cli.args import resume_point

        self.args.check_resume(self.args.resume_from_checkpoint if value is None else value)
        return resume_point(self.args, value)

    def _warn_on_changes(self, resume) -> None:
        """A resume continues exactly only on the same data plan: say so when a setting that decides it, or the
        rows themselves, changed; and say which schedule settings now differ from the checkpoint's."""
        if resume is None or not self.args.should_log:
            return
        config = self.args.to_dict()
        changes = checkpoint.data_changes(resume, config, self._rows_fingerprint())
        if changes:
            log.warning("resuming from %s with other data settings (%s): the steps after it train on other rows "
                        "than the original run would have", resume, "; ".join(changes))
        schedule = checkpoint.setting_changes(resume, config, SCHEDULE_FIELDS)
        if schedule:
            log.info("resuming from %s with other settings (%s): they apply from its next step", resume,
                     "; ".join(schedule))
        objective = checkpoint.setting_changes(resume, config, OBJECTIVE_FIELDS)
        if objective:
            log.warning("resuming from %s with another objective (%s): from its next step the logged reward is "
                        "another measure than before", resume, "; ".join(objective))

    def data_fingerprint(self) -> str | None:
        """A digest of the training rows (tokens and masks, or prompts and references), saved with the config: a
        resume on rows that changed under the same path is said. None: not known."""
        parts = self._data_parts()
        if parts is None:
            return None
        digest = hashlib.blake2b(digest_size=16)
        for part in parts:
            digest.update(part)
        return digest.hexdigest()

    def _data_parts(self) -> list | None:
        """The buffers (bytes, contiguous arrays) the training rows are fingerprinted by (each trainer's own)."""
        return None

    # ---- what a resume takes from the config (transformers restores the checkpoint's)
    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """transformers' schedule; then the config's optimizer settings and the schedule's initial learning rates are
        noted, before any checkpoint loads (DeepSpeed loads its optimizer's state before `_load_optimizer_and_scheduler`
        runs, so they are noted here rather than there)."""
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        groups = (optimizer or self.optimizer).param_groups
        self._config_groups = [{k: group[k] for k in CONFIG_GROUP_KEYS if k in group} for group in groups]
        self._config_base_lrs = list(getattr(scheduler, "base_lrs", []))
        return scheduler

    def _load_optimizer_and_scheduler(self, checkpoint_dir) -> None:
        super()._load_optimizer_and_scheduler(checkpoint_dir)
        fresh = getattr(self, "_config_groups", None)
        if checkpoint_dir is None or self.optimizer is None or fresh is None:
            return
        for group, settings in zip(self.optimizer.param_groups, fresh):
            group.update(settings)  # the config's weight decay, betas, eps and the schedule's initial lr
        base_lrs, lambdas = self._config_base_lrs, getattr(self.lr_scheduler, "lr_lambdas", None)
        if lambdas and len(base_lrs) == len(lambdas):  # transformers' schedules are LambdaLRs
            self.lr_scheduler.base_lrs = list(base_lrs)
            step = self.lr_scheduler.last_epoch
            for group, lr, at in zip(self.optimizer.param_groups, base_lrs, lambdas):
                group["lr"] = lr * at(step)
            self.lr_scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _load_callback_state(self) -> None:
        """Right after transformers reads the checkpoint's trainer_state.json (which holds the old logging, eval and
        save steps and batch size): the config's put back."""
        super()._load_callback_state()
        max_steps = self.args.max_steps if self.args.max_steps > 0 else self.state.max_steps
        self.state.compute_steps(self.args, max_steps)
        self.state.train_batch_size = self._train_batch_size

    # ---- checkpoints
    def _save_checkpoint(self, model, trial):
        """transformers' checkpoint, written to a staging folder and then renamed into place (atomic); never of a
        step whose non-finite loss is still unread (the guard reads it on the save paths it knows; this is the
        backstop for the others)."""
        self.nan_guard.resolve(self.args)
        run_dir = self._get_output_dir(trial=trial)
        folder = f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            checkpoint.clear_staging(run_dir)
        self.accelerator.wait_for_everyone()
        self._staging_for = run_dir
        try:
            super()._save_checkpoint(model, trial)
            self._save_extra_state(os.path.join(checkpoint.staging_dir(run_dir), folder))
        finally:
            self._staging_for = None
        self.accelerator.wait_for_everyone()
        best = self.state.best_model_checkpoint  # transformers named it in the staging folder
        if best:  # on every process: each loads it at the end (load_best_model_at_end)
            self.state.best_model_checkpoint = best.replace(checkpoint.staging_dir(run_dir), run_dir)
        if self.args.should_save:
            checkpoint.publish(run_dir, folder)
            if best:  # the checkpoint's own trainer_state.json too, which a resume reads
                self.state.save_to_json(os.path.join(run_dir, folder, "trainer_state.json"))
            checkpoint.rotate(self, run_dir)
        self.accelerator.wait_for_everyone()

    def _save_extra_state(self, folder: str) -> None:
        """A subclass's own state, written into the checkpoint folder before it is published."""

    def _load_extra_state(self, folder: str) -> None:
        """What `_save_extra_state` wrote, read before training resumes from `folder` (before the first step's
        `get_batch_samples`, which the Trainer calls before it restores its own RNG state)."""

    def _get_output_dir(self, trial):
        run_dir = super()._get_output_dir(trial)
        return checkpoint.staging_dir(run_dir) if getattr(self, "_staging_for", None) == run_dir else run_dir

    def save_resolved_config(self, directory: str) -> str:
        return self.args.save_resolved(directory, extra={"model": self.model_source, "dataset": self.args.dataset,
                                                         "train_rows": self._rows_fingerprint()})

    def _rows_fingerprint(self) -> str | None:
        if "_fingerprint" not in self.__dict__:  # once: the rows do not change during a run
            self._fingerprint = self.data_fingerprint()
        return self._fingerprint
