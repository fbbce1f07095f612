"""Console output: vftrain's own log lines through Rich, library chatter kept at warnings."""

from __future__ import annotations

import logging

from rich.logging import RichHandler


def setup_console_logging(level: int = logging.INFO) -> None:
    """Route the `vftrain` logger through Rich; transformers/datasets stay at warning level."""
    logger = logging.getLogger("vftrain")
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        logger.addHandler(RichHandler(show_path=False, show_time=False, markup=False))
    logger.setLevel(level)
    logger.propagate = False
    import transformers

    transformers.logging.set_verbosity_warning()
