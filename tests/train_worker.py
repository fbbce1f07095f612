"""Subprocess body for the checkpoint, guard and multi-process tests: train the tiny model (one process, or one of
torchrun's), optionally signalling itself, stalling or getting a NaN loss at a step; or evaluate; or only build
the config. `python tests/train_worker.py --help` lists the options."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import time

import datasets
import torch
from transformers import TrainerCallback

import vftrain as vf
import vftrain.sft.trainer as trainer_module
from conftest import TINY, addition_rows
from vftrain.guards import NonFiniteLossError, close_process_group

RANK = os.environ.get("RANK", "0")


class KillAt(TrainerCallback):
    """SIGKILL (a crash: no cleanup, no save), SIGINT (Ctrl-C) or SIGTERM (preemption) this process at a step;
    under torchrun only the process of rank `rank`, if given."""

    def __init__(self, step: int, sig: int, rank: str | None = None):
        self.step, self.sig, self.rank = step, sig, rank

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and self.rank in (None, RANK):
            os.kill(os.getpid(), self.sig)


class StallAt(TrainerCallback):
    """A very long optimizer step `step` (as under torch_compile): writes `<out>/stalled`, then sleeps."""

    def __init__(self, step: int, out_dir: str):
        self.step, self.marker = step, pathlib.Path(out_dir) / "stalled"

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self.marker.write_text("")
            time.sleep(120)


class Snapshots(TrainerCallback):
    """Sum of all weights after every step, and the final weights, written per process to <out>/weights-<rank>.pt."""

    def __init__(self, out_dir: str):
        self.path, self.sums = pathlib.Path(out_dir) / f"weights-{RANK}.pt", {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.sums[state.global_step] = sum(p.detach().double().sum() for p in model.parameters()).item()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        torch.save({"sums": self.sums, "final": {n: p.detach().clone() for n, p in model.named_parameters()}},
                   self.path)


def poison(trainer, step: int) -> None:
    """This process's loss is NaN during optimizer step `step` (1-based)."""
    real = trainer_module.linear_cross_entropy_sum

    def poisoned(*args, **kwargs):
        loss, correct = real(*args, **kwargs)
        return (loss * float("nan"), correct) if trainer.state.global_step == step - 1 else (loss, correct)

    trainer_module.linear_cross_entropy_sum = poisoned


def config(opts, **overrides) -> vf.SFTConfig:
    base = dict(output_dir=opts.out_dir, max_steps=opts.max_steps, batch_size=8, micro_batch_size=4, max_seq_len=64,
                learning_rate=3e-3, logging_steps=1, save_steps=2, save_total_limit=2, disable_tqdm=True, seed=0,
                dataloader_pin_memory=False, warmup_steps=2, nan_policy=opts.nan_policy)
    return vf.SFTConfig(**{**base, **overrides})


def train(opts) -> None:
    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(opts.rows)),
                            args=config(opts))
    if opts.kill_at:
        trainer.add_callback(KillAt(opts.kill_at, opts.kill_signal, opts.rank))
    if opts.stall_at:
        trainer.add_callback(StallAt(opts.stall_at, opts.out_dir))
    if opts.nan_at and opts.rank in (None, RANK):
        poison(trainer, opts.nan_at)
    if opts.snapshots:
        trainer.add_callback(Snapshots(opts.out_dir))
    # --resume-skew: each process was given its own checkpoint, as when one is published between the processes'
    # lookups of 'latest' (rank r: checkpoint-(2 + 2r))
    resume = os.path.join(opts.out_dir, f"checkpoint-{2 + 2 * int(RANK)}") if opts.resume_skew else opts.resume
    try:
        trainer.train(resume_from_checkpoint=resume or None)
    except NonFiniteLossError:
        (pathlib.Path(opts.out_dir) / f"stopped-{RANK}").write_text("")
        raise


def best(opts) -> None:
    """Evaluate and save every step and load the best checkpoint at the end (load_best_model_at_end); every process
    writes its final weights (Snapshots). "Best" is the highest eval loss, an early step's, so that the loaded
    weights differ from the last step's."""
    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(opts.rows)),
                            args=config(opts, eval_size=8, eval_strategy="steps", eval_steps=1, save_steps=1,
                                        save_total_limit=None, load_best_model_at_end=True, learning_rate=3e-2,
                                        metric_for_best_model="eval_loss", greater_is_better=True))
    trainer.add_callback(Snapshots(opts.out_dir))
    trainer.train()


def evaluate(opts) -> None:
    """eval metrics of the untrained model on `opts.rows` held-out rows, written by rank 0 to <out>/eval.json."""
    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(8)),
                            eval_dataset=datasets.Dataset.from_list(addition_rows(opts.rows, start=500)),
                            args=config(opts, micro_batch_size=opts.micro_batch_size,
                                        batch_size=opts.micro_batch_size * int(os.environ.get("WORLD_SIZE", "1"))))
    metrics = trainer.evaluate()
    if RANK == "0":
        (pathlib.Path(opts.out_dir) / "eval.json").write_text(json.dumps(metrics))


def run_name(opts, output_dir=None) -> None:
    """Only the config, with no run_name (and `output_dir` or none); rank 1 builds it 1.1 s after rank 0 (in another
    second)."""
    started = pathlib.Path(opts.out_dir) / "rank-0-started"
    if RANK == "0":
        os.makedirs(opts.out_dir, exist_ok=True)
        started.write_text("")
    else:
        while not started.exists():
            time.sleep(0.05)
        time.sleep(1.1)
    cfg = vf.SFTConfig(max_steps=1, batch_size=8, micro_batch_size=4, output_dir=output_dir)
    (pathlib.Path(opts.out_dir) / f"run_name-{RANK}.txt").write_text(f"{cfg.run_name} {cfg.output_dir}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--mode", choices=("train", "evaluate", "best", "run_name", "run_name_in_dir"),
                        default="train")
    parser.add_argument("--max-steps", type=int, default=7)
    parser.add_argument("--rows", type=int, default=24, help="training rows: 3 steps of 8 per epoch")
    parser.add_argument("--resume", action="store_true", help="resume_from_checkpoint latest")
    parser.add_argument("--resume-skew", action="store_true", help="rank r resumes from checkpoint-(2 + 2r)")
    parser.add_argument("--kill-at", type=int, default=0, help="send --signal to this process after that step")
    # not --signal: torchrun would take it for an abbreviation of its own --signals-to-handle
    parser.add_argument("--kill-signal", type=int, default=int(signal.SIGKILL))
    parser.add_argument("--rank", help="only this rank is signalled / gets the NaN")
    parser.add_argument("--stall-at", type=int, default=0, help="step that takes 2 minutes")
    parser.add_argument("--nan-at", type=int, default=0, help="step whose loss is NaN")
    parser.add_argument("--nan-policy", default="stop")
    parser.add_argument("--snapshots", action="store_true", help="write weights-<rank>.pt")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    opts = parser.parse_args()
    {"train": train, "evaluate": evaluate, "best": best, "run_name": run_name,
     "run_name_in_dir": lambda o: run_name(o, os.path.join(o.out_dir, "given"))}[opts.mode](opts)
    close_process_group()  # as vf-sft does (vftrain/guards.py)


if __name__ == "__main__":
    main()
