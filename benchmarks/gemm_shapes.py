"""Host time of a GEMM launch when its row count is new against one seen before (a probe, issue 21).

The 7B LoRA step at 4k-token micro-batches keeps the GPU busy for about half its wall time (benchmarks/RESULTS.md,
session 34), and the host spent ~80 us in each `torch._C._nn.linear` call of the profile. Packed micro-batches have
a different token count every step, so every GEMM of a step has a row count cuBLAS has not seen: this measures what
a launch costs the host for a new row count, a repeated one, and row counts rounded up to a multiple of 128.
Run on the GPU: `python3 benchmarks/gemm_shapes.py`; prints one JSON line.
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

HIDDEN, INTER = 3584, 18944  # Qwen2.5-7B
CALLS = 150


def host_us(rows: list[int], weights: list[torch.Tensor], x: torch.Tensor) -> tuple[float, float]:
    """Mean host microseconds per F.linear launch over `rows` (one call per weight and row count), and GPU ms."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    host = 0.0
    start.record()
    for m in rows:
        for w in weights:
            t = time.perf_counter()
            F.linear(x[:m, : w.shape[1]], w)
            host += time.perf_counter() - t
        torch.cuda.synchronize()  # the queue never fills: the host time is the launch's own
    end.record()
    torch.cuda.synchronize()
    return host / (len(rows) * len(weights)) * 1e6, start.elapsed_time(end)


def main() -> None:
    torch.manual_seed(0)
    dev = "cuda"
    weights = [torch.randn(o, i, device=dev, dtype=torch.bfloat16) * 0.02
               for o, i in ((HIDDEN, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER), (8, HIDDEN), (HIDDEN, 8))]
    x = torch.randn(4096, INTER, device=dev, dtype=torch.bfloat16)
    host_us([3000], weights, x)  # warm-up: cuBLAS handle, workspace
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    out["repeated_rows_us"] = round(host_us([3200] * CALLS, weights, x)[0], 1)
    out["new_rows_us"] = round(host_us([2000 + i for i in range(CALLS)], weights, x)[0], 1)
    rounded = [128 * -(-(2000 + 7 * i) // 128) for i in range(CALLS)]
    out["rows_rounded_to_128_us"] = round(host_us(rounded, weights, x)[0], 1)
    out["rounded_distinct_counts"] = len(set(rounded))
    out["new_rows_again_us"] = round(host_us([2000 + i for i in range(CALLS)], weights, x)[0], 1)  # now cached?
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
