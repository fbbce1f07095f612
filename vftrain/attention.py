"""`attn_implementation = "varlen"`: packed micro-batches through a variable-length flash-attention kernel.

The packed sequence is attended segment by segment (a row never sees another row) without materialising a
[tokens x tokens] mask. Registered in transformers' AttentionInterface under a name that has no mask function,
so transformers builds no mask for it. On CUDA it runs `torch.nn.attention.varlen.varlen_attn` (PyTorch >= 2.10,
FlashAttention underneath); elsewhere it runs causal SDPA per segment, which is exact but slow (tests only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "varlen"


def cu_seqlens_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative row lengths (int32, starting at 0) of a packed [1, T] position_ids, and the longest row.

    Costs a host sync; the collator passes `cu_seq_lens_q` / `max_length_q` ready-made to avoid it.
    """
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero()[:, 0]
    bounds = torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    return bounds, int((bounds[1:] - bounds[:-1]).max())


def varlen_attention_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                             cu_seq_lens_q=None, max_length_q=None, position_ids=None, **kwargs):
    """query/key/value: [1, heads, T, head_dim] (HF layout); returns ([1, T, heads, head_dim], None)."""
    if query.shape[0] != 1:
        raise ValueError("attn_implementation='varlen' needs packed micro-batches (packing = true)")
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
    if q.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        out = varlen_attn(q, k, v, cu, cu, int(max_length_q), int(max_length_q), scale=scaling,
                          window_size=(-1, 0))
    else:
        out = _segmented_sdpa(q, k, v, cu.tolist(), scaling)
    return out[None], None


def _segmented_sdpa(q, k, v, bounds: list[int], scale):
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg = [t[a:b].transpose(0, 1)[None] for t in (q, k, v)]  # [1, heads, len, dim]
        parts.append(F.scaled_dot_product_attention(*seg, is_causal=True, scale=scale)[0].transpose(0, 1))
    return torch.cat(parts)


def register() -> None:
    """Make "varlen" a valid `attn_implementation` for every transformers model (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
