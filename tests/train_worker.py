"""Subprocess body for tests/test_checkpoint.py: train the tiny model, optionally signal itself at a step."""

from __future__ import annotations

import os
import signal
import sys

import datasets
from transformers import TrainerCallback

import vftrain as vf
from conftest import TINY, addition_rows


class KillAt(TrainerCallback):
    """SIGKILL (a crash: no cleanup, no save) or SIGINT (Ctrl-C) this process at a step."""

    def __init__(self, step: int, sig: int):
        self.step, self.sig = step, sig

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.sig)


def main(out_dir: str, max_steps: int, kill_at: int, resume: bool, sig: int = signal.SIGKILL) -> None:
    cfg = vf.SFTConfig(output_dir=out_dir, max_steps=max_steps, batch_size=8, micro_batch_size=4, max_seq_len=64,
                       learning_rate=3e-3, logging_steps=1, save_steps=2, save_total_limit=2, disable_tqdm=True,
                       seed=0, dataloader_pin_memory=False, warmup_steps=2)
    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(20)), args=cfg)
    if kill_at:
        trainer.add_callback(KillAt(kill_at, sig))
    trainer.train(resume_from_checkpoint=True if resume else None)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1",
         int(sys.argv[5]) if len(sys.argv) > 5 else signal.SIGKILL)
