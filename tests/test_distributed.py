"""Data parallel through torchrun/accelerate (DDP, gloo on CPU): the same global batch on 2 processes gives the
same loss curve and gradient norms as on 1, with packing making the ranks' trained-token counts differ (so a
per-rank mean would weigh tokens wrongly, prime-rl#1961); console output and files come from rank 0 only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, addition_rows, write_jsonl

ARGS = ["--model", TINY, "--sft.max_steps", "6", "--sft.logging_steps", "1", "--sft.batch_size",
        "32", "--sft.micro_batch_size", "4", "--sft.packing", "true", "--sft.save_strategy", "no",
        "--sft.disable_tqdm", "true", "--sft.learning_rate", "1e-2", "--sft.max_seq_len", "128"]


def _dataset(tmp_path) -> str:
    """Two kinds of rows of similar length: long prompts with 3-token answers, and short prompts with a 60-token
    easy pattern. Packing balances total tokens, so ranks get similar lengths but different trained-token counts
    and per-token losses: a per-rank mean moves the loss by ~5e-4 (relative) within 6 steps."""
    rows = addition_rows(128)
    for row in rows:
        row["prompt"][0]["content"] += " pad" * 15
    easy = {"prompt": [{"role": "user", "content": "ab"}], "completion": [{"role": "assistant", "content": "xy" * 30}]}
    return write_jsonl(tmp_path / "data.jsonl", [r for pair in zip(rows, [easy] * 128) for r in pair])


def _train(out_dir, processes: int, data: str, extra=()):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_port", str(29500 + os.getpid() % 1000)] if processes > 1 else [sys.executable]
    proc = subprocess.run([*launcher, "-m", "vftrain.cli.sft", *ARGS, *extra, "--dataset", data,
                           "--sft.output_dir", str(out_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], proc.stdout


@pytest.mark.parametrize("extra", [(), ("--sft.micro_batch_tokens", "160")], ids=["packed", "token-budget"])
def test_two_processes_match_one(tmp_path, extra):
    """With a token budget, ranks run different numbers of forwards per step (gradient sync after the last)."""
    data = _dataset(tmp_path)
    one, _ = _train(tmp_path / "one", 1, data, extra)
    two, stdout = _train(tmp_path / "two", 2, data, extra)
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5, 6]  # rank 0 alone writes metrics.jsonl
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=5e-5), (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=5e-5)
        assert b["trained_tokens"] == a["trained_tokens"]  # counted over both ranks
    assert stdout.count("step 1/6 |") == 1
