"""The README's SFT -> RL demonstration, shortened: SFT on the careless teacher's labels, then RL with only the
checker. RL must lift held-out greedy accuracy measurably above where SFT left it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"  # a 130k-parameter model: threads only wait for each other
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def _accuracies(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"held-out exact-match accuracy[^:]*: ([0-9.]+)%", stdout)]


def test_rl_lifts_what_sft_learned_from_a_careless_teacher(tmp_path):
    sft_dir, rl_dir = tmp_path / "sft", tmp_path / "rl"
    _run(["vftrain.cli.sft", "@", "examples/sft_then_rl/sft.toml", "--sft.max_steps", "600",
          "--sft.output_dir", str(sft_dir), "--sft.eval_generation_rows", "0", "--sft.save_steps", "600"], tmp_path)
    out = _run(["vftrain.cli.rl", "@", "examples/sft_then_rl/rl.toml", "--model", str(sft_dir),
                "--rl.output_dir", str(rl_dir), "--rl.max_steps", "40", "--rl.eval_generation_rows", "200",
                "--rl.save_steps", "40"], tmp_path)
    before, after = _accuracies(out)
    assert before < 90, before  # the teacher's mistakes were learned
    assert after >= before + 5, (before, after)
