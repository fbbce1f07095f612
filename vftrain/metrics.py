"""Training statistics accumulated on the device between logging steps (no host sync per micro-batch), and
the throughput figures derived from them at logging time."""

from __future__ import annotations

import time

import torch


class StepStats:
    """Sums of per-micro-batch counters; `pop(reduce)` returns the logged values and resets."""

    KEYS = ("loss_sum", "correct", "trained_tokens", "tokens", "slots", "attn_sq")

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, **values: torch.Tensor | int | float) -> None:
        for key, value in values.items():
            value = torch.as_tensor(value, dtype=torch.float64).detach()
            current = self.sums.get(key)
            self.sums[key] = value.to(current.device) + current if current is not None else value

    def pop(self, reduce=lambda t: t) -> tuple[dict[str, float], float]:
        """(metrics since the last call, their sum of squared row lengths for the attention FLOPs). `reduce` sums
        a stacked tensor over processes (e.g. accelerator.reduce)."""
        if not self.sums:
            return {}, 0.0
        keys = [k for k in self.KEYS if k in self.sums]
        device = next(iter(self.sums.values())).device
        totals = reduce(torch.stack([self.sums[k].to(device) for k in keys])).tolist()
        self.sums = {}
        s = dict(zip(keys, totals))
        out = {}
        if s.get("trained_tokens"):
            out["token_accuracy"] = s["correct"] / s["trained_tokens"]
            out["trained_tokens"] = int(s["trained_tokens"])
        if s.get("tokens"):
            out["tokens"] = int(s["tokens"])
            out["trained_fraction"] = s.get("trained_tokens", 0) / s["tokens"]
        if s.get("slots"):
            out["padding_efficiency"] = s["tokens"] / s["slots"]
        return out, s.get("attn_sq", 0.0)


def row_counts(inputs: dict, labels: torch.Tensor) -> dict:
    """Real tokens and the sum of squared row lengths (attention work) of a micro-batch, on its device."""
    mask = inputs.get("attention_mask")
    if mask is not None:
        lengths = mask.sum(dim=1)
    elif "cu_seq_lens_q" in inputs:
        cu = inputs["cu_seq_lens_q"]
        lengths = cu[1:] - cu[:-1]
    else:
        lengths = torch.tensor([labels.shape[1]] * labels.shape[0])
    lengths = lengths.double()
    return {"tokens": lengths.sum(), "attn_sq": (lengths * lengths).sum()}
class EvalLoss:
    """The evaluation loss as one token mean over the whole eval set and every process: summed cross-entropy over
    summed trained tokens. A mean of per-micro-batch means would weigh a token by the size of its micro-batch
    (so change with micro_batch_size) and count rows that even-batch padding repeats. Only the first `counted`
    micro-batches of this process add (the rest are lockstep copies, `data.pack.eval_batches`)."""

    def __init__(self, counted: int | None = None):
        self.counted, self.seen = counted, 0
        self.sums: torch.Tensor | None = None  # [loss_sum, correct, trained_tokens], float64 on the device

    def add(self, loss_sum: torch.Tensor, correct: torch.Tensor, trained_tokens: int) -> None:
        self.seen += 1
        if self.counted is not None and self.seen > self.counted:
            return
        values = torch.stack([loss_sum.detach().double(), torch.as_tensor(correct).to(loss_sum.device).double(),
                              torch.tensor(float(trained_tokens), dtype=torch.float64, device=loss_sum.device)])
        self.sums = values if self.sums is None else self.sums + values

    def result(self, reduce, device) -> dict[str, float]:
        """`loss` and `token_accuracy` over every process's tokens (`reduce` sums a tensor over processes; every
        process must call this)."""
        sums = self.sums if self.sums is not None else torch.zeros(3, dtype=torch.float64, device=device)
        loss_sum, correct, tokens = reduce(sums.to(device)).tolist()
        if not tokens:
            return {}
        return {"loss": loss_sum / tokens, "token_accuracy": correct / tokens}


def matmul_params(model) -> int:
    """Parameters that take part in matrix products per token: all but the input embedding lookup, plus the
    output head when it shares the embedding's weight (counted once by `parameters()`)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    total = sum(_numel(p) for p in inner.parameters())
    embed = inner.get_input_embeddings().weight
    head = inner.get_output_embeddings()
    tied = head is not None and head.weight is embed
    return total - _numel(embed) + (_numel(embed) if tied else 0)


def _numel(p) -> int:
    """Elements of the whole parameter: ZeRO-3 leaves an empty placeholder and records the size in ds_numel (an
    FSDP2 DTensor reports its global size itself)."""
    return getattr(p, "ds_numel", p.numel())


def measured_matmul_peak() -> float:
    """bf16 matmul FLOP/s of this GPU, measured on an 8192^3 product (the MFU denominator of CONTEXT.md)."""
    gen = torch.Generator(device="cuda").manual_seed(0)  # its own: the run's random stream stays the user's seed's
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16, generator=gen)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16, generator=gen)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    end.synchronize()
    return 2 * 8192**3 * 10 / (start.elapsed_time(end) / 1000)


class Throughput:
    """Tokens/s and MFU between logging calls: MFU = (6 x matmul params x tokens + 6 x layers x hidden x
    sum of squared row lengths) / seconds / peak (the formula of CONTEXT.md and benchmarks/)."""

    def __init__(self, model):
        config = getattr(model, "config", None)
        self.params = matmul_params(model)
        self.attn_coef = 6 * getattr(config, "num_hidden_layers", 0) * getattr(config, "hidden_size", 0)
        # A run on the CPU of a CUDA machine (use_cpu) reports neither the GPU's peak nor its memory.
        self.gpu = torch.cuda.is_available() and next(model.parameters()).device.type == "cuda"
        self.peak = measured_matmul_peak() if self.gpu else None
        self.last = time.perf_counter()

    def update(self, logs: dict, attn_sq: float) -> None:
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        if "tokens" in logs and elapsed > 0:
            logs["tokens_per_second"] = logs["tokens"] / elapsed
            logs["trained_tokens_per_second"] = logs.get("trained_tokens", 0) / elapsed
            if self.peak:
                flops = 6 * self.params * logs["tokens"] + self.attn_coef * attn_sq
                logs["mfu"] = flops / elapsed / self.peak
        if self.gpu:
            logs["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
