"""Messages prepared for the chat template as vLLM prepares a conversation (an outside audit of what trains on real
templates): content parts, empty / string / malformed tool-call arguments, flat tool calls, reasoning under other
keys, empty assistant turns, and rows that are refused with their reason."""

from __future__ import annotations

import json

import pytest

from conftest import TEMPLATES, family_tokenizer
from test_render import trained_segments
from vftrain.data.render import Renderer, RowError
from vftrain.models import use_template

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {}}}}]


def _tok(family: str):
    if family == "qwen3":
        tok = family_tokenizer("qwen2.5")
        use_template(tok, str(TEMPLATES / "qwen3.jinja"), None)
        return tok
    return family_tokenizer(family)


def _rows(tok, messages, tools=None):
    return Renderer(tok, "messages")({"messages": messages, "tools": json.dumps(tools) if tools else None})


def _call(arguments, wrapped=True):
    call = {"name": "get_weather", "arguments": arguments}
    return {"id": "call_1", "type": "function", "function": call} if wrapped else call


def _tool_turns(arguments, wrapped=True):
    return [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [_call(arguments, wrapped)]},
            {"role": "tool", "content": "Sunny", "tool_call_id": "call_1"},
            {"role": "assistant", "content": "It is sunny."}]


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3", "llama3.1"])
def test_text_content_parts_render_as_their_text(family):
    """Llama 3.1 trained the parts' Python repr, Qwen3 rendered the user and tool turns empty, Qwen2.5 refused the
    row; vLLM joins text parts with newlines for these templates."""
    tok = _tok(family)

    def parts(text):
        return [{"type": "text", "text": line} for line in text.split("\n")]

    plain = [{"role": "user", "content": "Weather?\nIn Paris."}, {"role": "assistant", "content": "Sunny."}]
    with_parts = [{"role": m["role"], "content": parts(m["content"])} for m in plain]
    assert _rows(tok, with_parts) == _rows(tok, plain)


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3", "llama3.1"])
@pytest.mark.parametrize("arguments", ["", None, "{}"])
def test_empty_arguments_are_an_empty_object(family, arguments):
    """'' and null arguments were trained as `"arguments": ""`, `null`, or (Qwen3) `"arguments": }`: vLLM reads
    them as {}."""
    tok = _tok(family)
    assert _rows(tok, _tool_turns(arguments), TOOLS) == _rows(tok, _tool_turns({}), TOOLS)


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3", "llama3.1"])
def test_arguments_that_are_not_json_refuse_the_row(family):
    """A truncated arguments string was trained double-encoded (or, under Qwen3, as broken JSON)."""
    with pytest.raises(RowError, match="^tool call arguments are not valid JSON$"):
        _rows(_tok(family), _tool_turns('{"city": "Par'), TOOLS)


def test_flat_tool_calls_have_their_string_arguments_parsed():
    """{"name", "arguments": "<json>"} without a function wrapper (Qwen's template reads it) was double-encoded."""
    tok = _tok("qwen2.5")
    flat = _rows(tok, _tool_turns('{"city": "Paris"}', wrapped=False), TOOLS)
    assert flat == _rows(tok, _tool_turns({"city": "Paris"}, wrapped=False), TOOLS)
    assert '"arguments": {"city": "Paris"}' in trained_segments(tok, flat[0])[0]


def test_a_tool_call_without_a_name_is_refused():
    turns = _tool_turns({"city": "Paris"})
    del turns[1]["tool_calls"][0]["function"]["name"]
    with pytest.raises(RowError, match="^a tool call has no function name$"):
        _rows(_tok("qwen2.5"), turns, TOOLS)


@pytest.mark.parametrize("key", ["reasoning", "thinking"])
def test_reasoning_under_other_keys_is_reasoning_content(key):
    """vLLM returns reasoning as `reasoning`; gpt-oss data has `thinking`. A template that renders reasoning
    (Qwen3) renders it; one that does not (Qwen2.5) had the row trained without it, silently: now it is dropped with
    the documented reason, as for reasoning_content."""
    turn = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", key: "Two and two."}]
    as_content = [turn[0], {"role": "assistant", "content": "4", "reasoning_content": "Two and two."}]
    assert _rows(_tok("qwen3"), turn) == _rows(_tok("qwen3"), as_content)
    with pytest.raises(RowError, match="does not render the assistant's reasoning"):
        _rows(_tok("qwen2.5"), turn)


@pytest.mark.parametrize("content", ["", None])
def test_an_empty_assistant_turn_is_context_not_a_trained_stop(content):
    """An empty turn between two others trained a bare end-of-turn token: a stop right after "Hi A"."""
    tok = _tok("qwen2.5")
    messages = [{"role": "user", "content": "Hi A"}, {"role": "assistant", "content": content},
                {"role": "user", "content": "Hi B"}, {"role": "assistant", "content": "Reply B"}]
    [row] = _rows(tok, messages)
    assert trained_segments(tok, row) == ["Reply B<|im_end|>"]


def test_a_messages_string_is_refused_as_not_messages():
    """A string in the messages column became a lone assistant message, and the drop reason spoke of an empty
    conversation."""
    with pytest.raises(RowError, match="^messages is not a list of messages with a 'role'$"):
        Renderer(_tok("qwen2.5"), "messages")({"messages": "Hello"})


def test_float_arguments_of_a_struct_column_are_named(caplog, tmp_path):
    """Arrow types a struct field once for all rows: `limit` 10 in one row and 0.5 in another comes back 10.0 in
    the first, which trained as `"limit": 10.0`. The load names such fields; a JSON file keeps numbers as written."""
    import datasets

    from conftest import write_jsonl
    from vftrain.data.load import load_rows
    from vftrain.data.tokenize import tokenize_dataset

    rows = [{"messages": _tool_turns({"city": "Paris", "limit": 10})},
            {"messages": _tool_turns({"city": "Paris", "limit": 0.5})}]
    tok = _tok("qwen2.5")
    with caplog.at_level("WARNING", logger="vftrain"):
        tokenize_dataset(datasets.Dataset.from_list(rows), tok, 4096)
    assert "tool-call arguments limit are stored as floats" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="vftrain"):
        rendered, _ = tokenize_dataset(load_rows(write_jsonl(tmp_path / "rows.jsonl", rows), "train"), tok, 4096)
    assert "stored as floats" not in caplog.text
    assert '"limit": 10}' in tok.decode(rendered[0][0].tolist())


def test_reasoning_under_non_thinking_qwen3_says_why_it_is_dropped():
    """The generic "not a token prefix" reason gave no clue that enable_thinking = false closes the think block."""
    tok = family_tokenizer("qwen2.5")
    use_template(tok, str(TEMPLATES / "qwen3.jinja"), {"enable_thinking": False})
    turn = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "Sum."}]
    with pytest.raises(RowError, match="enable_thinking = false"):
        _rows(tok, turn)
