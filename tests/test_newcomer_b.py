"""What a new user meets on the second day, part 2 (issue 22; review newcomer-2026-12-02, items 6, 7, 13, 16, 18,
23, 24): peers' config names translated, tool-call drops explained and a chat_template setting, --inspect in a
pipe, settings that transformers would refuse late, console noise, a fast --help, prompts that lose characters."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ADDITION, ROOT, TINY
from vftrain.cli.sft import main


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _toml(tmp_path, section: str, body: str) -> str:
    path = tmp_path / "c.toml"
    path.write_text(f'model = "{TINY}"\ndataset = "{ADDITION}"\n[{section}]\n{body}')
    return str(path)


# ---- item 6: TRL / prime-rl / verifiers names

TRL_GRPO = """num_generations = 8
max_completion_length = 64
use_vllm = true
use_peft = true
generation_batch_size = 64
kl_coef = 0.1
max_step = 3
"""


def test_peer_names_are_translated_all_in_one_error(tmp_path, capsys):
    from vftrain.cli.rl import main as rl_main

    assert rl_main(["@", _toml(tmp_path, "rl", TRL_GRPO)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vf-rl: error: 7 unknown keys in [rl]: ")
    for typed, meant in (("num_generations", "rl.rollouts_per_example"), ("max_completion_length",
                                                                          "rl.max_new_tokens"),
                         ("use_vllm", "rl.rl_backend"), ("use_peft", "rl.use_lora"), ("kl_coef", "rl.beta"),
                         ("max_step", "rl.max_steps")):
        part = err.split(typed, 1)[1].split(";")[0]
        assert meant in part, (typed, part)
    assert "generation_batch_size (TRL's name) has no vftrain counterpart" in err
    # what plain similarity suggested before: each of them a different setting
    for wrong in ("num_iterations", "max_prompt_len", "use_cpu", "auto_find_batch_size"):
        assert wrong not in err
    assert "use_lora" not in err.split("use_vllm", 1)[1].split(";")[0]


def test_an_rl_name_in_sft_says_where_it_belongs(tmp_path, capsys):
    assert main(["@", _toml(tmp_path, "sft", "num_generations = 8\n")]) == 2
    assert "unknown key sft.num_generations (TRL's name) is rl.rollouts_per_example, a setting of vf-rl only" in \
        capsys.readouterr().err


# ---- item 23: --help and argument errors without torch

def _fresh_python(code: str, tmp_path) -> str:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout


HELP_PROBE = """import sys, io, contextlib
from vftrain.cli.{mod} import main
buf = io.StringIO()
with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
    code = main({argv!r})
print(code, "torch" in sys.modules, "transformers" in sys.modules, len(buf.getvalue().splitlines()))
"""


@pytest.mark.parametrize("mod,argv,code", [("sft", ["--help"], "0"), ("rl", ["--help"], "0"),
                                           ("sft", ["@", "examples/quickstart.toml", "--sft.max_stepz", "1"], "2")])
def test_help_and_key_errors_do_not_import_torch(tmp_path, mod, argv, code):
    first = _fresh_python(HELP_PROBE.format(mod=mod, argv=argv), tmp_path).split()
    second = _fresh_python(HELP_PROBE.format(mod=mod, argv=argv), tmp_path).split()
    assert first[0] == second[0] == code and first[3] == second[3]  # same answer from the cache
    assert second[1:3] == ["False", "False"]


def test_help_from_the_cache_lists_every_field(capsys):
    import dataclasses
    import re

    from vftrain.cli.rl import main as rl_main
    from vftrain.config import RLConfig

    main(["--help"])  # builds the cache
    capsys.readouterr()
    rl_main(["--help"])  # reads it
    out = capsys.readouterr().out
    for f in dataclasses.fields(RLConfig):
        if f.init:
            assert re.search(rf"^  (\* |  ){f.name} = ", out, re.M), f.name
    assert "  * chat_template = None" in out and "    rollouts_per_example = 8" in out


# ---- item 7: tool-call rows under a template that ignores tool_calls; the chat_template setting

def _tool_row(city: str = "Oslo") -> dict:
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
    return {"prompt": [{"role": "user", "content": f"Weather in {city}?"}],
            "completion": [{"role": "assistant", "content": "", "tool_calls": [call]},
                           {"role": "tool", "content": "14 C, rain", "tool_call_id": "c1"},
                           {"role": "assistant", "content": "14 C, rain."}]}


# A ChatML template that writes tool calls as Hermes-style text (the tiny template ignores them).
TOOL_TEMPLATE = ("{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + (m['content'] or '') }}"
                 "{%- for c in m.get('tool_calls') or [] %}{{- '<tool_call>' + c['function']['name'] + ' ' "
                 "+ (c['function']['arguments'] | tojson) + '</tool_call>' }}{%- endfor %}"
                 "{{- '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}"
                 "{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def _data(tmp_path, rows) -> str:
    from conftest import write_jsonl

    return write_jsonl(tmp_path / "data.jsonl", rows)


def test_tool_calls_the_template_ignores_are_named_as_the_reason(tmp_path, capsys):
    toml = _toml(tmp_path, "sft", "max_seq_len = 256\n")
    code = main(["@", toml, "--dataset", _data(tmp_path, [_tool_row()] * 3), "--inspect", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "3 rows dropped: chat template does not render the assistant's tool_calls" in err
    assert "set chat_template to" in err and "<think>" not in err


def test_a_character_the_tokenizer_cannot_encode_is_named(tmp_path, capsys):
    rows = [{"prompt": [{"role": "user", "content": "Weather?"}],
             "completion": [{"role": "assistant", "content": answer}]} for answer in ("14°C", "14 C")]
    code = main(["@", _toml(tmp_path, "sft", ""), "--dataset", _data(tmp_path, rows), "--inspect", "1", "--json"])
    err = capsys.readouterr().err
    assert code == 0 and "1 rows dropped: the tokenizer cannot encode '°' in assistant text" in err


def test_chat_template_setting_trains_the_tool_calls_and_is_saved(tmp_path, capsys):
    """As template text on --inspect, and as a file for a 1-step run whose saved tokenizer carries it."""
    data = _data(tmp_path, [_tool_row(c) for c in ("Oslo", "Rome", "Lima", "Kyiv")] * 2)
    code = main(["@", _toml(tmp_path, "sft", "max_seq_len = 256\n"), "--dataset", data, "--inspect", "1", "--json",
                 "--sft.chat_template", TOOL_TEMPLATE])
    out = capsys.readouterr().out
    assert code == 0
    import json

    row = json.loads(out.splitlines()[0])
    from transformers import AutoTokenizer

    trained = AutoTokenizer.from_pretrained(TINY).decode([t for t, m in zip(row["input_ids"], row["loss_mask"])
                                                          if m])
    assert '<tool_call>get_weather {"city": "Oslo"}</tool_call><|im_end|>' in trained and "14 C, rain.<|im_end|>" \
        in trained and "Weather in" not in trained
    template = tmp_path / "tools.jinja"
    template.write_text(TOOL_TEMPLATE)
    out_dir = tmp_path / "run"
    code = main(["@", _toml(tmp_path, "sft", "max_seq_len = 256\n"), "--dataset", data, "--sft.chat_template",
                 str(template), "--sft.max_steps", "1", "--sft.batch_size", "8", "--sft.output_dir", str(out_dir),
                 "--sft.save_strategy", "no", "--sft.disable_tqdm", "true"])
    assert code == 0
    saved = AutoTokenizer.from_pretrained(out_dir)
    assert saved.chat_template == TOOL_TEMPLATE


def test_chat_template_that_is_neither_text_nor_a_file(tmp_path, capsys):
    assert main(["@", _toml(tmp_path, "sft", "chat_template = 'no/such.jinja'\n")]) == 2
    assert "chat_template = 'no/such.jinja' is neither template text" in capsys.readouterr().err


# ---- item 24: prompts that lose characters

def test_prompt_characters_the_tokenizer_drops_are_warned_about_once(tmp_path, capsys, caplog):
    rows = [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": "ok"}]}
            for q in ("Météo à Oslo?", "Weather in Oslo?", "Zürich?")]
    with caplog.at_level("WARNING", logger="vftrain"):
        assert main(["@", _toml(tmp_path, "sft", ""), "--dataset", _data(tmp_path, rows), "--inspect", "1",
                     "--json"]) == 0
    warnings = [r.getMessage() for r in caplog.records if "cannot encode" in r.getMessage()]
    assert warnings == ["train data: 2 rows lose characters of their prompt that the tokenizer cannot encode: 'àéü' "
                        "(first: row 0); the model never sees them"]


def test_rl_prompts_that_lose_characters_are_warned_about(caplog):
    from conftest import tiny_tokenizer
    from vftrain.rl.rollouts import PromptSet

    items = [([{"role": "user", "content": "Météo?"}], "x", None), ([{"role": "user", "content": "Oslo?"}], "y", None)]
    with caplog.at_level("WARNING", logger="vftrain"):
        PromptSet.from_prompts(items, tiny_tokenizer(), 64)
    assert [r.getMessage() for r in caplog.records] == [
        "1 prompts lose characters that the tokenizer cannot encode: 'é' (first: prompt 0); the model never sees them"]


# ---- item 13: --inspect into a pipe or file

def test_inspect_into_a_pipe_marks_trained_text_keeps_lines_and_counts_dataset_rows(tmp_path, capsys):
    system = "You answer with the weather in one short line: the temperature, then the sky, and nothing else at all."
    rows = [{"prompt": [{"role": "user", "content": "x"}], "completion": [{"role": "assistant", "content": "1°"}]},
            {"prompt": [{"role": "system", "content": system}, {"role": "user", "content": "Oslo?"}],
             "completion": [{"role": "assistant", "content": "14 C, rain."}]}]
    code = main(["@", _toml(tmp_path, "sft", "max_seq_len = 256\n"), "--dataset", _data(tmp_path, rows),
                 "--inspect", "5"])
    captured = capsys.readouterr()
    assert code == 0 and "(first: row 0)" in captured.out  # the dropped row, numbered as in the dataset
    assert "--- dataset row 1: " in captured.out and "row 0:" not in captured.out
    assert system + "<|im_end|>" in captured.out.splitlines()  # one line, as in the tokens
    assert "<|im_start|>assistant\n[[14 C, rain.<|im_end|>]]\n" in captured.out
    assert "between [[ and ]]" in captured.out and "--json" in captured.out and "green" not in captured.out


# ---- item 16: settings transformers refuses only once training starts

@pytest.mark.parametrize("body,message", [
    ("lr_scheduler_type = 'cosine_with_min_lr'\n",
     "lr_scheduler_type = 'cosine_with_min_lr' needs one of min_lr and min_lr_rate in lr_scheduler_kwargs"),
    ("report_to = ['tensorboard']\n", "report_to = ['tensorboard']: 'tensorboard' needs its package, which is not "
                                     "installed: pip install 'vftrain[tensorboard]'"),
])
def test_settings_that_would_fail_in_transformers_fail_at_config_time(tmp_path, capsys, monkeypatch, body, message):
    from transformers.integrations import integration_utils

    monkeypatch.setattr(integration_utils, "get_available_reporting_integrations", lambda: [])  # none installed
    assert main(["@", _toml(tmp_path, "sft", body), "--inspect", "1"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cosine_with_min_lr_with_its_floor_is_accepted(tmp_path):
    from vftrain.cli.args import parse_argv
    from vftrain.cli.sft import FLAGS, resolve

    _, config = resolve(parse_argv(["@", _toml(tmp_path, "sft", "lr_scheduler_type = 'cosine_with_min_lr'\n"
                                                "lr_scheduler_kwargs = {min_lr_rate = 0.1}\n")], "sft", FLAGS))
    assert config.lr_scheduler_kwargs == {"min_lr_rate": 0.1}


# ---- item 18: console noise

def _logged_run(tmp_path, *extra) -> str:
    """vf-sft with stdout and stderr into one file, as `vf-sft ... > log 2>&1` writes it."""
    log = tmp_path / "run.log"
    cmd = [sys.executable, "-m", "vftrain.cli.sft", "@", "examples/quickstart.toml", "--sft.output_dir",
           str(tmp_path / "run"), "--sft.max_steps", "2", "--sft.save_steps", "1", "--sft.logging_steps", "1",
           "--sft.sample_every_n_steps", "1", "--sft.num_samples", "1", "--sft.max_new_tokens", "3",
           "--sft.eval_generation_rows", "2", *extra]
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=300,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)})
    text = log.read_text()
    assert proc.returncode == 0, text[-2000:]
    return text


def test_a_logged_run_and_its_resume_are_plain_lines_without_warnings(tmp_path):
    first = _logged_run(tmp_path)
    resumed = _logged_run(tmp_path, "--sft.max_steps", "3", "--sft.resume_from_checkpoint", "latest")
    for text in (first, resumed):
        assert "\r" not in text and "Loading weights" not in text and "Tokenizing" not in text
        assert "deprecated" not in text and "Warning" not in text
        assert "step 1/2 | loss" in first and "step 3/3 | loss" in resumed
    assert "missing keys" not in resumed  # the tied head, saved once as the embedding


def test_lora_runs_without_peft_deprecation_warnings(tmp_path):
    import warnings

    from conftest import small_config
    from transformers import AutoModelForCausalLM
    from vftrain.models import apply_lora

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_lora(AutoModelForCausalLM.from_pretrained(TINY), small_config(tmp_path, use_lora=True))
    assert not [w for w in caught if "deprecated" in str(w.message)]


def test_rl_console_column_is_named_as_its_metric():
    from vftrain.logging import format_metrics

    assert "frac_reward_zero_std 0.25" in format_metrics(3, 10, {"reward": 0.5, "frac_reward_zero_std": 0.25})


def test_rl_sampling_passes_the_cache_under_its_current_name():
    """RL rollouts (and vftrain.serve) decode with vftrain's own loop: it passed `past_key_values`, which transformers
    5 renames with a deprecation warning on every run."""
    import logging

    import transformers
    from transformers import AutoModelForCausalLM
    from vftrain.sampling.tokens import sample

    transformers.utils.logging.warning_once.cache_clear()  # once per process: an earlier test may have had it
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        sample(AutoModelForCausalLM.from_pretrained(TINY), [[1, 2, 3]], n=2, max_new_tokens=3, temperature=1.0,
               top_p=1.0, stop_ids={0}, pad_id=0, seed=0)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [r for r in records if "deprecated" in r.getMessage()]


def test_chat_template_applies_to_an_adapter_folder_too(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from vftrain.models import get_model_and_tokenizer

    get_peft_model(AutoModelForCausalLM.from_pretrained(TINY), LoraConfig(r=2, target_modules="all-linear")) \
        .save_pretrained(tmp_path / "adapter")
    _, tokenizer = get_model_and_tokenizer(str(tmp_path / "adapter"), chat_template=TOOL_TEMPLATE)
    assert tokenizer.chat_template == TOOL_TEMPLATE
