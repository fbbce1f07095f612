"""Stage 2: render one row to token ids and a loss mask, using the tokenizer's own chat template.

Masks never depend on `{% generation %}` markers, which most real templates lack (trl#4879). Instead each trained
assistant turn is rendered as inference produces it: the prompt `messages[:i]` with the generation prompt (what
inference feeds the model, `render_prompt`) must be a token prefix of `messages[:i+1]` rendered as a finished
conversation (trl#5213, verl#7807), and the turn's tokens are what follows, up to and including its first stop
token (the end-of-turn token is trained, axolotl#3754; whatever the template writes after it is not). The trained
tokens must carry the message's content (its text, reasoning and tool-call names, whitespace aside): a template
that rewrites the turn it renders (DeepSeek-R1-distill strips `<think>...</think>`) would otherwise train what is
left of it.

All turns share one row when the whole conversation's rendering starts with each turn's tokens. Templates that
render earlier turns differently from how they were generated (Qwen3 drops their reasoning) break that; the
conversation is then split into one row per group of turns that one rendering serves (`split_turns`), or
refused.

A row that cannot be rendered correctly raises `RowError` with a short reason; the tokenize stage counts and
reports those rows instead of training on a wrong mask.
"""

from __future__ import annotations

import json
import unicodedata
from functools import partial
from typing import Any

from vftrain.errors import DataError

# The tokenizer_config.json key that keeps a run's chat_template_kwargs with its tokenizer (`models.use_template`).
TEMPLATE_KWARGS = "vftrain_chat_template_kwargs"
IGNORE_INDEX = -100  # transformers' label of a token that does not train (its cross-entropy's ignore_index)
# End-of-turn tokens of common template families; the tokenizer's eos token is always included too.
_STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "</s>", "<|endoftext|>",
                "<|end_of_text|>", "<｜end▁of▁sentence｜>")


class RowError(Exception):
    """A row that cannot be trained on; the message is the reason reported (short, same for similar rows)."""


class Renderer:
    """Turns rows of one format into training rows `{"input_ids": [...], "loss_mask": [...]}` with a tokenizer.

    `split_turns`: when one rendering of a conversation cannot serve all its assistant turns, train them in
    several rows (True) or refuse the conversation (False)."""

    def __init__(self, tokenizer, fmt: str, split_turns: bool = True):
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.split_turns = split_turns
        self.stop_ids = stop_token_ids(tokenizer)
        if fmt == "messages":
            self._require_template()

    def _require_template(self) -> None:
        # Checked per chat row for prompt/completion: string prompts and completions (base models) need none.
        if not getattr(self.tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat_template, so chat rows cannot be rendered; set "
                            "tokenizer.chat_template or use a model with one")

    def __call__(self, row: dict) -> list[dict]:
        """The training rows of one dataset row: one, or one per group of turns (see `render_messages`)."""
        if self.fmt == "tokenized":
            return [_tokenized(row)]
        if self.fmt == "text":
            ids = encode_text(self.tokenizer, row["text"])
            return [_with_eos(ids, [1] * len(ids), self.tokenizer.eos_token_id)]
        tools = parse_tools(row.get("tools"))
        if self.fmt == "messages":
            return self.render_messages(as_messages(row["messages"], "messages"), 0, tools)
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return [self._strings(prompt, completion)]
        prompt_messages = as_messages(prompt, "prompt")
        return self.render_messages(prompt_messages + as_messages(completion, "completion"), len(prompt_messages),
                                    tools)

    def render_messages(self, messages: list[dict], train_from: int, tools: list | None = None) -> list[dict]:
        """Rows that train every assistant turn at index >= `train_from`, each in the context inference renders it
        in. The first row is the conversation up to its last trained turn, training every turn that rendering
        serves; each further row (only with `split_turns`) is the conversation up to a turn it does not serve."""
        self._require_template()
        turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant" and i >= train_from]
        if not turns:
            raise RowError("no assistant message to train on")
        turns = [i for i in turns if not _is_empty(messages[i])]  # an empty turn is context: it would train a stop
        if not turns:
            raise RowError("empty completion")
        spans = {i: self._turn(messages, i, tools) for i in turns}
        context = [m for k, m in enumerate(messages[:turns[-1]]) if k not in spans]
        lost = lost_characters(self.tokenizer, spans[turns[-1]][0], context)
        rows, pending = [], turns
        while pending:
            ids = spans[pending[-1]][0]  # messages[:last + 1]: serves its own last turn by construction
            mask, left = [0] * len(ids), []
            for i in pending:
                turn_ids, start, end = spans[i]
                if ids[:end] == turn_ids[:end]:
                    mask[start:end] = [1] * (end - start)
                else:
                    left.append(i)
            if left and not self.split_turns:
                raise RowError("chat template renders earlier assistant turns differently from inference "
                               "(split_turns = true trains them in rows of their own)")
            rows.append({"input_ids": ids, "loss_mask": mask, "lost": lost})
            pending = left
        return rows

    def _turn(self, messages: list[dict], i: int, tools) -> tuple[list[int], int, int]:
        """(ids of `messages[:i+1]`, start, end) of assistant turn `i` as inference produces it."""
        prompt = render_prompt(self.tokenizer, messages[:i], tools)
        ids = render_chat(self.tokenizer, messages[: i + 1], tools, generation_prompt=False)
        if ids[: len(prompt)] != prompt:
            thinking_off = template_kwargs(self.tokenizer).get("enable_thinking") is False
            why = " (it holds reasoning, and with enable_thinking = false the generation prompt already closes the " \
                  "think block)" if thinking_off and messages[i].get("reasoning_content") else ""
            raise RowError(f"chat template: the prompt rendered for generation is not a token prefix of the turn{why}")
        start = len(prompt)
        end = next((k + 1 for k in range(start, len(ids)) if ids[k] in self.stop_ids), None)
        if end is None:
            raise RowError("chat template renders an assistant turn without a stop token")
        text = self.tokenizer.decode(ids[start:end])
        if not _carries(text, messages[i], self.tokenizer):
            raise RowError(_dropped_part(self.tokenizer, text, messages[i]))
        return ids, start, end

    def _strings(self, prompt: str, completion: str) -> dict:
        if not completion:
            raise RowError("empty completion")
        p = encode_text(self.tokenizer, prompt)
        # The completion's tokens are those of prompt + completion after the prompt's: encoded alone, a
        # sentencepiece tokenizer (Llama-2, Mistral v0.1) would start it with an extra "▁" that never follows the
        # prompt in running text. Where tokens merge across the boundary the prompt's own tokens are kept (what
        # inference feeds the model) and the completion is encoded alone.
        whole = encode_text(self.tokenizer, prompt + completion)
        c = whole[len(p):] if whole[: len(p)] == p and len(whole) > len(p) else \
            self.tokenizer(completion, add_special_tokens=False)["input_ids"]
        row = _with_eos(p + c, [0] * len(p) + [1] * len(c), self.tokenizer.eos_token_id)
        return {**row, "lost": lost_characters(self.tokenizer, p, [{"content": prompt}])}


def lost_characters(tokenizer, ids: list[int], messages: list[dict]) -> str:
    """Characters of `messages` (the context: system, user, tool turns) that their rendering `ids` lacks because
    the tokenizer cannot encode them ('' if none). Trained turns are checked by `_turn`; without this a character-level
    tokenizer turned "Météo à Oslo?" into "Mto  Oslo?" without a word (review 2026-12-02, item 24)."""
    text = tokenizer.decode(ids)
    missing = [m for m in messages if not _carries(text, m, tokenizer)]  # commonly none: one decode is the cost
    return "".join(sorted({c for m in missing for c in unencodable(tokenizer, _text_of(m))}))


def unencodable(tokenizer, text: str) -> set[str]:
    """The characters of `text` that do not come back from encoding and decoding it."""
    back = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"])
    return {c for c in text if not c.isspace() and c not in back}


def _text_of(message: dict) -> str:
    content = message.get("content")
    parts = [content] if isinstance(content, str) else \
        [p.get("text") for p in content or [] if isinstance(p, dict) and p.get("type") == "text"]
    return " ".join(p for p in [*parts, message.get("reasoning_content")] if isinstance(p, str))


def _dropped_part(tokenizer, text: str, message: dict) -> str:
    """The drop reason for an assistant turn whose trained tokens `text` lack part of `message`: the template
    ignores its tool calls, the tokenizer cannot encode some of its characters, or the template rewrites it."""
    squeezed = "".join(text.split())
    calls = [c.get("function", c) for c in message.get("tool_calls") or [] if isinstance(c, dict)]
    if any(isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"] not in squeezed for fn in calls):
        return ("chat template does not render the assistant's tool_calls (no tool-call name in the turn it would "
                "train); set chat_template to a template that renders tool_calls (the model family's tool-calling "
                "template), or write the calls as text in the message content")
    lost = unencodable(tokenizer, _text_of(message))
    if lost:
        return (f"the tokenizer cannot encode {''.join(sorted(lost))!r} in assistant text (it would be missing from "
                "the trained tokens); replace those characters in the data or use a tokenizer that has them")
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str) and "".join(reasoning.split()) not in squeezed:
        return ("chat template does not render the assistant's reasoning (reasoning_content) in the tokens it would "
                "train; set chat_template to a template that renders it, or leave the reasoning out of the data")
    return ("chat template rewrites or drops part of an assistant message (e.g. strips <think> reasoning from its "
            "content) in the tokens it would train; set chat_template to a template that renders the turn as given")


def render_prompt(tokenizer, prompt: str | list[dict], tools: list | None = None, served: bool = False) -> list[int]:
    """Token ids inference feeds the model for `prompt` (a message list, rendered by the chat template with the
    generation prompt and `tools`; or a plain string, with the tokenizer's BOS once); `served`: see `clean_message`."""
    if isinstance(prompt, str):
        return encode_text(tokenizer, prompt)
    return render_chat(tokenizer, [clean_message(m, served) for m in prompt], tools, generation_prompt=True)


def render_chat(tokenizer, messages: list[dict], tools, generation_prompt: bool) -> list[int]:
    """Token ids of `messages` through the chat template; RowError if the template rejects them."""
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=generation_prompt, **template_kwargs(tokenizer))
    except Exception as exc:  # jinja raises TemplateError, templates raise their own exceptions
        raise RowError(f"chat template failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    # Rendered chat text already holds the template's BOS and specials: adding them again would double BOS.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def template_kwargs(tokenizer) -> dict:
    """The chat template's variables for this run (`chat_template_kwargs`, kept with the tokenizer:
    `models.use_template`)."""
    return dict(getattr(tokenizer, "init_kwargs", {}).get(TEMPLATE_KWARGS) or {})


def encode_text(tokenizer, text: str) -> list[int]:
    """Plain text with the tokenizer's special tokens (BOS), once: text that already starts with the BOS string
    would otherwise get a second one."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    return ids[1:] if bos is not None and ids[:2] == [bos, bos] else ids


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


# Columns of a tokenized row that say which tokens train: vftrain's, TRL's (completion_mask; assistant_masks, from
# apply_chat_template(return_assistant_tokens_mask=True)), and transformers' `labels` (-100: not trained).
MASK_COLUMNS = ("loss_mask", "completion_mask", "assistant_masks", "labels")


def _tokenized(row: dict) -> dict:
    ids = list(row["input_ids"])
    column = next((c for c in MASK_COLUMNS if row.get(c) is not None), None)
    values = [1] * len(ids) if column is None else list(row[column])
    if len(values) != len(ids):
        raise RowError(f"{column} length differs from input_ids length")
    if column == "labels":
        if any(v != IGNORE_INDEX and v != t for v, t in zip(values, ids)):
            raise RowError("labels differ from input_ids where they train: give transformers' unshifted labels "
                           f"(input_ids, {IGNORE_INDEX} where not trained), or a loss_mask")
        values = [v != IGNORE_INDEX for v in values]
    mask = [int(bool(m)) for m in values]
    return _unpadded(ids, mask, row.get("attention_mask"))


def _unpadded(ids: list[int], mask: list[int], attention) -> dict:
    """The row without the padding its attention_mask marks (0s at either end: rows padded to one length for
    transformers' Trainer); vftrain packs or pads rows itself."""
    if attention is None or all(attention):
        return {"input_ids": ids, "loss_mask": mask}
    if len(attention) != len(ids):
        raise RowError("attention_mask length differs from input_ids length")
    kept = [i for i, a in enumerate(attention) if a]
    if not kept or kept[-1] - kept[0] + 1 != len(kept):
        raise RowError("attention_mask masks tokens inside the row, not only padding at its ends")
    return {"input_ids": ids[kept[0]:kept[-1] + 1], "loss_mask": mask[kept[0]:kept[-1] + 1]}


def as_messages(value: Any, column: str) -> list[dict]:
    """`value` as a list of template-ready messages (a prompt or completion string is one user or assistant
    message)."""
    if isinstance(value, str) and column != "messages":
        role = "user" if column == "prompt" else "assistant"
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m for m in value):
        raise RowError(f"{column} is not a list of messages with a 'role'")
    return [clean_message(m) for m in value]


# Where messages keep reasoning besides `reasoning_content`: vLLM's responses (`reasoning`), gpt-oss (`thinking`).
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def clean_message(message: dict, served: bool = False) -> dict:
    """A copy of `message` as templates expect it, prepared as vLLM prepares a conversation for its template
    (renderers/chat_utils.py), so that training renders what serving will: None-valued keys removed (templates test
    for presence: "tool_calls" in message) but a null content is "", text-only content parts joined by newlines,
    reasoning under `thinking` / `reasoning` also as `reasoning_content` (transformers' order), JSON-string tool
    calls and arguments parsed (templates write them with `tojson`; "" and null arguments are {}), an empty
    tool_calls list dropped. `served`: a conversation a server is handed (a sampled turn, a request's history), whose
    arguments that are no JSON object become {} and whose calls without a name are kept, as vLLM keeps them; in
    training rows both are refused."""
    out = {k: v for k, v in message.items() if v is not None}
    if "content" in message:
        out["content"] = _text_parts(message["content"])
    reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
    if reasoning is not None:
        out["reasoning_content"] = reasoning
    calls = out.get("tool_calls")
    if isinstance(calls, str):
        try:
            calls = json.loads(calls)
        except json.JSONDecodeError:
            raise RowError("tool_calls is not valid JSON") from None
    if isinstance(calls, list):
        out["tool_calls"] = [_parsed_call(c, served) for c in calls]
    if not out.get("tool_calls", True):
        del out["tool_calls"]
    return out


def _text_parts(content: Any) -> Any:
    """OpenAI content parts that are all text as one string (vLLM joins them with newlines); else as given."""
    if content is None:
        return ""
    if isinstance(content, list) and content and all(isinstance(p, dict) and p.get("type") == "text"
                                                     and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    return content


def _parsed_call(call: Any, served: bool) -> Any:
    """A tool call with its arguments as a dict, in OpenAI's form (`function`) or the flat one Qwen's template also
    reads; in training rows a call without a name or with arguments that are not JSON is refused (it would train
    broken JSON); `served` (see `clean_message`): vLLM's {} for such arguments, and the call kept."""
    if not isinstance(call, dict):
        return call
    wrapped = isinstance(call.get("function"), dict)
    fn = call["function"] if wrapped else call
    if not served and (not isinstance(fn.get("name"), str) or not fn["name"]):
        raise RowError("a tool call has no function name")
    arguments = fn.get("arguments")
    if arguments is None or arguments == "":
        arguments = {}
    elif isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            if not served:
                raise RowError("tool call arguments are not valid JSON") from None
            arguments = {}
    if served and not isinstance(arguments, dict):  # vLLM: "Chat templates require a mapping"
        arguments = {}
    # served in vLLM's order: it validates a call's function as OpenAI's TypedDict (arguments, name), which
    # templates that write `function|tojson` (Mistral's) show
    fn = {"arguments": arguments, "name": fn.get("name", "")} if served and wrapped else {**fn, "arguments": arguments}
    return {**call, "function": fn} if wrapped else fn


def _is_empty(message: dict) -> bool:
    """An assistant turn that says nothing: no tool calls, and no content or reasoning but whitespace."""
    def blank(value) -> bool:
        return value is None or (isinstance(value, str) and not value.strip())

    return not message.get("tool_calls") and blank(message.get("content")) and blank(message.get("reasoning_content"))


def _carries(text: str, message: dict, tokenizer) -> bool:
    """Whether rendered `text` holds the message's content, reasoning and tool-call names, whitespace aside
    (templates trim content and lay out reasoning blocks their own way), both sides normalised as the tokenizer
    normalises text (Qwen2's NFC: NFD text decodes composed), else with NFKC."""
    content = message.get("content")
    parts = [content] if isinstance(content, str) else \
        [p.get("text") for p in content or [] if isinstance(p, dict) and p.get("type") == "text"]
    parts.append(message.get("reasoning_content"))
    for call in message.get("tool_calls") or []:
        fn = call.get("function", call) if isinstance(call, dict) else {}
        parts.append(fn.get("name") if isinstance(fn, dict) else None)
    normalizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", None)
    normalize = normalizer.normalize_str if normalizer is not None else partial(unicodedata.normalize, "NFKC")

    def squeezed(s: str) -> str:  # "▁": the space a sentencepiece normaliser (Llama 2) writes
        return "".join(normalize(s).replace("\u2581", " ").split())

    whole = squeezed(text)
    return all(squeezed(p) in whole for p in parts if isinstance(p, str))


def parse_tools(value: Any) -> list | None:
    """The `tools` column as a list of tool schemas (it may hold a JSON string), or None."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowError("tools column is not valid JSON") from None
    return value or None

