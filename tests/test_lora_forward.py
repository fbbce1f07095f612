"""peft's LoRA linears in fewer Python calls (lora.lean_forwards): the same logits and gradients as peft's own
forward bit for bit, and peft's own wherever the lean one does not apply (dropout, adapters off, another adapter
active, merged weights, per-row adapters, hooks); a run installs it."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from conftest import TINY
from vftrain.lora import lean_forwards

IDS = torch.arange(3, 35).reshape(2, 16)


def _models(**lora):
    """Two identical peft models of the tiny model with non-zero adapters; the second has the lean forwards."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # peft starts B at zero: the adapters would add nothing
    lean = copy.deepcopy(model)
    assert lean_forwards(lean) == sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
    return model, lean


def _logits_and_grads(model, **kwargs):
    model.zero_grad()
    logits = model(input_ids=IDS, **kwargs).logits
    if logits.requires_grad:  # not with the adapters off: nothing else trains
        logits.square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same(a, b) -> None:
    assert torch.equal(a[0], b[0])
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_the_same_logits_and_gradients_bit_for_bit():
    model, lean = _models()
    model.train(), lean.train()
    _same(_logits_and_grads(model), _logits_and_grads(lean))


def test_with_bf16_base_and_float32_adapters_as_peft_casts():
    model, lean = _models()
    for m in (model, lean):
        m.base_model.model.to(torch.bfloat16)
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()
    _same(_logits_and_grads(model), _logits_and_grads(lean))


def test_peft_s_own_forward_wherever_the_lean_one_does_not_apply():
    model, lean = _models()
    with model.disable_adapter(), lean.disable_adapter():
        _same(_logits_and_grads(model), _logits_and_grads(lean))
    for m in (model, lean):
        torch.manual_seed(2)  # the same random adapter in both
        m.add_adapter("other", LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
        m.set_adapter("other")
    _same(_logits_and_grads(model), _logits_and_grads(lean))  # the active adapter, not the first
    layer = next(m for m in lean.modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A"))
    seen = []
    layer.base_layer.register_forward_hook(lambda *args: seen.append(1))
    lean(input_ids=IDS)
    assert seen  # a hook on the base layer still runs: peft's forward calls it
    dropout_model, dropout_lean = _models(lora_dropout=0.5)
    torch.manual_seed(1)
    expected = _logits_and_grads(dropout_model)
    torch.manual_seed(1)
    _same(expected, _logits_and_grads(dropout_lean))


def test_merged_weights_and_a_pickled_model():
    model, lean = _models()
    model.eval(), lean.eval()
    with torch.no_grad():
        before = lean(input_ids=IDS).logits
        model.merge_adapter(), lean.merge_adapter()
        assert torch.equal(model(input_ids=IDS).logits, lean(input_ids=IDS).logits)
        torch.testing.assert_close(lean(input_ids=IDS).logits, before, rtol=1e-4, atol=1e-4)
        lean.unmerge_adapter()
        restored = pickle.loads(pickle.dumps(lean))  # comes back with peft's forward
        assert torch.equal(restored(input_ids=IDS).logits, lean(input_ids=IDS).logits)


@pytest.mark.parametrize("use_lora", [True])
def test_a_lora_run_uses_it(tmp_path, use_lora):
    import datasets

    import vftrain as vf
    from conftest import addition_rows, small_config

    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(16)),
                            args=small_config(tmp_path, use_lora=use_lora, max_steps=1))
    lean = [m for m in trainer.model.modules() if "forward" in vars(m)]
    assert lean and all(vars(m)["forward"].__func__.__module__ == "vftrain.lora" for m in lean)
