"""Run output: vftrain's log lines through Rich, and every logged metric appended to metrics.jsonl."""

from __future__ import annotations

import json
import logging
import os

from rich.logging import RichHandler
from transformers import TrainerCallback


def setup_console_logging(level: int = logging.INFO) -> None:
    """Route the `vftrain` logger through Rich; transformers/datasets stay at warning level."""
    logger = logging.getLogger("vftrain")
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        logger.addHandler(RichHandler(show_path=False, show_time=False, markup=False))
    logger.setLevel(level)
    logger.propagate = False
    import transformers

    transformers.logging.set_verbosity_warning()


class MetricsFileCallback(TrainerCallback):
    """Appends one JSON object per logging event (with `step`) to `<output_dir>/metrics.jsonl`, main process only.

    The file is opened per write, so a killed run leaves every line it logged, and a resumed run continues it.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        record = {"step": state.global_step, **{k: _plain(v) for k, v in logs.items()}}
        with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as fh:
            fh.write(json.dumps(record) + "\n")


def _plain(value):
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
