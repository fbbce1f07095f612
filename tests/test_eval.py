"""The eval loss (what best-checkpoint selection reads) is the mean over every trained token of the eval set: the
same for any micro_batch_size and number of processes, each row counted once, equal to the mean computed directly
from the model's logits."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import vftrain as vf
from conftest import TINY, addition_rows, run_worker, small_config

EVAL_ROWS = 13  # completions of 2 and 3 digits: rows carry different numbers of trained tokens


def _direct_token_mean(rows) -> float:
    """Cross-entropy of each row alone, summed over its trained tokens, over the total trained tokens."""
    model = AutoModelForCausalLM.from_pretrained(TINY).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in rows:
            logits = model(torch.tensor(ids, dtype=torch.long)[None]).logits[0, :-1].double()
            keep = torch.tensor(mask[1:]) > 0
            targets = torch.tensor(ids[1:], dtype=torch.long)
            total += F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count


def test_eval_loss_is_the_token_mean_for_any_micro_batch_size(tmp_path):
    eval_rows = datasets.Dataset.from_list(addition_rows(EVAL_ROWS, start=500))
    metrics = {}
    # micro_batch_size unset under a 64-token budget: eval micro-batches of up to 8 rows and 64 tokens
    for size, split in ((1, {}), (4, {}), (8, {}), ("budget", dict(micro_batch_tokens=64))):
        micro = dict(micro_batch_size=None if split else size, **split)
        trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(8)),
                                eval_dataset=eval_rows, args=small_config(tmp_path / str(size), **micro))
        metrics[size] = trainer.evaluate()  # each in its own folder: evaluate() claims it (one run per folder)
    direct = _direct_token_mean(trainer.eval_rows)
    for size, m in metrics.items():
        assert m["eval_loss"] == pytest.approx(direct, rel=1e-5), size
        assert m["eval_token_accuracy"] == metrics[1]["eval_token_accuracy"]


def test_eval_loss_on_two_processes_counts_each_row_once(tmp_path):
    """7 micro-batches of 2 rows on 2 processes: one process has one more (accelerate's even batches would have
    given the other a repeated one)."""
    proc = run_worker(tmp_path / "two", processes=2, mode="evaluate", rows=EVAL_ROWS, micro_batch_size=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "eval.json").read_text())
    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(8)),
                            eval_dataset=datasets.Dataset.from_list(addition_rows(EVAL_ROWS, start=500)),
                            args=small_config(tmp_path))
    assert two["eval_loss"] == pytest.approx(_direct_token_mean(trainer.eval_rows), rel=1e-5)


@pytest.mark.parametrize("lockstep", [False, True])
@pytest.mark.parametrize("budget", [None, 20])
def test_eval_batches_give_each_row_to_one_process(lockstep, budget):
    """Over any number of processes every row is counted exactly once; with sharded weights (lockstep) every
    process runs as many forwards, the extra ones not counted; a token budget caps every micro-batch's tokens."""
    from vftrain.data.pack import eval_batches

    lengths = np.array([10, 3, 12, 7] * (EVAL_ROWS // 4) + [5] * (EVAL_ROWS % 4))
    for world in (1, 2, 3, 5, 20):
        shares = [eval_batches(lengths, 3, rank, world, lockstep, budget) for rank in range(world)]
        counted = sorted(row for batches, n in shares for batch in batches[:n] for row in batch)
        assert counted == list(range(EVAL_ROWS)), world
        assert max(len(b) for batches, _ in shares for b in batches) == (3 if budget is None else 2)
        if budget is not None:
            assert max(lengths[b].sum() for batches, _ in shares for b in batches) <= budget
        if lockstep:
            assert len({len(batches) for batches, _ in shares}) == 1

def test_eval_rows_dropped_are_reported_beside_the_train_rows(tmp_path, caplog):
    """eval_loss is over the eval rows that fit: 3 of 5 here. The 2 dropped were never said (only the train rows'
    report was logged), so the eval loss looked like the whole split's."""
    long = {"prompt": [{"role": "user", "content": "x" * 80}], "completion": [{"role": "assistant", "content": "1"}]}
    held = datasets.Dataset.from_list(addition_rows(3, start=50) + [long, long])
    with caplog.at_level("INFO", logger="vftrain"):
        trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(16)),
                                eval_dataset=held, args=small_config(tmp_path))
    assert len(trainer.eval_rows) == 3
    assert "eval data: 3 rows kept from 5 dataset rows (prompt_completion format)" in caplog.text
    assert "eval data: 2 rows dropped: longer than max_seq_len (64) (first: row 3)" in caplog.text


def test_evaluate_without_eval_rows_or_with_a_dataset_given_to_it(tmp_path):
    """transformers' evaluate(eval_dataset=...) took a datasets.Dataset, which vftrain never tokenized
    (AttributeError: no attribute 'lengths'), as with no eval rows at all; RL's evaluate() was transformers'
    "requires an eval_dataset" traceback. Now a given dataset is tokenized as the eval split is, and the others
    say what to do in one line."""
    from rl_worker import config as rl_config
    from vftrain.errors import ConfigError

    train, held = datasets.Dataset.from_list(addition_rows(16)), datasets.Dataset.from_list(addition_rows(6, 50))
    given = vf.SFTTrainer(model=TINY, train_dataset=train, args=small_config(tmp_path / "a"))
    with pytest.raises(ConfigError, match=r"^evaluate\(\) needs held-out rows: set eval_split or eval_size"):
        given.evaluate()
    built = vf.SFTTrainer(model=TINY, train_dataset=train, eval_dataset=held, args=small_config(tmp_path / "b"))
    assert given.evaluate(eval_dataset=held)["eval_loss"] == pytest.approx(built.evaluate()["eval_loss"], rel=1e-6)
    rl = vf.RLTrainer(model=TINY, train_dataset=train, args=rl_config(str(tmp_path / "rl"), 1, eval_size=4),
                      reward_funcs=["exact_match"])
    with pytest.raises(ConfigError, match=r"^RLTrainer has no eval loss: evaluate_generations\(\)"):
        rl.evaluate()
