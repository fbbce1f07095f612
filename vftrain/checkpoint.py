"""Atomic checkpoints: a checkpoint is written under `<output_dir>/.staging/` and renamed into place only once
complete, so a crash during a save leaves the previous checkpoint intact and `resume_from_checkpoint = "latest"`
(transformers' `get_last_checkpoint`, which only sees `checkpoint-<step>` folders) never picks a partial one."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time

from vftrain.config_checks import checkpoint_of
from vftrain.errors import ConfigError
from vftrain.logging import HELD_OUT, trim_log

STAGING = ".staging"
LOCK = ".vftrain.lock"  # held by the run writing the folder (`claim`)
_CLAIMED: dict = {}  # run folders this process holds: path -> [its open lock file, trainers holding it]
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR folders
SUPERSEDED = "superseded-"  # a continuation that a resume from an earlier checkpoint replaced
# What a run leaves in its output_dir that another run must not mix with: logs, plots, checkpoints, held-out
# generations and a saved model (weights or adapter). The resolved config alone (a run that stopped before its
# first logged step) is not an output: a new run rewrites it.
_LOGS = ("metrics.jsonl", "rollouts.jsonl", "training_curves.png", "merged", STAGING)
_WEIGHTS = (".safetensors", ".bin", ".safetensors.index.json", ".pt")
# Deleted with the outputs by overwrite_output_dir: the saved model's other files, which a new save of another kind
# (adapter vs full weights) would not replace.
_COMPANIONS = ("config.json", "generation_config.json", "adapter_config.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt",
               "added_tokens.json", "tokenizer.model", "vftrain_config.json", "config.toml")

# Settings that decide which rows each step trains on: a resume with other values continues on different data
# (micro_batch_size, the number of processes and token budgets only regroup a step's rows, so they may change).
# eval_size cuts the held-out rows out of the training split; eval_split, another split, changes the training rows
# only through the rows the sample panels hold out (`_held_out`).
DATA_FIELDS = ("dataset", "dataset_split", "batch_size", "max_seq_len", "long_rows", "packing", "split_turns", "seed",
               "data_seed", "eval_size",
               "rollouts_per_example", "max_prompt_len")  # the last two: which prompts an RL step takes


# Settings that decide which parameters train, and their shapes or scale: a resume must keep them (the lora_* ones
# between two LoRA runs).
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_target_modules", "lora_modules_to_save", "lora_use_rslora")


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


def data_changes(checkpoint_dir: str, config: dict, fingerprint: str | None = None) -> list[str]:
    """`what: saved -> now` for each setting that decides the training rows and differs from the checkpoint's
    resolved config, and for the rows themselves where their fingerprint differs (a file changed under the same
    path, another Dataset object); empty when the checkpoint has none."""
    saved = _saved_config(checkpoint_dir)
    changes = _changes(saved, config, DATA_FIELDS)
    if _held_out(saved) != _held_out(config):
        changes.append(f"rows held out of training for samples: {_held_out(saved)} -> {_held_out(config)}")
    rows = _saved(checkpoint_dir).get("train_rows")
    if rows and fingerprint and rows != fingerprint:
        changes.append("the training rows themselves (their tokens differ from the checkpoint's run)")
    return changes


def setting_changes(checkpoint_dir: str, config: dict, fields) -> list[str]:
    """`what: saved -> now` for each of `fields` that differs from the checkpoint's resolved config."""
    return _changes(_saved_config(checkpoint_dir), config, fields)


# A model config's entries that decide its parameters' shapes: a checkpoint of another shape cannot load.
_SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
               "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")


def check_same_model(args, resume: str | None, model_source: str | None = None, model_config=None) -> None:
    """Refuse (ConfigError) a resume whose settings make another set of trained parameters than the checkpoint's
    (full weights vs LoRA, another rank or target modules, another scale) or whose model has another shape: its
    weights and optimizer state would not load (transformers' traceback, after the folder was set up for the
    resume) or would train another function. A model given by another path is said (the same model moved, or
    another one: a LoRA adapter continued on another base)."""
    saved, now = (_saved_config(resume) if resume else {}), args.to_dict()
    both_lora = saved.get("use_lora") and now.get("use_lora") and now.get("lora_config") is None
    changes = _changes(saved, now, ("use_lora", *(LORA_FIELDS if both_lora else ())))
    shape = _read_json(os.path.join(resume, "config.json")) if resume and model_config is not None else {}
    ours = model_config.to_dict() if shape else {}
    changes += [f"{key}: {shape[key]!r} -> {ours.get(key)!r}" for key in _SHAPE_KEYS
                if key in shape and shape[key] != ours.get(key)]
    if changes:
        raise ConfigError(f"{resume} was saved with other model settings than this run's ({'; '.join(changes)}); "
                          "resume with the checkpoint's, or start a new run (another run_name or output_dir)")
    before = _saved(resume).get("model") if resume else None
    if before and model_source and _where(before) != _where(model_source):
        logging.getLogger("vftrain").warning("resuming from %s, a run of model %r, with model %r: if that is another "
                                             "model, the run continues on it (a LoRA adapter on another base)",
                                             resume, before, model_source)


def _where(model: str) -> str:
    return os.path.realpath(model) if os.path.exists(model) else model


def _saved_config(checkpoint_dir: str) -> dict:
    """The resolved config saved with a checkpoint (empty when it has none)."""
    return _saved(checkpoint_dir).get("config", {})


def _saved(checkpoint_dir: str) -> dict:
    """The checkpoint's vftrain_config.json: its config, model, dataset and training rows' fingerprint."""
    return _read_json(os.path.join(checkpoint_dir, "vftrain_config.json"))


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        return json.load(fh)


def _changes(saved: dict, config: dict, fields) -> list[str]:
    return [f"{f}: {saved[f]!r} -> {config.get(f)!r}" for f in fields if f in saved and saved[f] != config.get(f)]


def _held_out(config: dict) -> int:
    """Rows sampling takes out of the training set (sampling.held_out_samples): only without held-out rows (an
    eval_split, or the eval_size cut) to take them from."""
    if config.get("sample_every_n_steps") and not config.get("eval_split") and config.get("eval_size") is None:
        return int(config.get("num_samples") or 0)
    return 0


def finished(args, folder: str | None) -> bool:
    """Whether the checkpoint `folder` ends the run `args` describes (its step reached max_steps; without
    max_steps, the end of num_train_epochs at the saved run's steps per epoch), said in one log line: a requeued
    finished job then trains nothing (transformers would train one step past max_steps before it checks, or with
    fewer epochs log a second summary of no steps)."""
    path = os.path.join(folder, "trainer_state.json") if folder else ""
    if not os.path.isfile(path):
        return False
    with open(path) as fh:
        state = json.load(fh)
    epochs = state.get("num_train_epochs")
    end = args.max_steps if args.max_steps > 0 else (
        math.ceil(state["max_steps"] / epochs * args.num_train_epochs - 1e-9) if epochs and state.get("max_steps")
        else None)
    if not end or state["global_step"] < end:
        return False
    longer = "max_steps" if args.max_steps > 0 else "num_train_epochs"
    logging.getLogger("vftrain").info("%s is step %d of %d: the run is finished, nothing to train (a larger %s "
                                      "continues it)", folder, state["global_step"], end, longer)
    return True


def has_final_model(run_dir: str) -> bool:
    """Whether `run_dir` holds the model a finished run saves beside its checkpoints (weights or an adapter), whole:
    a run killed while it wrote its safetensors left a truncated file, and a requeued job took the run as done."""
    if not os.path.isdir(run_dir):
        return False
    weights = [name for name in os.listdir(run_dir) if name.endswith(_WEIGHTS) and name != "training_args.bin"]
    return bool(weights) and all(_whole(os.path.join(run_dir, name)) for name in weights)


def _whole(path: str) -> bool:
    """A safetensors file is as long as its header says (8-byte header length, JSON header, then the tensors)."""
    if not path.endswith(".safetensors"):
        return True
    try:
        with open(path, "rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(length))
    except (OSError, ValueError):
        return False
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    return os.path.getsize(path) == 8 + length + end


def claim(run_dir: str, owner) -> str | None:
    """Take `run_dir` for the run of `owner` (a trainer): an exclusive lock on `.vftrain.lock`, held until every
    owner in this process is gone (or the process ends); None when taken, else why not. Two runs at once in one
    folder both wrote its logs, checkpoints and model, and cleared each other's staging folder."""
    import fcntl
    import socket
    import weakref

    key = os.path.realpath(run_dir)
    if key in _CLAIMED:
        _CLAIMED[key][1] += 1
        weakref.finalize(owner, _release, key)
        return None
    os.makedirs(run_dir, exist_ok=True)
    handle = open(os.path.join(run_dir, LOCK), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        return (f"output_dir {run_dir!r} is in use by a run still going ({holder}); wait for it to end, or give this "
                "run another run_name or output_dir")
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    handle.flush()
    _CLAIMED[key] = [handle, 1]
    weakref.finalize(owner, _release, key)
    return None


def _release(key: str) -> None:
    entry = _CLAIMED.get(key)
    if entry is not None:
        entry[1] -= 1
        if not entry[1]:
            entry[0].close()  # closing the file releases its lock
            del _CLAIMED[key]


def run_outputs(run_dir: str) -> list[str]:
    """Names of the entries of `run_dir` that a run wrote (checkpoints, logs, plots, held-out generations, a model)."""
    if not os.path.isdir(run_dir):
        return []
    return sorted(name for name in os.listdir(run_dir) if name in _LOGS or _CHECKPOINT.match(name)
                  or HELD_OUT.match(name) or name.endswith(_WEIGHTS) or name.startswith(SUPERSEDED))


def check_output_dir(args, resume) -> None:
    """Refuse (ConfigError) what would mix two runs in `args.output_dir`: a new run (`resume` None: no resume asked,
    or 'latest' with no checkpoint to continue) where another run left outputs, unless `overwrite_output_dir`."""
    check_same_model(args, resume)
    run_dir, found = args.output_dir, run_outputs(args.output_dir)
    if not found or _continued_step(args, resume) is not None or args.overwrite_output_dir:
        return
    shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    if resume is not None:  # a checkpoint of another folder: this run writes to output_dir, as a new one
        raise ConfigError(f"output_dir {run_dir!r} holds another run's outputs ({shown}); a run resumed from {resume} "
                          "(another folder's checkpoint) writes its own outputs there: give it an empty output_dir "
                          "(another run_name), or set overwrite_output_dir = true to delete them first")
    # Without a checkpoint 'latest' has nothing to continue: a finished run that saved none (save_strategy "no"),
    # or one killed before its first save, whose model and logs a fresh start would replace.
    resumable = any(_CHECKPOINT.match(name) for name in found)
    cont = "continue that run with resume_from_checkpoint = 'latest', or " if resumable else ""
    what = "" if resumable else " and no checkpoint to continue it from"
    raise ConfigError(f"output_dir {run_dir!r} holds another run's outputs ({shown}){what}; a new run there would "
                      "mix its metrics with them and replace its model: give this run another run_name (or "
                      f"output_dir), {cont}set overwrite_output_dir = true to delete them first")


def check_inputs_kept(args, inputs: list[str]) -> None:
    """Refuse (ConfigError) overwrite_output_dir on a folder that holds what the run loads (`inputs`: the model, an
    adapter folder's base): deleting the earlier run's outputs would delete it before training."""
    if not args.overwrite_output_dir:
        return
    run_dir = os.path.realpath(args.output_dir)
    for path in inputs:
        real = os.path.realpath(path)
        if os.path.exists(path) and (real == run_dir or real.startswith(run_dir + os.sep)):
            raise ConfigError(f"overwrite_output_dir = true would delete the model this run loads ({path!r}, inside "
                              f"output_dir {args.output_dir!r}); give this run another run_name (or output_dir), or "
                              "move the model out of that folder first")


def start_run(args, resume) -> None:
    """The run's output_dir made ready on the main process, after `check_output_dir`: a new run with
    `overwrite_output_dir` deletes the earlier run's outputs (named in the log); a resumed run drops what the run
    logged after its checkpoint (metrics and rollouts lines, held-out generations), so the files show one run."""
    check_output_dir(args, resume)
    run_dir, step = args.output_dir, _continued_step(args, resume)
    if step is None:
        gone = run_outputs(run_dir) + sorted(set(_COMPANIONS) & set(os.listdir(run_dir))) \
            if args.overwrite_output_dir and os.path.isdir(run_dir) else []
        if gone:
            logging.getLogger("vftrain").warning("overwrite_output_dir: deleting the earlier run's %s from %s",
                                                 ", ".join(gone), run_dir)
        for name in gone:
            path = os.path.join(run_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        return
    for name in ("metrics.jsonl", "rollouts.jsonl"):  # rollouts under the step that logs their update
        trim_log(os.path.join(run_dir, name), step)
    _set_aside_later_checkpoints(run_dir, step)
    for name in run_outputs(run_dir):
        match = HELD_OUT.match(name)
        if match and int(match.group(1)) > step:
            os.remove(os.path.join(run_dir, name))


def _set_aside_later_checkpoints(run_dir: str, step: int) -> None:
    """A resume from an earlier checkpoint of this folder abandons the continuation that wrote the later ones: they
    move into `superseded-<time>/` (kept, not deleted), so that `latest` and checkpoint rotation see this run's
    checkpoints only."""
    later = sorted((m.group(0) for m in map(_CHECKPOINT.match, os.listdir(run_dir)) if m and int(m.group(1)) > step),
                   key=lambda name: int(name.split("-")[1]))
    if not later:
        return
    aside = os.path.join(run_dir, SUPERSEDED + time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(aside, exist_ok=True)
    model = [name for name in os.listdir(run_dir) if name.endswith(_WEIGHTS) or name in _COMPANIONS] \
        if has_final_model(run_dir) else []  # that continuation's final model, when it got that far
    for name in later + model:
        os.rename(os.path.join(run_dir, name), os.path.join(aside, name))
    logging.getLogger("vftrain").warning("resuming from step %d: the later %s of the continuation this run replaces "
                                         "moved to %s", step, ", ".join(later + (["final model"] if model else [])),
                                         aside)


def _killed_before_first_save(args) -> bool:
    """A resume was asked for ('latest' found no checkpoint) in a folder whose only outputs are what a run writes
    while it trains (logs, the held-out figure before step 1): a run killed (SIGKILL, a lost node) before its first
    save, which the same command line restarts from step 0. A finished run that saved no checkpoint has its final
    model or plot there, and is refused as another run's."""
    if not args.resume_from_checkpoint:
        return False
    found = run_outputs(args.output_dir)
    return bool(found) and all(name in ("metrics.jsonl", "rollouts.jsonl", STAGING)
                               or (HELD_OUT.match(name) and int(HELD_OUT.match(name).group(1)) == 0)
                               for name in found)


def _continued_step(args, resume) -> int | None:
    """The step a run continues in its own output_dir: the resumed checkpoint's, 0 for a run killed before its first
    save, or None for a new run (also 'latest' in a folder without checkpoints that a finished run left, and a
    resume from a checkpoint in another folder: this folder's files are not that run's)."""
    if resume is None:
        return 0 if _killed_before_first_save(args) else None
    match = _CHECKPOINT.match(os.path.basename(os.path.normpath(resume)))
    return int(match.group(1)) if inside(args, resume) and match else None


def inside(args, resume: str) -> bool:
    """Whether the checkpoint `resume` is one of this run folder's own."""
    return checkpoint_of(resume, args.output_dir)


def newest(args, resume: str | None) -> bool:
    """Whether `resume` is the newest checkpoint of its run folder (a resume from it abandons nothing)."""
    step = _continued_step(args, resume)
    return step is None or not any(m and int(m.group(1)) > step
                                   for m in map(_CHECKPOINT.match, os.listdir(args.output_dir)))
