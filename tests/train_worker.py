"""Subprocess body for tests/test_checkpoint.py: train the tiny model, optionally signal itself at a step."""

from __future__ import annotations

import os
import signal
import sys

import datasets
import torch
from transformers import TrainerCallback

import vftrain as vf
from conftest import TINY, addition_rows


class KillAt(TrainerCallback):
    """SIGKILL (a crash: no cleanup, no save), SIGINT (Ctrl-C) or SIGTERM (preemption) this process at a step;
    under torchrun only the process of rank `rank`, if given."""

    def __init__(self, step: int, sig: int, rank: str | None = None):
        self.step, self.sig, self.rank = step, sig, rank

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and self.rank in (None, os.environ.get("RANK", "0")):
            os.kill(os.getpid(), self.sig)


def main(out_dir: str, max_steps: int, kill_at: int, resume: bool, sig: int = signal.SIGKILL,
         rank: str | None = None) -> None:
    cfg = vf.SFTConfig(output_dir=out_dir, max_steps=max_steps, batch_size=8, micro_batch_size=4, max_seq_len=64,
                       learning_rate=3e-3, logging_steps=1, save_steps=2, save_total_limit=2, disable_tqdm=True,
                       seed=0, dataloader_pin_memory=False, warmup_steps=2)
    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(20)), args=cfg)
    if kill_at:
        trainer.add_callback(KillAt(kill_at, sig, rank))
    trainer.train(resume_from_checkpoint=True if resume else None)
    if torch.distributed.is_initialized():  # as vf-sft does: gloo's threads can abort an exiting process
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1",
         int(sys.argv[5]) if len(sys.argv) > 5 else signal.SIGKILL, sys.argv[6] if len(sys.argv) > 6 else None)
