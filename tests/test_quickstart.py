"""The quickstart learns: a shortened `vf-sft @ examples/quickstart.toml` follows its golden loss curve where
training is exact on any CPU, then meets loss and accuracy bounds, and already solves most held-out additions."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT

# Mean loss of steps 1-10, 11-20 and 21-30 (torch 2.13 CPU, seed 0). The first steps are exact up to float rounding:
# another reduction order (micro_batch_size 32, one thread instead of two) moved them by < 1e-6 relative, while a
# change of the data order (seed 1) moves step 10 by 5e-4. A change that moves them changes what training computes,
# and must say why (or re-record these numbers).
GOLDEN = {10: (4.199049, 1e-4), 20: (2.979946, 1e-4), 30: (2.040516, 1e-3)}
# Later, training amplifies rounding (different kernels on different processors): the mean loss over steps 201-300
# was 0.414, and 0.458 with the other reduction order; a golden of 0.9665 over steps 101-200 recorded on one machine
# was 0.9455 on an AMD EPYC and on another. So from there on the curve is checked by bounds with about 2x margin over
# the worst of three runs (seed 0, the other reduction order, seed 1: 0.31-0.46 over steps 201-300, 0.042-0.068
# over 501-600).
MEAN_LOSS_BELOW = {300: 0.7, 600: 0.15}  # mean of the 100 steps ending there


def test_quickstart_learns(tmp_path):
    out = tmp_path / "qs"
    cmd = [sys.executable, "-m", "vftrain.cli.sft", "@", "examples/quickstart.toml", "--sft.max_steps", "600",
           "--sft.eval_generation_rows", "100", "--sft.output_dir", str(out), "--sft.disable_tqdm", "true",
           "--sft.save_strategy", "no", "--sft.logging_steps", "10", "--sft.eval_steps", "100",
           "--sft.use_cpu", "true"]  # the golden curve is the CPU's, also where a GPU is
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    for step, (expected, rel) in GOLDEN.items():
        assert losses[step] == pytest.approx(expected, rel=rel), (step, losses)
    for step, bound in MEAN_LOSS_BELOW.items():
        mean = sum(losses[s] for s in range(step - 90, step + 1, 10)) / 10
        assert mean < bound, (step, mean, losses)
    accuracy = float(re.search(r"held-out exact-match accuracy: ([\d.]+)%", proc.stdout).group(1))
    assert accuracy >= 90.0, proc.stdout[-2000:]
