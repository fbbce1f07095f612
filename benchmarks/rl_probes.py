"""Probes for benchmarks/rl_throughput.py (issue 20): GPU memory at an RL step's phase boundaries, the decoding step's
bandwidth floor, a random model made to stop early, and the decoder's own costs.

- `Memory`: `torch.cuda.memory_allocated` at each phase boundary (model built, trainer built, rollout / generate
  start and end, step end) with the peak inside each phase; `breakdown` turns them into weights, master copies,
  optimizer moments, what the sampler keeps and needs, the CUDA-graph pool (reserved in private pools, from the
  allocator's snapshot) and the train phase's activations.
- `copy_bandwidth` / `decode_floor`: one decoding step must read every weight the step uses and the filled KV cache
  once; the floor is those bytes over the card's device-to-device copy bandwidth, measured here.
- `make_stopping`: raise the stop token's output row so that a random model samples it with a set probability per
  step (completion lengths roughly geometric), the same weights for every framework.
- `DecodeCounts`: what the embedded decoder spends beyond graph replays (graphs built, failed captures, eager steps,
  compactions); `compile_decoding`: each decoding step's forward through torch.compile (--compile-decode).
"""
from __future__ import annotations

import time

import torch

GIB = 2**30


class Memory:
    """Allocated bytes at named phase boundaries, each with the peak since the previous boundary (CUDA only)."""

    def __init__(self):
        self.marks: list[tuple[str, int, int]] = []  # (label, allocated, peak since the last mark)
        self.graph_pool = None  # bytes reserved by the allocator's private pools (CUDA graphs) after step 1

    def mark(self, label: str) -> None:
        if not torch.cuda.is_available():
            return
        torch.cuda.synchronize()
        self.marks.append((label, torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()))
        torch.cuda.reset_peak_memory_stats()
        if label == "step 1 end":
            self.graph_pool = private_pool_bytes()

    def peak(self) -> int:
        return max([p for _, _, p in self.marks], default=0)

    def breakdown(self, steps: int, params: int) -> dict:
        """GiB per part. Master copies appear when the optimizer is made (before step 1's rollouts), Adam's moments
        at step 1's update; the sampler's and the train phase's figures are those of the last step (steady state)."""
        if not self.marks:
            return {}
        at = {label: (alloc, peak) for label, alloc, peak in self.marks}

        def alloc(label):
            return at.get(label, (0, 0))[0]

        last = f"step {steps}"
        out = {"weights": alloc("model"),
               "trainer setup": alloc("trainer") - alloc("model"),
               "master copies": alloc("step 1 rollout start") - alloc("trainer"),
               "moments": alloc("step 1 end") - alloc("step 1 rollout end"),
               "sampler kept": alloc("step 1 generate end") - alloc("step 1 generate start"),
               "sampler peak": at.get(f"{last} generate end", (0, 0))[1] - alloc(f"{last} generate start"),
               "train peak": at.get(f"{last} end", (0, 0))[1] - alloc(f"{last} rollout end"),
               "peak": self.peak()}
        if self.graph_pool is not None:
            out["graph pool reserved"] = self.graph_pool
        gib = {k: round(v / GIB, 2) for k, v in out.items()}
        gib["bytes/param, master + moments"] = round((out["master copies"] + out["moments"]) / max(params, 1), 1)
        return gib


def private_pool_bytes() -> int:
    """Bytes the caching allocator holds in private pools (CUDA-graph captures), not counted by memory_allocated
    once their blocks are free: segments whose pool id is not the default (0, 0)."""
    return sum(s["total_size"] for s in torch.cuda.memory_snapshot() if tuple(s.get("segment_pool_id", (0, 0)))
               != (0, 0))


def copy_bandwidth(gib: float = 2.0, repeats: int = 10) -> float:
    """The card's device-to-device copy bandwidth in bytes/s (bytes read + written), a `gib` GiB copy timed with
    CUDA events: the memory speed a decoding step could reach at best."""
    src = torch.empty(int(gib * GIB), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    del src, dst
    torch.cuda.empty_cache()
    return 2 * gib * GIB * repeats / seconds


def decode_bytes(model, rows: int, prompt_len: int, new_tokens: int) -> tuple[int, int]:
    """(weight bytes, mean filled KV-cache bytes) one decoding step reads: every parameter but the input embedding
    (a step gathers one row of it per sequence; a tied output head is read whole as the head), and keys and values of
    every layer at the mean filled length prompt_len + new_tokens / 2."""
    cfg = model.config
    embedding = model.get_input_embeddings().weight
    tied = getattr(cfg, "tie_word_embeddings", False)
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if tied or p is not embedding)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    filled = prompt_len + new_tokens / 2
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * rows * filled * embedding.element_size()
    return weights, int(kv)


def make_stopping(model, stop_id: int, prob: float, probe_ids: torch.Tensor) -> float:
    """Make the random model sample `stop_id` with about probability `prob` at every step (temperature 1), so that
    completion lengths are roughly geometric with mean ~1 / prob. Residual dimension 0 is made constant: every
    token's embedding holds the same value there and no layer writes to it (its rows of the attention and MLP output
    projections are zero), so after the final norm it is nearly the same at every position; the stop token's output
    row is k on that dimension and 0 elsewhere, so its logit is about the same everywhere, as is the rest of the
    softmax (a random model's other logits have a steady spread). k is set by bisection so that the stop token's
    mean probability over `probe_ids`' positions is `prob`; returned. (The stop token's output row along a random or
    the mean direction gives it a probability that varies by orders of magnitude between positions: rows that never
    stop.) The same weights serve every framework; with tied embeddings the stop token's input embedding changes too,
    which only affects the positions where the prompt holds it."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        embed[:, 0] = embed.float().std().to(embed.dtype)
        for name, module in model.named_modules():
            if name.endswith(("self_attn.o_proj", "mlp.down_proj")):
                module.weight[0] = 0
        hidden = model.model(input_ids=probe_ids).last_hidden_state.flatten(0, 1).float()
        head[stop_id] = 0
        logits = hidden @ head.float().T
        logits[:, stop_id] = -float("inf")
        others, along = torch.logsumexp(logits, dim=-1), hidden[:, 0]

        def mean_prob(k: float) -> float:
            return float(torch.sigmoid(k * along - others).mean())

        low, high = 0.0, 1.0
        while mean_prob(high) < prob and high < 1e9:
            high *= 2
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (mid, high) if mean_prob(mid) < prob else (low, mid)
        head[stop_id, 0] = high
    return high


def timed(fn, *args, **kwargs) -> float:
    """Seconds that fn takes, the GPU's work included."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


class DecodeCounts:
    """What the embedded decoder's steps cost beyond graph replays, counted by patching `tokens._Forward` in this
    benchmark process: graphs built (each: an eager warm-up step and a capture; `build_s`, the host waiting for the
    GPU before and after each), captures that failed (`failed`: the rest of that call decodes eagerly),
    steps decoded eagerly after such a failure (`eager_steps`), and compactions of stopped rows (`compactions`).
    It told a slow early-stopping decode's cause: every capture after a compaction failed (RESULTS.md, session 30).
    Averaged by `per_step` over every step, the warm-up's included."""

    def __init__(self):
        from vftrain.sampling import tokens

        counts = self.counts = dict(builds=0, build_s=0.0, failed=0, eager_steps=0, compactions=0)
        call, select = tokens._Forward.__call__, tokens._Forward.select

        def counted_call(fwd, ids, positions, length):
            decoding = fwd.static and ids.shape[1] == 1 and fwd.mask.is_cuda
            if not decoding or fwd.columns(length) in fwd.graphs:
                return call(fwd, ids, positions, length)
            if not fwd.capture:
                counts["eager_steps"] += 1
                return call(fwd, ids, positions, length)
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = call(fwd, ids, positions, length)
            torch.cuda.synchronize()
            counts["builds"] += 1
            counts["build_s"] += time.perf_counter() - start
            counts["failed"] += not fwd.capture
            return out

        def counted_select(fwd, live):
            counts["compactions"] += 1
            return select(fwd, live)

        tokens._Forward.__call__, tokens._Forward.select = counted_call, counted_select

    def per_step(self, steps: int) -> dict:
        return {k: round(v / max(steps, 1), 3) for k, v in self.counts.items()}


def compile_decoding() -> None:
    """--compile-decode: each decoding step's forward (one token per row over the static cache) through
    torch.compile, inside the decoder's CUDA graph: inductor fuses the elementwise kernels around the GEMMs (RoPE,
    cache writes, residual adds; ~35 kernels per layer eagerly). This benchmark process only, to measure what it
    saves before the decoder takes it. One function for every call, so the compiled graphs are reused across calls;
    a new width of read cache columns (`attention.decode_columns`, a Python int) or batch size compiles again."""
    from vftrain.sampling import tokens

    eager = tokens._Forward._run

    def step(model, cache, ids, positions, mask):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **{tokens._CACHE: cache},
                    use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    compiled = torch.compile(step)
    torch._dynamo.config.recompile_limit = 64  # widths x batch sizes

    def run(self, ids, positions, mask):
        if not self.static or ids.shape[1] > 1:  # the prompt's forward stays eager
            return eager(self, ids, positions, mask)
        return compiled(self.model, self.cache, ids, positions, mask)

    tokens._Forward._run = run
