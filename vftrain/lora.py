"""LoRA adapters beyond peft's own setup: an adapter folder's adapter trained on or merged, adapters attached through
transformers refused, the adapters' dtype (kept in the bf16 base's where the optimizer keeps their updates), and
peft's adapted linear layers run in fewer Python calls."""

from __future__ import annotations

import logging
import types

import torch

from vftrain.errors import ConfigError
from vftrain.models import count_parameters

log = logging.getLogger("vftrain")


def refuse_attached_adapter(model) -> None:
    """A transformers model with an adapter attached (`load_adapter`, or `from_pretrained` of an adapter folder)
    has `peft_config` but is not a peft PeftModel: its adapter is frozen and vftrain's LoRA paths cannot see it."""
    if isinstance(model, str) or not hasattr(model, "peft_config"):
        return
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise ConfigError(f"model: a {type(model).__name__} with a LoRA adapter attached through transformers is "
                          "not trainable here; pass the adapter folder's path as model, or "
                          "PeftModel.from_pretrained(base, folder, is_trainable=True)")


def continue_or_merge(model, use_lora: bool, folder: str):
    """The PeftModel of a LoRA adapter folder given as `model`: with use_lora its adapter is trained on; without,
    it is merged into the base model and all weights are trained."""
    if use_lora:
        trainable, total = count_parameters(model)
        log.info("LoRA: continuing the adapter of %s (rank %s, as saved there; the lora_* settings are not used): "
                 "%s trainable of %s parameters", folder, model.peft_config[model.active_adapter].r,
                 f"{trainable:,}", f"{total:,}")
        return model
    model = model.merge_and_unload().requires_grad_(True)
    log.info("%s holds a LoRA adapter and use_lora is false: merged it into its base model, training all %s "
             "weights (use_lora = true trains the adapter on instead)", folder, f"{count_parameters(model)[1]:,}")
    return model


def adapters_in_base_dtype(peft_model) -> None:
    """LoRA adapters on bf16 base weights kept in bf16, not in peft's float32 (`autocast_adapter_dtype`), for runs
    whose optimizer keeps their updates (master_weights: compensated or float32 copies, or FSDP / DeepSpeed's own).

    peft's float32 adapters make every adapted linear cast its input to float32 and add a float32 product to the
    bf16 output: on the Qwen2.5-7B shape, bf16 adapters took the forward + backward from 405 to 366 ms per step and
    the peak from 38.1 to 35.0 GiB (benchmarks/RESULTS.md, "7B LoRA", session 33). Their precision is kept by the
    optimizer, as for full-weight bf16 training (tests/test_lora_dtype.py)."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and module.get_base_layer().weight.dtype == torch.bfloat16:
            for name in module.adapter_layer_names:
                getattr(module, name).to(torch.bfloat16)


def adapter_dtype(peft_model):
    """The dtype of the active adapter's trainable weights (None when it has none)."""
    return next((p.dtype for n, p in peft_model.named_parameters() if "lora_" in n and p.requires_grad), None)


def lean_forwards(peft_model) -> int:
    """peft's LoRA linears over a plain `nn.Linear` run `forward` below (an instance attribute; the class and other
    models are untouched); returns how many. Why: peft's forward calls four modules (base layer, dropout, A, B)
    through `nn.Module.__call__` and checks its arguments and the adapter's state at each of the ~200 adapted
    linears of a 7B model, on every forward, and a 7B LoRA step at 4k-token micro-batches waits for the host
    (benchmarks/RESULTS.md, session 34): this forward saves 48 us of forward + backward per adapted linear on the
    development CPU (benchmarks/module_walks.py)."""
    from peft.tuners.lora import Linear

    count = 0
    for module in peft_model.modules():
        if type(module) is Linear and type(module.base_layer) is torch.nn.Linear and all(
                hasattr(module, name) for name in _PEFT_STATE):  # a peft that keeps its state elsewhere: its own
            object.__setattr__(module, "forward", types.MethodType(forward, module))
            count += 1
    return count


_PEFT_STATE = ("active_adapter", "_disable_adapters", "merged_adapters", "lora_variant", "scaling",
               "_cast_input_dtype")  # what `forward` reads of peft's layer (peft 0.17-0.21)


def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's `lora.Linear.forward` for one active plain adapter (no dropout, variant, merge, per-row adapters or
    hooks on the layers it calls): the same operations in the same order, so the same result bit for bit
    (tests/test_lora_forward.py); anything else goes to peft's own. Named `forward` so that a pickled model comes
    back with peft's."""
    from peft.tuners.lora import Linear

    base, names = self.base_layer, self.active_adapter
    name = names if isinstance(names, str) else names[0] if len(names) == 1 else None
    modules = self._modules
    lora_a, lora_b, dropout = (modules[key]._modules.get(name) for key in ("lora_A", "lora_B", "lora_dropout"))
    if (args or kwargs or self._disable_adapters or self.merged_adapters or lora_a is None
            or type(dropout) is not torch.nn.Identity or name in self.lora_variant
            or any(m._forward_hooks or m._forward_pre_hooks for m in (base, lora_a, lora_b))):
        return Linear.forward(self, x, *args, **kwargs)
    result = torch.nn.functional.linear(x, base.weight, base.bias)
    x = self._cast_input_dtype(x, lora_a.weight.dtype)
    lora = torch.nn.functional.linear(torch.nn.functional.linear(x, lora_a.weight, lora_a.bias), lora_b.weight,
                                      lora_b.bias)
    return (result + lora * self.scaling[name]).to(result.dtype)
