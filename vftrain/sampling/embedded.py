"""Embedded generation backend: the model being trained generates (batched, left-padded, eval mode, no grad)."""

from __future__ import annotations

import torch

from vftrain.attention import for_generation
from vftrain.data.render import render_prompt, stop_token_ids
from vftrain.sampling import ChatPrompt


def encode_prompt(tokenizer, prompt) -> list[int]:
    """The ids training rendered this prompt to (tools included), so samples show what the model learned."""
    if isinstance(prompt, ChatPrompt):
        return render_prompt(tokenizer, prompt.messages, prompt.tools)
    return render_prompt(tokenizer, prompt)


@torch.no_grad()
def generate(model, tokenizer, prompts: list, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             batch_size: int = 64, synced: bool = False) -> list[str]:
    """Completions (decoded, special tokens removed) for `prompts` (`ChatPrompt`s, message lists or strings).

    The model is put in eval mode and restored afterwards, so this is safe to call in the middle of training;
    a peft model generates with its adapters active. `synced`: the weights are sharded (FSDP, ZeRO-3), every
    process calls this with the same prompts, and all keep running forwards until the last one has finished
    (transformers' `synced_gpus`), since each forward gathers weights from all of them. A model that trains with
    "varlen" attention generates with SDPA (`attention.for_generation`).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stops = sorted(stop_token_ids(tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    out: list[str] = []
    try:
        with for_generation(model):
            encoded = [encode_prompt(tokenizer, p) for p in prompts]
            for start in range(0, len(encoded), batch_size):
                chunk = encoded[start:start + batch_size]
                width = max(len(ids) for ids in chunk)
                # Left padding: every prompt ends at the same column, so generation continues each one directly.
                ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk], device=device)
                attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk], device=device)
                sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 \
                    else {"do_sample": False}
                generated = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                           eos_token_id=stops, pad_token_id=pad, synced_gpus=synced, **sampling)
                out.extend(tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out
