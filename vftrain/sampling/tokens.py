"""Token-level sampling with the sampler's own log-probabilities: RL rollouts (embedded backend, `vftrain.serve`).

Token ids in, token ids out: a completion is never decoded and re-encoded before it is trained (re-tokenisation
changes tokens across turns: trl#5224, prime-rl#1334). The log-probability recorded for each token is that of the
distribution it was drawn from (temperature applied, then top-p truncation): the "processed" logprobs of vLLM
(`--logprobs-mode processed_logprobs`). The trainer's ratio `exp(logp_trainer - logp_sampler)` then measures the
real mismatch between the policy being trained and what sampled (trl#4159, trl#6789), never a recomputation.

The decoding loop is written here rather than through `model.generate`: generate merges the checkpoint's own
`generation_config` (Qwen ships top_k = 20, repetition_penalty = 1.05) into any call, uses the global RNG, and
keeps either no logprobs or every step's full `[batch, vocab]` scores. RL needs exactly the configured
distribution, a per-call generator (reproducible rollouts after a resume) and one float per token.

Speed: a decoding step runs hundreds of small kernels, and eager PyTorch spends it launching them (Qwen2.5-0.5B,
128 rows on an H200: 28.6 ms per step eagerly, 10.4 ms replayed as a graph; benchmarks/RESULTS.md, "RL step").
On a CUDA GPU the step's forward therefore runs over a static KV cache (transformers' `StaticCache`: fixed shapes,
cache length kept on the device), captured as CUDA graphs and replayed; sampling stays outside the graphs (it draws
from the call's generator). Its attention (`attention.for_decoding`) reads each grouped K/V head once and only the
filled columns, so a step reads what it must: the weights and the filled cache. Rows that have stopped leave the
batch (`_compact`), so short completions stop costing cache reads. The host reads "have all rows stopped?" one step
late, so it never waits for the step it has just queued.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch

from vftrain.attention import decode_columns, for_decoding, for_generation

log = logging.getLogger("vftrain")


def _cache_name() -> str:
    """The KV cache's keyword in transformers' forward and outputs: `cache` where transformers has renamed it (5.24;
    `past_key_values` there warns on every call that it is deprecated), else `past_key_values` (5.17 takes `cache=`
    into **kwargs and ignores it: every step would then run without the prompt's keys and values)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


_CACHE = _cache_name()


@dataclasses.dataclass
class Sample:
    """One completion: prompt and completion token ids, the sampler's logprob of each completion token, and why
    it ended: "stop" (a stop token, included in `completion_ids` and trained) or "length" (max_new_tokens).
    `mask`: None (every completion token was sampled), or per completion token 1 = sampled, 0 = written by an
    environment between turns (a multi-turn rollout, `rl/environment.py`; never trained, logprob 0)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    mask: list[int] | None = None


def seed_for(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, step, process, ...): the same parts give the same rollouts."""
    import numpy as np

    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def sampling_logits(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """float32 logits of the distribution tokens are drawn from: `logits / temperature`, then the smallest set of
    tokens whose probability reaches `top_p` kept (the rest -inf; at least one token always kept)."""
    x = logits.float() / temperature
    if top_p < 1.0:
        x.masked_fill_(outside_nucleus(x, top_p), float("-inf"))
    return x


def outside_nucleus(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """Bool [rows, vocab]: the tokens of `x` (float32 logits / temperature) outside the smallest set whose
    probability reaches `top_p` (`sampling_logits`' rule; the most probable token always stays in). Each [rows, vocab]
    intermediate is freed as soon as it is used (the trainer runs this over 512-1,024 rows of a 152k vocabulary)."""
    sorted_x, order = x.sort(dim=-1, descending=True)
    probs = sorted_x.softmax(dim=-1)
    del sorted_x
    # A token is dropped when the tokens before it already reach top_p (so the first one always stays).
    before = probs.cumsum(dim=-1).sub_(probs)
    del probs
    drop_sorted = before >= top_p
    del before
    return drop_sorted.scatter(-1, order, drop_sorted)


@torch.no_grad()
def sample(model, prompts: list[list[int]], *, n: int, max_new_tokens: int, temperature: float, top_p: float,
           stop_ids: set[int] | list[int], pad_id: int, seed: int, batch_size: int = 256,
           synced: bool = False, graphs: bool | None = None) -> list[list[Sample]]:
    """`n` completions of each prompt (token ids), drawn by `model` itself (eval mode, no grad; restored after).

    Returns one list of `n` Samples per prompt. `temperature` must be > 0 (RL samples; greedy decoding is
    `vftrain.sampling.embedded.generate`). `synced`: the weights are sharded (FSDP, ZeRO-3) and every process
    calls this; all keep running forwards until the last one has finished, since each forward gathers weights
    from all of them. A model that trains with "varlen" attention samples with SDPA (`attention.for_generation`).
    `graphs`: None (default) decodes over a static cache replayed as a CUDA graph where that applies (CUDA, not
    sharded, SDPA or eager attention, a model transformers marks `_can_compile_fullgraph`), else over transformers'
    dynamic cache; True forces the static cache (captured on CUDA only, so CPU tests run the same loop eagerly);
    False forces the dynamic cache.
    """
    if temperature <= 0:
        raise ValueError("sampling with logprobs needs temperature > 0")
    rows = [list(p) for p in prompts for _ in range(n)]
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    stops = torch.tensor(sorted(stop_ids), device=device)
    was_training = model.training
    model.eval()
    out: list[Sample] = []
    try:
        with for_generation(model):
            static = _static_applies(model, device, synced) if graphs is None else graphs
            with for_decoding(model) if static else contextlib.nullcontext():
                for start in range(0, len(rows), batch_size):
                    chunk = rows[start:start + batch_size]
                    out.extend(_sample_chunk(model, chunk, max_new_tokens, temperature, top_p, stops, pad_id,
                                             generator, device, synced, static))
    finally:
        model.train(was_training)
    return [out[i * n:(i + 1) * n] for i in range(len(prompts))]


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft


def _static_applies(model, device: torch.device, synced: bool) -> bool:
    """Static cache + CUDA graph by default: on CUDA, unsharded (a sharded forward gathers weights through
    collectives), with attention that reads transformers' masks, on a model that transformers declares compilable as
    one graph (`_can_compile_fullgraph`: no host syncs or data-dependent shapes in its forward)."""
    base = _base(model)
    return (device.type == "cuda" and not synced and getattr(base, "_can_compile_fullgraph", False)
            and getattr(base.config, "_attn_implementation", None) in ("sdpa", "eager"))


def _sample_chunk(model, rows: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                  stops: torch.Tensor, pad_id: int, generator: torch.Generator, device, synced: bool,
                  static: bool) -> list[Sample]:
    width = max(len(r) for r in rows)
    # Left padding: every prompt ends in the last column, so each row's next token is predicted at the same place.
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    # One attention mask for the prompt and every token to come: column width + t opens when token t is fed.
    mask = torch.zeros((len(rows), width + max_new_tokens), dtype=torch.long, device=device)
    mask[:, :width] = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
    last = positions[:, -1]
    forward = _Forward(model, mask, static)
    tokens = torch.full((len(rows), max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((len(rows), max_new_tokens), dtype=torch.float32, device=device)
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)
    lengths = torch.full((len(rows),), max_new_tokens, dtype=torch.long, device=device)
    all_done = _AllDone(device, synced)
    alive = slice(None)  # the rows in the decoding batch (all of them until the static cache is compacted)
    step_ids, step_pos = ids, positions
    for t in range(max_new_tokens):
        x = sampling_logits(forward(step_ids, step_pos, width + t), temperature, top_p)
        logp = x.log_softmax(-1)
        token = _draw(logp.exp(), alive, len(rows), generator)
        finished = done[alive]
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        tokens[alive, t] = token
        logprobs[alive, t] = logp.gather(-1, token[:, None])[:, 0]
        stopped = ~finished & torch.isin(token, stops)
        lengths[alive] = torch.where(stopped, torch.full_like(token, t + 1), lengths[alive])
        done[alive] = finished | stopped
        if all_done(done):
            break
        step_ids = token[:, None]
        step_pos = last[alive, None] + t + 1
        forward.mask[:, width + t] = 1  # a finished row's pads are never read
        if static and (t + 1) % _COMPACT_EVERY == 0:
            alive, step_ids, step_pos = _compact(forward, alive, done, step_ids, step_pos)
    tokens, logprobs, lengths, done = tokens.tolist(), logprobs.tolist(), lengths.tolist(), done.tolist()
    return [Sample(prompt_ids=r, completion_ids=tokens[i][:lengths[i]], logprobs=logprobs[i][:lengths[i]],
                   finish_reason="stop" if done[i] else "length") for i, r in enumerate(rows)]


def _draw(probs: torch.Tensor, alive, rows: int, generator: torch.Generator) -> torch.Tensor:
    """One token per row of `probs` (the decoding batch's rows `alive` of `rows`): `torch.multinomial(probs, 1)`'s
    own method (ATen's Distributions.cpp: argmax of p / q, q ~ Exp(1)), with the noise drawn for all `rows`, so a row's
    token does not depend on which other rows are still decoding (compaction below changes no sample)."""
    noise = torch.empty((rows, probs.shape[-1]), dtype=probs.dtype, device=probs.device).exponential_(1,
                                                                                                     generator=generator)
    return (probs / noise[alive]).argmax(-1)


# Rows that have stopped still cost a decoding step their share of reading the KV cache. Every this many steps the
# static cache drops them when at least half of its rows have stopped (one host read of `done` per check; each drop
# means new CUDA graphs for the smaller batch, so it is done only for a large saving).
_COMPACT_EVERY = 16


def batch_bucket(rows: int) -> int:
    """The decoding batch size kept for `rows` live rows: the next power of two. Each new batch shape costs kernel
    selection (cuDNN attention plans, cuBLAS heuristics, Triton variants) and a graph capture; compacting to the
    exact live count gives every RL step new shapes, since completions stop at random (the suspected cause of the
    H200's 6.3 s of decoding per step for rollouts that stopped early against 1.0 s for full-length ones,
    benchmarks/RESULTS.md; not re-measured since). With powers of two a process sees at most log2(rows) + 1 batch
    shapes; the rows that fill a bucket are stopped ones, which sample nothing."""
    return 1 << max(rows - 1, 0).bit_length()


def _compact(forward: "_Forward", alive, done: torch.Tensor, step_ids: torch.Tensor, step_pos: torch.Tensor):
    """(alive, step_ids, step_pos) after dropping stopped rows from the decoding batch where at least half of it
    has stopped, down to `batch_bucket` of the live rows (stopped rows fill the rest); unchanged otherwise."""
    finished = done[alive]
    running = int((~finished).sum())  # the one host read of the check
    keep = batch_bucket(running)
    if running == 0 or keep >= step_ids.shape[0]:
        return alive, step_ids, step_pos
    # positions within the batch: the running rows, then stopped ones up to `keep`, in batch order
    live = torch.argsort(finished.to(torch.int8), stable=True)[:keep].sort().values
    forward.select(live)
    rows = torch.arange(done.shape[0], device=done.device)[alive]
    return rows[live], step_ids[live], step_pos[live]


class _Forward:
    """The model's forward over a KV cache, one call per decoding step: `(ids, positions, length)` -> float logits
    `[rows, vocab]` of each row's last position, `length` being the columns of `mask` seen so far.

    Dynamic: transformers' growing cache, mask sliced to `length` (what `generate` does). Static: a `StaticCache` of
    the mask's full width (it masks the columns not yet written itself), decoded with `attention.for_decoding`'s
    attention, which reads the grouped K/V heads once and only the first `columns(length)` columns (the filled ones,
    rounded up to `WIDTH_STEP`). On CUDA each such width is captured once as a graph over fixed input buffers (the
    first step of a width runs eagerly on a side stream first: kernel selection, Triton compilation, cuBLAS
    workspaces) and later steps fill the buffers and replay it; the graphs of one batch size share a memory pool,
    since they run one after another (a compaction starts a new one: `select`). If capture fails (a forward that
    syncs with the host, e.g. data-dependent MoE routing), decoding goes on eagerly with a warning."""

    # Columns read per step are rounded up to this: a late step of a 512 + 512 decode reads ~1024 columns instead of
    # all of them from the start, at the cost of one graph capture per 256 columns.
    WIDTH_STEP = 256
    warned = False

    def __init__(self, model, mask: torch.Tensor, static: bool):
        self.model, self.mask, self.static = model, mask, static
        self.cache = None
        if static:
            from transformers import StaticCache

            self.cache = StaticCache(config=_base(model).config, max_cache_len=mask.shape[1])
        self.capture = static and mask.is_cuda
        self.graphs: dict[int, tuple] = {}  # columns -> (graph, logits)
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        rows = mask.shape[0]
        self.ids = mask.new_zeros((rows, 1))
        self.positions = mask.new_zeros((rows, 1))

    def select(self, live: torch.Tensor) -> None:
        """Keep only the batch rows `live` (static cache): their cache rows, mask and input buffers; the graphs of
        the larger batch are dropped (their memory goes back to the shared pool)."""
        self.mask = self.mask[live]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[live], layer.values[live]
            layer.batch_size = live.numel()
        self.ids, self.positions = self.ids[live], self.positions[live]
        self.graphs.clear()
        # A new pool for the smaller batch's graphs: the dropped graphs were the old pool's only users, and the
        # allocator refuses a capture into a pool that no graph uses while tensors it made (the last step's logits)
        # are still alive ("it->second->use_count > 0" INTERNAL ASSERT in capture_begin: on the H200 every capture
        # after the first compaction failed and the rest of each call decoded eagerly, ~4x slower per step).
        # The old pool's memory is released once those tensors are freed.
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    def columns(self, length: int) -> int:
        return min(-(-length // self.WIDTH_STEP) * self.WIDTH_STEP, self.mask.shape[1])

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        if not self.static or ids.shape[1] > 1:  # dynamic cache, or the prompt's forward
            return self._run(ids, positions, self.mask if self.static else self.mask[:, :length])
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        columns = self.columns(length)
        with decode_columns(columns):
            if columns in self.graphs:
                graph, logits = self.graphs[columns]
                graph.replay()
                return logits
            if not self.capture:
                return self._run(self.ids, self.positions, self.mask)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                logits = self._run(self.ids, self.positions, self.mask)
            torch.cuda.current_stream().wait_stream(stream)
            self._capture(stream, columns)
        return logits

    def _run(self, ids, positions, mask) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **{_CACHE: self.cache},
                         use_cache=True, logits_to_keep=1)
        self.cache = getattr(out, _CACHE)
        return out.logits[:, -1].float()

    def _capture(self, stream, columns: int) -> None:
        graph = torch.cuda.CUDAGraph()
        # Not the `torch.cuda.graph` context: it empties the allocator's caches on entry (torch/cuda/graphs.py), so
        # the training step that follows would take all of its memory from the driver again.
        torch.cuda.synchronize()
        try:
            with torch.cuda.stream(stream):
                graph.capture_begin(pool=self.pool)
                try:
                    logits = self._run(self.ids, self.positions, self.mask)
                finally:
                    graph.capture_end()
        except RuntimeError as error:  # nothing captured ran: the cache is as the warm-up step left it
            self.capture = False
            _end_failed_capture(stream)
            if not _Forward.warned:
                log.warning("decoding without CUDA graphs (capture failed: %s)", str(error).splitlines()[0])
                _Forward.warned = True
            return
        self.graphs[columns] = (graph, logits)


def _end_failed_capture(stream) -> None:
    """A failed capture leaves the CUDA generator in capture mode (`CUDAGraph.capture_end` raises before ending the
    generator's part of the capture), and every later CUDA random op of the process then fails with "Offset increment
    outside graph capture encountered unexpectedly" (seen on the H200: the next trainer's torch.randn, dropout). A
    capture that completes ends that mode."""
    torch.cuda.synchronize()
    scratch = torch.zeros(1, device=stream.device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        graph.capture_begin()
        scratch.add_(1)
        graph.capture_end()


class _AllDone:
    """`(done) -> bool`: whether every row has stopped. Sharded: agreed by all processes, every step. On CUDA the
    answer is that of the previous step, copied to the host without waiting, so the host queues step t + 1 while
    the device still runs step t (a stopped row only samples padding, so one extra step changes no result)."""

    def __init__(self, device: torch.device, synced: bool):
        self.synced, self.lagged = synced, device.type == "cuda" and not synced
        self.pending = None

    def __call__(self, done: torch.Tensor) -> bool:
        if self.synced:
            flag = (~done).any().int().reshape(1)
            torch.distributed.all_reduce(flag)  # any process still generating keeps every process in the loop
            return not bool(flag.item())
        if not self.lagged:
            return bool(done.all())
        flag = done.all().to("cpu", non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        previous, self.pending = self.pending, (flag, event)
        if previous is None:
            return False
        previous[1].synchronize()
        return bool(previous[0])
