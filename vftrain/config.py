"""Configs: one shared base (model, LoRA, batch, logging, sampling) and `SFTConfig` on top of it.

`TrainerConfig` holds every field an SFT and an RL run share, so SFT -> RL is a change of the `[sft]` table
to `[rl]`; `SFTConfig` adds only the dataset and data-path fields. Both subclass `transformers.TrainingArguments`
(the seed's API, and what the ecosystem's integrations read). Every field carries a help string in its metadata:
`vf-sft --help` prints them and the README's TOML reference is generated from the same text.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from vftrain.errors import ConfigError


def _f(default: Any, help: str, choices: tuple | None = None, **kw) -> Any:
    meta = {"help": help, "vftrain": True}  # marks our fields: TrainingArguments' own carry other metadata
    if choices:
        meta["vf_choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def launch_world_size() -> int:
    """Number of processes of this launch, read from the launcher's environment (torchrun, accelerate).

    Read before `TrainingArguments.__post_init__`, which already uses `gradient_accumulation_steps` (seed review
    bug 2), so it cannot come from the not-yet-initialised distributed state.
    """
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return max(1, int(value))
    except ValueError:
        raise ConfigError(f"environment WORLD_SIZE={value!r} is not an integer") from None


@dataclass
class TrainerConfig(TrainingArguments):
    """Fields shared by SFT and RL: model loading, LoRA, batch shape, logging defaults and sample generation."""

    # ---- model loading
    dtype: str = _f("auto", "Weights dtype: 'auto' (bfloat16 on a GPU that supports it, else float32), "
                    "'bfloat16', 'float16' or 'float32'.", ("auto", "bfloat16", "float16", "float32"))
    attn_implementation: str = _f("auto", "Attention kernel: 'auto' ('varlen' for packed rows on a CUDA GPU where "
                                  "the model's attention allows it, else the model's default: SDPA, or eager), "
                                  "'sdpa', 'eager', 'varlen' (variable-length flash attention over packed rows, CUDA; "
                                  "needs packing; no soft-capping or sinks), 'flex_attention', or any name registered "
                                  "in transformers.AttentionInterface.")
    master_weights: bool = _f(True, "Keep float32 copies of bf16/fp16 trainable weights for the optimizer step "
                              "(mixed precision). Pure bf16 AdamW rounds most updates away at fine-tuning learning "
                              "rates (benchmarks/RESULTS.md, Precision); false saves 8 bytes per trainable "
                              "parameter. FSDP2 and DeepSpeed keep float32 master weights themselves.")
    trust_remote_code: bool = _f(False, "Allow model code from the hub repository to run (only for models you trust).")
    use_liger: bool | None = _f(None, "Patch the model with liger-kernel's fused Triton kernels (RMSNorm, RoPE, SwiGLU). "
                                "Default: on when training on a CUDA GPU with liger-kernel installed (pip install "
                                "'vftrain[liger]') and the model type supported (0.5B: -20% peak memory, up to +18% speed; "
                                "benchmarks/RESULTS.md); true requires it.")
    lean_mlp: bool = _f(False, "Recompute SwiGLU's gate*up product in the backward instead of saving it (exact): "
                        "intermediate_size x 2 bytes less per token per layer (-17% peak memory on a 1.5B shape "
                        "at 16k tokens), for ~9% speed in eager mode (benchmarks/RESULTS.md).")
    # ---- LoRA
    use_lora: bool = _f(False, "Train LoRA adapters (peft) instead of all weights.")
    lora_rank: int = _f(8, "LoRA rank r.")
    lora_alpha: float = _f(16.0, "LoRA scaling numerator alpha (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input.")
    lora_target_modules: Any = _f("all-linear", "Modules that get adapters: 'all-linear' (every linear layer "
                                  "but the output head) or a list of module names such as ['q_proj', 'v_proj'].")
    lora_modules_to_save: Any = _f(None, "Modules trained in full and saved beside the adapter, e.g. ['lm_head'].")
    lora_use_rslora: bool = _f(False, "Use rank-stabilised LoRA scaling alpha / sqrt(r) (Kalajdzievski 2023).")
    lora_config: Any = _f(None, "A ready peft.LoraConfig (Python API only); overrides the lora_* fields.")
    merge_lora: bool = _f(False, "After training, also write <output_dir>/merged: the base model with the LoRA "
                          "adapter merged in, loadable by transformers and vLLM without peft.")
    nan_policy: str = _f("stop", "On a NaN/inf loss: 'stop' with a message before the weights are touched, or "
                         "'skip' the optimizer step.", ("stop", "skip"))
    # ---- batch shape
    batch_size: int = _f(64, "Sequences per optimizer step, summed over all processes.")
    micro_batch_size: int = _f(8, "Sequences per process per forward pass (with packing: on average; micro-batches "
                               "are balanced by tokens).")
    max_seq_len: int = _f(2048, "Longest tokenized row, in tokens; longer rows follow `long_rows`.")
    micro_batch_tokens: int | None = _f(None, "With packing: most tokens in one forward pass (a hard memory cap). A "
                                        "micro-batch over it runs as several forwards in the same step, so their "
                                        "number per step varies; the loss is unchanged. At least max_seq_len.")
    # ---- sample generation (monitoring during training; RL reuses the backends)
    sample_every_n_steps: int = _f(0, "Generate completions for a few fixed held-out prompts every N optimizer "
                                   "steps (0: never).")
    num_samples: int = _f(4, "Prompts generated for at each sampling step.")
    sample_backend: str = _f("embedded", "Who generates samples: 'embedded' (the model being trained) or 'openai' "
                             "(an OpenAI-compatible server such as `vllm serve`).", ("embedded", "openai"))
    sample_base_url: str = _f("http://localhost:8000/v1", "Base URL of the OpenAI-compatible server.")
    sample_timeout: float = _f(60.0, "Seconds before a sampling request to the server is abandoned.")
    max_new_tokens: int = _f(256, "Most tokens generated per sample.")
    temperature: float = _f(0.0, "Sampling temperature; 0 means greedy.")
    top_p: float = _f(1.0, "Nucleus sampling probability mass.")
    reward_funcs: Any = _f(["exact_match"], "Functions that score samples: 'exact_match' or 'module:function' "
                           "import paths; logged as eval/reward.")

    # ---- TrainingArguments fields whose defaults change for fine-tuning
    output_dir: str | None = _f(None, "Where checkpoints, the resolved config and metrics go (default "
                                "outputs/<run_name>).")
    run_name: str | None = _f(None, "Name of the run (default: sft-<date>-<time>).")
    learning_rate: float = _f(2e-5, "Peak learning rate (AdamW).")
    lr_scheduler_type: str = _f("cosine", "Learning-rate schedule after warmup (transformers scheduler names).")
    warmup_steps: float = _f(0.03, "Warmup: an integer number of steps, or a float in [0, 1) as a fraction of all steps.")
    logging_steps: float = _f(10, "Log metrics every N optimizer steps.")
    save_steps: float = _f(500, "Save a checkpoint every N optimizer steps.")
    bf16: bool | None = _f(None, "bfloat16 autocast; default: on where the GPU supports it.")
    report_to: Any = _f("none", "Reporting integrations ('wandb', 'tensorboard', 'trackio', ...); 'none' contacts "
                        "no service.")
    gradient_accumulation_steps: int | None = _f(None, "Computed: batch_size / (micro_batch_size * world_size). "
                                                 "Setting it is an error unless it equals that value.")
    per_device_train_batch_size: int = _f(8, "Set from micro_batch_size.")
    fsdp: bool | str | None = _f(None, "Shard weights, gradients and optimizer state over the GPUs with FSDP2 "
                                 "(through accelerate): true, or transformers' option string such as "
                                 "'full_shard offload'. Needs one process per GPU (torchrun or accelerate launch). "
                                 "With bf16 the sharded weights are kept in float32 (FSDP2 mixed precision).")
    fsdp_config: Any = _f(None, "FSDP tuning, as transformers reads it: a table such as {reshard_after_forward = "
                          "false, cpu_offload = true} or a JSON file path. vftrain sets cpu_ram_efficient_loading "
                          "= true unless given: only rank 0 reads the weights, the others build the model empty "
                          "and receive their shards from it (one copy of the model in CPU memory, not one per GPU).")
    deepspeed: Any = _f(None, "DeepSpeed config (JSON file path or table), e.g. ZeRO-3 (run on 2 GPUs: "
                        "benchmarks/RESULTS.md); needs the deepspeed package and one process per GPU. Not with "
                        "micro_batch_tokens.")
    remove_unused_columns: bool = _f(False, "Kept False: the data path selects its own columns.")
    ddp_find_unused_parameters: bool | None = _f(False, "DDP's search for parameters without a gradient, a graph "
                                                 "walk every step; off because vftrain's loss reaches every "
                                                 "trainable parameter.")
    logging_nan_inf_filter: bool = _f(False, "Replace NaN/inf losses in the logged average (transformers' filter); "
                                      "off because it costs a GPU sync per micro-batch, and a NaN loss stops "
                                      "training with a message instead.")

    def __post_init__(self):
        self._validate_choices()
        self._validate_batch()
        if not self.run_name:
            self.run_name = "sft-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        if not self.output_dir:
            self.output_dir = os.path.join("outputs", self.run_name)
        if self.bf16 is None:
            self.bf16 = _bf16_supported()
        if launch_world_size() > 1 and not _cuda():
            # transformers builds a CPU process group only when told to use the CPU, and needs a backend for it
            self.use_cpu = True
            self.ddp_backend = self.ddp_backend or "gloo"
        if self.dtype == "float16" and self.fp16:
            raise ConfigError("dtype = 'float16' with fp16 = true cannot train: fp16 autocast scales the loss and "
                              "torch's GradScaler refuses float16 gradients; use dtype = 'float32' with fp16 = true "
                              "(GPUs without bfloat16), or bfloat16")
        if self.fsdp:
            self.fsdp_config = _fsdp_config_with_defaults(self.fsdp_config)
        if self.fsdp and self.deepspeed:
            raise ConfigError("fsdp and deepspeed are both set; choose one sharding engine")
        if (self.fsdp or self.deepspeed) and launch_world_size() == 1:
            raise ConfigError(f"{'fsdp' if self.fsdp else 'deepspeed'} shards over several processes, but this "
                              "is one; launch with torchrun or accelerate launch (one process per GPU)")
        if self.deepspeed and self.micro_batch_tokens:
            raise ConfigError("micro_batch_tokens is not supported with deepspeed (its engine counts every forward "
                              "as an accumulation step); use fsdp, or leave micro_batch_tokens unset")
        if self.deepspeed and not _cuda():
            raise ConfigError("deepspeed runs only on GPUs here (accelerate has no DeepSpeed CPU path); on CPU "
                              "processes use plain data parallel (leave deepspeed unset)")
        super().__post_init__()
        if launch_world_size() > 1 and self.parallel_mode.value != "distributed":
            raise ConfigError(f"launched with WORLD_SIZE={launch_world_size()} but the training arguments set up "
                              "no process group; set ddp_backend (nccl on GPUs, gloo on CPUs)")

    def _validate_choices(self):
        for f in dataclasses.fields(self):
            choices = f.metadata.get("vf_choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name} = {getattr(self, f.name)!r} is not allowed; choose one of "
                                  + ", ".join(repr(c) for c in choices))
        for name in ("batch_size", "micro_batch_size", "max_seq_len", "lora_rank", "num_samples", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} = {value!r} must be a positive integer")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < self.max_seq_len:
            raise ConfigError(f"micro_batch_tokens = {self.micro_batch_tokens} must be at least max_seq_len "
                              f"({self.max_seq_len}), or every row could not fit a forward pass")
        if self.sample_every_n_steps < 0:
            raise ConfigError(f"sample_every_n_steps = {self.sample_every_n_steps!r} must be >= 0 (0 turns it off)")

    def _validate_batch(self):
        world = launch_world_size()
        per_step = self.micro_batch_size * world
        if self.batch_size % per_step:
            raise ConfigError(
                f"batch_size = {self.batch_size} is not divisible by micro_batch_size ({self.micro_batch_size}) "
                f"x world_size ({world}); choose a batch_size that is a multiple of {per_step}")
        steps = self.batch_size // per_step
        if self.gradient_accumulation_steps not in (None, steps):
            raise ConfigError(
                f"gradient_accumulation_steps = {self.gradient_accumulation_steps} disagrees with batch_size "
                f"({self.batch_size}) / (micro_batch_size ({self.micro_batch_size}) x world_size ({world})) = {steps}; "
                "leave it unset")
        self.gradient_accumulation_steps = steps
        self.per_device_train_batch_size = self.micro_batch_size

    def to_dict(self) -> dict:
        """All fields as JSON-safe values (a ready `lora_config` is written as its dict)."""
        out = {}
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            if f.name == "lora_config" and value is not None:
                value = value.to_dict() if hasattr(value, "to_dict") else str(value)
            out[f.name] = _jsonable(value)
        return out

    def save_resolved(self, directory: str, extra: dict | None = None) -> str:
        """Write the resolved config (every field, defaults included) as JSON to `directory/vftrain_config.json`."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "vftrain_config.json")
        with open(path, "w") as fh:
            json.dump({**(extra or {}), "config": self.to_dict()}, fh, indent=2, sort_keys=True)
        return path


@dataclass
class SFTConfig(TrainerConfig):
    """Supervised fine-tuning: `TrainerConfig` plus where the data comes from and how rows become batches."""

    dataset: str | None = _f(None, "Dataset: a hub name or a local file/folder (jsonl, json, parquet, csv). The "
                             "Python API may pass a datasets.Dataset to SFTTrainer instead.")
    dataset_split: str = _f("train", "Split of `dataset` to train on.")
    eval_split: str | None = _f(None, "Split of `dataset` for evaluation loss and held-out samples (None: none).")
    packing: bool = _f(True, "Pack rows into token-balanced micro-batches with attention kept inside each row; "
                       "False pads each micro-batch to its longest row.")
    long_rows: str = _f("drop", "What to do with rows longer than max_seq_len: 'drop' them, 'truncate' them "
                        "(the end of the completion is lost), or 'error'.", ("drop", "truncate", "error"))
    split_turns: bool = _f(True, "Train every assistant turn in the context inference renders it in: where the chat "
                           "template renders earlier turns differently (Qwen3 drops their reasoning), split the "
                           "conversation into one row per such turn (the added rows and tokens are reported); "
                           "False drops those conversations instead.")
    dataset_num_proc: int | None = _f(None, "Processes for tokenizing the dataset (None: one, or up to 8 for "
                                      "20,000 rows and more).")
    eval_generation_rows: int = _f(0, "After training, greedily generate for this many eval rows and report "
                                   "exact-match accuracy (0: skip).")

    def __post_init__(self):
        if self.eval_split and str(getattr(self.eval_strategy, "value", self.eval_strategy)) == "no":
            self.eval_strategy = "steps"  # an eval split means an eval loss, every eval_steps (or logging_steps)
        if self.micro_batch_tokens is not None and not self.packing:
            raise ConfigError("micro_batch_tokens needs packing = true (padded micro-batches are sized in rows)")
        if self.attn_implementation == "varlen" and not self.packing:
            raise ConfigError("attn_implementation = 'varlen' needs packing = true (padded rows have no varlen "
                              "boundaries); use 'sdpa' with packing = false")
        super().__post_init__()


def _fsdp_config_with_defaults(config: Any) -> dict:
    """`fsdp_config` (a table or a JSON file path) with vftrain's defaults: weights read by rank 0 alone and sent to
    the others (accelerate's cpu_ram_efficient_loading; SFTTrainer builds the model empty on the other ranks)."""
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
    return config


def weights_from_rank0(args) -> bool:
    """Whether FSDP loads the weights on rank 0 only and broadcasts them (resolved `fsdp_config`)."""
    config = (args.fsdp_config or {}) if args.fsdp else {}
    value = config.get("cpu_ram_efficient_loading", config.get("fsdp_cpu_ram_efficient_loading", False))
    return str(value).lower() == "true"


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
    return str(value)
