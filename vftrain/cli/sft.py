"""`vf-sft @ config.toml [--sft.key value ...] [--model M] [--dataset D] [--inspect N [--json]]`."""

from __future__ import annotations

import logging
import sys

from vftrain.cli.args import (build_config, check_keys, import_beside_config, parse_argv, resolve_path_or_name,
                               resume_point)
from vftrain.errors import ConfigError, VFTrainError

FLAGS = {"inspect": True, "json": False, "help": False}
USAGE = """usage: vf-sft @ path/to/config.toml [--sft.<field> VALUE ...] [--model M] [--dataset D]
              [--inspect N [--json]]
       vf-sft export ADAPTER_DIR [--out DIR] [--model BASE]

Supervised fine-tuning. The TOML file holds top-level `model` and `dataset` and an [sft] table of the fields
below; command-line values override the file (e.g. --sft.max_steps 40 --model path/to/model).
--inspect N prints the first N training rows as they will be trained (trained tokens in green; between [[ and
]] in a pipe or file; not the rows eval_size or the sample panels hold out, which it counts) and the masking
statistics, without training; with --json, one JSON object per row (row,
input_ids, loss_mask, text). Rows are numbered as in the dataset, as the counts of dropped rows are.
`export` merges a LoRA adapter into its base model (a folder transformers and vLLM load without peft).
Ctrl-C (or SIGTERM) during training saves a checkpoint at the end of the current step and stops, exit status 130
(143); a second one stops at once."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "export":  # its own --help
        return export(argv[1:])
    if not argv or "-h" in argv or "--help" in argv:
        try:
            print_help()
        except BrokenPipeError:  # `vf-sft --help | head`
            sys.stderr.close()
        return 0
    try:
        inv = parse_argv(argv, "sft", FLAGS)
        model, config = resolve(inv)
        import_beside_config(inv)
        if "inspect" in inv.flags:
            return inspect(model, config, inv.flags["inspect"], bool(inv.flags.get("json")))
        return train(model, config)
    except VFTrainError as exc:
        print(f"vf-sft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vf-sft: interrupted", file=sys.stderr)
        return 130


def export(argv: list[str]) -> int:
    """`vf-sft export ADAPTER_DIR [--out DIR] [--model BASE]`: merge a LoRA adapter into its base model."""
    import argparse

    from vftrain.models import export_merged

    parser = argparse.ArgumentParser(prog="vf-sft export", description="Merge a LoRA adapter into its base "
                                     "model and save a plain transformers folder (loads in vLLM).")
    parser.add_argument("adapter", help="folder with adapter_config.json (a LoRA run's output or checkpoint)")
    parser.add_argument("--out", help="output folder (default: <adapter>/merged)")
    parser.add_argument("--model", help="base model (default: the one recorded in adapter_config.json)")
    args = parser.parse_args(argv)
    try:
        out = export_merged(args.adapter, args.out or f"{args.adapter.rstrip('/')}/merged", args.model)
    except VFTrainError as exc:
        print(f"vf-sft: error: {exc}", file=sys.stderr)
        return 2
    print(f"merged model written to {out}")
    return 0


def resolve(inv, config_cls=None, section: str = "sft"):
    """(model, config) from the parsed invocation (the [section]'s config class: SFTConfig, RLConfig, or
    `config_cls`); unknown keys (checked before torch is imported) and missing or malformed model/dataset are
    one-line errors."""
    check_keys(inv.table, section)
    if config_cls is None:
        from vftrain import config as configs
        from vftrain.cli.fields import SECTIONS

        config_cls = getattr(configs, SECTIONS[section])
    model = inv.top.get("model")
    if model is None:
        raise ConfigError("no model: set `model = ...` at the top of the TOML file or pass --model")
    table = dict(inv.table)
    if "dataset" in inv.top:
        if "dataset" in table and table["dataset"] != inv.top["dataset"]:
            raise ConfigError(f"dataset is set both at the top level and in [{section}]; set it once")
        table["dataset"] = inv.top["dataset"]
    if table.get("dataset") is not None:
        table["dataset"] = resolve_path_or_name(table["dataset"], "dataset")
    elif not table.get("env"):  # RL on a verifiers environment takes its prompts from there
        raise ConfigError("no dataset: set `dataset = ...` at the top of the TOML file or pass --dataset")
    try:
        config = build_config(config_cls, table, section, inv.cli_text)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, VFTrainError):
            raise
        raise ConfigError(f"invalid [{section}] value: {str(exc).strip().splitlines()[0]}") from None
    return resolve_path_or_name(model, "model"), config


def train(model: str, config, trainer_cls=None, before=None, launch=None) -> int:
    """Train, save, merge (LoRA), report held-out accuracy; `before(trainer)` runs once the trainer is built, and
    `launch(config, model)` is the context (vf-rl's vLLM server) training runs in: entered only when there is
    something to train."""
    import contextlib

    from vftrain.logging import setup_console_logging

    if trainer_cls is None:
        from vftrain.sft.trainer import SFTTrainer as trainer_cls

    from vftrain.checkpoint import check_output_dir, finished, has_final_model, newest
    from vftrain.resume import same_resume_everywhere

    setup_console_logging()
    resume = resume_point(config)
    same_resume_everywhere(resume)  # before each process decides on its own whether the run is finished
    wrap_up = finished(config, resume)
    if wrap_up:
        # a requeued finished job: its model, merge and held-out generation stay as they are (a resume from an
        # earlier checkpoint sets aside the later continuation's, model included, and wraps up from it)
        if has_final_model(config.output_dir) and newest(config, resume):
            _close_process_group()
            return 0
        # killed after its last checkpoint, before the model was saved: the run is wrapped up from that checkpoint
        logging.getLogger("vftrain").info("%s has no final model: saving it from %s, then what follows a run",
                                          config.output_dir, resume)
    check_output_dir(config, resume)  # before loading and tokenizing: a refused run fails at once
    # stopped on return and error; a wrap-up samples nothing (held-out generations are the model's own)
    with launch(config, model) if launch is not None and not wrap_up else contextlib.nullcontext():
        return _train(model, config, trainer_cls, before, resume)


def _train(model: str, config, trainer_cls, before, resume) -> int:
    trainer = trainer_cls(model=model, args=config)
    warn_without_held_out(trainer, config)
    trainer.start_run(resume)  # before `before` writes its held-out generations into the run folder
    if before is not None and resume is None:  # a resumed run measured its start model when it first started
        before(trainer)
    trainer.train(resume_from_checkpoint=resume)  # out of memory: OutOfMemory, exit 2
    if trainer.interrupt.stopped_by is not None:
        return interrupted(trainer, config, trainer.interrupt.stopped_by)
    trainer.save_model()
    merged = trainer.save_merged() if config.merge_lora else None
    if trainer.is_world_process_zero():
        print(saved_message(trainer, config.output_dir, merged), flush=True)
    report_generation_accuracy(trainer, config)
    _close_process_group()
    return 0


def saved_message(trainer, output_dir: str, merged: str | None) -> str:
    """Where the finished run's model went: the model, or the LoRA adapter (and the merged model, or how to merge)."""
    if not hasattr(trainer.accelerator.unwrap_model(trainer.model), "peft_config"):
        return f"model saved to {output_dir}"
    merge = f"merged model written to {merged}" if merged else f"merge it with `vf-sft export {output_dir}`"
    return f"LoRA adapter saved to {output_dir}; {merge}"


def interrupted(trainer, config, signum: int) -> int:
    """After Ctrl-C or SIGTERM the step's checkpoint is saved and the run is unfinished: no final model, merge or
    held-out generation (a preempted job is resumed, not wrapped up). Exit 128 + the signal's number (130, 143), as
    the signal itself would, so that a script or scheduler sees that the run did not finish."""
    import signal

    from transformers.trainer_utils import get_last_checkpoint

    if trainer.is_world_process_zero():
        last = get_last_checkpoint(config.output_dir)
        print(f"vf-{config.run_name_prefix}: stopped by {signal.Signals(signum).name} after step "
              f"{trainer.state.global_step}; continue with --{config.run_name_prefix}.resume_from_checkpoint {last}",
              file=sys.stderr, flush=True)
    _close_process_group()
    return 128 + signum


def _close_process_group() -> None:
    from vftrain.guards import close_process_group  # imports torch: not at `--help`

    close_process_group()


def report_generation_accuracy(trainer, config, when: str = "") -> float | None:
    """Held-out greedy exact match on `eval_generation_rows` held-out rows (`eval_split`, or cut by `eval_size`):
    printed by the main process, with every generation written to the run folder and the accuracy logged
    (`VFTrainer.evaluate_generations`); None when not asked for. With sharded weights every process generates;
    otherwise only the main one."""
    if not (config.eval_generation_rows and getattr(trainer, "raw_eval", None) is not None
            and (trainer.is_world_process_zero() or trainer.sharded)):
        return None
    result = trainer.evaluate_generations()
    if not trainer.is_world_process_zero():
        return result["accuracy"]
    for prompt, completion, reference in result["examples"]:
        last = prompt if isinstance(prompt, str) else prompt.messages[-1]["content"]
        print(f"  {last!r} -> {completion!r} (reference {reference!r})")
    where = f"split {config.eval_split!r}" if config.eval_split else f"eval_size = {config.eval_size!r}"
    funcs = ", ".join(f"{name} {'scored none' if mean is None else f'{mean:.3f}'}"
                      for name, mean in result.get("reward_funcs", {}).items())
    reward = f"; reward {result['reward']:.3f} ({funcs})" if "reward" in result else ""
    print(f"held-out exact-match accuracy{when}: {result['accuracy']:.1%}{reward} ({result['n']} rows of {where}; "
          f"generations in {result['path']})", flush=True)
    return result["accuracy"]


def warn_without_held_out(trainer, config) -> None:
    """eval_generation_rows with no held-out rows to generate for is said once, not skipped without a word."""
    if not config.eval_generation_rows or getattr(trainer, "raw_eval", None) is not None \
            or not trainer.is_world_process_zero():
        return
    why = "an environment's run (env) has no held-out rows" if getattr(config, "env", None) else \
        "no held-out rows: set eval_split (a split of the dataset) or eval_size (rows cut from the training split)"
    logging.getLogger("vftrain").warning("eval_generation_rows = %d is skipped: %s", config.eval_generation_rows, why)


def inspect_setup(model: str, config, n_text: str, what: str):
    """(count, tokenizer) for `--inspect N`: N checked, the model's tokenizer loaded with a pad token."""
    from transformers import AutoTokenizer

    from vftrain.models import ensure_pad_token, load_error, use_template

    try:
        n = int(n_text)
    except ValueError:
        raise ConfigError(f"--inspect {n_text!r}: expected a number of {what}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=config.trust_remote_code)
    except OSError as exc:
        raise load_error("tokenizer", model, exc) from None
    use_template(tokenizer, config.chat_template, config.chat_template_kwargs)
    ensure_pad_token(tokenizer)
    return n, tokenizer


def inspect(model: str, config, n_text: str, as_json: bool) -> int:
    """The rows training will use: without those eval_size and the sample panels hold out (`SFTTrainer`'s split)."""
    from vftrain.cli.inspect import print_rows
    from vftrain.data import tokenize_dataset
    from vftrain.data.load import held_out_lines
    from vftrain.logging import quiet_progress_bars

    quiet_progress_bars()
    n, tokenizer = inspect_setup(model, config, n_text, "rows")
    raw_train, raw_eval, sample_rows = training_split(config)
    rows, report = tokenize_dataset(raw_train, tokenizer, config.max_seq_len, config.long_rows,
                                    config.dataset_num_proc, "train", config.split_turns)
    print_rows(rows, report, tokenizer, n, as_json, held_out_lines(config, raw_eval, len(sample_rows)))
    return 0


def training_split(config):
    """(training rows, held-out rows or None, rows the sample panels hold out) of the config's dataset, split as the
    trainers split it: what `--inspect` shows is what trains."""
    from vftrain.data.load import raw_splits
    from vftrain.sampling import held_out_samples

    raw_train, raw_eval = raw_splits(None, None, config)
    sample_rows = []
    if config.sample_every_n_steps:
        sample_rows, raw_train = held_out_samples(raw_train, raw_eval, config.num_samples)
    return raw_train, raw_eval, sample_rows


def print_help(section: str = "sft", usage: str = USAGE) -> None:
    """The usage text and every field of the [section] table with its default and help (from the cached field
    table: no torch import, so --help answers at once)."""
    from vftrain.cli.fields import field_table

    print(usage)
    print(field_table(section)["help"])


if __name__ == "__main__":
    sys.exit(main())
