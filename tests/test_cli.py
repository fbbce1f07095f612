"""`vf-sft`: shipped configs parse, overrides apply, bad input is one line on stderr with exit code 2,
--inspect shows the masks, --help lists the fields, and the seed's TOML trains and saves."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from conftest import ADDITION, ROOT, TINY, addition_rows, write_jsonl
from vftrain.cli.args import parse_argv
from vftrain.cli.sft import FLAGS, main, resolve


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str) -> bool:
    """Exactly one error line and no traceback (progress bars of datasets may share stderr)."""
    return "Traceback" not in err and sum(line.startswith("vf-sft: error: ") for line in err.splitlines()) == 1


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_toml_parses(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    model, config = resolve(parse_argv(["@", str(path)], "sft", FLAGS))
    assert model and config.dataset and config.gradient_accumulation_steps >= 1


def test_overrides_beat_the_file(monkeypatch):
    monkeypatch.chdir(ROOT)
    inv = parse_argv(["@", "examples/quickstart.toml", "--sft.max_steps", "40", "--sft.packing=false",
                      "--sft.use_lora", "--model", TINY], "sft", FLAGS)
    model, config = resolve(inv)
    assert model == TINY and config.max_steps == 40 and config.packing is False and config.use_lora is True


def _toml(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


GOOD = f'model = "{TINY}"\ndataset = "{ADDITION}"\n'


@pytest.mark.parametrize("text,extra,message", [
    (GOOD + "[sft]\nmax_step = 3\n", [], "unknown key sft.max_step; did you mean sft.max_steps?"),
    (GOOD + "[sft]\nmax_steps = 'many'\n", [], "sft.max_steps = 'many' has the wrong type; expected int"),
    (GOOD + "[sft]\nuse_lora = 1\n", [], "sft.use_lora = 1 has the wrong type; expected bool"),
    (GOOD + "[sft]\nbatch_size = 10\nmicro_batch_size = 4\n", [],
     "batch_size = 10 is not divisible by micro_batch_size (4) x world_size (1)"),
    (GOOD + "[sft]\nlong_rows = 'skip'\n", [], "long_rows = 'skip' is not allowed; choose one of 'drop'"),
    (GOOD + "modle = 'x'\n", [], "unknown top-level key 'modle'"),
    (GOOD + "[SFT]\nmax_steps = 1\n", [], "unknown top-level key 'SFT' (did you mean [sft]?)"),
    # transformers refuses it in Trainer.__init__ with a traceback; named before the data is tokenized
    (GOOD + "[sft]\neval_strategy = 'epoch'\n", [], "eval_strategy = 'epoch' needs held-out rows to evaluate: "
                                                    "set eval_split"),
    (f'dataset = "{ADDITION}"\n', [], "no model: set `model = ...`"),
    (f'model = "{TINY}"\n', [], "no dataset: set `dataset = ...`"),
    ('model = "./no/such/model"\n' + f'dataset = "{ADDITION}"\n', [], "model path './no/such/model' does not exist"),
    (GOOD + "[sft\n", [], "is not valid TOML"),
    (GOOD + "[sft]\nlearning_rate = -1.0\n", [], "learning_rate = -1.0 is not allowed; expected a number >= 0"),
    (GOOD + "[sft]\nlr_scheduler_type = 'bogus'\n", [], "lr_scheduler_type = 'bogus' is not allowed; choose one of"),
    (GOOD, ["--sft.max_stepz", "3"], "unknown key sft.max_stepz; did you mean sft.max_steps?"),
    (GOOD, ["--modle", "x"], "unknown option --modle; did you mean --model?"),
])
def test_config_errors_are_one_line(tmp_path, capsys, text, extra, message):
    code, out, err = _run(["@", _toml(tmp_path, text), *extra], capsys)
    assert code == 2 and message in err and _one_error_line(err)


def test_missing_config_file(tmp_path, capsys):
    code, _, err = _run(["@", str(tmp_path / "none.toml")], capsys)
    assert code == 2 and "does not exist" in err and _one_error_line(err)


def test_dataset_without_usable_column(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "1+1", "answer": "2"}])
    code, _, err = _run(["@", _toml(tmp_path, f'model = "{TINY}"\ndataset = "{data}"\n'), "--inspect", "1"], capsys)
    assert code == 2 and "none of the accepted formats" in err and _one_error_line(err)


@pytest.mark.parametrize("content,message", [
    ("", "dataset file '{path}' is empty"),
    ("\n\n", "dataset file '{path}' is empty"),
    ('{"text": "a"}\n{"text": "b"}\n{"text": \n{"text": "d"}\n',
     "dataset file '{path}' line 3 is not valid JSON (Expecting value, column 10)"),
    ('{"text": "a"}\nnot json\n', "dataset file '{path}' line 2 is not valid JSON (Expecting value, column 1)"),
], ids=["empty", "blank-lines", "malformed-line", "not-json"])
def test_unreadable_data_file_is_one_line(tmp_path, capsys, content, message):
    """Empty files and malformed JSONL lines (once StopIteration and DatasetGenerationError tracebacks)."""
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    code, _, err = _run(["@", _toml(tmp_path, f'model = "{TINY}"\ndataset = "{path}"\n'), "--inspect", "1"], capsys)
    assert code == 2 and message.format(path=path) in err and _one_error_line(err)


def test_empty_file_in_a_dataset_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("")
    code, _, err = _run(["@", _toml(tmp_path, f'model = "{TINY}"\ndataset = "{tmp_path / "data"}"\n'),
                         "--inspect", "1"], capsys)
    assert code == 2 and "a data file is empty" in err and _one_error_line(err)


def test_offline_hub_model_is_one_line(tmp_path, capsys):
    code, _, err = _run(["@", _toml(tmp_path, f'model = "nobody/no-such-model"\ndataset = "{ADDITION}"\n'),
                         "--sft.max_steps", "1", "--sft.output_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "could not load model 'nobody/no-such-model'" in err and _one_error_line(err)


def test_inspect_json_prints_rows_with_masks(tmp_path, capsys):
    code, out, err = _run(["@", _toml(tmp_path, GOOD), "--inspect", "3", "--json"], capsys)
    assert code == 0
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert len(rows) == 3
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY)
    for row in rows:
        assert len(row["input_ids"]) == len(row["loss_mask"]) and set(row["loss_mask"]) == {0, 1}
        trained = tok.decode([t for t, m in zip(row["input_ids"], row["loss_mask"]) if m])
        assert trained.endswith("<|im_end|>") and trained[:-len("<|im_end|>")].isdigit()
    assert "rows kept" in err


def test_inspect_text_marks_trained_tokens(tmp_path, capsys):
    code, out, _ = _run(["@", _toml(tmp_path, GOOD), "--inspect", "1"], capsys)
    assert code == 0 and "row 0:" in out and "trained" in out and "masking statistics" in out


def test_help_lists_fields_with_help(capsys):
    code, out, _ = _run(["--help"], capsys)
    assert code == 0
    for name in ("batch_size", "micro_batch_size", "lora_rank", "sample_every_n_steps", "long_rows",
                 "learning_rate"):
        assert f"{name} = " in out
    assert "Sequences per optimizer step" in out


def test_export_help_is_exports_own(capsys):
    """`vf-sft export --help` printed the training help (its fields), not export's arguments."""
    with pytest.raises(SystemExit) as stop:
        main(["export", "--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "usage: vf-sft export" in out and "--out" in out and "batch_size = " not in out


def test_seed_toml_trains_and_saves(tmp_path):
    """The seed's TOML (LoRA, batch 512 of micro 8) through the installed entry point, in a subprocess."""
    out_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "vftrain.cli.sft", "@", "examples/seed.toml", "--sft.max_steps", "2",
           "--sft.output_dir", str(out_dir), "--sft.batch_size", "64", "--sft.logging_steps", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out_dir / "adapter_model.safetensors").exists()
    resolved = json.loads((out_dir / "vftrain_config.json").read_text())
    assert resolved["model"] == "assets/tiny-chat" and resolved["config"]["use_lora"] is True
    assert resolved["config"]["gradient_accumulation_steps"] == 8 and resolved["config"]["run_name"] == "wordle-sft"


def test_string_fields_keep_the_text_as_typed(tmp_path, monkeypatch):
    """TOML reads `true`, `2024` or `1e3` as a bool or number; a field that takes a string keeps the text."""
    monkeypatch.chdir(ROOT)
    inv = parse_argv(["--sft.max_steps", "40", "--sft.run_name", "2024", "--sft.output_dir", "true",
                      "--sft.resume_from_checkpoint", "latest", "@", "examples/quickstart.toml"], "sft", FLAGS)
    _, config = resolve(inv)
    assert config.run_name == "2024" and config.output_dir == "true" and config.resume_from_checkpoint == "latest"
    assert config.max_steps == 40  # the command line beats the file even when `@ file` comes after it


def test_none_unsets_a_field_that_takes_none(tmp_path, monkeypatch):
    """TOML has no null: `none` on the command line unsets a field that takes None but no string (it used to be
    refused as "'none' has the wrong type; expected int or none"); a string field keeps the text."""
    monkeypatch.chdir(ROOT)
    toml = _toml(tmp_path, f'model = "{TINY}"\ndataset = "{ADDITION}"\n[sft]\nmicro_batch_tokens = 4096\n'
                 'use_liger = false\n')
    inv = parse_argv(["@", toml, "--sft.micro_batch_tokens", "none", "--sft.use_liger", "None",
                      "--sft.run_name", "none"], "sft", FLAGS)
    _, config = resolve(inv)
    assert config.micro_batch_tokens is None and config.use_liger is None and config.run_name == "none"


def _tiny_run(tmp_path, *extra):
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(32))
    toml = _toml(tmp_path, f'model = "{TINY}"\ndataset = "{data}"\n[sft]\nbatch_size = 8\nmicro_batch_size = 8\n'
                 f'max_seq_len = 64\nlogging_steps = 1\nsave_steps = 1\ndisable_tqdm = true\n'
                 f'output_dir = "{tmp_path / "out"}"\n')
    return ["@", toml, *extra]


def test_resume_latest_continues_from_the_newest_checkpoint(tmp_path, capsys):
    """The README's `--sft.resume_from_checkpoint latest`, through the command line (it once failed type checks)."""
    assert _run(_tiny_run(tmp_path, "--sft.max_steps", "2"), capsys)[0] == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    code, _, err = _run(_tiny_run(tmp_path, "--sft.max_steps", "3", "--sft.resume_from_checkpoint", "latest"), capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]  # from checkpoint-2: step 2 not trained again


def test_resume_latest_without_a_checkpoint_starts_fresh(tmp_path, capsys, caplog):
    """One command line for the first launch and every restart of a preempted job."""
    with caplog.at_level(logging.WARNING, logger="vftrain"):
        code, _, _ = _run(_tiny_run(tmp_path, "--sft.max_steps", "1", "--sft.resume_from_checkpoint", "latest"),
                          capsys)
    assert code == 0 and (tmp_path / "out" / "checkpoint-1").is_dir()
    assert any("no checkpoint in" in r.getMessage() for r in caplog.records)


def test_resume_from_a_missing_folder_is_one_line(tmp_path, capsys):
    code, _, err = _run(_tiny_run(tmp_path, "--sft.resume_from_checkpoint", str(tmp_path / "nope")), capsys)
    assert code == 2 and "is not a checkpoint folder; use 'latest'" in err and _one_error_line(err)
