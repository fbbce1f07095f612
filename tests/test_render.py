"""Loss masks from real chat templates (no generation markers): assistant content + stop token trained,
everything else not; inconsistent renderings are reported, never trained."""

from __future__ import annotations

import pytest

from conftest import FAMILIES, TEMPLATES, family_tokenizer, tiny_tokenizer
from vftrain.data.collate import collate_packed
from vftrain.data.render import Renderer, RowError
from vftrain.errors import DataError

CONVERSATION = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6, surely."},
]


def trained_segments(tok, out) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    segments, current = [], []
    for token, m in zip(out["input_ids"], out["loss_mask"]):
        if m:
            current.append(token)
        elif current:
            segments.append(tok.decode(current))
            current = []
    if current:
        segments.append(tok.decode(current))
    return segments


def _stop(family: str) -> str:
    return "<end_of_turn>" if family == "gemma2" else FAMILIES[family]["eos"]


def _no_system(messages):
    return [m for m in messages if m["role"] != "system"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_messages_train_every_assistant_turn_with_its_stop_token(family):
    tok = family_tokenizer(family)
    messages = CONVERSATION if family != "gemma2" else _no_system(CONVERSATION)  # gemma has no system role
    out = Renderer(tok, "messages")({"messages": messages})
    assert trained_segments(tok, out) == [f"4.{_stop(family)}", f"6, surely.{_stop(family)}"]
    assert len(out["input_ids"]) == len(out["loss_mask"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prompt_completion_trains_only_the_completion(family):
    tok = family_tokenizer(family)
    prompt = CONVERSATION[:4] if family != "gemma2" else _no_system(CONVERSATION[:4])
    row = {"prompt": prompt, "completion": [CONVERSATION[4]]}
    out = Renderer(tok, "prompt_completion")(row)
    assert trained_segments(tok, out) == [f"6, surely.{_stop(family)}"]
    # The untrained part is exactly what inference sees: the prompt with the generation prompt.
    start = out["loss_mask"].index(1)
    expected = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert tok.decode(out["input_ids"][:start]) == expected


def test_chatml_header_system_and_user_are_not_trained():
    tok = family_tokenizer("qwen2.5")
    out = Renderer(tok, "messages")({"messages": CONVERSATION})
    untrained = tok.decode([t for t, m in zip(out["input_ids"], out["loss_mask"]) if not m])
    for text in ("<|im_start|>assistant\n", "Be terse.", "What is 2+2?", "And 3+3?"):
        assert text in untrained


def test_completion_with_tool_turns_trains_only_assistant_messages():
    tok = family_tokenizer("qwen2.5")
    tools = [{"type": "function", "function": {"name": "add", "description": "add numbers",
                                               "parameters": {"type": "object", "properties": {}}}}]
    row = {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "completion": [
            {"role": "assistant", "content": "",
             "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}]},
            {"role": "tool", "content": "4"},
            {"role": "assistant", "content": "It is 4."},
        ],
        "tools": tools,
    }
    out = Renderer(tok, "prompt_completion")(row)
    segments = trained_segments(tok, out)
    assert len(segments) == 2
    assert "<tool_call>" in segments[0] and '"name": "add"' in segments[0] and segments[0].endswith("<|im_end|>")
    assert segments[1] == "It is 4.<|im_end|>"
    untrained = tok.decode([t for t, m in zip(out["input_ids"], out["loss_mask"]) if not m])
    assert "<tools>" in untrained and "<tool_response>\n4\n</tool_response>" in untrained


def test_pad_equal_to_eos_still_trains_the_stop_token():
    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token  # the trl#1623 setup
    out = Renderer(tok, "prompt_completion")({"prompt": [{"role": "user", "content": "1+1"}],
                                              "completion": [{"role": "assistant", "content": "2"}]})
    import numpy as np

    batch = collate_packed([(np.array(out["input_ids"]), np.array(out["loss_mask"]))])
    targets = [t for t in batch["labels"][0].tolist() if t != -100]
    assert targets == tok.encode("2", add_special_tokens=False) + [tok.eos_token_id]


def test_qwen3_reasoning_dropped_from_earlier_turns_is_reported():
    tok = family_tokenizer("qwen2.5")
    tok.chat_template = (TEMPLATES / "qwen3.jinja").read_text()
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>add</think>4"},
                {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]
    with pytest.raises(RowError, match="not a token prefix"):
        Renderer(tok, "messages")({"messages": messages})
    # Only the final turn trained (prompt/completion) is consistent: its prompt is a prefix.
    out = Renderer(tok, "prompt_completion")({"prompt": messages[:3], "completion": messages[3:]})
    assert trained_segments(tok, out)[-1].endswith("6<|im_end|>")


def test_string_prompt_completion_and_text_append_eos():
    tok = tiny_tokenizer()
    out = Renderer(tok, "prompt_completion")({"prompt": "Q: 1+1\nA:", "completion": " 2"})
    assert trained_segments(tok, out) == [" 2<|im_end|>"]
    out = Renderer(tok, "text")({"text": "hello"})
    assert tok.decode(out["input_ids"]) == "hello<|im_end|>" and all(out["loss_mask"])


def test_tokenized_rows_keep_their_mask_and_check_lengths():
    tok = tiny_tokenizer()
    out = Renderer(tok, "tokenized")({"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]})
    assert out == {"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}
    assert Renderer(tok, "tokenized")({"input_ids": [5, 6]})["loss_mask"] == [1, 1]
    with pytest.raises(RowError, match="length"):
        Renderer(tok, "tokenized")({"input_ids": [5, 6], "loss_mask": [1]})


@pytest.mark.parametrize("completion", [[{"role": "assistant", "content": ""}], [{"role": "assistant", "content": "  "}]])
def test_empty_completion_is_an_error(completion):
    with pytest.raises(RowError, match="empty completion"):
        Renderer(tiny_tokenizer(), "prompt_completion")({"prompt": [{"role": "user", "content": "x"}],
                                                         "completion": completion})


def test_completion_without_assistant_and_template_without_stop_token():
    tok = tiny_tokenizer()
    with pytest.raises(RowError, match="no assistant"):
        Renderer(tok, "prompt_completion")({"prompt": [{"role": "user", "content": "x"}],
                                            "completion": [{"role": "user", "content": "y"}]})
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                        "{% if add_generation_prompt %}assistant: {% endif %}"
    with pytest.raises(RowError, match="without a stop token"):
        Renderer(tok, "messages")({"messages": CONVERSATION[1:3]})


def test_tokenizer_without_chat_template_is_a_clear_error():
    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat_template"):
        Renderer(tok, "messages")
