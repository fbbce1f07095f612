"""Loss masks from real chat templates (no generation markers): assistant content + stop token trained,
everything else not; inconsistent renderings are reported, never trained."""

from __future__ import annotations

import pytest

from conftest import FAMILIES, TEMPLATES, family_tokenizer, tiny_tokenizer
from vftrain.data.collate import collate_packed
from vftrain.data.render import Renderer, RowError, render_prompt
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
    return {"gemma2": "<end_of_turn>", "phi3": "<|end|>"}.get(family, FAMILIES[family]["eos"])


def trained_turns(tok, messages, rows, tools=None) -> list[tuple[int, str]]:
    """(assistant turn, decoded trained tokens) for every trained span of `rows`, sorted; each span is identified by
    the tokens before it, which must be exactly the prompt inference renders for that turn."""
    prompts = {i: render_prompt(tok, messages[:i], tools) for i, m in enumerate(messages) if m["role"] == "assistant"}
    found = []
    for row in rows:
        ids, mask = row["input_ids"], row["loss_mask"]
        starts = [k for k in range(len(mask)) if mask[k] and (k == 0 or not mask[k - 1])]
        for start in starts:
            end = next((k for k in range(start, len(mask)) if not mask[k]), len(mask))
            turn = [i for i, prompt in prompts.items() if ids[:start] == prompt]
            assert len(turn) == 1, f"trained span at {start} does not follow an assistant turn's inference prompt"
            found.append((turn[0], tok.decode(ids[start:end])))
    return sorted(found)


def _no_system(messages):
    return [m for m in messages if m["role"] != "system"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_messages_train_every_assistant_turn_with_its_stop_token(family):
    tok = family_tokenizer(family)
    messages = CONVERSATION if family != "gemma2" else _no_system(CONVERSATION)  # gemma has no system role
    [out] = Renderer(tok, "messages")({"messages": messages})
    assert trained_segments(tok, out) == [f"4.{_stop(family)}", f"6, surely.{_stop(family)}"]
    assert len(out["input_ids"]) == len(out["loss_mask"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prompt_completion_trains_only_the_completion(family):
    tok = family_tokenizer(family)
    prompt = CONVERSATION[:4] if family != "gemma2" else _no_system(CONVERSATION[:4])
    row = {"prompt": prompt, "completion": [CONVERSATION[4]]}
    [out] = Renderer(tok, "prompt_completion")(row)
    assert trained_segments(tok, out) == [f"6, surely.{_stop(family)}"]
    # The untrained part is exactly what inference sees: the prompt with the generation prompt.
    start = out["loss_mask"].index(1)
    expected = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert tok.decode(out["input_ids"][:start]) == expected


def test_chatml_header_system_and_user_are_not_trained():
    tok = family_tokenizer("qwen2.5")
    [out] = Renderer(tok, "messages")({"messages": CONVERSATION})
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
    [out] = Renderer(tok, "prompt_completion")(row)
    segments = trained_segments(tok, out)
    assert len(segments) == 2
    assert "<tool_call>" in segments[0] and '"name": "add"' in segments[0] and segments[0].endswith("<|im_end|>")
    assert segments[1] == "It is 4.<|im_end|>"
    untrained = tok.decode([t for t, m in zip(out["input_ids"], out["loss_mask"]) if not m])
    assert "<tools>" in untrained and "<tool_response>\n4\n</tool_response>" in untrained


def test_pad_equal_to_eos_still_trains_the_stop_token():
    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token  # the trl#1623 setup
    [out] = Renderer(tok, "prompt_completion")({"prompt": [{"role": "user", "content": "1+1"}],
                                              "completion": [{"role": "assistant", "content": "2"}]})
    import numpy as np

    batch = collate_packed([(np.array(out["input_ids"]), np.array(out["loss_mask"]))])
    targets = [t for t in batch["labels"][0].tolist() if t != -100]
    assert targets == tok.encode("2", add_special_tokens=False) + [tok.eos_token_id]


QWEN3_TOOLS = [{"type": "function", "function": {"name": "add", "description": "add numbers",
                                                  "parameters": {"type": "object", "properties": {}}}}]
QWEN3_CASES = {
    # Qwen3 drops the reasoning of earlier turns and writes an empty think block only in the last one.
    "reasoning": ([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>add</think>4"},
                   {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}], None,
                  [(1, "<think>\nadd\n</think>\n\n4<|im_end|>"), (3, "<think>\n\n</think>\n\n6<|im_end|>")]),
    # A verifiers-style tool trajectory: user, tool call, tool result, answer.
    "tool trajectory": ([{"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "", "tool_calls": [
                             {"type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}]},
                         {"role": "tool", "content": "4"}, {"role": "assistant", "content": "It is 4."}], QWEN3_TOOLS,
                        [(1, '<think>\n\n</think>\n\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n'
                             '</tool_call><|im_end|>'),
                         (3, "<think>\n\n</think>\n\nIt is 4.<|im_end|>")]),
}


@pytest.mark.parametrize("case", list(QWEN3_CASES))
def test_qwen3_multi_turn_trains_every_turn_as_inference_renders_it(case):
    tok = family_tokenizer("qwen2.5")
    tok.chat_template = (TEMPLATES / "qwen3.jinja").read_text()
    messages, tools, expected = QWEN3_CASES[case]
    rows = Renderer(tok, "messages")({"messages": messages, "tools": tools})
    assert len(rows) == 2  # the later rendering cannot serve the first turn: one row per turn
    assert trained_turns(tok, messages, rows, tools) == expected
    with pytest.raises(RowError, match="renders earlier assistant turns differently"):
        Renderer(tok, "messages", split_turns=False)({"messages": messages, "tools": tools})


def test_turns_one_rendering_serves_share_one_row():
    tok = family_tokenizer("qwen2.5")
    tok.chat_template = (TEMPLATES / "qwen3.jinja").read_text()
    # Both answers come after the last user message with their reasoning: the full rendering keeps both.
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>a</think>4"},
                {"role": "tool", "content": "ok"}, {"role": "assistant", "content": "<think>b</think>done"}]
    rows = Renderer(tok, "messages")({"messages": messages})
    assert len(rows) == 1
    assert [t for t, _ in trained_turns(tok, messages, rows)] == [1, 3]


def test_phi3_trains_each_turn_up_to_its_end_token_not_the_final_eos():
    tok = family_tokenizer("phi3")
    rows = Renderer(tok, "messages")({"messages": CONVERSATION})
    assert trained_turns(tok, CONVERSATION, rows) == [(2, "4.<|end|>"), (4, "6, surely.<|end|>")]
    [row] = rows
    assert tok.decode(row["input_ids"]).endswith("<|end|>\n<|endoftext|>")  # rendered, not trained


R1_ROW = {"prompt": [{"role": "user", "content": "2+2?"}],
          "completion": [{"role": "assistant", "content": "<think>2 plus 2 is 4</think>4"}]}


def test_template_that_strips_reasoning_is_refused_not_trained_on_the_rest():
    tok = family_tokenizer("deepseek-r1-distill")
    # The DeepSeek-R1-distill template renders an assistant turn without its <think> block. Its first release
    # (January 2025) had a bare "<｜Assistant｜>" generation prompt, so the prompt is a prefix and only "4" + eos
    # would be trained; today's prefills "<think>\n", which no rendered turn starts with.
    with pytest.raises(RowError, match="not a token prefix"):
        Renderer(tok, "prompt_completion")(R1_ROW)
    tok.chat_template = tok.chat_template.replace("{{'<｜Assistant｜><think>\\n'}}", "{{'<｜Assistant｜>'}}")
    assert tok.apply_chat_template(R1_ROW["prompt"], tokenize=False, add_generation_prompt=True).endswith("｜>")
    with pytest.raises(RowError, match="drops part of an assistant message"):
        Renderer(tok, "prompt_completion")(R1_ROW)
    # Answers without reasoning are untouched by the rewrite and train as usual.
    plain = {"prompt": R1_ROW["prompt"], "completion": [{"role": "assistant", "content": "4"}]}
    assert trained_segments(tok, Renderer(tok, "prompt_completion")(plain)[0]) == ["4<｜end▁of▁sentence｜>"]


def test_string_prompt_completion_and_text_append_eos():
    tok = tiny_tokenizer()
    [out] = Renderer(tok, "prompt_completion")({"prompt": "Q: 1+1\nA:", "completion": " 2"})
    assert trained_segments(tok, out) == [" 2<|im_end|>"]
    [out] = Renderer(tok, "text")({"text": "hello"})
    assert tok.decode(out["input_ids"]) == "hello<|im_end|>" and all(out["loss_mask"])


def test_tokenized_rows_keep_their_mask_and_check_lengths():
    tok = tiny_tokenizer()
    [out] = Renderer(tok, "tokenized")({"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]})
    assert out == {"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}
    assert Renderer(tok, "tokenized")({"input_ids": [5, 6]})[0]["loss_mask"] == [1, 1]
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


def sentencepiece_tokenizer():
    """A Llama-2 / Mistral-v0.1 style tokenizer (sentencepiece, legacy): the text gets a leading "▁", spaces are
    "▁", and BOS is added, as the hub's fast tokenizers of those models do."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+:?.\n"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "▁2": 4, **{c: i + 5 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "2")], unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_text_and_string_prompts_that_start_with_bos_get_one_bos():
    tok = sentencepiece_tokenizer()
    rows = [({"text": "<s>hello"}, "text"), ({"text": "hello"}, "text"),
            ({"prompt": "<s>Q: 1+1\nA:", "completion": " 2"}, "prompt_completion")]
    for row, fmt in rows:
        [out] = Renderer(tok, fmt)(row)
        assert out["input_ids"][0] == tok.bos_token_id and out["input_ids"].count(tok.bos_token_id) == 1


def test_string_completion_is_tokenized_as_it_follows_the_prompt():
    tok = sentencepiece_tokenizer()
    [out] = Renderer(tok, "prompt_completion")({"prompt": "Q: 1+1\nA:", "completion": " 2"})
    trained = [t for t, m in zip(out["input_ids"], out["loss_mask"]) if m]
    # " 2" after "A:" is the one token "▁2" (as in the whole text), not "▁" + "▁2" (the completion encoded alone).
    assert tok.convert_ids_to_tokens(trained) == ["▁2", "</s>"]
    assert out["input_ids"][: out["loss_mask"].index(1)] == render_prompt(tok, "Q: 1+1\nA:")


def test_sample_prompts_are_the_training_prompts_with_the_rows_tools():
    import datasets

    from vftrain.sampling import held_out_samples, prompt_and_reference
    from vftrain.sampling.embedded import encode_prompt

    tok = family_tokenizer("qwen2.5")
    tools = [{"type": "function", "function": {"name": "add", "description": "add numbers", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}}}}]
    rows = [{"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "4"}],
             "tools": tools},
            {"prompt": [{"role": "user", "content": "3+3?"}], "completion": [{"role": "assistant", "content": "6"}],
             "tools": [{"type": "function", "function": {"name": "mul", "description": "multiply", "parameters": {
                 "type": "object", "properties": {"b": {"type": "integer"}}}}}]}]
    samples, _ = held_out_samples(datasets.Dataset.from_list(rows), None, 1)  # Arrow: properties {a, b}
    prompt, reference = prompt_and_reference(samples[0])
    [trained] = Renderer(tok, "prompt_completion")(rows[1])
    assert reference == "6"
    assert encode_prompt(tok, prompt) == trained["input_ids"][: trained["loss_mask"].index(1)]
    assert '"name": "mul"' in tok.decode(encode_prompt(tok, prompt))


def test_qwen3_non_thinking_mode_from_chat_template_kwargs(tmp_path):
    """`chat_template_kwargs = {enable_thinking = false}`: Qwen3's non-thinking mode, whose generation prompt ends in
    an empty think block, so the trained span is the answer alone, as inference with enable_thinking=False prompts
    it. It was no setting at all (an unknown key). The variables travel with the saved tokenizer."""
    from transformers import AutoTokenizer

    from vftrain.data.render import template_kwargs
    from vftrain.models import use_template

    tok = family_tokenizer("qwen2.5")
    use_template(tok, str(TEMPLATES / "qwen3.jinja"), None)
    row = {"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "4"}]}

    def trained(tokenizer) -> str:
        [out] = Renderer(tokenizer, "prompt_completion")(row)
        return tokenizer.decode([t for t, m in zip(out["input_ids"], out["loss_mask"]) if m])

    thinking_prompt = tok.decode(render_prompt(tok, row["prompt"]))
    assert trained(tok) == "<think>\n\n</think>\n\n4<|im_end|>" and thinking_prompt.endswith("assistant\n")
    use_template(tok, None, {"enable_thinking": False})
    assert trained(tok) == "4<|im_end|>"
    assert tok.decode(render_prompt(tok, row["prompt"])) == thinking_prompt + "<think>\n\n</think>\n\n"
    tok.save_pretrained(tmp_path / "tok")
    assert template_kwargs(AutoTokenizer.from_pretrained(tmp_path / "tok")) == {"enable_thinking": False}


def test_chat_template_kwargs_must_be_a_table(tmp_path):
    import vftrain as vf

    with pytest.raises(Exception, match=r"chat_template_kwargs = 'enable_thinking=false' must be a table"):
        vf.SFTConfig(output_dir=str(tmp_path), chat_template_kwargs="enable_thinking=false")
