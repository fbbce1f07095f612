"""One fused pass of `optim.CompensatedAdamW`'s step per parameter, on the GPU (Triton).

Why: the step's foreach form (optim.py) gathers every segment into float32 buffers, runs about a dozen elementwise
passes over them and scatters back, so at 1.3B parameters it cost ~0.2 s per step, 35-40% of a 16k-token training
step (benchmarks/RESULTS.md, "Leaner optimizer modes"). The update itself needs one read of the weight, its
compensation, the gradient and both moments and one write of each but the gradient: this kernel does exactly that.
Same arithmetic as the foreach form (AdamW with decoupled weight decay, bias corrections from the parameter's step
count, moments lerped, w = p + c rounded to nearest into p, c = w - p), and bf16 moments stochastically rounded
with Philox bits drawn from (seed, element): the seed changes every step and per parameter
(`CompensatedAdamW._seed`), so a resume that restores the step counter rounds as the uninterrupted run did.
Imported only where a step runs on CUDA tensors (or under TRITON_INTERPRET=1 in the tests): triton is a GPU
dependency.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _stochastic_bf16(x, bits):
    """float32 -> the float32 value of a bf16 rounded up or down at random in proportion to the dropped low 16 bits
    (optim.stochastic_round_bf16's rule: up when the 16 random bits are below them)."""
    raw = x.to(tl.int32, bitcast=True)
    truncated = raw & -65536
    up = (bits & 0xFFFF).to(tl.int32) < (raw & 0xFFFF)
    return tl.where(up, truncated + 0x10000, truncated).to(tl.float32, bitcast=True)


@triton.jit
def _nearest_bf16(x):
    """float32 -> the float32 value of the nearest bf16 (ties to even), by the bits: Triton's interpreter casts
    by truncation whatever rounding is asked for, so the tests on the CPU run this same rule."""
    raw = x.to(tl.int32, bitcast=True)
    rounded = (raw + 0x7FFF + ((raw >> 16) & 1)) & -65536
    return tl.where(x == x, rounded.to(tl.float32, bitcast=True), x)  # NaN stays NaN


@triton.jit
def _kahan_adamw(p_ptr, c_ptr, g_ptr, m_ptr, v_ptr, bc1_ptr, bc2_ptr, keep_ptr, n, lr, one_minus_beta1,
                 one_minus_beta2, eps, lr_decay, seed, HAS_C: tl.constexpr, BF16_MOMENTS: tl.constexpr,
                 BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    keep = tl.load(keep_ptr)
    bc1, bc2 = tl.load(bc1_ptr), tl.load(bc2_ptr)
    w = tl.load(p_ptr + offsets, mask=mask).to(tl.float32)
    if HAS_C:
        w += tl.load(c_ptr + offsets, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=mask).to(tl.float32)
    g = tl.where(keep > 0, g, 0.0)  # a skipped step's gradient may be NaN: nothing of it may reach the state
    write = offsets < tl.where(keep > 0, n, 0)  # a skipped step writes nothing (a rewritten p + c may tie)
    m = tl.load(m_ptr + offsets, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offsets, mask=mask).to(tl.float32)
    m = m + one_minus_beta1 * keep * (g - m)
    v = v + one_minus_beta2 * keep * (g * g - v)
    w = w * (1 - lr_decay * keep)
    denom = tl.sqrt(v) / bc2 + eps
    w = w - (lr * keep / bc1) * m / denom
    if BF16_MOMENTS:
        b0, b1, _, _ = tl.randint4x(seed, offsets)
        m = _stochastic_bf16(m, b0)
        v = _stochastic_bf16(v, b1)
    tl.store(m_ptr + offsets, m.to(m_ptr.dtype.element_ty), mask=write)
    tl.store(v_ptr + offsets, v.to(v_ptr.dtype.element_ty), mask=write)
    if HAS_C:  # a bf16 weight: p = round(w), c = w - p (what p could not hold), both rounded to nearest
        p = _nearest_bf16(w)
        tl.store(p_ptr + offsets, p.to(tl.bfloat16), mask=write)
        tl.store(c_ptr + offsets, _nearest_bf16(w - p).to(tl.bfloat16), mask=write)
    else:  # a float32 weight holds w itself
        tl.store(p_ptr + offsets, w, mask=write)


def step(p: torch.Tensor, state: dict, keep: torch.Tensor, group: dict, seed: int, bc1: torch.Tensor,
         bc2: torch.Tensor) -> None:
    """One AdamW step of contiguous `p` (its `.grad` contiguous too) and its `state` (step already counted), with
    its bias corrections (`optim._bias_corrections`: 0-d float32 tensors on the device). 1 - beta and lr x
    weight_decay are worked out here in double precision, as the foreach form's Python scalars are: in the kernel's
    float32, 1 - 0.999 is 0.99998713e-3, which put the second moment 1.3e-5 (relative) off torch's AdamW (the H200's
    run of tests/test_optim_kernel.py; Triton's CPU interpreter computes such scalars in double)."""
    beta1, beta2 = group["betas"]
    c = state.get("compensation")
    m, v = state["exp_avg"], state["exp_avg_sq"]
    n = p.numel()
    _kahan_adamw[(triton.cdiv(n, BLOCK),)](
        p, c if c is not None else p, p.grad, m, v, bc1, bc2, keep, n, float(group["lr"]), 1 - beta1, 1 - beta2,
        group["eps"], float(group["lr"]) * group["weight_decay"], seed, HAS_C=c is not None,
        BF16_MOMENTS=m.dtype == torch.bfloat16, BLOCK=BLOCK)
