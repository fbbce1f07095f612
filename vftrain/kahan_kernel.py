"""The step of `optim.CompensatedAdamW` fused into one pass per kind of parameter, on the GPU (Triton).

Why: the step's foreach form (optim.py) gathers every segment into float32 buffers, runs about a dozen elementwise
passes over them and scatters back, so at 1.3B parameters it cost ~0.2 s per step, 35-40% of a 16k-token training
step (benchmarks/RESULTS.md, "Leaner optimizer modes"). The update itself needs one read of the weight, its
compensation, the gradient and both moments and one write of each but the gradient: this kernel does exactly that.
Same arithmetic as the foreach form (AdamW with decoupled weight decay, bias corrections from the parameter's step
count, moments lerped, w = p + c rounded to nearest into p, c = w - p), and bf16 moments stochastically rounded
with Philox bits drawn from (seed, element): the seed changes every step and per parameter
(`CompensatedAdamW._fused_steps`), so a resume that restores the step counter rounds as the uninterrupted run did.

One launch steps every parameter of a kind (dtypes, compensation or not) through a table of their addresses, as
torch's fused AdamW does with its multi-tensor apply, and counts their steps and works out their bias corrections
itself: a LoRA run has ~400 small adapter tensors, and a launch each (plus the per-tensor foreach ops of the step
counts) cost 15-24 ms of host time per step on the H200 for ~0.2 ms of GPU work (benchmarks/RESULTS.md, 7B LoRA).
Each program takes a CHUNK of one tensor; the address table is kept while the tensors stay where they are (the
gradients usually come back to the same addresses) and rebuilt otherwise, the table of (tensor, chunk) pairs while
their sizes do.
Imported only where a step runs on CUDA tensors (or under TRITON_INTERPRET=1 in the tests): triton is a GPU
dependency.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK = 1024
CHUNK = 16 * BLOCK  # elements per program: a 311M-element embedding is 19k programs, a rank-8 adapter one to ten
_ROW = 8  # the address table's columns: p, c, grad, exp_avg, exp_avg_sq, step, numel, the parameter's index
_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


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
def _kahan_adamw(table_ptr, chunks_ptr, keep_ptr, lr, one_minus_beta1, one_minus_beta2, log_beta1, log_beta2, eps,
                 lr_decay, seed_base, P_TYPE: tl.constexpr, G_TYPE: tl.constexpr, M_TYPE: tl.constexpr,
                 HAS_C: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr, ROW: tl.constexpr):
    t = tl.load(chunks_ptr + 2 * tl.program_id(0))  # which tensor, and which of its chunks
    start = tl.load(chunks_ptr + 2 * tl.program_id(0) + 1).to(tl.int64) * CHUNK
    row = table_ptr + t * ROW
    p_ptr = tl.load(row).to(tl.pointer_type(P_TYPE))
    c_ptr = tl.load(row + 1).to(tl.pointer_type(P_TYPE))
    g_ptr = tl.load(row + 2).to(tl.pointer_type(G_TYPE))
    m_ptr = tl.load(row + 3).to(tl.pointer_type(M_TYPE))
    v_ptr = tl.load(row + 4).to(tl.pointer_type(M_TYPE))
    keep = tl.load(keep_ptr)
    # This step's count (`_count_steps` stores it after this launch), and 1 - beta1^step, sqrt(1 - beta2^step) from
    # it in double precision: in float32 the GPU's exp lost ~1e-4 of 1 - 0.999 at step 1 (the H200). The foreach
    # form's float32 pow is itself ~1e-5 off there (0.999 is not a float32), far inside the tests' tolerance.
    count = tl.load(tl.load(row + 5).to(tl.pointer_type(tl.float32))).to(tl.float64) + keep
    bc1 = (1 - tl.exp(count * log_beta1)).to(tl.float32)
    bc2 = tl.sqrt(1 - tl.exp(count * log_beta2)).to(tl.float32)
    n = tl.load(row + 6)
    seed = (seed_base + tl.load(row + 7)) % 2147483648
    limit = tl.where(keep > 0, n, 0)  # a skipped step writes nothing (a rewritten p + c may tie)
    for i in range(0, CHUNK, BLOCK):
        offsets = start + i + tl.arange(0, BLOCK)
        mask = offsets < n
        write = offsets < limit
        w = tl.load(p_ptr + offsets, mask=mask).to(tl.float32)
        if HAS_C:
            w += tl.load(c_ptr + offsets, mask=mask).to(tl.float32)
        g = tl.load(g_ptr + offsets, mask=mask).to(tl.float32)
        g = tl.where(keep > 0, g, 0.0)  # a skipped step's gradient may be NaN: nothing of it may reach the state
        m = tl.load(m_ptr + offsets, mask=mask).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=mask).to(tl.float32)
        m = m + one_minus_beta1 * keep * (g - m)
        v = v + one_minus_beta2 * keep * (g * g - v)
        w = w * (1 - lr_decay * keep)
        denom = tl.sqrt(v) / bc2 + eps
        w = w - (lr * keep / bc1) * m / denom
        if M_TYPE == tl.bfloat16:
            b0, b1, _, _ = tl.randint4x(seed, offsets)
            m = _stochastic_bf16(m, b0)
            v = _stochastic_bf16(v, b1)
        tl.store(m_ptr + offsets, m.to(M_TYPE), mask=write)
        tl.store(v_ptr + offsets, v.to(M_TYPE), mask=write)
        if HAS_C:  # a bf16 weight: p = round(w), c = w - p (what p could not hold), both rounded to nearest
            p = _nearest_bf16(w)
            tl.store(p_ptr + offsets, p.to(tl.bfloat16), mask=write)
            tl.store(c_ptr + offsets, _nearest_bf16(w - p).to(tl.bfloat16), mask=write)
        else:  # a float32 weight holds w itself
            tl.store(p_ptr + offsets, w, mask=write)


@triton.jit
def _count_steps(table_ptr, keep_ptr, ROW: tl.constexpr):
    """Each tensor's step count += keep (a skipped step does not count), after `_kahan_adamw` has read it."""
    step_ptr = tl.load(table_ptr + tl.program_id(0) * ROW + 5).to(tl.pointer_type(tl.float32))
    tl.store(step_ptr, tl.load(step_ptr) + tl.load(keep_ptr))


def kind(p: torch.Tensor, state: dict) -> tuple:
    """What one launch must share: the dtypes of weight, gradient and moments, and whether a compensation is kept."""
    return p.dtype, p.grad.dtype, state["exp_avg"].dtype, "compensation" in state


def step(params: list[torch.Tensor], states: list[dict], indices: list[int], keep: torch.Tensor, group: dict,
         seed_base: int, tables: dict) -> None:
    """One AdamW step of contiguous `params` of one `kind` (their `.grad` contiguous too) and their `states`, step
    counts included (float32, on the device); `indices` are the parameters' positions in the optimizer, `tables`
    the caller's cache of device tables. 1 - beta, log beta and lr x weight_decay are worked out here in double
    precision, as the foreach form's Python scalars are: in the kernel's float32, 1 - 0.999 is 0.99998713e-3, which
    put the second moment 1.3e-5 (relative) off torch's AdamW (the H200's run of tests/test_optim_kernel.py;
    Triton's CPU interpreter computes such scalars in double)."""
    beta1, beta2 = group["betas"]
    p_type, g_type, m_type, has_c = kind(params[0], states[0])
    table, chunks = _tables(params, states, indices, params[0].device, tables)
    _kahan_adamw[(chunks.numel() // 2,)](
        table, chunks, keep, float(group["lr"]), 1 - beta1, 1 - beta2, math.log(beta1), math.log(beta2),
        group["eps"], float(group["lr"]) * group["weight_decay"], seed_base, P_TYPE=_TL[p_type], G_TYPE=_TL[g_type],
        M_TYPE=_TL[m_type], HAS_C=has_c, BLOCK=BLOCK, CHUNK=CHUNK, ROW=_ROW)
    _count_steps[(len(params),)](table, keep, ROW=_ROW)


def _tables(params, states, indices, device, cache: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The address table (int64, _ROW per tensor) and the (tensor, chunk) pairs (int32): the ones in `cache` (this
    launch's last) while every tensor is where it was, else new ones, kept there."""
    rows = []
    for p, s, index in zip(params, states, indices):
        c = s.get("compensation", p)
        rows.append((p.data_ptr(), c.data_ptr(), p.grad.data_ptr(), s["exp_avg"].data_ptr(),
                     s["exp_avg_sq"].data_ptr(), s["step"].data_ptr(), p.numel(), index))
    if cache.get("rows") != rows:
        numels = [p.numel() for p in params]
        if cache.get("numels") != numels:  # the pairs depend on the sizes only: kept when only addresses move
            cache.update(numels=numels, chunks=_upload(chunk_pairs(numels), device))
        cache.update(rows=rows, table=_upload(torch.tensor(rows, dtype=torch.int64), device))
    return cache["table"], cache["chunks"]


def chunk_pairs(numels: list[int]) -> torch.Tensor:
    """(tensor, chunk) int32 pairs: every CHUNK of every tensor, in order. Built with tensor ops: a 0.5B model has
    ~30k of them, and a Python list of them took 16-33 ms a rebuild (on steps where the gradients had moved)."""
    counts = torch.tensor([triton.cdiv(n, CHUNK) for n in numels], dtype=torch.int64)
    starts = torch.cumsum(counts, 0) - counts
    tensor = torch.repeat_interleave(torch.arange(len(numels)), counts)
    chunk = torch.arange(int(counts.sum())) - torch.repeat_interleave(starts, counts)
    return torch.stack([tensor, chunk], 1).to(torch.int32)


def _upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """To the device without waiting for it: from pinned memory, which torch's host allocator keeps until the copy
    has run."""
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
