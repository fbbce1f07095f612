"""The lean SwiGLU MLP computes the same outputs and gradients as the stock module and saves less for the
backward (exactly the gate*up product: intermediate_size values per token per layer)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from conftest import TINY
from vftrain.mlp import use_lean_mlp


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _saved_bytes(model, ids) -> int:
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen and not isinstance(t, torch.nn.Parameter):  # weights are saved by both
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids, use_cache=False).loss
    return total


def test_same_loss_and_gradients():
    torch.manual_seed(0)
    ids = torch.randint(0, 95, (2, 24))
    stock = AutoModelForCausalLM.from_pretrained(TINY).double()
    lean = AutoModelForCausalLM.from_pretrained(TINY).double()
    assert use_lean_mlp(lean) == lean.config.num_hidden_layers
    loss_a, grads_a = _loss_and_grads(stock, ids)
    loss_b, grads_b = _loss_and_grads(lean, ids)
    torch.testing.assert_close(loss_b, loss_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=name)


def test_saves_the_product_no_more():
    ids = torch.randint(0, 95, (2, 24))
    stock = AutoModelForCausalLM.from_pretrained(TINY)
    lean = AutoModelForCausalLM.from_pretrained(TINY)
    use_lean_mlp(lean)
    cfg = stock.config
    saved_stock, saved_lean = _saved_bytes(stock, ids), _saved_bytes(lean, ids)
    product = ids.numel() * cfg.intermediate_size * 4 * cfg.num_hidden_layers  # float32 gate*up per layer
    assert saved_stock - saved_lean >= product * 0.99


def test_lora_down_projection_falls_back_to_stock(tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    ids = torch.randint(0, 95, (1, 16))
    model = AutoModelForCausalLM.from_pretrained(TINY)
    use_lean_mlp(model)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["down_proj", "q_proj"]))
    out = peft(input_ids=ids, labels=ids).loss
    out.backward()
    assert any(p.grad is not None for n, p in peft.named_parameters() if "lora_" in n and "down_proj" in n)


def test_rl_update_is_the_stock_one(tmp_path):
    """RL with lean_mlp (the default on a GPU): rollouts sampled without autograd, the loss with it; the SGD update
    equals the stock MLP's."""
    from rl_worker import one_sgd_step

    from vftrain import mlp

    updates = {}
    for lean in (False, True):
        trainer = one_sgd_step(str(tmp_path / str(lean)), lean_mlp=lean)
        patched = [m for m in trainer.model.modules() if getattr(m.forward, "__func__", None) is mlp._lean_forward]
        assert bool(patched) == lean
        updates[lean] = torch.load(tmp_path / str(lean) / "weights.pt")
    base = {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(TINY).named_parameters()}
    assert max(float((updates[False][n] - base[n]).abs().max()) for n in base) > 1e-3  # the step moved the weights
    for name, weight in updates[True].items():
        torch.testing.assert_close(weight, updates[False][name], rtol=1e-5, atol=1e-7, msg=name)
