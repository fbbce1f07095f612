"""torch.compile where it pays.

`cuda_compiled(fn)`: fuse an elementwise-heavy function when its inputs are on a GPU. Used for the per-chunk
cross-entropy (vftrain/loss.py) and the lean SwiGLU backward (vftrain/mlp.py), where eager mode makes several
passes over large intermediate tensors. On the CPU, or if compilation fails (no inductor toolchain), the function
runs eagerly: the result is the same, only slower.

`CompiledLayers`: the model's decoder layers compiled (`compile_layers`), used inside training and evaluation
forwards only. A 7B LoRA step on one GPU launches ~4,000 kernels per forward and backward, and the host, not the
GPU, set its pace (benchmarks/RESULTS.md, issue 21): a compiled layer runs its norms, RoPE, SwiGLU and LoRA
scaling as a few fused kernels and its backward as one autograd node. All layers share one compiled graph (one
code object, the weights are its inputs), compiled for any token count (dynamic shapes) so that packed forwards of
new lengths do not recompile.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch
import torch._functorch.config

log = logging.getLogger("vftrain")

# Below this many parameters `compile_layers` stays off unless asked for: compiling takes ~20-60 s at the first
# forward (and again for a new model shape), more than a small model's run saves (benchmarks/RESULTS.md, session 36).
COMPILE_FROM_PARAMETERS = 100_000_000

# AOTAutograd otherwise compiles a backward lazily, or tries at the forward and on failure only logs it: the error
# would then surface at the first backward, past CompiledLayers' fallback. The flag is absent before torch 2.7 or so
# (2.6 lacks it, 2.11 has it); there the backward stays lazy.
_BACKWARD_AT_FORWARD = ({"force_non_lazy_backward_lowering": True}
                        if hasattr(torch._functorch.config, "force_non_lazy_backward_lowering") else {})


def cuda_compiled(fn: Callable) -> Callable:
    compiled = None
    failed = False

    def run(*tensors):
        nonlocal compiled, failed
        # inside a compiled region (compile_layers: the lean MLP's backward) the enclosing graph traces and fuses it
        if failed or tensors[0].device.type != "cuda" or torch.compiler.is_compiling():
            return fn(*tensors)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        try:
            return compiled(*tensors)
        except Exception as exc:
            failed = True
            log.warning("compiled %s unavailable (%s); running eagerly", fn.__name__,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return fn(*tensors)

    return run


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's repeated decoder layers: transformers' GradientCheckpointingLayer instances (every decoder layer
    of its causal LMs since 4.52)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_applies(model, device: torch.device) -> bool:
    """`compile_layers` left unset: on for a model of at least COMPILE_FROM_PARAMETERS parameters with decoder
    layers, trained on a CUDA GPU where Triton (inductor's GPU code generator) is installed."""
    from torch.utils._triton import has_triton

    return (device.type == "cuda" and has_triton() and bool(decoder_layers(model))
            and sum(p.numel() for p in model.parameters()) >= COMPILE_FROM_PARAMETERS)


class CompiledLayers:
    """Each decoder layer of the models given, compiled (as `nn.Module.compile` would) but run compiled only inside
    `active()`: generation and decoding (KV caches, CUDA graphs of their own) keep the eager layers. Unless
    `strict`, a layer torch.compile cannot compile (an error while tracing or generating code for its forward or
    its backward, before anything runs) makes every layer eager from then on, with a warning."""

    def __init__(self, *models, strict: bool = False, **compile_kwargs):
        self.compile_kwargs = {"dynamic": True, **compile_kwargs}
        self.strict = strict
        self.failed = False
        self.layers: list[tuple[torch.nn.Module, Callable]] = []
        for model in models:
            self.include(model)

    def include(self, model) -> None:
        """Compile `model`'s decoder layers too (RL's frozen reference copy)."""
        self.layers += [(layer, self._guarded(layer, torch.compile(layer._call_impl, **self.compile_kwargs)))
                        for layer in decoder_layers(model)]

    def _guarded(self, layer, compiled: Callable) -> Callable:
        def run(*args, **kwargs):
            if not self.failed:
                try:
                    with torch._functorch.config.patch(_BACKWARD_AT_FORWARD):
                        return compiled(*args, **kwargs)
                except torch._dynamo.exc.TorchDynamoException as exc:
                    if self.strict:
                        raise
                    self.failed = True
                    log.warning("compile_layers: torch.compile failed on %s (%s); the layers run eagerly",
                                type(layer).__name__, str(exc).strip().splitlines()[0] if str(exc) else
                                type(exc).__name__)
            return layer._call_impl(*args, **kwargs)

        return run

    @contextlib.contextmanager
    def active(self):
        # nn.Module.__call__ runs `_compiled_call_impl` where it is set (what `module.compile()` sets for good).
        before = [layer._compiled_call_impl for layer, _ in self.layers]
        for layer, compiled in self.layers:
            layer._compiled_call_impl = compiled
        try:
            yield
        finally:
            for (layer, _), previous in zip(self.layers, before):
                layer._compiled_call_impl = previous
