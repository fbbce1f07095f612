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
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
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


def test_help_from_the_cache_lists_every_field(tmp_path, capsys):
    from vftrain.config import RLConfig

    main(["--help"])
    capsys.readouterr()
    from vftrain.cli.rl import main as rl_main

    rl_main(["--help"])
    out = capsys.readouterr().out
    assert "rollouts_per_example = 8" in out and "per_device_train_batch_size = None" in out
    assert all(f"  {name} = " in out for name in RLConfig.__dataclass_fields__ if name in ("beta", "chat_template"))
