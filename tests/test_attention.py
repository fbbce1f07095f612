"""attn_implementation = "varlen": same outputs and training as SDPA on packed rows, sliding windows honoured,
what the kernel cannot do refused, generation working; "auto" choosing it only where it applies (CPU runs the exact
segment-by-segment fallback; the CUDA kernel is compared in benchmarks/gpu_check.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY, addition_rows, small_config, tiny_tokenizer
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


def _tiny(model_type, attn, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=128, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn).eval()


@pytest.mark.parametrize("model_type, extra", [
    ("mistral", dict(sliding_window=4)),
    ("gemma2", dict(sliding_window=4, attn_logit_softcapping=None, final_logit_softcapping=None)),
])
def test_varlen_honours_sliding_windows(model_type, extra):
    """Each packed row under varlen equals that row alone under eager attention, with a window shorter than the
    rows (Gemma 2 alternates sliding and full layers)."""
    from vftrain import attention

    attention.register()
    lengths = (9, 3, 12)
    rng = np.random.default_rng(0)
    rows = [(rng.integers(3, 128, n), np.ones(n, dtype=np.uint8)) for n in lengths]
    batch = collate_packed(rows)
    for key in ("labels", "trained_positions", "trained_flat"):
        batch.pop(key)
    eager = _tiny(model_type, "eager", **extra)
    varlen = _tiny(model_type, "eager", **extra)
    varlen.set_attn_implementation("varlen")
    with torch.no_grad():
        packed = varlen(**batch, use_cache=False).logits[0]
        alone = torch.cat([eager(input_ids=torch.as_tensor(ids)[None], use_cache=False).logits[0] for ids, _ in rows])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_window_matches_transformers_sliding_window_semantics():
    from vftrain.attention import window_size

    # transformers: a query sees itself and the sliding_window - 1 keys before it; the kernel's left count excludes
    # the query itself; (-1, 0) is plain causal.
    assert window_size(4) == (3, 0) and window_size(None) == (-1, 0)


@pytest.mark.parametrize("model_type, extra, feature", [
    ("gemma2", dict(attn_logit_softcapping=50.0), "soft-capping"),
    ("gpt_oss", dict(num_local_experts=2, num_experts_per_tok=1), "sinks"),
])
def test_varlen_refuses_what_the_kernel_cannot_do_and_auto_falls_back(model_type, extra, feature, monkeypatch):
    import vftrain as vf
    from vftrain import attention

    monkeypatch.setattr(attention, "kernel_available", lambda device=None: True)  # as on a CUDA machine
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    tok = vf.get_model_and_tokenizer(TINY)[1]
    with pytest.raises(ConfigError, match=f"varlen' cannot run this model here: .*{feature}"):
        vf.get_model_and_tokenizer(_tiny(model_type, "eager", **extra), attn_implementation="varlen", tokenizer=tok)
    model, _ = vf.get_model_and_tokenizer(_tiny(model_type, "eager", **extra), attn_implementation="auto",
                                          tokenizer=tok)
    assert model.config._attn_implementation in ("sdpa", "eager")
    with pytest.raises(ValueError, match="cannot apply attention logit soft-capping"):  # a model not caught above
        attention.varlen_attention_forward(None, *[torch.zeros(1, 2, 3, 4)] * 3, softcap=30.0)


def test_auto_picks_varlen_for_packed_rows_where_the_kernel_exists(monkeypatch):
    import vftrain as vf
    from vftrain import attention

    def chosen(packing, kernel):
        monkeypatch.setattr(attention, "kernel_available", lambda device=None: kernel)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        return vf.get_model_and_tokenizer(TINY, packing=packing, dtype="bfloat16")[0].config._attn_implementation

    assert chosen(packing=True, kernel=True) == "varlen"
    assert chosen(packing=False, kernel=True) == "sdpa"
    assert chosen(packing=True, kernel=False) == "sdpa"  # CPU: packed SDPA with a block-causal mask
    assert vf.get_model_and_tokenizer(TINY, attn_implementation="eager")[0].config._attn_implementation == "eager"


def test_generation_works_under_varlen():
    """Batched (left-padded) and single prompts, with a KV cache: the same text as SDPA, varlen restored after."""
    from vftrain.sampling.embedded import generate

    tok = tiny_tokenizer()
    prompts = [[{"role": "user", "content": "12+34"}], [{"role": "user", "content": "1+2"}]]
    expected = generate(_model("sdpa"), tok, prompts, max_new_tokens=6)
    model = _model("varlen")
    assert generate(model, tok, prompts, max_new_tokens=6) == expected
    assert generate(model, tok, prompts[:1], max_new_tokens=6) == expected[:1]
    assert model.config._attn_implementation == "varlen"


def test_samples_and_end_of_run_generation_under_varlen(tmp_path):
    """Sample panels during training and eval_generation_rows after it are generated, not skipped or crashing."""
    import datasets

    import vftrain as vf
    from vftrain.sampling.callback import SampleCallback

    cfg = small_config(tmp_path, attn_implementation="varlen", sample_every_n_steps=1, num_samples=2,
                       max_new_tokens=3)
    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(24)), args=cfg)
    trainer.train()
    sampler = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SampleCallback))
    assert {h["step"] for h in sampler.history} == {1, 2} and len(sampler.history) == 4
    assert trainer.evaluate_generations(addition_rows(2, start=50), max_new_tokens=3)["n"] == 2
