"""Model-level helpers: the fused output-head loss equals the loss of the model's own logits on every architecture
family with a logit transform; saved models stop at the end-of-turn token that training teaches; liger-kernel is
applied by default only where it can run."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, addition_rows, small_config, tiny_tokenizer
from vftrain.loss import cross_entropy_sum, linear_cross_entropy_sum
from vftrain.models import head_returns_hidden, logit_softcap, plain_output_head

SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, head_dim=8)
# Every family transformers 5.2x ships (as a causal LM buildable offline) whose logits are not `hidden @ head.T`,
# found by reading what each modeling file does after its lm_head; values far from 1 so that a missed transform
# changes the loss. Soft-capping uses a small cap, where tanh is far from linear.
SCALED = {
    "cohere": dict(logit_scale=4.0),                               # logits * logit_scale
    "cohere2": dict(logit_scale=4.0),
    "granite": dict(logits_scaling=0.25),                          # logits / logits_scaling
    "granitemoe": dict(logits_scaling=0.25, num_local_experts=2, num_experts_per_tok=1),
    "granitemoeshared": dict(logits_scaling=0.25, num_local_experts=2, num_experts_per_tok=1),
    "granitemoehybrid": dict(logits_scaling=0.25, num_local_experts=2, num_experts_per_tok=1, mamba_d_head=8,
                             layer_types=["mamba", "attention"], mamba_n_heads=8, mamba_d_state=8),
    "hyperclovax": dict(logits_scaling=4.0),                       # logits * logits_scaling
    "falcon_h1": dict(lm_head_multiplier=4.0, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8),
    "minicpm3": dict(dim_model_base=8, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                     qk_rope_head_dim=8, v_head_dim=8),             # hidden / (hidden_size / dim_model_base)
}
SOFTCAPPED = {
    "gemma2": dict(final_logit_softcapping=0.5),                   # cap * tanh(logits / cap)
    "gemma3_text": dict(final_logit_softcapping=0.5),
    "gemma4_text": dict(final_logit_softcapping=0.5),
    "vaultgemma": dict(final_logit_softcapping=0.5),
    "nanochat": dict(final_logit_softcapping=0.5),
    "beam": dict(final_logit_softcapping=0.5),
    "recurrent_gemma": dict(logits_soft_cap=0.5, lru_width=32, block_types=["recurrent", "attention"]),
}


def _model(model_type, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**SHAPE, **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # logits of a few units: soft-capping at 0.5 is far from the identity
    return model


def _vftrain_loss(model, ids, labels):
    """The training loss as SFTTrainer computes it: fused with the head where `plain_output_head` allows."""
    head = plain_output_head(model)
    if head is None:
        return cross_entropy_sum(model(input_ids=ids).logits[0], labels)[0], False
    with head_returns_hidden(head):
        hidden = model(input_ids=ids).logits[0]
    return linear_cross_entropy_sum(hidden, head.weight, labels)[0], True


@pytest.mark.parametrize("family", sorted(SCALED) + sorted(SOFTCAPPED))
def test_fused_loss_matches_the_models_own_logits(family):
    from transformers import CONFIG_MAPPING

    if family not in CONFIG_MAPPING:  # beam arrived after transformers 5.17
        pytest.skip(f"this transformers has no {family} models")
    model = _model(family, **{**SCALED, **SOFTCAPPED}[family])
    ids = torch.randint(3, SHAPE["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, SHAPE["vocab_size"], (12,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = F.cross_entropy(model(input_ids=ids).logits[0].float(), labels, reduction="sum")
        loss, fused = _vftrain_loss(model, ids, labels)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    # A scalar factor commutes with the head's matmul, so those stay fused; soft-capping cannot, so it falls back.
    assert fused == (family in SCALED)


def test_softcap_kept_in_a_nested_text_config_is_found():
    """Gemma 3 (vision) and Gemma-3n keep the cap in their text config only; the top level says nothing or None."""
    from transformers import AutoModelForCausalLM, Gemma3Config, Gemma3nConfig

    config = Gemma3Config(text_config={**SHAPE, "vocab_size": 300, "final_logit_softcapping": 0.5},
                          vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, image_size=28, patch_size=14),
                          mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298)
    model = AutoModelForCausalLM.from_config(config)
    assert getattr(model.config, "final_logit_softcapping", None) is None
    assert plain_output_head(model) is None
    gemma3n = Gemma3nConfig()  # building its model needs timm (vision tower); the config is what decides
    assert getattr(gemma3n, "final_logit_softcapping", None) is None and logit_softcap(gemma3n) == 30.0


def _qwen_base_tokenizer():
    """The tiny tokenizer set up like a Qwen2.5 base model: eos <|endoftext|>, its ChatML template trains <|im_end|>."""
    tok = tiny_tokenizer()
    tok.eos_token = "<|endoftext|>"
    return tok


def _eos_ids(folder) -> set[int]:
    eos = json.load(open(os.path.join(folder, "generation_config.json")))["eos_token_id"]
    return {eos} if isinstance(eos, int) else set(eos)


def test_saved_models_stop_at_the_trained_end_of_turn(tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM

    import vftrain as vf

    tok = _qwen_base_tokenizer()
    im_end, endoftext = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    model = AutoModelForCausalLM.from_pretrained(TINY)
    model.generation_config.eos_token_id = endoftext
    cfg = small_config(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    trainer = vf.SFTTrainer(model=model, processing_class=tok, args=cfg,
                            train_dataset=datasets.Dataset.from_list(addition_rows(16)))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "out" / "checkpoint-1", tmp_path / "final"):
        assert {im_end, endoftext} <= _eos_ids(folder), folder


def test_merged_export_stops_at_the_trained_end_of_turn(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from vftrain.models import save_merged

    tok = _qwen_base_tokenizer()
    base = AutoModelForCausalLM.from_pretrained(TINY)
    base.generation_config.eos_token_id = tok.eos_token_id
    merged = save_merged(get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])), tok, str(tmp_path / "m"))
    assert tok.convert_tokens_to_ids("<|im_end|>") in _eos_ids(merged)


def test_liger_is_applied_by_default_only_where_it_can_run(monkeypatch):
    """use_liger unset: patched on a CUDA machine with liger-kernel and kernels for the model type, else not."""
    import sys
    import types

    import vftrain as vf

    patched = []
    fake = types.ModuleType("liger_kernel.transformers.monkey_patch")
    fake.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": None}
    fake._apply_liger_kernel_to_instance = lambda model, **kw: patched.append(model.config.model_type)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", fake)

    def load(use_liger, cuda=True, model_type="llama"):
        from transformers import AutoModelForCausalLM

        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        model = AutoModelForCausalLM.from_pretrained(TINY)
        model.config.model_type = model_type
        patched.clear()
        vf.get_model_and_tokenizer(model, use_liger=use_liger, attn_implementation="sdpa",
                                   tokenizer=tiny_tokenizer(), device="cuda" if cuda else "cpu")
        return bool(patched)

    assert load(None) and load(True)
    assert not load(False)
    assert not load(None, cuda=False)               # its kernels are Triton: GPU only
    assert not load(None, model_type="unknown")     # no kernels for this architecture


def test_model_built_without_weights_matches_the_loaded_one():
    """FSDP ranks that receive their shards from rank 0 build the model empty: no parameter memory, but the same
    architecture, buffers (RoPE frequencies), name and generation config as the loaded model."""
    from vftrain.models import get_model_and_tokenizer

    loaded, _ = get_model_and_tokenizer(TINY, dtype="bfloat16")
    empty, _ = get_model_and_tokenizer(TINY, dtype="bfloat16", load_weights=False)
    assert all(p.is_meta for p in empty.parameters())
    assert [(n, p.shape, p.dtype) for n, p in empty.named_parameters()] == \
        [(n, p.shape, p.dtype) for n, p in loaded.named_parameters()]
    buffers = dict(loaded.named_buffers())
    assert buffers and all(torch.equal(b, buffers[n]) for n, b in empty.named_buffers())
    assert empty.name_or_path == loaded.name_or_path == TINY
    assert empty.generation_config.eos_token_id == loaded.generation_config.eos_token_id
    assert empty.config._attn_implementation == loaded.config._attn_implementation
