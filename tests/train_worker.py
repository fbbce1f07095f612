"""Subprocess body for tests/test_checkpoint.py: train the tiny model, optionally SIGKILL itself at a step."""

from __future__ import annotations

import os
import signal
import sys

import datasets
from transformers import TrainerCallback

import vftrain as vf
from conftest import TINY, addition_rows


class KillAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final save: a real crash


def main(out_dir: str, max_steps: int, kill_at: int, resume: bool) -> None:
    cfg = vf.SFTConfig(output_dir=out_dir, max_steps=max_steps, batch_size=8, micro_batch_size=4, max_seq_len=64,
                       learning_rate=3e-3, logging_steps=1, save_steps=2, save_total_limit=2, disable_tqdm=True,
                       seed=0, dataloader_pin_memory=False, warmup_steps=2)
    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(20)), args=cfg)
    if kill_at:
        trainer.add_callback(KillAt(kill_at))
    trainer.train(resume_from_checkpoint=True if resume else None)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1")
