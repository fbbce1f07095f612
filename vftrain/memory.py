"""Peak GPU memory of a training run, estimated before its first step, and the defaults that make it fit.

`estimate` adds up what one process holds at its peak (the end of the forward / start of the backward of the
largest micro-batch): weights, gradients, the optimizer's state by `master_weights` mode, LoRA adapters, the
activations each decoder layer keeps for its backward per token (by attention kernel, liger-kernel, lean_mlp and
gradient checkpointing) and the fused output head's chunk. `fit` compares it with the card's memory: where it does
not fit, the lean paths the user left unset (`lean_mlp`, then `gradient_checkpointing`) are turned on, in that order
(the cheapest in speed first: lean_mlp costs nothing measurable, checkpointing ~25%; benchmarks/RESULTS.md; lean_mlp
is on anyway in a full-weight run, and left off where it saves nothing), checkpointing as few layers as fit; where
even that does not fit, the run stops before training with the setting that fits. Sharded runs (FSDP, DeepSpeed)
are not estimated. The GPU measurement beside each estimate: benchmarks/memory21.sh.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from vftrain import attention
from vftrain.errors import ConfigError
from vftrain.mlp import has_swiglu
from vftrain.optim import KAHAN_MODES, LOW_PRECISION

log = logging.getLogger("vftrain")

GIB = 2**30
# Share of the card a run may plan to use: the caching allocator's fragmentation, the CUDA context and kernels'
# workspaces live outside the estimate.
FIT_SHARE = 0.9
HEAD_CHUNK = 2048  # vftrain.loss.CHUNK: rows of logits the fused head holds at once


@dataclasses.dataclass
class Shape:
    """What the estimate reads from a decoder-only model."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, model) -> "Shape":
        config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else \
            model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers, heads,
                   getattr(config, "num_key_value_heads", None) or heads, head_dim, config.vocab_size)


@dataclasses.dataclass
class Plan:
    """The run's memory-relevant settings, as the estimate sees them."""

    tokens: int  # tokens in the largest micro-batch
    master_weights: bool | str = True
    use_lora: bool = False
    lora_rank: int = 8
    lean_mlp: bool = False
    swiglu: bool = True  # the model's MLPs are SwiGLU ones, which lean_mlp patches (others keep their forward)
    gradient_checkpointing: bool = False
    every_n_layers: int = 1
    liger: bool = False
    varlen: bool = False
    act_bytes: int = 2  # bytes per activation element: 2 under bf16/fp16, 4 in float32
    bf16_adapters: bool = False  # LoRA adapters kept in the bf16 weights' dtype (`lora.adapters_in_base_dtype`)
    accumulates: bool = True  # gradient accumulation over micro-batches: a step's gradients live through forwards


def optimizer_bytes_per_param(dtype: torch.dtype, master_weights) -> int:
    """Optimizer state kept per trainable parameter: AdamW's two moments, plus the master copy or compensation."""
    if dtype not in LOW_PRECISION or master_weights is False:
        return 2 * torch.empty((), dtype=dtype).element_size()
    if master_weights in KAHAN_MODES:  # compensation in the weight's dtype, moments in the mode's
        return 2 + 2 * torch.empty((), dtype=KAHAN_MODES[master_weights]).element_size()
    return 4 + 8  # float32 copy and moments


def step_bytes_per_param(dtype: torch.dtype, master_weights) -> int:
    """Made for the optimizer step only: with float32 master weights, a float32 copy of the gradients
    (`optim.use_float32_master_weights`)."""
    return 4 if dtype in LOW_PRECISION and master_weights is True else 0


def lora_parameters(model, rank: int) -> int:
    """Adapter parameters of rank `rank` on every linear layer but the output head (lora_target_modules 'all-linear')."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sum(rank * (m.in_features + m.out_features) for m in model.modules()
               if isinstance(m, torch.nn.Linear) and m is not head)


def layer_activation_elements(shape: Shape, plan: Plan) -> int:
    """Elements one decoder layer keeps for its backward, per token. Two RMSNorms: liger's keep their input and the
    normalised output read by the next matmul (2 x hidden each), transformers' also a float32 copy of the input
    (+2 x hidden in bf16 units). Attention: q and the output, k and v (expanded to every query head for the varlen
    kernel: vftrain/attention.py). SwiGLU: gate, up, silu(gate) and the product in transformers' module (4 x
    intermediate), liger's recomputes silu (3), lean_mlp also the product (2; vftrain/mlp.py)."""
    norms = 2 * (2 if plan.liger else 4) * shape.hidden
    kv = shape.heads if plan.varlen else shape.kv_heads
    attention = (2 * shape.heads + 2 * kv) * shape.head_dim
    lean = plan.lean_mlp and plan.swiglu and not plan.use_lora  # a LoRA-wrapped down projection keeps its forward
    mlp = (2 if lean else 3 if plan.liger else 4) * shape.intermediate
    # float32 LoRA adapters on bf16 activations: peft casts each adapted layer's input to float32 and autocast back
    # to bf16 for the matmul, so every adapter keeps its own copy (q, k, v and gate, up no longer share one, o_proj's
    # is new). bf16 adapters read the input as it is (a 7B LoRA measured 32.8 GiB at a 4k forward's end: 36.0
    # estimated with the copies, 32.8 without; benchmarks/RESULTS.md, session 35).
    copies = plan.use_lora and not plan.bf16_adapters and plan.act_bytes == 2
    adapters = 3 * shape.hidden + shape.heads * shape.head_dim if copies else 0
    return norms + attention + mlp + adapters


def estimate(model, plan: Plan) -> dict[str, int]:
    """Bytes at the peak, by part (the sum is the estimate): the end of the largest micro-batch's forward (all its
    activations and the fused head's buffers held; the step's gradients so far only when it accumulates: the
    trainer frees them after each step), or the optimizer step (every gradient, and the step's own buffers) where
    that is larger."""
    shape = Shape.of(model)
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    parts = {"weights": weights}
    if plan.use_lora:
        adapters = lora_parameters(model, plan.lora_rank)
        # the adapters, their gradients and optimizer state: bf16 with the master_weights mode's state, else float32
        per = 2 + 2 + optimizer_bytes_per_param(torch.bfloat16, plan.master_weights) if plan.bf16_adapters else 16
        parts["lora"] = adapters * per
        step = {}
    else:
        trainable = [p for p in params if p.requires_grad]
        gradients = sum(p.numel() * p.element_size() for p in trainable)
        if plan.accumulates:
            parts["gradients"] = gradients
        parts["optimizer"] = sum(p.numel() * optimizer_bytes_per_param(p.dtype, plan.master_weights)
                                 for p in trainable)
        step = {"weights": weights, "gradients": gradients, "optimizer": parts["optimizer"],
                "step buffers": sum(p.numel() * step_bytes_per_param(p.dtype, plan.master_weights)
                                    for p in trainable)}
    per_layer = layer_activation_elements(shape, plan)
    # Each checkpointed layer keeps only its input (transformers checkpoints layers 0, n, 2n, ...); the others keep
    # everything, to the forward's end.
    kept = -(-shape.layers // plan.every_n_layers) if plan.gradient_checkpointing else 0
    layers = kept * shape.hidden + (shape.layers - kept) * per_layer
    # Outside the layers: the embedding output, the final norm (as a layer norm) and the trained hidden states.
    parts["activations"] = plan.tokens * (layers + 5 * shape.hidden) * plan.act_bytes
    # The fused head: one chunk of logits in float32 (logits, softmax, their gradient: ~12 bytes per logit), the
    # float32 weight-gradient accumulator, the hidden states' gradient.
    chunk = min(HEAD_CHUNK, plan.tokens)
    accumulator = 0 if plan.use_lora else shape.vocab * shape.hidden * 4
    parts["head"] = 12 * chunk * shape.vocab + accumulator + plan.tokens * shape.hidden * 4
    if kept:  # the backward recomputes one checkpointed layer at a time, once the head's buffers are freed
        parts["head"] = max(parts["head"], plan.tokens * per_layer * plan.act_bytes)
    return step if total(step) > total(parts) else parts


def total(parts: dict[str, int]) -> int:
    return sum(parts.values())


def describe(parts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v / GIB:.1f}" for k, v in parts.items()) + f" (GiB; total {total(parts) / GIB:.1f})"


def card_bytes(device: torch.device | None = None) -> int | None:
    """Memory this process can use on its GPU (free, plus what it holds already), None off CUDA."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return None
    index = torch.device(device).index if device is not None else None
    free, _ = torch.cuda.mem_get_info(index)
    return free + torch.cuda.memory_reserved(index)


def tokens_per_micro_batch(args) -> int:
    """The largest micro-batch the run can form: micro_batch_tokens, else the longest row (SFT: max_seq_len; RL: a
    rollout's prompt + completion) x micro_batch_size."""
    return args.micro_batch_tokens or args.longest_row() * args.micro_batch_size


def uses_liger(model) -> bool:
    """Whether liger-kernel's RMSNorm / SwiGLU run in this model. vftrain patches the model's instances
    (`models.apply_liger`), which keeps the modules' classes and renames them through `_get_name` only; liger's
    class-level patch replaces the classes."""
    return any(m._get_name().startswith("Liger") for m in model.modules())


def plan_of(args, model, tokens: int | None = None) -> Plan:
    """The Plan of a run with `args` on `model` as loaded (its attention kernel and liger patches), its largest
    micro-batch `tokens` where known (else the configured bound)."""
    kwargs = args.gradient_checkpointing_kwargs or {}
    dtype = next(model.parameters()).dtype
    # compiled layers: inductor fuses the norms and SwiGLU as liger does (the 7B LoRA's peak measured alike)
    liger = uses_liger(model) or bool(args.compile_layers)
    varlen = getattr(model.config, "_attn_implementation", None) == attention.NAME
    return Plan(tokens=tokens or tokens_per_micro_batch(args), master_weights=args.master_weights,
                use_lora=args.use_lora, lora_rank=args.lora_rank, lean_mlp=bool(args.lean_mlp),
                swiglu=has_swiglu(model),
                gradient_checkpointing=bool(args.gradient_checkpointing),
                every_n_layers=int(kwargs.get("every_n_layers", 1)), liger=liger, varlen=varlen,
                act_bytes=2 if (args.bf16 or args.fp16 or dtype in LOW_PRECISION) else 4,
                bf16_adapters=bool(args.use_lora and args.master_weights and dtype == torch.bfloat16),
                # a slot split by micro_batch_tokens runs its parts back to back: the first part's gradients live
                accumulates=(args.gradient_accumulation_steps or 1) > 1 or args.micro_batch_tokens is not None)


def fit(model, plan: Plan, budget: int, unset: tuple[str, ...], sparse: bool = False) -> dict[str, bool | int]:
    """The values of the unset fields among ('lean_mlp', 'gradient_checkpointing') that make `plan` fit `budget`
    bytes: lean_mlp on where it applies (SwiGLU MLPs, full weights); the rest off where the run fits without them,
    else turned on in that order until it fits (logged, one line). With `sparse` (the user gave no every_n_layers)
    checkpointing turned on here covers as few layers as fit ("every_n_layers" in the result, where above 1).
    Raises ConfigError naming what fits when even that does not."""
    limit = budget * FIT_SHARE
    # lean_mlp is on by default for full-weight runs on one GPU: no slower at 0.5B and 1.3B, 4 GiB less at both
    # (benchmarks/RESULTS.md, "lean_mlp by default"). A LoRA-wrapped down projection keeps the stock forward.
    chosen = {name: name == "lean_mlp" and plan.swiglu and not plan.use_lora for name in unset}
    plan = dataclasses.replace(plan, **{name: True for name, on in chosen.items() if on})
    parts = estimate(model, plan)
    turned = []
    for name in ("lean_mlp", "gradient_checkpointing"):
        if total(parts) <= limit or name not in unset or chosen[name] or (name == "lean_mlp" and not plan.swiglu):
            continue
        lean = dataclasses.replace(plan, **{name: True})
        lean_parts = estimate(model, lean)
        if total(lean_parts) == total(parts):  # lean_mlp in a LoRA run: adapted MLPs keep their forward
            continue
        chosen[name] = True
        turned.append(name)
        plan, parts = lean, lean_parts
        if name == "gradient_checkpointing" and sparse:
            plan = sparsest_checkpointing(model, plan, limit)
            if plan.every_n_layers > 1:
                chosen["every_n_layers"] = plan.every_n_layers
                turned[-1] += f" (every {plan.every_n_layers} layers)"
                parts = estimate(model, plan)
    if turned and total(parts) <= limit:
        log.info("memory: %s set to true: the run's estimated peak without it is above %.0f%% of this GPU's "
                 "%.1f GiB at %s tokens per micro-batch (now %s)", " and ".join(turned), FIT_SHARE * 100,
                 budget / GIB, f"{plan.tokens:,}", describe(parts))
    if total(parts) > limit:
        raise ConfigError(_does_not_fit(model, plan, parts, budget))
    return chosen


def sparsest_checkpointing(model, plan: Plan, limit: float) -> Plan:
    """`plan` checkpointing every n-th layer for the largest n that fits `limit` (1 when none does): a layer not
    checkpointed keeps its activations and is not recomputed. A LoRA backward is about one forward, so checkpointing
    every layer adds about half a step (a 7B LoRA at 16k tokens per forward on an 80 GB card: 10.6k tok/s with every
    layer checkpointed, 14.0k with every 3rd; benchmarks/RESULTS.md, session 35)."""
    layers = Shape.of(model).layers
    for n in range(layers, 1, -1):
        sparse = dataclasses.replace(plan, every_n_layers=n)
        if total(estimate(model, sparse)) <= limit:
            return sparse
    return dataclasses.replace(plan, every_n_layers=1)


def _does_not_fit(model, plan: Plan, parts: dict[str, int], budget: int) -> str:
    """One line: the estimate, the card, and the setting that fits (fewer tokens per micro-batch, else LoRA)."""
    limit = budget * FIT_SHARE
    # the largest multiple of 1,024 tokens that fits (not linear in tokens: the head's fixed buffers or a recomputed
    # layer, whichever is larger)
    fits = next((t for t in range((plan.tokens - 1) // 1024 * 1024, 0, -1024)
                 if total(estimate(model, dataclasses.replace(plan, tokens=t))) <= limit), 0)
    said = (f"the run needs about {total(parts) / GIB:.1f} GiB at {plan.tokens:,} tokens per micro-batch "
            f"({describe(parts)}), more than {FIT_SHARE:.0%} of this GPU's {budget / GIB:.1f} GiB")
    if fits >= 1024:
        return said + f"; set micro_batch_tokens = {fits} (and max_seq_len at most that)"
    if not plan.use_lora:
        return said + "; even one row does not fit: set use_lora = true, or shard the model with fsdp = true"
    return said + "; even one row does not fit: use a GPU with more memory, or shard the model with fsdp = true"
