"""Tool calls read out of a sampled reply as vLLM's tool parsers read them, so that what a policy learns to write
is what the server it is deployed on runs. The dialect follows the chat template, as a vLLM user's
`--tool-call-parser` does:

- `hermes` (Qwen 2.5 / 3, Hermes and templates that write no tool calls): `<tool_call>{"name", "arguments"}
  </tool_call>` blocks, vLLM's `hermes_tool_parser.py`: closed blocks or one left open at the end; the content is
  the text before the first block; one block that does not parse makes the whole reply content.
- `llama3_json` (Llama 3.1 / 3.2 / 3.3, whose templates write a call as `{"name": ..., "parameters": ...}`),
  vLLM's `llama_tool_parser.py`: every JSON object in the reply (after `<|python_tag|>` where it is kept), each
  with a `name` and `arguments` or `parameters`; the content is then empty, and an object without them, or a `{`
  that starts no JSON, makes the whole reply content.
- `mistral` (templates that write `[TOOL_CALLS]`), vLLM's `parser/mistral.py`, which vLLM picks by the vocabulary:
  without an `[ARGS]` token (Mistral 7B v0.3, Nemo, Small 2409) the first JSON value after the marker, a call or a
  list of them (string arguments kept as they are, a missing name ""); with one (v11+ tokenizers),
  `[TOOL_CALLS]name[ARGS]{...}` or `[TOOL_CALLS]name{...}` per call, the arguments the first JSON value's text. The
  content is the text before the first marker. Call ids are 9 letters and digits, as Mistral's templates require.
"""

from __future__ import annotations

import json
import re

HERMES = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)
# What Llama 3.x templates write for a custom tool call (and for a built-in one): none of the hermes templates do.
LLAMA_MARKS = ('"parameters": ', "<|python_tag|>")
MISTRAL_CALLS, MISTRAL_ARGS = "[TOOL_CALLS]", "[ARGS]"
MISTRAL_JSON = re.compile(r"\[{.*}\]", re.DOTALL)  # vLLM's fallback where the text after the marker is no JSON


def dialect(tokenizer) -> str:
    """The tool-call dialect of the tokenizer's chat template: `mistral` (`mistral_v11` with an `[ARGS]` token)
    where it writes `[TOOL_CALLS]`, `llama3_json` where it writes Llama 3's calls, else `hermes`."""
    template = str(getattr(tokenizer, "chat_template", None) or "")
    if MISTRAL_CALLS in template:
        return "mistral_v11" if MISTRAL_ARGS in tokenizer.get_vocab() else "mistral"
    return "llama3_json" if "<tool_call>" not in template and any(m in template for m in LLAMA_MARKS) else "hermes"


def call_id(style: str, index: int) -> str:
    """The id of a reply's `index`-th call: Mistral's templates refuse any but 9 letters and digits."""
    return f"call{index:05d}" if style.startswith("mistral") else f"call_{index}"


def reply_ids(ids: list[int], finish_reason: str | None, stop_ids, style: str) -> tuple[list[int], bool]:
    """(the ids of a sampled reply that vLLM decodes for the tool parser of `style`, whether it skips special tokens):
    the hermes and mistral parsers ask for special tokens (a `<tool_call>` may be one; Mistral's `[TOOL_CALLS]` is
    one), without the stop token that ended the reply (vLLM's text never holds it); llama3_json's does not."""
    if style == "llama3_json":
        return ids, True
    return (ids[:-1] if finish_reason == "stop" and ids and ids[-1] in stop_ids else ids), False


def reply_text(tokenizer, ids: list[int], finish_reason: str | None, stop_ids, style: str) -> str:
    """A sampled reply's text as vLLM hands it to the tool parser of `style` (`reply_ids`)."""
    ids, skip = reply_ids(ids, finish_reason, stop_ids, style)
    return tokenizer.decode(ids, skip_special_tokens=skip)


def parse_tool_calls(text: str, style: str) -> tuple[str | None, list[dict]]:
    """(content, calls) of a reply with tools in `style` (see `dialect`), as vLLM's chat response gives them
    (`parser/abstract_parser.py`): calls [{"name", "arguments": a JSON string}], none where the reply holds none or
    one does not parse; beside calls a content of whitespace only is None. Without calls the content is the reply,
    or for Mistral's engine-based parser what it leaves of it (the text after a marker no call follows)."""
    if style.startswith("mistral"):
        content, calls = (_mistral_v11 if style == "mistral_v11" else _mistral)(text)
    else:
        try:
            content, bodies = (_hermes if style == "hermes" else _llama3_json)(text)
            calls = [{"name": str(body["name"]), "arguments": _arguments(body)} for body in bodies]
        except (ValueError, KeyError, TypeError):
            return text, []
        content = content if calls else text
    if not calls:
        return content or None, []
    return (content if content.strip() else None), calls


def _hermes(text: str):
    return text[:text.find("<tool_call>")], [json.loads(closed or open_) for closed, open_ in HERMES.findall(text)]


def _llama3_json(text: str):
    decoder, calls, end = json.JSONDecoder(), [], -1
    for start in (m.start() for m in re.finditer(r"\{", text)):
        if start > end:  # a `{` inside an object already read is part of it
            body, length = decoder.raw_decode(text[start:])
            calls.append(body)
            end = start + length - 1
    return "", calls


def _arguments(call: dict) -> str:
    """A call's arguments as a JSON string (the OpenAI form; a string is encoded again, as vLLM's parsers do, so a
    tool then gets a string, not an object); Llama's `parameters` where it has no `arguments`."""
    return json.dumps(call["arguments"] if "arguments" in call else call["parameters"], ensure_ascii=False)


def _mistral(text: str):
    """Before v11: the first JSON value after the marker (repeated markers with nothing between count as one); with
    no call in it, that text is the content."""
    content, *segments = text.split(MISTRAL_CALLS)
    body = next((segment.strip() for segment in segments if segment.strip()), "")
    if not segments:
        return text, []
    try:
        parsed = json.JSONDecoder().raw_decode(body)[0]
    except ValueError:
        found = MISTRAL_JSON.findall(body)
        try:
            parsed = json.loads(found[0]) if found else None
        except ValueError:
            parsed = None
    entries = [parsed] if isinstance(parsed, dict) else parsed if isinstance(parsed, list) else []
    calls = [{"name": e.get("name") if isinstance(e.get("name"), str) else "",
              "arguments": _mistral_arguments(e.get("arguments"))}
             for e in entries if isinstance(e, dict) and ("name" in e or "arguments" in e)]
    return (content, calls) if calls else (body, [])


def _mistral_arguments(value) -> str:
    return "{}" if value is None else value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _mistral_v11(text: str):
    """v11+: `name[ARGS]{...}` or `name{...}` after the marker; a marker after the arguments starts the next call (one
    inside a name is part of it). The arguments are the first JSON value's text (what follows it is dropped), else
    the text as it is, "{}" when there is none; a name that never ends is a call without arguments, unless nothing
    follows the marker."""
    content, _, rest = text.partition(MISTRAL_CALLS)
    calls = []
    while True:
        ends = [i for i in (rest.find(MISTRAL_ARGS), rest.find("{")) if i >= 0]
        if not ends:
            return content, calls + ([{"name": rest.strip(), "arguments": "{}"}] if rest else [])
        at = min(ends)
        name, rest = rest[:at], rest[at + len(MISTRAL_ARGS) if rest.startswith(MISTRAL_ARGS, at) else at:]
        raw, marker, rest = rest.partition(MISTRAL_CALLS)
        calls.append({"name": name.strip(), "arguments": _first_json_text(raw.strip())})
        if not marker:
            return content, calls


def _first_json_text(raw: str) -> str:
    try:
        return raw[:json.JSONDecoder().raw_decode(raw)[1]] if raw else "{}"
    except ValueError:
        return raw
