"""Run output: metric and log lines stay whole in a file or pipe, the curves plot eval loss beside train loss,
and total_flos counts every forward."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from vftrain.logging import (MetricsFileCallback, RichProgressCallback, curve_panels, plot_curves, read_metrics,
                             setup_console_logging)

LOGS = {"loss": 2.25101, "eval_loss": 2.5, "token_accuracy": 0.44, "learning_rate": 3e-3, "grad_norm": 1.25,
        "tokens_per_second": 83050.0, "mfu": 0.361, "peak_memory_gib": 71.5}


def test_metric_line_is_not_wrapped_into_a_file(capsys, monkeypatch):
    """Rich wraps at 80 columns when stdout is not a terminal; the line is longer and must stay one line."""
    monkeypatch.delenv("COLUMNS", raising=False)
    callback = RichProgressCallback()
    args, state = SimpleNamespace(disable_tqdm=False), SimpleNamespace(is_world_process_zero=True, max_steps=1000,
                                                                       global_step=100)
    callback.on_train_begin(args, state, None)
    callback.on_log(args, state, None, logs=LOGS)
    callback.on_train_end(args, state, None)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1 and len(lines[0]) > 80, lines
    assert "tok/s 83,050" in lines[0] and lines[0].startswith("step 100/1000 | loss 2.2510")


def test_log_lines_are_not_wrapped_into_a_file(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    setup_console_logging()
    message = "train data: 7,600 of 7,600 rows kept (prompt_completion format); 217,359 tokens, 27,359 trained (12.6%)"
    logging.getLogger("vftrain").info(message)
    assert capsys.readouterr().out.splitlines() == [f"INFO     {message}"]


def test_eval_loss_is_drawn_on_the_loss_panel(tmp_path):
    records = [{"step": s, "loss": 3.0 / s, "token_accuracy": 0.1 * s} for s in range(1, 5)]
    records += [{"step": 2, "eval_loss": 2.0}, {"step": 4, "eval_loss": 1.5}]
    panels = dict(curve_panels(records))
    assert panels["loss"] == [("train", [(s, 3.0 / s) for s in range(1, 5)]), ("eval", [(2, 2.0), (4, 1.5)])]
    assert "eval reward" not in panels  # no data, no empty panel
    assert plot_curves(records, str(tmp_path / "c.png")) and (tmp_path / "c.png").stat().st_size > 1000


def test_total_flos_is_transformers_estimate_over_every_forward(tmp_path):
    """`total_flos` (trainer_state.json) is transformers' 6 x input tokens x non-embedding parameters summed over
    every forward, token-budget splits of a micro-batch included, with the parameter count worked out once."""
    import datasets

    import vftrain as vf
    from conftest import TINY, addition_rows, small_config

    cfg = small_config(tmp_path, max_steps=2, packing=True, micro_batch_tokens=64)
    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(32)), args=cfg)
    tokens, compute_loss = [], trainer.compute_loss

    def counted(model, inputs, *args, **kwargs):
        tokens.append(inputs["input_ids"].numel())
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = counted
    trainer.train()
    assert len(tokens) > 2  # the 64-token budget split the 8-row micro-batches
    expected = 6 * sum(tokens) * trainer.model.num_parameters(exclude_embeddings=True)
    assert trainer.state.total_flos == pytest.approx(expected, rel=1e-6)


def test_metrics_file_is_strict_json_with_a_nan_loss(tmp_path):
    """A skipped step's NaN loss was written as a bare NaN, which strict JSON readers (JavaScript, jq) reject."""
    import json

    args = SimpleNamespace(output_dir=str(tmp_path))
    state = SimpleNamespace(is_world_process_zero=True, global_step=3)
    MetricsFileCallback().on_log(args, state, None, logs={"loss": float("nan"), "grad_norm": float("inf"), "lr": 1.0})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c}")) == \
        {"step": 3, "loss": None, "grad_norm": None, "lr": 1.0}
    assert read_metrics(str(tmp_path / "metrics.jsonl"))[0]["loss"] is None
