"""`attn_implementation = "varlen"`: packed micro-batches through a variable-length flash-attention kernel.

The packed sequence is attended segment by segment (a row never sees another row) without materialising a
[tokens x tokens] mask. Registered in transformers' AttentionInterface under a name that has no mask function,
so transformers builds no mask for it. On CUDA it runs `torch.nn.attention.varlen.varlen_attn` (PyTorch >= 2.10,
FlashAttention underneath); elsewhere it runs causal SDPA per segment, which is exact but slow (tests only).

The kernel does causal and sliding-window attention. It cannot do attention logit soft-capping (Gemma 2),
attention sinks (gpt-oss), chunked attention (Llama 4) or attention dropout, and on CUDA it runs only on Ampere or
newer GPUs, in float16/bfloat16, with equal q/k/v head sizes of at most 256 in multiples of 8: `unsupported_features`
names what a model needs beyond that, `choose` then keeps the model's own attention for "auto", and an explicit
"varlen" is refused. Generation (padded prompts, a KV cache) runs under
`for_generation`, which switches the model to SDPA (or eager) for the duration.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F

from vftrain.errors import ConfigError

NAME = "varlen"
AUTO = "auto"

# Keyword arguments through which transformers' attention layers ask for math the kernel does not do.
_UNSUPPORTED_KWARGS = {"softcap": "attention logit soft-capping", "s_aux": "attention sinks",
                       "sinks": "attention sinks", "position_bias": "an additive position bias",
                       "block_indices": "block-sparse attention"}


def kernel_available(device=None) -> bool:
    """torch's variable-length flash kernel can run on `device` (a CUDA device, CUDA build of PyTorch >= 2.10).
    `device` None: any CUDA GPU here. A CPU device (`use_cpu = true`, a model kept on the CPU) never has it."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def unsupported_features(model, device=None) -> list[str]:
    """What of `model`'s attention the varlen kernel cannot reproduce, from its configs and modules (empty: none)."""
    found = []
    configs = [model.config] + [getattr(model.config, k, None) for k in getattr(model.config, "sub_configs", {})]
    caps = {getattr(c, "attn_logit_softcapping", None) for c in configs if c is not None} - {None}
    if caps:
        found.append(f"attention logit soft-capping (attn_logit_softcapping = {sorted(caps)[0]})")
    if any(isinstance(getattr(m, "sinks", None), torch.nn.Parameter) for m in model.modules()):
        found.append("attention sinks")
    found += _chunked_and_dropout(model.config.get_text_config(decoder=True))
    if kernel_available(device):  # the CPU path (exact segmented SDPA) has none of the kernel's limits
        found += kernel_limits(model)
    return found


def _chunked_and_dropout(config) -> list[str]:
    """Chunked attention (Llama 4: transformers builds it as a mask, which varlen never sees; masking_utils'
    create_masks_for_generate reads it from layer_types, or from attention_chunk_size without them) and attention
    dropout (the kernel has none), from the text config."""
    found = []
    chunk = getattr(config, "attention_chunk_size", None)
    layer_types = getattr(config, "layer_types", None)
    if chunk and ("chunked_attention" in layer_types if layer_types else True):
        found.append(f"chunked attention (attention_chunk_size = {chunk})")
    # Named attention_dropout, attn_pdrop (GPT-2), attention_probs_dropout_prob, ... by family.
    dropout = {k: v for k, v in config.to_dict().items() if ("attn" in k or "attention" in k) and "drop" in k
               and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0}
    if dropout:
        found.append("attention dropout (" + ", ".join(f"{k} = {v}" for k, v in sorted(dropout.items())) + ")")
    return found


def kernel_limits(model) -> list[str]:
    """What of this GPU, `model`'s weights and its head sizes torch's CUDA varlen kernel refuses: FlashAttention's
    mha_varlen_fwd (pytorch aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp) needs compute
    capability >= 8.0, float16/bfloat16 inputs, and a head size <= 256, a multiple of 8, equal for q, k and v."""
    found = []
    capability = torch.cuda.get_device_capability()
    if tuple(capability) < (8, 0):
        found.append(f"this GPU (compute capability {capability[0]}.{capability[1]}; the kernel needs 8.0, Ampere "
                     "or newer)")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype not in (torch.float16, torch.bfloat16):
        found.append(f"{str(dtype).replace('torch.', '')} weights (the kernel takes float16 or bfloat16)")
    for qk, v in sorted(head_sizes(model)):
        if qk != v:
            found.append(f"q/k head size {qk} with v head size {v} (the kernel needs them equal)")
        found += [f"head size {d} (the kernel takes at most 256, a multiple of 8)"
                  for d in sorted({qk, v}) if d > 256 or d % 8]
    return found


def head_sizes(model) -> set[tuple[int, int]]:
    """Every (q/k, v) head size of `model`'s attention layers: from the text config and its per-layer overrides
    (Gemma 4's full-attention layers: global_head_dim), MLA's qk_nope + qk_rope and v_head_dim (DeepSeek-V2/V3), and
    the head_dim / qk_head_dim / v_head_dim the attention modules themselves keep (per-layer choices a config field
    does not name, such as a sliding layer's own head size)."""
    config = model.config.get_text_config(decoder=True)
    configs = list(config.per_layer_config) if getattr(config, "is_heterogeneous", False) else [config]
    sizes = set()
    for c in configs:
        heads, hidden = getattr(c, "num_attention_heads", None), getattr(c, "hidden_size", None)
        base = getattr(c, "head_dim", None) or (hidden // heads if heads and hidden else None)
        nope, rope = getattr(c, "qk_nope_head_dim", None), getattr(c, "qk_rope_head_dim", None)
        qk = getattr(c, "qk_head_dim", None) or (nope + rope if nope and rope else None) or base
        v = getattr(c, "v_head_dim", None) or base
        if qk and v:
            sizes.add((qk, v))
    for m in model.modules():
        base = getattr(m, "head_dim", None)
        if isinstance(base, int) and not isinstance(m, torch.nn.Linear):
            sizes.add((getattr(m, "qk_head_dim", None) or base, getattr(m, "v_head_dim", None) or base))
    return sizes


def choose(model, requested: str, packing: bool, device=None) -> str | None:
    """The attention to train `model` with on `device`: `requested` unless it is "auto", which picks "varlen" for
    packed rows where the kernel runs on that device and the model's attention allows, else None (the model's own
    default: SDPA where supported, eager otherwise). An explicit "varlen" the model's attention rules out is a
    ConfigError."""
    if requested == NAME:
        missing = unsupported_features(model, device)
        if missing:
            raise ConfigError(f"attn_implementation = 'varlen' cannot run this model here: {'; '.join(missing)}; "
                              "use 'auto' (picks the model's own attention where varlen cannot) or 'eager'")
        return NAME
    if requested != AUTO:
        return requested
    if packing and kernel_available(device) and not unsupported_features(model, device):
        return NAME
    return None


class _MaskReached(Exception):
    def __init__(self, position_ids):
        self.position_ids = position_ids


def keeps_rows_apart(model) -> bool:
    """Whether `model`'s attention keeps packed rows apart: its forward hands the packed position_ids to
    transformers' mask builders (masking_utils), which then mask each row off from the others (and hand them to
    varlen). A model that builds its mask without them (Bloom and MPT, whose ALiBi reads no position_ids; OPT) or
    outside masking_utils lets a packed row attend to the rows before it.

    Probed with a forward of two packed rows of two tokens, stopped where the first mask is built (nothing past the
    embeddings is computed); a forward that never builds one runs to its end, or fails: either way, no."""
    from transformers import masking_utils

    original = masking_utils._preprocess_mask_arguments
    signature = inspect.signature(original)

    def stop(*args, **kwargs):
        raise _MaskReached(signature.bind(*args, **kwargs).arguments.get("position_ids"))

    device = next(model.parameters()).device
    ids = torch.zeros((1, 4), dtype=torch.long, device=device)
    positions = torch.tensor([[0, 1, 0, 1]], device=device)
    masking_utils._preprocess_mask_arguments = stop
    try:
        with torch.no_grad():
            model(input_ids=ids, position_ids=positions, use_cache=False)
    except _MaskReached as reached:
        return reached.position_ids is not None
    except Exception:  # noqa: BLE001 - a model the probe cannot run says nothing about its mask
        return False
    finally:
        masking_utils._preprocess_mask_arguments = original
    return False


def fallback_implementation(model) -> str:
    """What generation runs with when training uses varlen: SDPA where the model supports it, else eager."""
    return "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"


@contextlib.contextmanager
def for_generation(model):
    """Run `model` with masked attention (SDPA or eager) inside the block when it trains with varlen: generation
    pads prompts and decodes with a KV cache, which the packed-only kernel cannot. Restores it afterwards."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    current = getattr(base.config, "_attn_implementation", None)
    if current != NAME:
        yield model
        return
    base.set_attn_implementation(fallback_implementation(base))
    try:
        yield model
    finally:
        base.set_attn_implementation(NAME)


def cu_seqlens_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative row lengths (int32, starting at 0) of a packed [1, T] position_ids, and the longest row.

    Costs a host sync; the collator passes `cu_seq_lens_q` / `max_length_q` ready-made to avoid it.
    """
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero()[:, 0]
    bounds = torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    return bounds, int((bounds[1:] - bounds[:-1]).max())


def window_size(sliding_window: int | None) -> tuple[int, int]:
    """The kernel's (left, right) window for transformers' `sliding_window`: transformers lets a query see the
    `sliding_window` keys ending at itself (masking_utils.sliding_window_overlay: kv > q - sliding_window), and
    FlashAttention's left window counts the keys before the query (modeling_flash_attention_utils passes
    sliding_window - 1). (-1, 0) is plain causal."""
    return (-1, 0) if sliding_window is None else (int(sliding_window) - 1, 0)


def varlen_attention_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                             cu_seq_lens_q=None, max_length_q=None, position_ids=None, sliding_window=None,
                             is_causal=None, **kwargs):
    """query/key/value: [1, heads, T, head_dim] (HF layout); returns ([1, T, heads, head_dim], None)."""
    asked = [what for name, what in _UNSUPPORTED_KWARGS.items() if kwargs.get(name) is not None]
    if is_causal is False:
        asked.append("bidirectional attention")
    if asked:
        raise ValueError(f"attn_implementation='varlen' cannot apply {', '.join(asked)}; use 'auto' or 'eager'")
    if query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise ValueError("attn_implementation='varlen' runs packed training forwards only (packing = true); "
                         "generate inside vftrain.attention.for_generation(model)")
    if cu_seq_lens_q is None:
        if position_ids is None:
            raise ValueError("varlen attention needs cu_seq_lens_q or position_ids")
        cu_seq_lens_q, max_length_q = cu_seqlens_from_positions(position_ids)
    dtype = _kernel_dtype(module, query)
    q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))  # [T, heads, dim]
    if k.shape[1] != q.shape[1]:
        # Expanding grouped KV heads first measured faster than the kernel's own GQA path (CONTEXT.md probe).
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    cu = cu_seq_lens_q.to(device=q.device, dtype=torch.int32)
    window = window_size(sliding_window)
    if q.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        out = varlen_attn(q, k, v, cu, cu, int(max_length_q), int(max_length_q), scale=scaling, window_size=window)
    else:
        out = _segmented_sdpa(q, k, v, cu.tolist(), scaling, window[0])
    return out[None], None


def _kernel_dtype(module, query: torch.Tensor) -> torch.dtype:
    """The one dtype q, k and v go to the kernel in, as transformers' flash path picks it
    (integrations/flash_attention.get_target_dtype): a float32 query goes to the autocast dtype, else to the
    weights' dtype. Under autocast RoPE leaves q and k in float32 (float32 cos/sin) while v leaves its projection
    in the autocast dtype, and the CUDA kernel needs all three in one 16-bit dtype."""
    from transformers.integrations.flash_attention import get_target_dtype

    return (get_target_dtype(query, module) if hasattr(module, "config") else None) or query.dtype


def _segmented_sdpa(q, k, v, bounds: list[int], scale, left: int):
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg = [t[a:b].transpose(0, 1)[None] for t in (q, k, v)]  # [1, heads, len, dim]
        if left < 0:
            out = F.scaled_dot_product_attention(*seg, is_causal=True, scale=scale)
        else:  # key j is visible from query i when i - left <= j <= i
            i = torch.arange(b - a, device=q.device)
            offset = i[:, None] - i[None, :]
            out = F.scaled_dot_product_attention(*seg, attn_mask=(offset >= 0) & (offset <= left), scale=scale)
        parts.append(out[0].transpose(0, 1))
    return torch.cat(parts)


# ---- decoding: one query token per row over a static KV cache (vftrain.sampling.tokens)
DECODE = "vftrain_decode"
_decode_columns: int | None = None


@contextlib.contextmanager
def decode_columns(columns: int | None):
    """Inside the block, decode attention reads only the first `columns` columns of the static cache (the filled
    ones, rounded up): the rest are masked anyway, and reading them is most of a late decoding step's traffic. A
    Python int, so a CUDA graph captured inside the block keeps it: one graph per width."""
    global _decode_columns
    before, _decode_columns = _decode_columns, columns
    try:
        yield
    finally:
        _decode_columns = before


def decode_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA for a decoding step that reads the grouped K/V cache once: the query heads sharing a K/V head become
    that head's "query rows" ([rows, kv heads, group, dim], what transformers >= 5.24 calls pack_gqa) instead of
    repeating K and V to every query head (`repeat_kv`, which writes and reads the whole cache again per step), and
    only the `decode_columns` filled columns are read. Anything else (the prompt's forward, no mask) is stock SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows, heads, length, dim = query.shape
    if length != 1 or attention_mask is None or attention_mask.shape[1] != 1 or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if _decode_columns is not None and _decode_columns < key.shape[2]:
        key, value = key[:, :, :_decode_columns], value[:, :, :_decode_columns]
        attention_mask = attention_mask[..., :_decode_columns]
    groups = heads // key.shape[1]  # query head h reads K/V head h // groups (transformers' repeat_kv)
    if attention_mask.dtype != torch.bool and attention_mask.dtype != query.dtype:
        attention_mask = attention_mask.to(query.dtype)
    out = F.scaled_dot_product_attention(query.reshape(rows, key.shape[1], groups, dim), key, value,
                                         attn_mask=attention_mask, scale=scaling)
    return out.reshape(rows, heads, 1, dim).transpose(1, 2), None


@contextlib.contextmanager
def for_decoding(model):
    """Decode attention (above) inside the block for a model that runs SDPA; others are left as they are."""
    register()  # a model loaded without vftrain.models
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    configs = [c for c in {id(c): c for c in [base.config, *(m.config for m in base.modules()
                                                               if hasattr(m, "config"))]}.values()
               if getattr(c, "_attn_implementation", None) == "sdpa"]
    for config in configs:
        config._attn_implementation = DECODE
    try:
        yield model
    finally:
        for config in configs:
            config._attn_implementation = "sdpa"


def register() -> None:
    """Make "varlen" (training) and the decode attention valid `attn_implementation`s of every transformers model
    (idempotent); the decode attention builds SDPA's masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if DECODE in AttentionInterface():
        return
    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionInterface.register(DECODE, decode_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(DECODE, sdpa_mask)
