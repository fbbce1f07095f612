"""Every command line of the README's ```bash blocks runs as written, in a scratch folder, with tiny settings
appended. A line this file neither runs nor exempts (with the reason) fails, so a documented command cannot break
unseen; a new `vf-sft` line is picked up and run without any change here."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, addition_rows, write_jsonl

# Appended to every run (later overrides win): two steps, a few generations.
TINY_SFT = ["--sft.max_steps", "2", "--sft.eval_generation_rows", "2"]
TINY_RL = ["--rl.max_steps", "2", "--rl.eval_generation_rows", "2"]
SFT_PROGRAMS = (["vf-sft"], ["torchrun", "--nproc_per_node", "2", "-m", "vftrain.cli.sft"],
                ["accelerate", "launch", "--num_processes", "2", "-m", "vftrain.cli.sft"])
RL_PROGRAMS = (["vf-rl"],)

# README lines that cannot run here, with the reason (keys: the command without its comment).
EXEMPT = {
    "python -m venv .venv && . .venv/bin/activate": "setup: a fresh virtualenv; .ci/run does the same",
    "pip install torch==2.13.0": "setup: needs the network; .ci/run installs it this way",
    "pip install -e .[test]": "setup: needs the network; .ci/run installs it this way",
    "python -m pytest -q tests": "the test suite this file belongs to; .ci/run runs it as written",
    "accelerate launch --num_processes 2 -m vftrain.cli.sft @ config.toml":
        "accelerate takes its port only from its own flag or config file (default 29500, which concurrent runs on "
        "one machine share); the torchrun line below is the same DDP run, and "
        "test_distributed.py::test_two_processes_match_one[accelerate-launch] runs accelerate launch",
    "export VFTRAIN_API_KEY=$(openssl rand -hex 16)":
        "a shell builtin for the server commands below; test_serve.py runs the server with a key from the environment",
    "python -m vftrain.serve --model outputs/my-sft --port 8000":
        "a server that runs until stopped; test_serve.py::test_command_line_reads_the_key_from_the_environment starts "
        "`python -m vftrain.serve` as a subprocess and talks to it",
    "VLLM_SERVER_DEV_MODE=1 VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve outputs/my-sft --host 127.0.0.1 "
    "--port 8000 --api-key $VFTRAIN_API_KEY --logprobs-mode processed_logprobs --generation-config vllm "
    "--enable-lora --max-lora-rank 64":
        "a server that runs until stopped, from vLLM's own virtualenv; tests/test_vllm.py starts vLLM with these "
        "flags (vftrain/sampling/vllm_server.py) and runs RL and SFT sample panels against it",
    "torchrun --nproc_per_node 2 -m vftrain.cli.sft @ config.toml --sft.fsdp true":
        "accelerate applies FSDP only on accelerators (on CPU processes vftrain refuses it); "
        "test_distributed.py runs the FSDP2 path on CPU through tests/cpu_fsdp.py",
    "torchrun --nproc_per_node 2 -m vftrain.cli.sft @ config.toml --sft.deepspeed examples/ds_zero3.json":
        "DeepSpeed runs only on GPUs (accelerate has no DeepSpeed CPU path); benchmarks/scale.sh runs ZeRO-3 on 2 GPUs",
}


def readme_commands() -> list[str]:
    """Each command line of the README's ```bash blocks, without its comment."""
    blocks = re.findall(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]  # continuations
    return [" ".join(shlex.split(line, comments=True)) for line in lines if shlex.split(line, comments=True)]


def _exemption(command: str) -> str | None:
    if command in EXEMPT:
        return EXEMPT[command]
    if "verifiers_env" in command and importlib.util.find_spec("verifiers") is None:
        return "needs the verifiers extra (Python >= 3.11; .ci/run installs it there)"
    return None


def _tiny(args: list[str]) -> list[str] | None:
    """The tiny settings for the program `args` start (None: not a program this test runs). A line that starts a
    new run may take over its folder (`overwrite_output_dir`): a reader runs each line on its own, while here the
    lines before it have used the same run_name (a new run into another run's folder is refused)."""
    for programs, tiny, section in ((SFT_PROGRAMS, TINY_SFT, "sft"), (RL_PROGRAMS, TINY_RL, "rl")):
        if any(args[:len(p)] == p for p in programs):
            resumes = any("resume_from_checkpoint" in a for a in args)
            return tiny + ([] if resumes else [f"--{section}.overwrite_output_dir", "true"])
    return None


COMMANDS = readme_commands()


def test_readme_has_the_commands_this_file_knows():
    """The parser still finds the README's commands (an empty list would make every other check vacuous)."""
    assert "vf-sft @ examples/quickstart.toml" in COMMANDS and len(COMMANDS) >= 12
    assert not set(EXEMPT) - set(COMMANDS), "EXEMPT lists commands the README no longer has"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A folder where the README's paths exist: the repository's examples/ and assets/, a small `config.toml`
    (also at path/to/config.toml) on a 64-row dataset, and path/to/model (the tiny model)."""
    folder = tmp_path_factory.mktemp("readme")
    for name in ("examples", "assets"):
        (folder / name).symlink_to(ROOT / name)
    write_jsonl(folder / "data" / "train.jsonl", addition_rows(64))
    write_jsonl(folder / "data" / "test.jsonl", addition_rows(8, start=500))
    config = ('model = "assets/tiny-chat"\ndataset = "data"\n\n[sft]\nrun_name = "readme"\neval_split = "test"\n'
              "batch_size = 8\nmicro_batch_size = 4\nmax_seq_len = 64\nlogging_steps = 1\nsave_steps = 1\n")
    (folder / "config.toml").write_text(config)
    (folder / "path" / "to").mkdir(parents=True)
    (folder / "path" / "to" / "config.toml").write_text(config)
    (folder / "path" / "to" / "model").symlink_to(ROOT / "assets" / "tiny-chat")
    return folder


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs_as_written(command, scratch):
    """In README order, in one scratch folder (so `--sft.resume_from_checkpoint latest` finds the checkpoints of
    the lines before it, and `vf-rl @ examples/sft_then_rl/rl.toml` the model its SFT line wrote)."""
    reason = _exemption(command)
    args = shlex.split(command)
    if reason is None and _tiny(args) is None:
        pytest.fail(f"README command {command!r} is neither run nor exempted: teach tests/test_readme.py to run it "
                    "(tiny settings), or add it to EXEMPT with the reason")
    if reason is not None:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "COLUMNS")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # the venv's vf-sft, torchrun
    env["PET_MASTER_PORT"] = _free_port()  # torchrun's --master_port, without changing the command line
    proc = subprocess.run([*args, *_tiny(args)], cwd=scratch, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
