"""The update is the mean over the step's trained tokens: it does not depend on how the step is split into
micro-batches, on packing versus padding, or on which rows share a packed micro-batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY, addition_rows, small_config
from vftrain.data.collate import collate_packed, trained_index
from vftrain.loss import cross_entropy_sum, select_trained


def _one_step(tmp_path, rows, **overrides):
    import datasets

    import vftrain as vf

    cfg = small_config(tmp_path, max_steps=1, batch_size=8, optim="sgd", learning_rate=1.0, warmup_steps=0,
                       lr_scheduler_type="constant", max_grad_norm=0.0, **overrides)
    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(rows), args=cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    delta = {n: before[n] - p.detach() for n, p in trainer.model.named_parameters()}  # = lr * grad
    return trainer.state.log_history[0]["loss"], delta


def _rows():
    # Rows of different lengths, so that a per-micro-batch mean would weigh tokens differently.
    rows = addition_rows(8)
    for i, r in enumerate(rows):
        r["completion"][0]["content"] = r["completion"][0]["content"] * (1 + i % 3)
    return rows


@pytest.mark.parametrize("packing,split", [(True, {"micro_batch_size": 2}), (False, {"micro_batch_size": 2}),
                                           (True, {"micro_batch_size": 8, "micro_batch_tokens": 64})])
def test_same_update_for_any_micro_batch_split(tmp_path, packing, split):
    """(micro 8, accumulation 1) against (micro 2, accumulation 4), or against one slot of 8 rows run as
    several forwards of at most 64 tokens (micro_batch_tokens)."""
    loss_a, grads_a = _one_step(tmp_path / "a", _rows(), micro_batch_size=8, packing=packing)
    loss_b, grads_b = _one_step(tmp_path / "b", _rows(), packing=packing, **split)
    assert loss_a == pytest.approx(loss_b, abs=1e-4)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)
    assert max(float(g.abs().max()) for g in grads_a.values()) > 1e-3  # the step really moved the weights


def test_a_budget_without_micro_batch_size_packs_the_fewest_forwards(tmp_path):
    """micro_batch_tokens with micro_batch_size unset: each process's share of the step is one slot, packed into the
    fewest forwards of at most the budget (best-fit decreasing over all its rows), where 4-row slots each split on
    their own run more; the update is the one of a single unbudgeted forward."""
    import datasets

    import vftrain as vf
    from vftrain.data.pack import split_by_tokens

    rows = addition_rows(16)
    for i, r in enumerate(rows):
        r["completion"][0]["content"] = r["completion"][0]["content"] * (1 + i % 4)

    class Counting(vf.SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            self.forwards = getattr(self, "forwards", 0) + len(inputs.get("micro_batches") or [inputs])
            return super().training_step(model, inputs, num_items_in_batch)

    def step(name, **split):
        cfg = small_config(tmp_path / name, max_steps=1, batch_size=16, optim="sgd", learning_rate=1.0,
                           warmup_steps=0, max_grad_norm=0.0, **split)
        trainer = Counting(model=TINY, train_dataset=datasets.Dataset.from_list(rows), args=cfg)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        return trainer, {n: before[n] - p.detach() for n, p in trainer.model.named_parameters()}

    filled, grads = step("filled", micro_batch_size=None, micro_batch_tokens=96)
    assert (filled.args.micro_batch_size, filled.args.gradient_accumulation_steps) == (16, 1)
    assert filled.forwards == len(split_by_tokens(filled.train_rows.lengths.tolist(), 96))
    four, _ = step("four", micro_batch_size=4, micro_batch_tokens=96)
    assert four.forwards > filled.forwards
    _, whole = step("whole", micro_batch_size=16)
    for name in whole:
        torch.testing.assert_close(grads[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_update_equals_padded_update(tmp_path):
    loss_a, grads_a = _one_step(tmp_path / "a", _rows(), micro_batch_size=2, packing=True)
    loss_b, grads_b = _one_step(tmp_path / "b", _rows(), micro_batch_size=2, packing=False)
    assert loss_a == pytest.approx(loss_b, abs=1e-4)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


def _row_losses(model, rows):
    batch = collate_packed(rows)
    labels = batch.pop("labels")
    batch.pop("trained_positions"), batch.pop("trained_flat")
    logits = model(**batch, use_cache=False).logits
    out, start = [], 0
    for ids, _ in rows:
        seg = slice(start, start + len(ids))
        where = _where(labels[:, seg])
        flat, targets = select_trained(logits[:, seg][:, where["positions"]], labels[:, seg], **where)
        out.append(float(cross_entropy_sum(flat, targets)[0]) / len(targets))
        start += len(ids)
    return out


def _where(labels):
    where = trained_index(labels)
    return {"positions": where["trained_positions"], "flat": where["trained_flat"]}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_row_loss_does_not_depend_on_its_pack_neighbours(attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY, attn_implementation=attn)
    rng = np.random.default_rng(0)

    def row(n):
        return rng.integers(0, 95, n), np.r_[np.zeros(n // 2), np.ones(n - n // 2)].astype(np.uint8)

    target, left, other_left, right = row(12), row(7), row(20), row(5)
    with torch.no_grad():
        alone = _row_losses(model, [target])[0]
        assert _row_losses(model, [left, target, right])[1] == pytest.approx(alone, abs=1e-5)
        assert _row_losses(model, [other_left, target])[1] == pytest.approx(alone, abs=1e-5)
