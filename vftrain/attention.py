"""`attn_implementation = "varlen"`: packed micro-batches through a variable-length flash-attention kernel.

The packed sequence is attended segment by segment (a row never sees another row) without materialising a
[tokens x tokens] mask. Registered in transformers' AttentionInterface under a name that has no mask function,
so transformers builds no mask for it. On CUDA it runs `torch.nn.attention.varlen.varlen_attn` (PyTorch >= 2.10,
FlashAttention underneath); elsewhere it runs causal SDPA per segment, which is exact but slow (tests only).

The kernel does causal and sliding-window attention. It cannot do attention logit soft-capping (Gemma 2) or
attention sinks (gpt-oss): `unsupported_features` names them, `choose` then keeps the model's own attention for
"auto", and an explicit "varlen" is refused. Generation (padded prompts, a KV cache) runs under
`for_generation`, which switches the model to SDPA (or eager) for the duration.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from vftrain.errors import ConfigError

NAME = "varlen"
AUTO = "auto"

# Keyword arguments through which transformers' attention layers ask for math the kernel does not do.
_UNSUPPORTED_KWARGS = {"softcap": "attention logit soft-capping", "s_aux": "attention sinks",
                       "sinks": "attention sinks", "position_bias": "an additive position bias",
                       "block_indices": "block-sparse attention"}


def kernel_available() -> bool:
    """torch's variable-length flash kernel exists here (CUDA build of PyTorch >= 2.10)."""
    if not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def unsupported_features(model) -> list[str]:
    """What of `model`'s attention the varlen kernel cannot reproduce, from its configs and modules (empty: none)."""
    found = []
    configs = [model.config] + [getattr(model.config, k, None) for k in getattr(model.config, "sub_configs", {})]
    caps = {getattr(c, "attn_logit_softcapping", None) for c in configs if c is not None} - {None}
    if caps:
        found.append(f"attention logit soft-capping (attn_logit_softcapping = {sorted(caps)[0]})")
    if any(isinstance(getattr(m, "sinks", None), torch.nn.Parameter) for m in model.modules()):
        found.append("attention sinks")
    return found


def choose(model, requested: str, packing: bool) -> str | None:
    """The attention to train `model` with: `requested` unless it is "auto", which picks "varlen" for packed rows
    where the kernel exists and the model's attention allows, else None (the model's own default: SDPA where
    supported, eager otherwise). An explicit "varlen" the model's attention rules out is a ConfigError."""
    if requested == NAME:
        missing = unsupported_features(model)
        if missing:
            raise ConfigError(f"attn_implementation = 'varlen' cannot apply this model's {', '.join(missing)}; use "
                              "'auto' (picks the model's own attention) or 'eager'")
        return NAME
    if requested != AUTO:
        return requested
    if packing and kernel_available() and not unsupported_features(model):
        return NAME
    return None


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
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, dim]
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


def register() -> None:
    """Make "varlen" a valid `attn_implementation` for every transformers model (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
