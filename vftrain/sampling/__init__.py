"""Sample generation during and after training: prompts from held-out rows, backends, scoring."""

from __future__ import annotations

from vftrain.errors import DataError


def prompt_and_reference(row: dict):
    """(prompt, reference answer) of a chat row: the prompt is everything before the last assistant message
    (what inference sees), the reference is that message's content."""
    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(completion, str):
            return prompt, completion
        answers = [m for m in completion if m.get("role") == "assistant"]
        return list(prompt) if not isinstance(prompt, str) else prompt, answers[-1].get("content") or ""
    if "messages" in row:
        messages = list(row["messages"])
        last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
        return messages[:last], messages[last].get("content") or ""
    raise DataError("sampling needs prompt + completion or messages columns")


def held_out_samples(raw_train, raw_eval, n: int):
    """(rows to sample from, rows to train on): the first `n` eval rows when there is an eval split, else the
    last `n` training rows, which are then held out of training."""
    if raw_eval is not None and len(raw_eval):
        return [raw_eval[i] for i in range(min(n, len(raw_eval)))], raw_train
    k = min(n, len(raw_train) - 1)
    keep = len(raw_train) - k
    return [raw_train[i] for i in range(keep, len(raw_train))], raw_train.select(range(keep))


def make_backend(trainer):
    """The generation backend the config names: `backend(prompts, step) -> completions`."""
    if trainer.args.sample_backend == "openai":
        from vftrain.sampling.openai_backend import OpenAIBackend

        return OpenAIBackend(trainer)
    from vftrain.sampling.callback import embedded_backend

    return embedded_backend(trainer)
