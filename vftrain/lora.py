"""LoRA adapters' dtype: kept in the bf16 base's dtype where the optimizer keeps their updates."""

from __future__ import annotations

import torch


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
