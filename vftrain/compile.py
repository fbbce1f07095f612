"""`cuda_compiled(fn)`: fuse an elementwise-heavy function with torch.compile when its inputs are on a GPU.

Used for the per-chunk cross-entropy (vftrain/loss.py) and the lean SwiGLU backward (vftrain/mlp.py), where
eager mode makes several passes over large intermediate tensors. On the CPU, or if compilation fails (no
inductor toolchain), the function runs eagerly: the result is the same, only slower.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch


def cuda_compiled(fn: Callable) -> Callable:
    compiled = None
    failed = False

    def run(*tensors):
        nonlocal compiled, failed
        if failed or tensors[0].device.type != "cuda":
            return fn(*tensors)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        try:
            return compiled(*tensors)
        except Exception as exc:
            failed = True
            logging.getLogger("vftrain").warning("compiled %s unavailable (%s); running eagerly", fn.__name__,
                                                 str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return fn(*tensors)

    return run
