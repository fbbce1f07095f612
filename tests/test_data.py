"""Data path stages: loading and format detection, long-row policy and reports, packing plans, collation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import ADDITION, addition_rows, tiny_tokenizer, write_jsonl
from vftrain.data.collate import IGNORE_INDEX, collate_packed, collate_padded, shifted_labels
from vftrain.data.load import detect_format, load_rows
from vftrain.data.pack import StepBatchSampler, plan_epoch, split_step
from vftrain.data.tokenize import tokenize_dataset
from vftrain.errors import DataError


def test_load_folder_splits_and_missing_split():
    assert len(load_rows(ADDITION, "train")) == 7600 and len(load_rows(ADDITION, "test")) == 500
    with pytest.raises(DataError, match="no split 'validation'; available: "):
        load_rows(ADDITION, "validation")


@pytest.mark.parametrize("ext", ["jsonl", "parquet", "csv"])
def test_load_single_files(tmp_path, ext):
    import datasets

    rows = [{"text": f"row {i}"} for i in range(5)]
    path = tmp_path / f"data.{ext}"
    getattr(datasets.Dataset.from_list(rows), {"jsonl": "to_json", "parquet": "to_parquet", "csv": "to_csv"}[ext])(
        str(path))
    loaded = load_rows(str(path), "train")
    assert loaded["text"] == [r["text"] for r in rows]


def test_a_saved_dataset_folder_is_one_split(tmp_path):
    """datasets.load_dataset refuses a Dataset's save_to_disk folder ("use load_from_disk"); it loads as the train
    split, and held-out rows are cut from it as from a file."""
    import datasets

    import vftrain as vf
    from vftrain.data.load import raw_splits

    path = str(tmp_path / "saved")
    datasets.Dataset.from_list(addition_rows(10)).save_to_disk(path)
    assert load_rows(path, "train")["prompt"] == [r["prompt"] for r in addition_rows(10)]
    train, held_out = raw_splits(None, None, vf.SFTConfig(output_dir=str(tmp_path / "out"), dataset=path, eval_size=2))
    assert (len(train), len(held_out)) == (8, 2)
    with pytest.raises(DataError, match="holds one split, 'train', not 'test': cut held-out rows from it"):
        load_rows(path, "test")


def test_missing_path_and_bad_extension(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"), "train")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported extension"):
        load_rows(str(tmp_path / "data.txt"), "train")


def test_format_detection():
    assert detect_format(["prompt", "completion", "answer"]) == "prompt_completion"
    assert detect_format(["messages", "tools"]) == "messages"
    assert detect_format(["input_ids", "loss_mask"]) == "tokenized"
    assert detect_format(["text"]) == "text"
    with pytest.raises(DataError, match=r"columns \['answer', 'question'\] but none of the accepted formats"):
        detect_format(["question", "answer"])


@pytest.mark.parametrize(("columns", "hint"), [(["conversations"], "ShareGPT's conversations: map each {from, value}"),
                                               (["instruction", "input", "output"], "Alpaca's"),
                                               (["question", "answer"], "RL's; for SFT map them to prompt"),
                                               (["body"], None)])
def test_other_projects_formats_are_named_with_their_mapping(columns, hint):
    """ShareGPT and Alpaca rows (Axolotl's, LLaMA-Factory's) got only the list of accepted columns."""
    with pytest.raises(DataError) as caught:
        detect_format(columns)
    message = str(caught.value)
    assert "\n" not in message and (hint in message if hint else message.endswith("text"))


def _dataset(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


def test_long_rows_policies_and_report():
    tok = tiny_tokenizer()
    rows = addition_rows(4) + [{"prompt": [{"role": "user", "content": "x" * 80}],
                                "completion": [{"role": "assistant", "content": "y" * 20}]}]
    kept, report = tokenize_dataset(_dataset(rows), tok, max_seq_len=64, long_rows="drop")
    assert len(kept) == 4 and report.dropped == {"longer than max_seq_len (64)": (1, 4)}
    assert any("1 rows dropped: longer than max_seq_len (64) (first: row 4)" in line for line in report.lines())
    # Truncating the long row cuts its whole completion: it has no trained token left and is dropped as such.
    kept, report = tokenize_dataset(_dataset(rows), tok, max_seq_len=64, long_rows="truncate")
    assert len(kept) == 4 and report.truncated == 1 and report.dropped == {"no trained tokens": (1, 4)}
    kept, report = tokenize_dataset(_dataset(rows), tok, max_seq_len=100, long_rows="truncate")
    assert len(kept) == 5 and report.truncated == 1 and kept.lengths.max() == 100
    with pytest.raises(DataError, match="row 4 has 1.. tokens, more than max_seq_len = 64"):
        tokenize_dataset(_dataset(rows), tok, max_seq_len=64, long_rows="error")


def test_bad_rows_are_counted_and_all_bad_is_an_error():
    tok = tiny_tokenizer()
    empty = {"prompt": [{"role": "user", "content": "x"}], "completion": [{"role": "assistant", "content": ""}]}
    kept, report = tokenize_dataset(_dataset(addition_rows(3) + [empty, empty]), tok, max_seq_len=64)
    assert len(kept) == 3 and report.dropped == {"empty completion": (2, 3)}
    assert report.trained_tokens == sum(int(kept[i][1].sum()) for i in range(3))
    with pytest.raises(DataError, match="no train row is left to train on: 2 rows dropped: empty completion"):
        tokenize_dataset(_dataset([empty, empty]), tok, max_seq_len=64)


def test_parallel_tokenization_matches_serial():
    tok = tiny_tokenizer()
    ds = _dataset(addition_rows(40))
    a, _ = tokenize_dataset(ds, tok, max_seq_len=64)
    b, _ = tokenize_dataset(ds, tok, max_seq_len=64, num_proc=2)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.masks, b.masks)


def test_split_step_balances_tokens_and_keeps_every_row():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, size=64)
    bins = split_step(lengths, np.arange(64), 8, packing=True)
    assert sorted(r for b in bins for r in b) == list(range(64))
    loads = [int(lengths[b].sum()) for b in bins]
    assert max(loads) - min(loads) <= lengths.max()  # LPT: within one row of each other
    padded = split_step(lengths, np.arange(64), 8, packing=False)
    assert all(len(b) == 8 for b in padded) and sorted(r for b in padded for r in b) == list(range(64))


def test_epoch_plan_is_deterministic_and_covers_full_steps():
    lengths = np.arange(1, 101)
    plan = plan_epoch(lengths, batch_size=16, num_micro_batches=4, packing=True, seed=3, epoch=0)
    assert len(plan) == (100 // 16) * 4
    assert plan == plan_epoch(lengths, 16, 4, True, 3, 0)
    assert plan != plan_epoch(lengths, 16, 4, True, 3, 1)
    steps = [sum((plan[s * 4 + k] for k in range(4)), []) for s in range(100 // 16)]
    assert all(len(step) == 16 for step in steps) and len(set(sum(steps, []))) == 96
    sampler = StepBatchSampler(lengths, 16, 4, True, seed=3)
    sampler.set_epoch(1)
    assert list(sampler) == plan_epoch(lengths, 16, 4, True, 3, 1) and len(sampler) == len(plan)


def test_shifted_labels_and_collation():
    ids, mask = np.array([10, 11, 12, 13]), np.array([0, 0, 1, 1])
    assert shifted_labels(ids, mask).tolist() == [IGNORE_INDEX, 12, 13, IGNORE_INDEX]
    rows = [(ids, mask), (np.array([20, 21, 22]), np.array([0, 1, 1]))]
    packed = collate_packed(rows)
    assert packed["input_ids"].tolist() == [[10, 11, 12, 13, 20, 21, 22]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    # The last token of row 1 never predicts the first of row 2.
    assert packed["labels"].tolist() == [[IGNORE_INDEX, 12, 13, IGNORE_INDEX, 21, 22, IGNORE_INDEX]]
    padded = collate_padded(rows, pad_id=0)
    assert padded["input_ids"].tolist() == [[10, 11, 12, 13], [20, 21, 22, 0]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert padded["labels"][1].tolist() == [21, 22, IGNORE_INDEX, IGNORE_INDEX]


def test_jsonl_messages_with_tools_column(tmp_path):
    tok = tiny_tokenizer()
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
           "tools": json.dumps([])}
    path = write_jsonl(tmp_path / "d.jsonl", [row, row])
    kept, report = tokenize_dataset(load_rows(path, "train"), tok, max_seq_len=64)
    assert len(kept) == 2 and report.format == "messages"


def test_split_by_tokens_respects_the_budget_and_keeps_rows():
    from vftrain.data.pack import split_by_tokens

    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 100, size=60).tolist()
    groups = split_by_tokens(lengths, 200)
    assert sorted(i for g in groups for i in g) == list(range(60))
    assert all(sum(lengths[i] for i in g) <= 200 for g in groups)
    assert len(groups) <= int(np.ceil(sum(lengths) / 200) * 11 / 9) + 1  # near the fewest possible


def test_collator_splits_a_micro_batch_over_the_token_budget():
    from vftrain.data.collate import Collator

    rows = [(np.arange(n) + 3, np.ones(n, dtype=np.uint8)) for n in (30, 25, 20, 15, 10)]
    whole = Collator(pad_id=0, packing=True)(rows)
    split = Collator(pad_id=0, packing=True, budget=40)(rows)
    parts = split["micro_batches"]
    assert len(parts) >= 3 and all(p["input_ids"].shape[1] <= 40 for p in parts)
    assert sum(p["input_ids"].shape[1] for p in parts) == whole["input_ids"].shape[1]
    assert int((split["labels"] != IGNORE_INDEX).sum()) == int((whole["labels"] != IGNORE_INDEX).sum())
    assert "micro_batches" not in Collator(pad_id=0, packing=True, budget=100)(rows)


def _tool_row(arguments, properties: dict) -> dict:
    return {"messages": [{"role": "user", "content": "go"},
                         {"role": "assistant", "content": "",
                          "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": arguments}}]},
                         {"role": "tool", "content": "ok"}, {"role": "assistant", "content": "done"}],
            "tools": [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {
                "type": "object", "properties": properties}}}]}


TOOL_ROWS = [_tool_row({"city": "Paris"}, {"city": {"type": "string"}}),
             _tool_row({"a": 1, "b": 2}, {"a": {"type": "integer"}, "b": {"type": "integer"}})]


@pytest.mark.parametrize("storage", ["from_list", "parquet"])
def test_tool_calls_and_tools_from_arrow_gain_no_keys(tmp_path, storage):
    from conftest import family_tokenizer
    from vftrain.data.render import Renderer

    tok = family_tokenizer("qwen2.5")
    dataset = _dataset(TOOL_ROWS)  # Arrow stores both rows' arguments as one struct {city, a, b}
    if storage == "parquet":
        dataset.to_parquet(str(tmp_path / "tools.parquet"))
        dataset = load_rows(str(tmp_path / "tools.parquet"), "train")
    kept, _ = tokenize_dataset(dataset, tok, max_seq_len=4096)
    assert len(kept) == 2
    for i, row in enumerate(TOOL_ROWS):
        [expected] = Renderer(tok, "messages")(row)  # the rows as written, never through Arrow
        ids, mask = kept[i]
        assert ids.tolist() == expected["input_ids"] and mask.tolist() == expected["loss_mask"]
    text = tok.decode(kept[0][0])
    assert '"arguments": {"city": "Paris"}' in text and "null" not in text


def test_null_inside_json_string_arguments_is_kept():
    from conftest import family_tokenizer

    tok = family_tokenizer("qwen2.5")
    rows = [_tool_row('{"city": "Paris", "unit": null}', {"city": {"type": "string"}}),
            _tool_row('{"a": 1}', {"a": {"type": "integer"}})]
    rows[1]["tools"] = json.dumps(rows[1]["tools"])  # a JSON-string tools column is kept exactly too
    rows[0]["tools"] = json.dumps(rows[0]["tools"])
    kept, _ = tokenize_dataset(_dataset(rows), tok, max_seq_len=4096)
    assert '"arguments": {"city": "Paris", "unit": null}' in tok.decode(kept[0][0])
    assert '"arguments": {"a": 1}' in tok.decode(kept[1][0])


def test_split_conversations_are_reported_with_their_growth():
    from conftest import TEMPLATES, family_tokenizer

    tok = family_tokenizer("qwen2.5")
    tok.chat_template = (TEMPLATES / "qwen3.jinja").read_text()
    multi = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>a</think>4"},
                          {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]}
    single = {"messages": multi["messages"][:2]}
    kept, report = tokenize_dataset(_dataset([multi, single, multi]), tok, max_seq_len=256)
    assert report.rows_in == 3 and len(kept) == report.rows_kept == 5
    assert (report.split, report.split_rows) == (2, 2) and report.split_tokens == 2 * len(kept[1][0])
    assert f"2 conversations split into one row per turn the template renders differently later (split_turns): " \
           f"+2 rows, +{report.split_tokens} tokens" in report.lines()
    kept, report = tokenize_dataset(_dataset([multi, single, multi]), tok, max_seq_len=256, split_turns=False)
    assert len(kept) == 1 and list(report.dropped.values()) == [(2, 0)]


def test_tokenized_rows_made_for_transformers_trainer_train_what_their_labels_say():
    """Rows padded for transformers' Trainer: `labels` -100 on the prompt and padding, `attention_mask` 0 on the
    padding. Both columns were ignored: every token trained, the prompt and the padding too. Now the labels are the
    mask, the padding is dropped, and labels that are not the row's own tokens, or holes inside the attention mask,
    drop the row with their reason."""
    from vftrain.data.render import Renderer

    pad, ids = 0, [5, 6, 7, 8, 9]
    good = {"input_ids": ids + [pad] * 3, "attention_mask": [1] * 5 + [0] * 3,
            "labels": [-100, -100, 7, 8, 9] + [-100] * 3}
    render = Renderer(tiny_tokenizer(), "tokenized")
    assert render(good) == [{"input_ids": ids, "loss_mask": [0, 0, 1, 1, 1]}]
    left = {"input_ids": [pad, pad] + ids, "attention_mask": [0, 0] + [1] * 5, "assistant_masks": [0, 0, 0, 1, 1, 1, 1]}
    assert render(left) == [{"input_ids": ids, "loss_mask": [0, 1, 1, 1, 1]}]
    shifted = {**good, "labels": [-100, 7, 8, 9, -100, -100, -100, -100]}
    holes = {**good, "attention_mask": [1, 0, 1, 1, 1, 0, 0, 0]}
    for bad, reason in ((shifted, "labels differ from input_ids"), (holes, "masks tokens inside the row")):
        with pytest.raises(Exception, match=reason):
            render(bad)
    kept, report = tokenize_dataset(_dataset([good, good, shifted]), tiny_tokenizer(), max_seq_len=64)
    assert len(kept) == 2 and list(report.dropped) == ["labels differ from input_ids where they train: give "
                                                       "transformers' unshifted labels (input_ids, -100 where not "
                                                       "trained), or a loss_mask"]


def test_a_streaming_dataset_or_a_dict_of_datasets_is_named_in_one_line():
    """Both were refused with the whole multi-line repr of the object, saying nothing of streaming."""
    import datasets

    stream = datasets.Dataset.from_list(addition_rows(4)).to_iterable_dataset()
    with pytest.raises(DataError, match=r"^a streaming dataset \(IterableDataset\) is not supported: .*without "
                                        r"streaming=True$"):
        load_rows(stream, "train")
    with pytest.raises(DataError, match=r"^dataset = dict is not a dataset name, path or datasets.Dataset \(one "
                                        r"split: a dict of several is not taken\)$"):
        load_rows({"a": datasets.Dataset.from_list(addition_rows(4)), "b": stream, "c": "x" * 80}, "train")
