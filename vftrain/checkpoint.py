"""Atomic checkpoints: a checkpoint is written under `<output_dir>/.staging/` and renamed into place only once
complete, so a crash during a save leaves the previous checkpoint intact and `resume_from_checkpoint = "latest"`
(transformers' `get_last_checkpoint`, which only sees `checkpoint-<step>` folders) never picks a partial one."""

from __future__ import annotations

import os
import shutil

STAGING = ".staging"


def staging_dir(run_dir: str) -> str:
    return os.path.join(run_dir, STAGING)


def clear_staging(run_dir: str) -> None:
    """Remove what an interrupted save left behind."""
    shutil.rmtree(staging_dir(run_dir), ignore_errors=True)


def publish(run_dir: str, folder: str) -> str:
    """Move the complete `<staging>/<folder>` to `<run_dir>/<folder>` (replacing an older save of the same step)."""
    final = os.path.join(run_dir, folder)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(os.path.join(staging_dir(run_dir), folder), final)  # atomic on one filesystem
    clear_staging(run_dir)
    return final


def rotate(trainer, run_dir: str) -> None:
    """Apply save_total_limit to the published checkpoints (ordered by step, not mtime)."""
    try:
        from transformers.trainer_utils import rotate_checkpoints
    except ImportError:  # transformers before the function moved out of Trainer
        trainer._rotate_checkpoints(use_mtime=False, output_dir=run_dir)
        return
    rotate_checkpoints(output_dir=run_dir, save_total_limit=trainer.args.save_total_limit,
                       best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=False)
