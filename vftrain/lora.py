"""LoRA adapters beyond peft's own setup: an adapter folder's adapter trained on or merged, adapters attached through
transformers refused, target modules that match nothing named, and the adapters' dtype (kept in the bf16 base's where
the optimizer keeps their updates)."""

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


def refuse_unmatched_targets(model, lora_config, setting: str) -> None:
    """Target modules that match no module of `model`, by peft's own rule (`check_target_module_exists`), named
    here with the model's linear module names (what can take an adapter) instead of peft's
    NoMatchingPeftModuleError traceback, which lists neither."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers.pytorch_utils import Conv1D

    targets = lora_config.target_modules
    if targets is None or (isinstance(targets, str) and targets.lower() == "all-linear"):  # peft's shorthand
        return
    # A match, or a module it matches but excludes (a falsy marker: one in modules_to_save), whose message is peft's.
    if any(check_target_module_exists(lora_config, name) not in (None, False) for name, _ in model.named_modules()):
        return
    linear = [name for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, Conv1D))]
    regex = isinstance(targets, str)
    shown = targets if regex else sorted(targets)  # LoraConfig keeps a list as a set
    raise ConfigError(f"{setting} = {shown!r} matches no module of the model; its linear modules are "
                      f"{', '.join(sorted({name.rsplit('.', 1)[-1] for name in linear})) or 'none'}"
                      + (f" (a regular expression must match a whole dotted name such as {linear[0]!r})"
                         if regex and linear else ""))
