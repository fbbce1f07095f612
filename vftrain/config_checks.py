"""Config validation shared by every config: numeric bounds, TrainingArguments' enum choices, settings transformers
accepts but refuses once training starts, FSDP defaults, and the resolved config's JSON form. `vftrain/config.py`
holds the fields; this module the rules they are checked by."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
from typing import Any

from transformers import TrainingArguments

from vftrain.errors import ConfigError


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _steps_or_fraction(value) -> bool:
    return 0 < value < 1 or (value >= 1 and float(value).is_integer())


def _integer(low: int) -> Any:
    return lambda value: float(value).is_integer() and value >= low


# Numeric fields whose bad values torch or transformers reject with a traceback that does not name the field, or
# accept and silently misread (a negative max_grad_norm turns clipping off, warmup_steps = 1.5 becomes 1 step,
# save_total_limit = 0 keeps every checkpoint, max_steps = 0 trains num_train_epochs): (field, test, allowed).
_STEPS = "an integer number of steps >= 1, or a fraction in (0, 1) of all steps"
_BOUNDS = (
    ("learning_rate", lambda v: v >= 0, "a number >= 0"),
    ("weight_decay", lambda v: v >= 0, "a number >= 0"),
    ("adam_beta1", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("adam_beta2", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("adam_epsilon", lambda v: v > 0, "a number > 0"),
    ("max_grad_norm", lambda v: v >= 0, "a number >= 0 (0: no clipping)"),
    ("warmup_steps", lambda v: v == 0 or _steps_or_fraction(v), "0, " + _STEPS),
    ("logging_steps", _steps_or_fraction, _STEPS),
    ("save_steps", _steps_or_fraction, _STEPS),
    ("eval_steps", _steps_or_fraction, _STEPS + " (unset: logging_steps)"),
    ("max_steps", lambda v: v == -1 or _integer(1)(v), "a positive integer, or -1 to train num_train_epochs"),
    ("num_train_epochs", lambda v: v > 0, "a number > 0"),
    ("save_total_limit", _integer(1), "an integer >= 1 (unset: keep every checkpoint)"),
    ("seed", lambda v: _integer(0)(v) and v < 2**32, "an integer in [0, 2**32)"),
    ("data_seed", lambda v: _integer(0)(v) and v < 2**32, "an integer in [0, 2**32) (unset: seed)"),
    ("dataloader_num_workers", _integer(0), "an integer >= 0"),
    ("lora_alpha", lambda v: v > 0, "a number > 0"),
    ("lora_dropout", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("micro_batch_tokens", _integer(1), "a positive integer (unset: no cap)"),
    ("sample_every_n_steps", _integer(0), "an integer >= 0 (0: never)"),
    ("sample_timeout", lambda v: v > 0, "a number of seconds > 0"),
    ("temperature", lambda v: v >= 0, "a number >= 0 (0: greedy)"),
    ("top_p", lambda v: 0 < v <= 1, "a number in (0, 1]"),
    ("eval_size", _steps_or_fraction, "a fraction in (0, 1) or a number of rows >= 1 (unset: no cut)"),
)
_OPTIONAL = {"eval_size", "eval_steps", "save_total_limit", "data_seed", "micro_batch_tokens", "dataset_num_proc"}


def _check_bounds(config, bounds) -> None:
    for name, ok, allowed in bounds:
        value = getattr(config, name)
        if value is None and name in _OPTIONAL:
            continue
        if not _number(value) or not math.isfinite(value) or not ok(value):
            raise ConfigError(f"{name} = {value!r} is not allowed; expected {allowed}")


def _enum_choices() -> dict[str, tuple]:
    """TrainingArguments' enum-valued fields (optim, lr_scheduler_type, *_strategy) and their allowed strings, so a
    bad one is named here rather than by transformers' 'bogus is not a valid SchedulerType'."""
    import enum
    import typing

    choices = {}
    for name, hint in typing.get_type_hints(TrainingArguments).items():
        for arg in typing.get_args(hint):
            if isinstance(arg, type) and issubclass(arg, enum.Enum):
                choices[name] = tuple(e.value for e in arg)
    return choices


_TRANSFORMERS_CHOICES = _enum_choices()


def _reporting_integrations() -> tuple:
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return tuple(INTEGRATION_TO_CALLBACK)


# What to install for each report_to integration whose package transformers can tell is missing (its callback
# otherwise raises in Trainer.__init__, after the data is tokenized).
_INTEGRATION_PACKAGES = {"tensorboard": "'vftrain[tensorboard]'", "wandb": "'vftrain[wandb]'", "trackio": "trackio",
                         "mlflow": "mlflow", "comet_ml": "comet_ml", "neptune": "neptune", "clearml": "clearml",
                         "dagshub": "dagshub", "dvclive": "dvclive", "codecarbon": "codecarbon",
                         "swanlab": "swanlab", "azure_ml": "azureml-core", "kubeflow": "kubeflow"}
# Schedules whose transformers function needs exactly one of min_lr / min_lr_rate, and fails on the first step
# without (optimization.py: get_cosine_with_min_lr_schedule_with_warmup).
_MIN_LR_SCHEDULES = ("cosine_with_min_lr", "cosine_warmup_with_min_lr")


def _trl_values(config) -> None:
    """Values TRL and transformers users set that mean one of vftrain's: scale_rewards True / False (TRL's older
    form of 'group' / 'none') and use_liger_kernel (transformers' patch of the whole model class, which would
    replace vftrain's forward: vftrain's own use_liger patches this model only)."""
    if isinstance(getattr(config, "scale_rewards", None), bool):
        config.scale_rewards = "group" if config.scale_rewards else "none"
    if config.use_liger_kernel:
        if config.use_liger is False:
            raise ConfigError("use_liger_kernel = true and use_liger = false disagree; set use_liger (vftrain's)")
        config.use_liger, config.use_liger_kernel = True, False


def checkpoint_of(resume: str, run_dir: str) -> bool:
    """Whether the checkpoint folder `resume` lies in the run folder `run_dir` (here, not in checkpoint.py: config
    checks import no torch)."""
    return os.path.dirname(os.path.abspath(resume)) == os.path.abspath(run_dir)


def _check_overwrite(config) -> None:
    """overwrite_output_dir with a resume from this folder would delete the checkpoint it continues (one of another
    folder's run may start this folder afresh)."""
    resume = config.resume_from_checkpoint
    if not (config.overwrite_output_dir and resume):
        return
    elsewhere = isinstance(resume, str) and resume.lower() not in ("latest", "true") and (
        not config.output_dir or not checkpoint_of(resume, config.output_dir))
    if not elsewhere:
        raise ConfigError(f"overwrite_output_dir deletes the checkpoints that resume_from_checkpoint = {resume!r} "
                          "would continue; set one of them")


def _check_late_failures(config) -> None:
    """Settings transformers accepts here but refuses once training starts, named now with their fix."""
    from transformers.integrations.integration_utils import get_available_reporting_integrations

    schedule = getattr(config.lr_scheduler_type, "value", config.lr_scheduler_type)
    kwargs = config.lr_scheduler_kwargs
    if schedule in _MIN_LR_SCHEDULES and isinstance(kwargs or {}, dict) and \
            ("min_lr" in (kwargs or {})) == ("min_lr_rate" in (kwargs or {})):
        raise ConfigError(f"lr_scheduler_type = {schedule!r} needs one of min_lr and min_lr_rate in "
                          f"lr_scheduler_kwargs (got {kwargs!r}); e.g. lr_scheduler_kwargs = {{min_lr_rate = 0.1}} "
                          "decays to a tenth of learning_rate")
    reporters = [config.report_to] if isinstance(config.report_to, str) else (config.report_to or [])
    available = get_available_reporting_integrations()
    for name in reporters:
        if name in _INTEGRATION_PACKAGES and name not in available:
            raise ConfigError(f"report_to = {config.report_to!r}: {name!r} needs its package, which is not "
                              f"installed: pip install {_INTEGRATION_PACKAGES[name]}")
    _check_optim(config)


def _check_optim(config) -> None:
    """An optim whose package is missing or too old, or whose settings are incomplete (GaLore's
    optim_target_modules), fails when transformers builds the optimizer, after the model is loaded and the data
    tokenized: transformers' own lookup is run now, without the model, and its refusal named in one line."""
    from transformers import Trainer

    try:
        Trainer.get_optimizer_cls_and_kwargs(config)
    except (ImportError, ValueError, TypeError, NotImplementedError) as exc:
        if "model" not in str(exc):  # "pass a model": what GaLore, Apollo and LOMO need past these checks
            raise ConfigError(f"optim = {getattr(config.optim, 'value', config.optim)!r}: "
                              f"{str(exc).strip().splitlines()[0]}") from None


# Arguments of TRL's SFTTrainer / GRPOTrainer (and transformers' Trainer) that vftrain's trainers do another way:
# refused in one line rather than a TypeError after loading, or, for compute_loss_func, ignored without a word.
_TRL_ONLY = {
    "formatting_func": "rows are rendered with the chat template; map them to prompt/completion, messages or text "
                       "columns first (datasets.Dataset.map)",
    "data_collator": "rows are packed and collated by vftrain (packing, micro_batch_tokens)",
    "compute_loss_func": "the loss is vftrain's (vftrain/loss.py); subclass the trainer and override compute_loss",
    "reward_processing_classes": "reward models are not supported; score with reward functions (reward_funcs)",
    "compute_metrics": "the output head runs only on trained positions, so no logits reach it; evaluation logs "
                       "eval_loss and eval_token_accuracy, and evaluate_generations() scores greedy generations",
    "preprocess_logits_for_metrics": "the output head runs only on trained positions, so no logits are kept",
}


def trl_arguments(trainer: str, args, kwargs: dict) -> None:
    """TRL's trainer arguments in `kwargs`: `peft_config` (a ready peft LoraConfig) taken as `lora_config` with
    use_lora = true, as TRL trains it; those vftrain does another way refused, each in one line."""
    for name, why in _TRL_ONLY.items():
        if name in kwargs:
            raise ConfigError(f"{trainer} takes no {name}= (TRL's): {why}")
    peft_config = kwargs.pop("peft_config", None)
    if peft_config is not None:
        if args.lora_config is not None and args.lora_config is not peft_config:
            raise ConfigError(f"{trainer}: peft_config= and lora_config are both set; give one")
        args.lora_config, args.use_lora = peft_config, True


def _check_template(config) -> None:
    """A missing chat_template file is named now, not after the model loads; chat_template_kwargs is a table."""
    if config.chat_template is not None:
        from vftrain.models import read_chat_template

        read_chat_template(config.chat_template)
    kwargs = config.chat_template_kwargs
    if kwargs is not None and not (isinstance(kwargs, dict) and all(isinstance(k, str) for k in kwargs)):
        raise ConfigError(f"chat_template_kwargs = {kwargs!r} must be a table of the template's variables, e.g. "
                          "{enable_thinking = false}")


def _check_lora_modules(config) -> None:
    """peft reads a string of modules_to_save character by character (every module whose name ends in one of its
    letters is trained in full), and a string of target_modules as a regular expression that must match a module's
    whole dotted name: `q_proj`, the natural command-line spelling of one module, matches none (a list entry matches
    a name or its last dotted parts). A plain name is therefore read as that one-entry list; a string with other
    characters stays the regular expression peft reads."""
    names = config.lora_modules_to_save
    if names is not None and not (isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)):
        raise ConfigError(f"lora_modules_to_save = {names!r} must be a list of module names such as ['lm_head'], "
                          "or unset (none)")
    target = config.lora_target_modules
    if not isinstance(target, str) and not (isinstance(target, (list, tuple)) and target
                                            and all(isinstance(n, str) for n in target)):
        raise ConfigError(f"lora_target_modules = {target!r} must be 'all-linear', a list of module names such as "
                          "['q_proj', 'v_proj'], or a regular expression matching whole module names")
    if isinstance(target, str) and re.fullmatch(r"[\w.]+", target):
        config.lora_target_modules = [target]


def _fsdp_config_with_defaults(config: Any, save_only_model: bool = False) -> dict:
    """`fsdp_config` (a table or a JSON file path) with vftrain's defaults: weights read by rank 0 alone and sent to
    the others (accelerate's cpu_ram_efficient_loading; SFTTrainer builds the model empty on the other ranks), and
    resume state written sharded, each process its own part (issue #12: a gathered 7B checkpoint is ~107 GB through
    one process). A checkpoint of the model alone has no resume state, and transformers refuses that combination."""
    if isinstance(config, str):  # inline JSON (as transformers accepts it) or a JSON file
        try:
            if config.lstrip().startswith("{"):
                config = json.loads(config)
            else:
                with open(config) as fh:
                    config = json.load(fh)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"fsdp_config = {config!r} is neither a JSON table nor a readable JSON file: "
                              f"{exc}") from None
    config = dict(config or {})
    if "cpu_ram_efficient_loading" not in config and "fsdp_cpu_ram_efficient_loading" not in config:
        config["cpu_ram_efficient_loading"] = True
    fsdp2 = str(config.get("version", config.get("fsdp_version", 2))) == "2"  # vftrain gathers FSDP2's model only
    if "state_dict_type" not in config and "fsdp_state_dict_type" not in config and not save_only_model and fsdp2:
        config["state_dict_type"] = "SHARDED_STATE_DICT"
    return config


def weights_from_rank0(args) -> bool:
    """Whether FSDP loads the weights on rank 0 only and broadcasts them (resolved `fsdp_config`)."""
    config = (args.fsdp_config or {}) if args.fsdp else {}
    value = config.get("cpu_ram_efficient_loading", config.get("fsdp_cpu_ram_efficient_loading", False))
    return str(value).lower() == "true"


def _check_deepspeed(config) -> None:
    if not config.deepspeed:
        return
    if config.micro_batch_tokens:
        raise ConfigError("micro_batch_tokens is not supported with deepspeed (its engine counts every forward as an "
                          "accumulation step); use fsdp, or leave micro_batch_tokens unset")
    if config.nan_policy == "skip":
        raise ConfigError("nan_policy = 'skip' cannot skip a step under deepspeed: its engine applies the update "
                          "inside the backward, before vftrain sees the step's loss, so training would go on with "
                          "non-finite weights; use nan_policy = 'stop' (the default), or fsdp")
    if not _cuda():
        raise ConfigError("deepspeed runs only on GPUs here (accelerate has no DeepSpeed CPU path); on CPU processes "
                          "use plain data parallel (leave deepspeed unset)")
    if importlib.util.find_spec("deepspeed") is None:
        # transformers would fail deep in its DeepSpeed setup and leave a half-built global config behind
        raise ConfigError("deepspeed is set but the deepspeed package is not installed: pip install deepspeed")


def _check_compile_layers(config) -> None:
    """compile_layers = true with a setting it cannot run beside (the model-dependent checks are
    models.layers_compiled's)."""
    if not config.compile_layers:
        return
    clash = [f"{name} = true" for name in ("use_cpu", "use_liger", "torch_compile") if getattr(config, name)]
    clash += [name for name in ("fsdp", "deepspeed") if getattr(config, name)]
    if clash:
        raise ConfigError(f"compile_layers = true cannot run with {' and '.join(clash)} (the CPU: compiled for "
                          "CUDA; liger: its Triton kernels do not trace; torch_compile: compiles the whole model; "
                          "fsdp/deepspeed: their sharding hooks are not compiled here); set compile_layers = false")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _bf16_supported() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "value"):  # enums such as SchedulerType
        return value.value
    if dataclasses.is_dataclass(value):  # accelerator_config: a table that loads back, not its repr
        return _jsonable(dataclasses.asdict(value))
    return str(value)


def _positive_ints(*values) -> bool:
    return all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in values)


def budgeted_micro_batch(packing: bool, longest: int, budget: int, batch_size: int, world: int) -> int:
    """RL's default micro_batch_size, sized in tokens rather than a fixed 8 rollouts (~4k tokens at 256 + 256, where
    the train phase ran at half SFT's speed; issue 20): as many rollouts as fit `budget` tokens (RL_MICRO_BATCH_TOKENS,
    its speed and memory measured there) at the `longest` a rollout can be, the largest count that divides this
    process's share of the step (every micro-batch then has as many rollouts, balanced by tokens: the packer's LPT
    rule); 8 without packing. Invalid numbers are left to the checks after this (1 here)."""
    if not packing:
        return 8
    if not _positive_ints(longest, budget, batch_size):
        return 1
    share = batch_size // world
    fit = max(1, budget // longest)
    return max((d for d in range(1, min(fit, share) + 1) if share % d == 0), default=1)


def filled_micro_batch(packing: bool, budget: int | None, batch_size: int, world: int) -> int:
    """SFT's default micro_batch_size: 8 rows, or under a token budget (packing) this process's whole share of the
    step in one accumulation slot, which the collator packs into the fewest forwards of at most `budget` tokens
    (`pack.split_by_tokens`). Slots of 8 rows, each split on its own, leave forwards part-empty: at 4,096 tokens a
    step of 64 rows (the throughput benchmark's mix) ran 16 forwards of ~2.5k tokens where 10 of ~3.9k hold them,
    and on an H200 a 7B LoRA forward cost about the same at either size (benchmarks/RESULTS.md, session 35).
    Invalid numbers are left to the checks after this (1 here)."""
    if not packing or budget is None:
        return 8
    if not _positive_ints(budget, batch_size):
        return 1
    return max(1, batch_size // world)


def compiles_when_unset(args) -> bool:
    """Whether `compile_layers` left unset may turn on for this run (the model decides the rest:
    `compile.compile_applies`). Measured on one GPU only: several processes ask for it with compile_layers = true
    (not under fsdp or deepspeed, whose sharding hooks are not compiled here); torch_compile compiles the whole model.
    Full weights with lean_mlp: +24% at 0.5B, +11% at the 1.3B long-row and 1.5B shapes, at the same peak memory
    (benchmarks/RESULTS.md, session 39)."""
    return args.world_size == 1 and not args.torch_compile


def _non_blocking_copies(value):
    """accelerate's loader copies each micro-batch to the GPU from pinned memory without waiting (`non_blocking`),
    unless the user's accelerator_config says otherwise. A blocking copy waits for every kernel already queued, so
    the GPU then idles while the host launches the next step: on a Qwen2.5-0.5B shape that was ~5 syncs and about
    a third of each step (benchmarks/RESULTS.md, "host syncs")."""
    if value is None:
        return {"non_blocking": True}
    if isinstance(value, dict):
        return {"non_blocking": True, **value}
    return value  # a JSON file or an AcceleratorConfig: the user's own
