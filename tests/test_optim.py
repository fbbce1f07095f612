"""Float32 master weights: a bf16 model keeps the small updates that pure bf16 AdamW rounds away, its weights are
the rounded master copies, and a resume from a checkpoint continues exactly (the copies are saved)."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

import vftrain as vf
from conftest import TINY, addition_rows, small_config
from vftrain.optim import master_weights


def _train(tmp_path, dtype: str, master: bool | str = True, rows: int = 32, **overrides):
    """3 AdamW steps at lr 1e-5 (a fine-tuning rate) on `rows` rows, unless `overrides` say otherwise; returns the
    trainer and the weights it started from."""
    settings = dict(dtype=dtype, master_weights=master, learning_rate=1e-5, max_steps=3, warmup_steps=0,
                    lr_scheduler_type="constant", micro_batch_size=4)
    args = small_config(tmp_path, **{**settings, **overrides})
    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(rows)), args=args)
    start = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    return trainer, start


def _update(trainer, start, weights=None) -> torch.Tensor:
    weights = weights or {n: p for n, p in trainer.model.named_parameters()}
    return torch.cat([(weights[n].detach().float() - w).flatten() for n, w in start.items()])


def test_master_weights_keep_updates_that_bf16_rounds_away(tmp_path):
    """Against a float32 run: pure bf16 loses most of the update (85% of the weights do not move at all); the
    float32 master copies of a bf16 model follow the float32 update to within a few percent."""
    reference = _update(*_train(tmp_path / "fp32", "float32"))
    pure = _update(*_train(tmp_path / "pure", "bfloat16", master=False))
    mixed, start = _train(tmp_path / "mixed", "bfloat16")
    masters = {n: m for n, p in mixed.model.named_parameters() for q, m in master_weights(mixed.optimizer) if p is q}
    assert len(masters) == len(start)
    master = _update(mixed, start, masters)
    size = reference.abs().mean()
    assert (pure - reference).abs().mean() > 0.5 * size
    assert (master - reference).abs().mean() < 0.05 * size
    assert (pure == 0).float().mean() > 0.5
    for n, p in mixed.model.named_parameters():  # the model holds the rounded master copies, in bf16
        assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), masters[n].to(torch.bfloat16)), n


def test_resume_with_master_weights_is_exact(tmp_path):
    save = dict(save_strategy="steps", save_steps=2, max_steps=4)
    straight, _ = _train(tmp_path / "a", "bfloat16", **save)
    resumed_args = small_config(tmp_path / "a", dtype="bfloat16", master_weights=True, learning_rate=1e-5,
                                warmup_steps=0, lr_scheduler_type="constant", micro_batch_size=4,
                                output_dir=str(tmp_path / "b"), **save)
    resumed = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(32)),
                            args=resumed_args)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))

    def losses(folder):
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}

    a, b = losses(tmp_path / "a" / "out"), losses(tmp_path / "b")
    assert [b[s] for s in (3, 4)] == pytest.approx([a[s] for s in (3, 4)], rel=1e-6)
    for (n, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), n
