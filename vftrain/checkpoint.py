"""Atomic checkpoints: a checkpoint is written under `<output_dir>/.staging/` and renamed into place only once
complete, so a crash during a save leaves the previous checkpoint intact and `resume_from_checkpoint = "latest"`
(transformers' `get_last_checkpoint`, which only sees `checkpoint-<step>` folders) never picks a partial one."""

from __future__ import annotations

import json
import os
import shutil

STAGING = ".staging"

# Settings that decide which rows each step trains on: a resume with other values continues on different data
# (micro_batch_size, the number of processes and token budgets only regroup a step's rows, so they may change).
DATA_FIELDS = ("dataset", "dataset_split", "batch_size", "max_seq_len", "long_rows", "packing", "split_turns", "seed",
               "data_seed",
               "rollouts_per_example", "max_prompt_len")  # the last two: which prompts an RL step takes


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


def gathered_state_dict(model, dtype, keep: bool) -> dict:
    """The full state dict of an FSDP2-sharded `model`, gathered one tensor at a time on its device and cast to
    `dtype` there (floating tensors; None keeps their dtype), so only the saved bytes cross to the CPU (half of
    accelerate's float32 gather for a bf16 model), and only on the process that `keep`s them; the others take part
    in every gather and return {}. Keys are torch's cleaned names (no wrapper prefixes), as from_pretrained expects;
    tied weights (one shard under two names) come back as one tensor, which save_pretrained then writes once."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    out, tied = {}, {}
    sharded = get_model_state_dict(model, options=StateDictOptions(full_state_dict=False, cpu_offload=False))
    for name, value in sharded.items():  # the same order on every process: the gathers pair up
        local = value.to_local() if isinstance(value, DTensor) else value
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        if keep:
            shard = (local.data_ptr(), tuple(local.shape)) if local.data_ptr() else name
            if shard not in tied:
                tied[shard] = value.to("cpu")
            out[name] = tied[shard]
    return out


def data_changes(checkpoint_dir: str, config: dict) -> list[str]:
    """`what: saved -> now` for each setting that decides the training rows and differs from the checkpoint's
    resolved config (empty when the checkpoint has none)."""
    path = os.path.join(checkpoint_dir, "vftrain_config.json")
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        saved = json.load(fh).get("config", {})
    changes = [f"{f}: {saved[f]!r} -> {config.get(f)!r}" for f in DATA_FIELDS if f in saved and saved[f] != config.get(f)]
    if _held_out(saved) != _held_out(config):
        changes.append(f"rows held out of training for samples: {_held_out(saved)} -> {_held_out(config)}")
    return changes


def _held_out(config: dict) -> int:
    """Rows sampling takes out of the training set (sampling.held_out_samples): only without an eval split."""
    if config.get("sample_every_n_steps") and not config.get("eval_split"):
        return int(config.get("num_samples") or 0)
    return 0
