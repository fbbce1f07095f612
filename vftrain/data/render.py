"""Stage 2: render one row to token ids and a loss mask, using the tokenizer's own chat template.

Masks never depend on `{% generation %}` markers, which most real templates lack (trl#4879). Instead every
trained assistant turn is located by rendering the conversation up to it: `messages[:i]` with the generation
prompt is exactly what inference feeds the model, so its tokens must be a prefix of the full rendering
(trl#5213, verl#7807); the trained span runs from there to the end of `messages[:i+1]`, cut just after the turn's
stop token (the end-of-turn token is trained, axolotl#3754; the template's trailing newline is not).

A row that cannot be rendered consistently raises `RowError` with a short reason; the tokenize stage counts
and reports those rows instead of training on a wrong mask.
"""

from __future__ import annotations

import json
from typing import Any

from vftrain.errors import DataError

# End-of-turn tokens of common template families; the tokenizer's eos token is always included too.
_STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "</s>", "<|endoftext|>",
                "<|end_of_text|>", "<｜end▁of▁sentence｜>")


class RowError(Exception):
    """A row that cannot be trained on; the message is the reason reported (short, same for similar rows)."""


class Renderer:
    """Turns rows of one format into `{"input_ids": [...], "loss_mask": [...]}` with a given tokenizer."""

    def __init__(self, tokenizer, fmt: str):
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.stop_ids = stop_token_ids(tokenizer)
        if fmt in ("prompt_completion", "messages") and not getattr(tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat_template, so chat rows cannot be rendered; set "
                            "tokenizer.chat_template or use a model with one")

    def __call__(self, row: dict) -> dict:
        if self.fmt == "tokenized":
            return _tokenized(row)
        if self.fmt == "text":
            ids = self._encode(row["text"], special=True)
            return _with_eos(ids, [1] * len(ids), self.tokenizer.eos_token_id)
        tools = _tools(row.get("tools"))
        if self.fmt == "messages":
            return self.render_messages(_as_messages(row["messages"], "messages"), 0, tools)
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return self._strings(prompt, completion)
        prompt_messages = _as_messages(prompt, "prompt")
        return self.render_messages(prompt_messages + _as_messages(completion, "completion"), len(prompt_messages),
                                    tools)

    def render_messages(self, messages: list[dict], train_from: int, tools: list | None = None) -> dict:
        """Token ids of the whole conversation; mask = 1 on assistant turns at index >= `train_from`."""
        turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant" and i >= train_from]
        if not turns:
            raise RowError("no assistant message to train on")
        if all(_is_empty(messages[i]) for i in turns):
            raise RowError("empty completion")
        ids = self._template(messages, tools, generation_prompt=False)
        mask = [0] * len(ids)
        for i in turns:
            start = len(self._prefix_of(ids, messages[:i], tools, True, "the prompt rendered for generation"))
            end = len(ids) if i == len(messages) - 1 else \
                len(self._prefix_of(ids, messages[: i + 1], tools, False, "the conversation up to this turn"))
            end = self._cut_after_stop(ids, start, end)
            mask[start:end] = [1] * (end - start)
        return {"input_ids": ids, "loss_mask": mask}

    def _prefix_of(self, ids: list[int], messages, tools, generation_prompt: bool, what: str) -> list[int]:
        prefix = self._template(messages, tools, generation_prompt)
        if ids[: len(prefix)] != prefix:
            raise RowError(f"chat template: {what} is not a token prefix of the full conversation")
        return prefix

    def _cut_after_stop(self, ids: list[int], start: int, end: int) -> int:
        for k in range(end - 1, start - 1, -1):
            if ids[k] in self.stop_ids:
                return k + 1
        raise RowError("chat template renders an assistant turn without a stop token")

    def _template(self, messages, tools, generation_prompt: bool) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja raises TemplateError, templates raise their own exceptions
            raise RowError(f"chat template failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        return self._encode(text, special=False)

    def _encode(self, text: str, special: bool) -> list[int]:
        # Rendered chat text already holds the template's BOS and specials: adding them again would double BOS.
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _strings(self, prompt: str, completion: str) -> dict:
        # Encoded separately and concatenated: exactly what inference sees (the prompt's tokens, then generated
        # ones), where encoding prompt + completion as one string could merge tokens across the boundary.
        if not completion:
            raise RowError("empty completion")
        p = self._encode(prompt, special=True)
        c = self._encode(completion, special=False)
        return _with_eos(p + c, [0] * len(p) + [1] * len(c), self.tokenizer.eos_token_id)


def stop_token_ids(tokenizer) -> set[int]:
    """Ids that end an assistant turn: the tokenizer's eos plus known end-of-turn tokens in its vocabulary."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in _STOP_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _with_eos(ids: list[int], mask: list[int], eos: int | None) -> dict:
    if eos is not None and (not ids or ids[-1] != eos):
        ids, mask = ids + [eos], mask + [1]
    return {"input_ids": ids, "loss_mask": mask}


def _tokenized(row: dict) -> dict:
    ids = list(row["input_ids"])
    mask = row.get("loss_mask")
    if mask is None:
        mask = row.get("completion_mask")
    mask = [1] * len(ids) if mask is None else [int(bool(m)) for m in mask]
    if len(mask) != len(ids):
        raise RowError("loss_mask length differs from input_ids length")
    return {"input_ids": ids, "loss_mask": mask}


def _as_messages(value: Any, column: str) -> list[dict]:
    if isinstance(value, str):
        role = "user" if column == "prompt" else "assistant"
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m for m in value):
        raise RowError(f"{column} is not a list of messages with a 'role'")
    return [_clean(m) for m in value]


def _clean(message: dict) -> dict:
    # datasets stores the union of all rows' keys, filling absent ones with None; templates test for presence
    # ("tool_calls" in message), so None-valued keys must go. JSON-string tool calls are parsed back.
    out = {k: v for k, v in message.items() if v is not None}
    if isinstance(out.get("tool_calls"), str):
        out["tool_calls"] = json.loads(out["tool_calls"])
    for call in out.get("tool_calls") or []:
        fn = call.get("function", {}) if isinstance(call, dict) else {}
        if isinstance(fn.get("arguments"), str):
            try:
                fn["arguments"] = json.loads(fn["arguments"])
            except json.JSONDecodeError:
                pass
    return out


def _is_empty(message: dict) -> bool:
    content = message.get("content")
    return not message.get("tool_calls") and (content is None or (isinstance(content, str) and not content.strip()))


def _tools(value: Any) -> list | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowError("tools column is not valid JSON") from None
    return value or None


def prompt_ids(tokenizer, prompt, tools: list | None = None) -> list[int]:
    """Token ids of a prompt exactly as inference continues it: messages rendered by the chat template with the
    generation prompt (tools included), or a string encoded with the tokenizer's special tokens (BOS). RL samples
    from these ids and trains on them as they are."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    renderer = Renderer(tokenizer, "prompt_completion")
    return renderer._template(_as_messages(prompt, "prompt"), _tools(tools), generation_prompt=True)
