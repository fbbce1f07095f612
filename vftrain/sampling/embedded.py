"""Embedded generation backend: the model being trained generates (batched, left-padded, eval mode, no grad)."""

from __future__ import annotations

import contextlib

import torch

from vftrain.attention import for_generation
from vftrain.data.render import render_prompt, stop_token_ids
from vftrain.sampling import ChatPrompt, Completion
from vftrain.sampling.tokens import Sample


def encode_prompt(tokenizer, prompt) -> list[int]:
    """The ids training rendered this prompt to (tools included), so samples show what the model learned."""
    if isinstance(prompt, ChatPrompt):
        return render_prompt(tokenizer, prompt.messages, prompt.tools)
    return render_prompt(tokenizer, prompt)


def pad_token_id(tokenizer) -> int:
    """The id that fills left padding and finished rows: the pad token, else the smallest stop token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_token_ids(tokenizer))


@torch.no_grad()
def generate(model, tokenizer, prompts: list, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             batch_size: int = 64, synced: bool = False) -> list[str]:
    """Completions (decoded, special tokens removed; `Completion.truncated` when cut by max_new_tokens) for
    `prompts` (`ChatPrompt`s, message lists or strings).

    The model is put in eval mode and restored afterwards, so this is safe to call in the middle of training;
    a peft model generates with its adapters active. `synced`: the weights are sharded (FSDP, ZeRO-3), every
    process calls this with the same prompts, and all keep running forwards until the last one has finished
    (transformers' `synced_gpus`), since each forward gathers weights from all of them. A model that trains with
    "varlen" attention generates with SDPA (`attention.for_generation`).
    """
    samples = generate_ids(model, [encode_prompt(tokenizer, p) for p in prompts], max_new_tokens,
                           stop_token_ids(tokenizer), pad_token_id(tokenizer), temperature, top_p, batch_size, synced)
    texts = tokenizer.batch_decode([s.completion_ids for s in samples], skip_special_tokens=True)
    return [Completion(t, s.finish_reason == "length") for t, s in zip(texts, samples)]


@torch.no_grad()
def generate_ids(model, prompts: list[list[int]], max_new_tokens: int, stop_ids, pad_id: int,
                 temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 64, synced: bool = False,
                 logprobs: bool = False) -> list[Sample]:
    """One completion per prompt (token ids) through `model.generate`: greedy at temperature 0, else sampled.

    Each completion ends with its stop token ("stop") or after `max_new_tokens` ("length"), chosen as asked and
    nothing else: the checkpoint's generation_config (Qwen: top_k 20, repetition_penalty 1.05) does not apply
    (`_asked_only`). `logprobs`: also
    the log-probability of each token under the scores it was chosen from (the logits after generate's
    processors, as vLLM's processed logprobs of a greedy request); otherwise `Sample.logprobs` is empty.
    RL sampling with the sampler's own logprobs is `vftrain.sampling.tokens.sample`.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stops = set(stop_ids)
    out: list[Sample] = []
    try:
        with for_generation(model), _asked_only(model):
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start:start + batch_size]
                width = max(len(ids) for ids in chunk)
                # Left padding: every prompt ends at the same column, so generation continues each one directly.
                ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in chunk], device=device)
                attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk], device=device)
                sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 \
                    else {"do_sample": False}
                result = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                        eos_token_id=sorted(stops), pad_token_id=pad_id, synced_gpus=synced,
                                        return_dict_in_generate=True, output_scores=logprobs, **sampling)
                tokens = result.sequences[:, width:]
                logp = torch.stack(result.scores, 1).float().log_softmax(-1).gather(-1, tokens[..., None])[..., 0] \
                    if logprobs else None
                for row, (prompt, generated) in enumerate(zip(chunk, tokens.tolist())):
                    # A finished row is padded up to the longest one: it ends at its first stop token.
                    end = next((i + 1 for i, t in enumerate(generated) if t in stops), None)
                    completion = generated[:end]
                    out.append(Sample(prompt_ids=list(prompt), completion_ids=completion,
                                      logprobs=logp[row, :len(completion)].tolist() if logprobs else [],
                                      finish_reason="length" if end is None else "stop"))
    finally:
        model.train(was_training)
    return out


@contextlib.contextmanager
def _asked_only(model):
    """`model.generate` with a plain generation config: transformers fills every field a call leaves unset from the
    model's `generation_config` (`GenerationMixin._prepare_generation_config`), so a checkpoint's repetition penalty
    (which also penalises the prompt's end-of-turn token), top-k, beam count or minimum length would reach greedy
    held-out generations and samples, which then neither are greedy nor match vLLM's (pinned neutral:
    `openai_backend.NEUTRAL_SAMPLING`). The config is swapped on the transformers model that runs `generate` (under
    a peft wrapper too) and restored after; saved checkpoints keep theirs."""
    from transformers import GenerationConfig, GenerationMixin

    target = next((m for m in model.modules() if isinstance(m, GenerationMixin)), None)
    if target is None:
        yield
        return
    saved = target.generation_config
    target.generation_config = GenerationConfig(
        **{k: getattr(saved, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    try:
        yield
    finally:
        target.generation_config = saved
