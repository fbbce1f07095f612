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
