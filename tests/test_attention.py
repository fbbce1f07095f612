"""attn_implementation = "varlen": same outputs and training as SDPA on packed rows (CPU runs its exact
segment-by-segment fallback; the CUDA kernel is compared in benchmarks/)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY, addition_rows, small_config
from vftrain.attention import cu_seqlens_from_positions
from vftrain.data.collate import collate_packed
from vftrain.errors import ConfigError


def _model(attn):
    import vftrain as vf

    model, _ = vf.get_model_and_tokenizer(TINY, attn_implementation=attn)
    return model.eval()


def test_varlen_matches_sdpa_on_packed_rows():
    rng = np.random.default_rng(0)
    rows = [(rng.integers(0, 95, n), np.ones(n, dtype=np.uint8)) for n in (5, 11, 3)]
    batch = collate_packed(rows)
    for key in ("labels", "trained_positions", "trained_flat"):
        batch.pop(key)
    with torch.no_grad():
        sdpa = _model("sdpa")(**batch, use_cache=False).logits
        varlen = _model("varlen")(**batch, use_cache=False).logits
        # Without the ready-made boundaries, they are derived from position_ids.
        derived = _model("varlen")(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                   use_cache=False).logits
    torch.testing.assert_close(varlen, sdpa, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(derived, sdpa, rtol=1e-5, atol=1e-5)


def test_cu_seqlens_from_positions():
    cu, longest = cu_seqlens_from_positions(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
    assert cu.tolist() == [0, 3, 5, 9] and longest == 4 and cu.dtype == torch.int32


def test_varlen_trains_like_sdpa(tmp_path):
    import datasets

    import vftrain as vf

    losses = {}
    for attn in ("sdpa", "varlen"):
        cfg = small_config(tmp_path / attn, attn_implementation=attn, max_steps=3)
        trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(32)), args=cfg)
        trainer.train()
        losses[attn] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses["varlen"] == pytest.approx(losses["sdpa"], abs=1e-4)


def test_varlen_without_packing_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="varlen' needs packing = true"):
        small_config(tmp_path, attn_implementation="varlen", packing=False)
