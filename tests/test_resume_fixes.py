"""Run folders and resume (review of 2026-12 merges): the config's `resume_from_checkpoint` and 'latest' through the
Python API, 'latest' on a folder without a checkpoint, evaluation before training, the data-change warning for
eval_size, overwrite_output_dir and the input model, a requeued finished run, and RL's rollouts.jsonl after a
restart."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import pytest

from transformers import TrainerCallback

import vftrain as vf
from conftest import TINY, addition_rows, small_config
from vftrain.errors import ConfigError


def _rows(n=64):
    return datasets.Dataset.from_list(addition_rows(n))


def _sft(tmp_path, **overrides):
    """An SFT trainer on the tiny model writing checkpoints every 2 steps to tmp_path/out."""
    args = small_config(tmp_path, **{**dict(save_strategy="steps", save_steps=2), **overrides})
    return vf.SFTTrainer(model=TINY, train_dataset=_rows(), args=args)


def _trained(trainer) -> list[int]:
    """The steps `trainer` will train (filled in as it trains)."""
    steps = []

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    trainer.add_callback(Count())
    return steps


def _logged(run: Path, key="loss") -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


# ---- 1. the config's resume_from_checkpoint, and 'latest' as train()'s argument
def test_config_latest_continues_through_the_python_api(tmp_path):
    run = tmp_path / "out"
    _sft(tmp_path, max_steps=2).train()
    trainer = _sft(tmp_path, max_steps=3, resume_from_checkpoint="latest")
    steps = _trained(trainer)
    trainer.train()
    assert steps == [3] and _logged(run) == [1, 2, 3]  # from checkpoint-2, earlier lines kept


def test_latest_as_the_train_argument(tmp_path):
    run = tmp_path / "out"
    fresh = _sft(tmp_path, max_steps=2)
    fresh.train(resume_from_checkpoint="latest")  # no checkpoint yet: a fresh start
    assert fresh.state.global_step == 2 and _logged(run) == [1, 2]
    again = _sft(tmp_path, max_steps=4)
    steps = _trained(again)
    again.train(resume_from_checkpoint="latest")
    assert steps == [3, 4] and _logged(run) == [1, 2, 3, 4]
