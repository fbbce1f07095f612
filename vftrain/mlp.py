"""Memory-lean SwiGLU MLP: `down(silu(gate(x)) * up(x))` without keeping the product for the backward.

In the stock module, `down_proj` saves its input `silu(gate) * up` for its weight gradient, on top of `gate` and
`up` that the product's own backward keeps: three `intermediate_size` tensors per token per layer. Here the
product is recomputed in the backward from `gate` and `up` (one elementwise pass), so two are kept: for a
Qwen2.5-1.5B shape at 16k tokens per micro-batch that is 8.2 GB less activation memory (benchmarks/RESULTS.md).
The same trade liger-kernel makes inside its SwiGLU, carried one step further into the down projection.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from vftrain.compile import cuda_compiled


def _swiglu_backward(dc: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """(d a, d b, silu(a) * b) from d(silu(a) * b), in at least float32: one fused pass on GPU.
    d silu(a) / da = s (1 + a (1 - s)) with s = sigmoid(a)."""
    wide = torch.promote_types(a.dtype, torch.float32)
    a_, b_, dc_ = a.to(wide), b.to(wide), dc.to(wide)
    sig = torch.sigmoid(a_)
    silu = a_ * sig
    da = dc_ * b_ * (sig * (1 + a_ * (1 - sig)))
    return da.to(a.dtype), (dc_ * silu).to(b.dtype), (silu * b_).to(dc.dtype)


_swiglu_backward_fused = cuda_compiled(_swiglu_backward)


class _SiluMulDown(torch.autograd.Function):
    """y = (silu(a) * b) @ weight.T, saving a, b and weight only."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b, weight)
        return F.linear(F.silu(a) * b, weight)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy: torch.Tensor):
        a, b, weight = ctx.saved_tensors
        dc = dy @ weight.to(dy.dtype)
        da, db, c = _swiglu_backward_fused(dc, a, b)
        dw = None
        if ctx.needs_input_grad[2]:
            dw = dy.reshape(-1, dy.shape[-1]).T @ c.reshape(-1, c.shape[-1])
        return da, db, dw


def _is_swiglu(module: torch.nn.Module) -> bool:
    if not all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj")):
        return False
    act = getattr(module, "act_fn", None)
    return type(module).__name__ == "LigerSwiGLUMLP" or type(act).__name__ in ("SiLU", "SiLUActivation")


def _lean_forward(self, x: torch.Tensor) -> torch.Tensor:
    down = self.down_proj
    # Also without autograd (RL's sampler), though nothing is saved there: the sampler's arithmetic is then the
    # trainer's, op for op (liger's fused SwiGLU computes silu its own way, x * sigmoid(x) in float32, so its bf16
    # product can differ by one ulp).
    if type(down) is not torch.nn.Linear or down.bias is not None:  # e.g. a LoRA-wrapped down projection
        return type(self).forward(self, x)
    return _SiluMulDown.apply(self.gate_proj(x), self.up_proj(x), down.weight)


def has_swiglu(model: torch.nn.Module) -> bool:
    """Whether `model` has MLPs the lean forward applies to."""
    return any(_is_swiglu(module) for module in model.modules())


def use_lean_mlp(model: torch.nn.Module) -> int:
    """Give every SwiGLU MLP of `model` the lean forward; returns how many modules were patched."""
    count = 0
    for module in model.modules():
        if _is_swiglu(module):
            module.forward = types.MethodType(_lean_forward, module)
            count += 1
    return count
