"""Run output: metric and log lines stay whole in a file or pipe, and the curves plot eval loss beside train loss."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from vftrain.logging import RichProgressCallback, curve_panels, plot_curves, setup_console_logging

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
