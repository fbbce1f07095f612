"""Sample generation during and after training: prompts from held-out rows, backends, scoring."""

from __future__ import annotations

from dataclasses import dataclass

from vftrain.data.load import plain_row
from vftrain.data.render import RowError, as_messages, parse_tools
from vftrain.errors import DataError


@dataclass
class ChatPrompt:
    """A chat prompt as inference gets it: the messages and the tools the row offers (None: no tools)."""

    messages: list[dict]
    tools: list | None = None


class Completion(str):
    """A sampled completion's text; `truncated`: cut by max_new_tokens (False where the backend cannot tell)."""

    truncated: bool = False

    def __new__(cls, text: str, truncated: bool = False):
        out = super().__new__(cls, text)
        out.truncated = truncated
        return out


def prompt_and_reference(row: dict):
    """(prompt, reference answer) of a row: the prompt is everything before the last assistant message with the
    row's tools (what inference sees; a `ChatPrompt`, or a string for string prompts), the reference is that
    message's content. A completion of several messages (tool call, tool result, answer) is part of the prompt
    up to its last assistant message, so the sample answers the context its reference answers."""
    try:
        tools = parse_tools(row.get("tools"))
        if "prompt" in row and "completion" in row:
            prompt, completion = row["prompt"], row["completion"]
            if isinstance(completion, str):
                return (prompt if isinstance(prompt, str) else ChatPrompt(list(prompt), tools)), completion
            # as training renders the row (data/render.py)
            messages = as_messages(prompt, "prompt") + as_messages(completion, "completion")
        elif "messages" in row:
            messages = as_messages(row["messages"], "messages")
        else:
            raise DataError("sampling needs prompt + completion or messages columns")
    except RowError as exc:
        raise DataError(f"sampling: {exc}") from None
    return _split_at_last_answer(messages, tools)


def _split_at_last_answer(messages: list[dict], tools) -> tuple[ChatPrompt, str]:
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        raise DataError("sampling: a row has no assistant message to compare a sample with")
    return ChatPrompt(messages[:last], tools), messages[last].get("content") or ""


def held_out_samples(raw_train, raw_eval, n: int):
    """(rows to sample from, rows to train on): the first `n` eval rows when there is an eval split, else the
    last `n` training rows, which are then held out of training. Sample rows are returned as plain Python rows
    (`data.load.plain_row`: without the keys Arrow adds to struct columns)."""
    if raw_eval is not None and len(raw_eval):
        source, picked, train = raw_eval, range(min(n, len(raw_eval))), raw_train
    else:
        keep = len(raw_train) - min(n, len(raw_train) - 1)
        source, picked, train = raw_train, range(keep, len(raw_train)), raw_train.select(range(keep))
    return [plain_row(source[i], source.features) for i in picked], train


def make_backend(trainer):
    """The generation backend the config names: `backend(prompts, step) -> completions`. The trainer's own
    OpenAI backend (RL rollouts), when it has one, is shared: two would each push the weights and load the same
    adapter name, which vLLM refuses (issue 18 item 7)."""
    if trainer.args.sample_backend == "openai":
        from vftrain.sampling.openai_backend import OpenAIBackend

        shared = getattr(trainer, "backend", None)
        return shared if isinstance(shared, OpenAIBackend) else OpenAIBackend(trainer)
    from vftrain.sampling.callback import embedded_backend

    return embedded_backend(trainer)
