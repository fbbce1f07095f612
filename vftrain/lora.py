"""LoRA adapters beyond peft's own setup: an adapter folder's adapter trained on or merged, adapters attached through
transformers refused, and the adapters' dtype (kept in the bf16 base's where the optimizer keeps their updates)."""

from __future__ import annotations

import logging

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
