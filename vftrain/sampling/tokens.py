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
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Sample:
    """One completion: prompt and completion token ids, the sampler's logprob of each completion token, and why
    it ended: "stop" (a stop token, included in `completion_ids` and trained) or "length" (max_new_tokens)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    finish_reason: str


def seed_for(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, step, process, ...): the same parts give the same rollouts."""
    import numpy as np

    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def sampling_logits(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """float32 logits of the distribution tokens are drawn from: `logits / temperature`, then the smallest set of
    tokens whose probability reaches `top_p` kept (the rest -inf; at least one token always kept)."""
    x = logits.float() / temperature
    if top_p < 1.0:
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(dim=-1)
        # A token is dropped when the tokens before it already reach top_p (so the first one always stays).
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        x = x.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return x


@torch.no_grad()
def sample(model, prompts: list[list[int]], *, n: int, max_new_tokens: int, temperature: float, top_p: float,
           stop_ids: set[int] | list[int], pad_id: int, seed: int, batch_size: int = 256,
           synced: bool = False) -> list[list[Sample]]:
    """`n` completions of each prompt (token ids), drawn by `model` itself (eval mode, no grad; restored after).

    Returns one list of `n` Samples per prompt. `temperature` must be > 0 (RL samples; greedy decoding is
    `vftrain.sampling.embedded.generate`). `synced`: the weights are sharded (FSDP, ZeRO-3) and every process
    calls this; all keep running forwards until the last one has finished, since each forward gathers weights
    from all of them.
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
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            out.extend(_sample_chunk(model, chunk, max_new_tokens, temperature, top_p, stops, pad_id, generator,
                                     device, synced))
    finally:
        model.train(was_training)
    return [out[i * n:(i + 1) * n] for i in range(len(prompts))]


def _sample_chunk(model, rows: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                  stops: torch.Tensor, pad_id: int, generator: torch.Generator, device, synced: bool) -> list[Sample]:
    width = max(len(r) for r in rows)
    # Left padding: every prompt ends in the last column, so each row's next token is predicted at the same place.
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    tokens = torch.full((len(rows), max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((len(rows), max_new_tokens), dtype=torch.float32, device=device)
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)
    lengths = torch.full((len(rows),), max_new_tokens, dtype=torch.long, device=device)
    cache = None
    step_ids, step_pos = ids, positions
    for t in range(max_new_tokens):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        x = sampling_logits(out.logits[:, -1], temperature, top_p)
        logp = x.log_softmax(-1)
        token = torch.multinomial(logp.exp(), 1, generator=generator)[:, 0]
        token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens[:, t] = token
        logprobs[:, t] = logp.gather(-1, token[:, None])[:, 0]
        stopped = ~done & torch.isin(token, stops)
        lengths = torch.where(stopped, torch.full_like(lengths, t + 1), lengths)
        done = done | stopped
        finished = bool(done.all())
        if synced:
            flag = torch.tensor([int(not finished)], device=device)
            torch.distributed.all_reduce(flag)  # any process still generating keeps every process in the loop
            finished = not bool(flag.item())
        if finished:
            break
        step_ids = token[:, None]
        step_pos = positions[:, -1:] + t + 1
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)  # a finished row's pads are never read
    tokens, logprobs, lengths, done = tokens.tolist(), logprobs.tolist(), lengths.tolist(), done.tolist()
    return [Sample(prompt_ids=r, completion_ids=tokens[i][:lengths[i]], logprobs=logprobs[i][:lengths[i]],
                   finish_reason="stop" if done[i] else "length") for i, r in enumerate(rows)]
