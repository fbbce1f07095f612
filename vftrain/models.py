"""Load a causal LM and its tokenizer (hub name, local path, or ready objects) and attach LoRA adapters."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from vftrain.data.render import TEMPLATE_KWARGS
from vftrain.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from vftrain.config import TrainerConfig

log = logging.getLogger("vftrain")

_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}
ADAPTER_CONFIG = "adapter_config.json"  # what peft's save_pretrained writes beside a LoRA adapter


def resolve_dtype(name: str, device):
    """'auto' -> bfloat16 on a CUDA device that supports it, float32 elsewhere (CPU bf16 matmuls are slow and lossy)."""
    import torch

    if name == "auto":
        cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, _DTYPES[name])


def run_device(model, device=None):
    """The device `model` will run on: `device` if given, else where the model is (its first parameter; the CPU for
    a hub name or folder, which `from_pretrained` loads onto the CPU)."""
    import torch

    if device is not None:
        return torch.device(device)
    param = None if isinstance(model, str) else next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def get_model_and_tokenizer(
    model: str | PreTrainedModel,
    *,
    dtype: str = "auto",
    attn_implementation: str = "auto",
    packing: bool = True,
    trust_remote_code: bool = False,
    use_liger: bool | None = None,
    compile_layers: bool | None = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
    load_weights: bool = True,
    chat_template: str | None = None,
    chat_template_kwargs: dict | None = None,
    device=None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return `(model, tokenizer)`.

    `model` is a hub name, a local folder, or a loaded `PreTrainedModel` (then `tokenizer` is required unless the
    model's `name_or_path` points at one). A tokenizer without a pad token gets one (see `ensure_pad_token`).
    `device` is where the model will run (the trainers pass their `args.device`; None: where the model is, so the
    CPU for a name or folder); `dtype = "auto"`, `attn_implementation = "auto"` and `use_liger = None` follow it.
    `attn_implementation = "auto"` trains packed rows (`packing`) with "varlen" where it applies
    (`vftrain.attention.choose`), else with the model's own default. `use_liger = None` applies liger-kernel where
    it can run (`liger_applies`) and the caller will not compile the decoder layers: `compile_layers` true, or None
    where `vftrain.compile.compile_applies` (liger's Triton kernels do not trace inside torch.compile, whose own
    fusions replace them). `chat_template` (a file path or template text) replaces the tokenizer's, and
    `chat_template_kwargs` are its variables (`use_template`).
    `load_weights = False` (a hub name or folder only) builds the model with empty
    (meta-device) parameters and real buffers, for FSDP ranks that receive their shards from rank 0.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vftrain import attention

    attention.register()
    device = run_device(model, device)
    # "varlen" is set after loading, once the model's attention features are known (attention.choose).
    load_attn = None if attn_implementation in (attention.AUTO, attention.NAME) else attn_implementation
    if isinstance(model, str):
        if is_adapter_folder(model):
            return load_adapter_folder(model, dtype=dtype, attn_implementation=attn_implementation, packing=packing,
                                       trust_remote_code=trust_remote_code, use_liger=use_liger,
                                       compile_layers=compile_layers, tokenizer=tokenizer,
                                       load_weights=load_weights, chat_template=chat_template,
                                       chat_template_kwargs=chat_template_kwargs, device=device)
        refuse_run_folder_without_model(model)
        load = AutoModelForCausalLM.from_pretrained if load_weights else empty_model
        try:
            model_obj = load(model, dtype=resolve_dtype(dtype, device), attn_implementation=load_attn,
                             trust_remote_code=trust_remote_code)
        except OSError as exc:
            raise load_error("model", model, exc) from None
        source = model
    else:
        model_obj, source = model, getattr(model, "name_or_path", None)
    chosen = attention.choose(model_obj, attn_implementation, packing, device)
    if chosen is not None and chosen != getattr(model_obj.config, "_attn_implementation", None):
        model_obj.set_attn_implementation(chosen)
    compiled = layers_compiled(model_obj, device, compile_layers, use_liger)
    liger = (liger_applies(model_obj, device) and not compiled) if use_liger is None else use_liger
    if liger:
        apply_liger(model_obj, device)
    log.info("attention: %s; liger kernels: %s; compiled layers: %s", model_obj.config._attn_implementation,
             "on" if liger else "off", "on" if compiled else "off")
    if tokenizer is None:
        if not source:
            raise ConfigError("model was passed as an object without a name_or_path: pass processing_class=tokenizer")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        except OSError as exc:
            raise load_error("tokenizer", source, exc) from None
    use_template(tokenizer, chat_template, chat_template_kwargs)
    ensure_pad_token(tokenizer, model_obj)
    add_stop_tokens(model_obj, tokenizer)
    return model_obj, tokenizer


def load_adapter_folder(folder: str, *, tokenizer=None, trust_remote_code: bool = False, load_weights: bool = True,
                        **options):
    """A LoRA adapter folder (a LoRA run's output or checkpoint): its recorded base model, loaded as
    `get_model_and_tokenizer` loads any model (`options`), with the folder's adapter on it as a trainable peft
    `PeftModel` (`VFTrainer._load_model` trains it on, or merges it when use_lora is false). The tokenizer is the
    folder's, which the run saved beside the adapter (the one training used), else the base model's.

    transformers would load the folder as the base model with the adapter attached frozen, not a PeftModel: nothing
    trainable, and vftrain's LoRA paths (merging, KL reference, adapter pushes) would not see the adapter.
    """
    from peft import PeftConfig, PeftModel, get_peft_model
    from transformers import AutoTokenizer

    config = PeftConfig.from_pretrained(folder)
    base = adapter_base(folder)
    if tokenizer is None and os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        except OSError as exc:
            raise load_error("tokenizer", folder, exc) from None
    try:
        model, tokenizer = get_model_and_tokenizer(base, tokenizer=tokenizer, trust_remote_code=trust_remote_code,
                                                   load_weights=load_weights, **options)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (the base model that {folder}/{ADAPTER_CONFIG} names)") from None
    with peft_quiet():
        if load_weights:
            model = PeftModel.from_pretrained(model, folder, is_trainable=True)
        else:  # FSDP ranks that receive their shards from rank 0: the adapter's shapes only, trainable as on rank 0
            # (a saved adapter records inference_mode true: get_peft_model would freeze it)
            config.inference_mode = False
            model = get_peft_model(model, config)
    model.peft_config[model.active_adapter].base_model_name_or_path = local_abspath(base)
    return model, tokenizer


def is_adapter_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def adapter_config(folder: str) -> dict:
    """A LoRA adapter folder's adapter_config.json."""
    with open(os.path.join(folder, ADAPTER_CONFIG)) as fh:
        return json.load(fh)


def adapter_base(folder: str) -> str:
    """The base model a LoRA adapter folder's adapter_config.json names (what the adapter loads onto, and what a
    server serves for it)."""
    base = adapter_config(folder).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{folder!r} holds a LoRA adapter whose adapter_config.json names no base model "
                          "(base_model_name_or_path): load the base and the adapter yourself and pass the PeftModel")
    return base


def served_model(model: str | None) -> str | None:
    """The model a server serves for the trainer's `model`: a LoRA run folder's base (vLLM loads no adapter folder
    as --model; the adapter is pushed, or merged and pushed, at the first step), else `model` itself."""
    return adapter_base(model) if model and is_adapter_folder(model) else model


def refuse_run_folder_without_model(path: str) -> None:
    """A run folder with checkpoints but no final model (`SFTTrainer.train()` saves none; `save_model()` or the CLI
    does): one line naming its newest checkpoint, not transformers' "Unrecognized model"."""
    from transformers.trainer_utils import get_last_checkpoint

    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return
    last = get_last_checkpoint(path)
    if last:
        raise ConfigError(f"model {path!r} is a run folder without a final model (no config.json or "
                          f"{ADAPTER_CONFIG}): pass its newest checkpoint {last!r}, or call trainer.save_model() "
                          "after trainer.train() (vf-sft and vf-rl save it)")


def local_abspath(name: str | None) -> str | None:
    """`name` as an absolute path when it is a local folder (a hub name is kept): recorded in saved adapters, so
    that `vf-sft export` and RL find the base model from any folder."""
    return os.path.abspath(name) if name and os.path.isdir(name) else name


def empty_model(source: str, *, dtype, attn_implementation, trust_remote_code: bool):
    """The model of `source` as `from_pretrained` would build it, without reading its weights: parameters on the meta
    device (no memory), buffers real (RoPE frequencies are computed, not loaded, and FSDP does not broadcast
    non-persistent buffers), generation config loaded. For the FSDP ranks that get their shards from rank 0."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    model = empty_from_config(config, dtype=dtype, attn_implementation=attn_implementation,
                              trust_remote_code=trust_remote_code)
    model.name_or_path = model.config.name_or_path = source
    try:
        model.generation_config = GenerationConfig.from_pretrained(source)
    except OSError:  # no generation_config.json: from_pretrained derives it from the model config, as from_config
        pass
    return model


def empty_from_config(config, **kwargs):
    """`AutoModelForCausalLM.from_config(config, **kwargs)` with parameters on the meta device, buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.tie_weights()  # init_empty_weights re-creates each parameter on meta, which unties a tied head
    return model


def distinct_meta_pointers(model) -> None:
    """Give each meta-device parameter of `model` its own stand-in `data_ptr()`.

    accelerate's FSDP2 `prepare` (1.15) swaps the optimizer's parameters for their sharded copies through a map keyed
    by `data_ptr()`, which is 0 for every meta parameter: on the ranks that build the model empty (`empty_model`)
    every optimizer entry became the same sharded parameter, so the others were never updated (the loss left the
    1-process curve from the second update on; tests/test_distributed.py). Negative numbers are never real
    addresses; fully_shard replaces these parameters, so the stand-ins do not outlive the prepare.
    """
    for i, p in enumerate(model.parameters()):
        if p.is_meta:
            p.data_ptr = functools.partial(int, -1 - i)


def apply_liger(model, device=None) -> None:
    """Swap liger-kernel's fused RMSNorm and SwiGLU Triton kernels into this model instance (a peft model: into its
    base model, where liger finds the decoder). A model type liger has no kernels for, or a model that runs on the
    CPU, is a ConfigError: an explicit `use_liger = true` must not pass as on while nothing was patched.

    Instance only (review sft-2026-12-02, finding 5): liger's apply also rebinds the family's module-level classes
    (`modeling_qwen2.Qwen2RMSNorm`, `Qwen2MLP`), which every later model of the family in the process would be built
    from (a reference model, the merged export loaded for a check; on the CPU their forward crashes); they are put
    back once the instance is patched. Its RoPE exists only as such a module-level function swap, so it is left
    off, as is its fused cross-entropy (vftrain's loss already fuses the output head with it, vftrain/loss.py).
    The model's own RoPE saves only cos/sin for the backward, so this costs kernel launches, not memory.
    """
    try:
        from liger_kernel.transformers.monkey_patch import (MODEL_TYPE_TO_APPLY_LIGER_FN,
                                                            _apply_liger_kernel_to_instance)
    except ImportError:
        raise ConfigError("use_liger = true needs liger-kernel: pip install 'vftrain[liger]'") from None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(base.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ConfigError(f"use_liger = true, but liger-kernel has no kernels for model type {model_type!r}; "
                          "set use_liger = false (or leave it unset: on where it applies)")
    if run_device(base, device).type == "cpu":
        raise ConfigError("use_liger = true, but the model runs on the CPU (use_cpu = true, or a model placed on "
                          "the CPU) and liger-kernel's kernels are Triton (GPU); set use_liger = false")
    with _module_classes_restored("transformers."):
        _apply_liger_kernel_to_instance(model=base, rope=False, fused_linear_cross_entropy=False, cross_entropy=False)


def liger_applies(model, device=None) -> bool:
    """liger-kernel is installed, the model runs on a CUDA GPU (its kernels are Triton; `device` as in
    `run_device`) and liger has kernels for the model type."""
    if run_device(model, device).type != "cuda":
        return False
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return False
    return getattr(model.config, "model_type", None) in MODEL_TYPE_TO_APPLY_LIGER_FN


def layers_compiled(model, device, compile_layers: bool | None, use_liger: bool | None = None) -> bool:
    """What `compile_layers` (true, false, or None: where `compile_applies`) means for `model` on `device`; true
    where it cannot run is a ConfigError."""
    from vftrain.compile import compile_applies, decoder_layers
    from vftrain.memory import uses_liger

    device = run_device(model, device)
    if compile_layers is None:
        return use_liger is not True and not uses_liger(model) and compile_applies(model, device)
    if not compile_layers:
        return False
    if device.type != "cuda":
        raise ConfigError("compile_layers = true compiles for a CUDA GPU, but the model runs on the CPU (use_cpu = "
                          "true, or no GPU); set compile_layers = false")
    if use_liger or uses_liger(model):
        raise ConfigError("compile_layers = true with liger-kernel's kernels in the model (use_liger = true, or a "
                          "model patched before): its Triton kernels do not compile inside torch.compile, which "
                          "fuses the same operations itself; set one of them false")
    if not decoder_layers(model):
        raise ConfigError(f"compile_layers = true, but this model ({model.config.model_type}) has no transformers "
                          "decoder layers (GradientCheckpointingLayer) to compile; set compile_layers = false")
    return True


def use_template(tokenizer, chat_template: str | None, variables: dict | None) -> None:
    """The run's chat template and its variables on the tokenizer. The variables go into its init_kwargs, which
    save_pretrained writes to tokenizer_config.json: a run from the saved tokenizer renders as this one trained
    (`data.render.template_kwargs`)."""
    if chat_template is not None:
        tokenizer.chat_template = read_chat_template(chat_template)
    if variables is not None:
        tokenizer.init_kwargs[TEMPLATE_KWARGS] = dict(variables)


def read_chat_template(value: str) -> str:
    """The template text of the `chat_template` setting: the text itself when it holds Jinja tags, else the
    contents of the file it names."""
    if "{{" in value or "{%" in value:
        return value
    try:
        with open(os.path.expanduser(value)) as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"chat_template = {value!r} is neither template text (no '{{{{' or '{{%') nor a readable "
                          f"file: {getattr(exc, 'strerror', None) or exc}") from None


@contextlib.contextmanager
def _module_classes_restored(prefix: str):
    """Inside the block, modules named `prefix*` may have their module-level classes and functions rebound; they are
    put back on leaving it."""
    saved = {module: {k: v for k, v in vars(module).items() if callable(v)}
             for name, module in list(sys.modules.items()) if name.startswith(prefix) and module is not None}
    try:
        yield
    finally:
        for module, values in saved.items():
            namespace = vars(module)
            for key, value in values.items():
                if namespace.get(key) is not value:
                    namespace[key] = value


def load_error(what: str, name: str, exc: Exception) -> ConfigError:
    """One line for a model or tokenizer that cannot be loaded (offline hub name, wrong path, missing files)."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return ConfigError(f"could not load {what} {name!r}: {first}")


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: Any = None) -> None:
    """Give the tokenizer a pad token if it has none.

    Reusing eos as pad is safe here because vftrain never derives labels or attention from the pad id: the loss
    mask comes from the chat template and attention from row lengths, so the real end-of-sequence token is
    still trained (the bug of trl#1623 and the seed's review, item 3).
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise ConfigError("the tokenizer has no pad, eos or unk token to pad with; set tokenizer.pad_token")
    if model is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def add_stop_tokens(model, tokenizer) -> None:
    """Add the end-of-turn tokens that training teaches (`data.render.stop_token_ids`) to the model's
    `generation_config.eos_token_id`, which every save writes: Qwen2.5/3 base models stop on `<|endoftext|>` while
    their chat template trains `<|im_end|>`, so transformers and vLLM would otherwise run past the end of a turn."""
    from vftrain.data.render import stop_token_ids

    config = getattr(model, "generation_config", None)
    if config is None:
        return
    current = config.eos_token_id
    ids = [current] if isinstance(current, int) else list(current or [])
    ids += sorted(stop_token_ids(tokenizer) - set(ids))
    if ids:
        config.eos_token_id = ids[0] if len(ids) == 1 else ids


def lora_config_from(args: TrainerConfig):
    """The peft LoraConfig the config asks for, every lora_* field passed through (seed review item 6)."""
    from peft import LoraConfig

    if args.lora_config is not None:
        return args.lora_config
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules,
        modules_to_save=args.lora_modules_to_save,
        use_rslora=args.lora_use_rslora,
    )


@contextlib.contextmanager
def peft_quiet():
    """Around peft wrapping a model (a new adapter or one loaded from a folder): peft 0.21 reads transformers'
    deprecated `is_gradient_checkpointing`; the FutureWarning is about peft's code, not the user's, and repeats on
    every LoRA run. Only that warning is silenced."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def apply_lora(model: PreTrainedModel, args: TrainerConfig):
    """Wrap `model` with LoRA adapters; returns the peft model and logs the trainable-parameter count."""
    from peft import get_peft_model

    from vftrain.lora import refuse_unmatched_targets  # lora.py imports this module

    lora_config = lora_config_from(args)
    refuse_unmatched_targets(model, lora_config, "lora_config.target_modules" if args.lora_config is not None
                             else "lora_target_modules")
    with peft_quiet():
        peft_model = get_peft_model(model, lora_config)
    config = peft_model.peft_config[peft_model.active_adapter]
    config.base_model_name_or_path = local_abspath(config.base_model_name_or_path)
    trainable, total = count_parameters(peft_model)
    log.info("LoRA: %s trainable of %s parameters (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return peft_model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def plain_output_head(model):
    """The output head as a bias-free `nn.Linear` whose logits the loss can compute itself (fused with the
    cross-entropy, no logits held), or None to use the model's own logits.

    Under `head_returns_hidden` the model applies whatever follows its head to the final hidden states instead of
    the logits. A scalar factor (Cohere's logit_scale, Granite's logits_scaling, Falcon-H1's lm_head_multiplier,
    MiniCPM3's scaled hidden states, ...) commutes with the head's matmul, so the fused loss stays exact; soft-capping
    (`c * tanh(x / c)`, Gemma 2/3/3n) does not, and falls back. tests/test_models.py checks every family that
    transformers ships with a logit transform against the model's own logits. A LoRA-adapted or fully-trained peft
    copy of the head falls back too.
    """
    import torch

    inner = model
    while hasattr(inner, "module"):  # DDP and similar wrappers
        inner = inner.module
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if _own_class(head) is not torch.nn.Linear or head.bias is not None:
        return None
    if logit_softcap(getattr(inner, "config", None)) is not None:
        return None
    return head


def logit_softcap(config) -> float | None:
    """The final-logit soft-cap of a model config, wherever the model keeps it: on the config itself, or on its text
    config (Gemma-3n's top level says None while its text config caps at 30); recurrent Gemma names it
    `logits_soft_cap`."""
    if config is None:
        return None
    configs = [config] + [getattr(config, k, None) for k in getattr(config, "sub_configs", {})]
    for c in configs:
        for name in ("final_logit_softcapping", "logits_soft_cap"):
            value = getattr(c, name, None)
            if value:
                return float(value)
    return None


def _own_class(module) -> type:
    """The module's class before FSDP2, which swaps a sharded module's class for `FSDP<Name>(FSDPModule, cls)`."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    return cls.__bases__[-1] if issubclass(cls, FSDPModule) else cls


def keep_gathered_through_backward(model, head) -> None:
    """FSDP2: keep the output head's weight gathered from the model's forward to its backward, so that the loss
    can apply it outside the forward (its gradient is reduce-scattered with the rest of its group).

    accelerate (>= 1.15) already puts the head in such a group, and FSDP2's root group does not reshard after
    forward by default; this makes it hold with any wrapping. Cost: the head stays gathered one phase longer.
    """
    from torch.distributed.fsdp import FSDPModule

    owner = head if isinstance(head, FSDPModule) else model
    if isinstance(owner, FSDPModule):
        owner.set_reshard_after_forward(False, recurse=False)


class head_returns_hidden:
    """Context in which `head(x)` returns x: the model's forward then yields final hidden states as `.logits`
    (only at `logits_to_keep` positions), and the loss applies the head itself."""

    def __init__(self, head):
        self.head = head

    def __enter__(self):
        self.head.forward = _identity
        return self.head

    def __exit__(self, *exc):
        del self.head.forward  # back to the class's forward


def _identity(x):
    return x


def merged_state_dict(peft_model) -> dict:
    """The base model's state dict with the LoRA adapters merged in (peft's reversible merge: the live model
    keeps its adapters), under the base model's own key names."""
    peft_model.merge_adapter()
    try:
        out = {}
        for key, value in peft_model.get_base_model().state_dict().items():
            if "lora_" in key or ".original_module." in key:
                continue
            key = key.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
            out[key] = value.detach().clone()
        return out
    finally:
        peft_model.unmerge_adapter()


def save_merged(peft_model, tokenizer, directory: str) -> str:
    """Write a plain transformers model folder (merged weights + tokenizer) that vLLM and transformers load
    without peft: the hand-off from LoRA SFT to RL or serving."""
    base = peft_model.get_base_model()
    add_stop_tokens(base, tokenizer)  # `vf-sft export` loads the base model afresh
    state = merged_state_dict(peft_model)
    config = base.config
    tied = getattr(config, "tie_word_embeddings", False)
    # A trained copy of a tied head (lm_head in lora_modules_to_save) no longer equals the embedding: the folder
    # must say so, or loaders that honour the flag (vLLM skips lm_head.weight when tied) use the embedding.
    config.tie_word_embeddings = tied and not _head_untied(state)
    try:
        base.save_pretrained(directory, state_dict=state)
    finally:
        config.tie_word_embeddings = tied
    tokenizer.save_pretrained(directory)
    return directory


def _head_untied(state: dict) -> bool:
    import torch

    head = state.get("lm_head.weight")
    embed = next((v for k, v in state.items() if k.endswith("embed_tokens.weight")), None)
    return head is not None and embed is not None and not torch.equal(head, embed)


def export_merged(adapter_dir: str, directory: str, base: str | None = None) -> str:
    """`vf-sft export`: load `base` (default: the adapter's recorded base model) with the adapter and save merged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not is_adapter_folder(adapter_dir):
        raise ConfigError(f"{adapter_dir!r} is not a LoRA adapter folder (no {ADAPTER_CONFIG})")
    base = base or adapter_base(adapter_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
        tokenizer_source = adapter_dir if os.path.exists(os.path.join(adapter_dir, "tokenizer_config.json")) else base
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    except OSError as exc:
        raise load_error("base model", base, exc) from None
    return save_merged(PeftModel.from_pretrained(model, adapter_dir), tokenizer, directory)
