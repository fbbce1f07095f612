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
"""

from __future__ import annotations

import json
import re

HERMES = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)
# What Llama 3.x templates write for a custom tool call (and for a built-in one): none of the hermes templates do.
LLAMA_MARKS = ('"parameters": ', "<|python_tag|>")


def dialect(tokenizer) -> str:
    """The tool-call dialect of the tokenizer's chat template: `llama3_json` where it writes Llama 3's calls, else
    `hermes`."""
    template = str(getattr(tokenizer, "chat_template", None) or "")
    return "llama3_json" if "<tool_call>" not in template and any(m in template for m in LLAMA_MARKS) else "hermes"


def parse_tool_calls(text: str, style: str) -> tuple[str | None, list[dict]] | None:
    """(content, or None where there is none; [{"name", "arguments": a JSON string}]) of a reply that holds tool
    calls in `style` (see `dialect`); None when it holds none, or one does not parse (the reply is then content)."""
    try:
        content, bodies = (_hermes if style == "hermes" else _llama3_json)(text)
        calls = [{"name": str(body["name"]), "arguments": _arguments(body)} for body in bodies]
    except (ValueError, KeyError, TypeError):
        return None
    return (content or None, calls) if calls else None


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
