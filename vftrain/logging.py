"""Run output: vftrain's log lines through Rich, and every logged metric appended to metrics.jsonl."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys

from rich.console import Console
from rich.logging import RichHandler
from transformers import TrainerCallback


def setup_console_logging(level: int = logging.INFO) -> None:
    """Route the `vftrain` logger to stdout: through Rich on a terminal, as plain unwrapped lines into a file or pipe
    (Rich would wrap them at 80 columns there, splitting a value from its name). transformers/datasets stay at
    warning level. Processes other than the launch's first (RANK > 0 under torchrun / accelerate) show warnings and
    errors only."""
    logger = logging.getLogger("vftrain")
    for old in [h for h in logger.handlers if getattr(h, "vftrain_console", False)]:
        logger.removeHandler(old)  # a second call (tests, notebooks) may find another stdout
    if Console().is_terminal:
        handler = RichHandler(show_path=False, show_time=False, markup=False)
    else:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(levelname)-8s %(message)s"))
    handler.vftrain_console = True
    logger.addHandler(handler)
    logger.setLevel(level if os.environ.get("RANK", "0") == "0" else max(level, logging.WARNING))
    logger.propagate = False
    import transformers

    transformers.logging.set_verbosity_warning()
    quiet_progress_bars()


def console_unless_configured() -> None:
    """The CLI's console output for a Python API run whose program set up no logging (no handler on the `vftrain` or
    the root logger): the data report (rows kept and dropped, held-out lines) is what the README promises is
    printed, and at INFO it would go nowhere."""
    if not logging.getLogger("vftrain").handlers and not logging.getLogger().handlers:
        setup_console_logging()


def quiet_progress_bars() -> None:
    """No tqdm bars (loading weights, tokenizing, writing shards) when stderr is a file or pipe: there each redraw is
    glued to the last with a carriage return, and the README promises one line per step."""
    if sys.stderr.isatty():
        return
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


class LogAtSaves(TrainerCallback):
    """Logs the steps since the last logging step whenever a checkpoint is saved: a run resumed from it starts a
    new window, and the old one's metrics (every rollout's reward in RL) were lost."""

    def on_step_end(self, args, state, control, **kwargs):
        control.should_log = control.should_log or control.should_save

    on_epoch_end = on_step_end


class MetricsFileCallback(TrainerCallback):
    """Appends one JSON object per logging event (with `step`) to `<output_dir>/metrics.jsonl`, main process only.

    The file is opened per write, so a killed run leaves every line it logged, and a resumed run continues it
    (`checkpoint.start_run` first drops the lines after the checkpoint it resumes from).
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        record = {"step": state.global_step, **{k: _plain(v) for k, v in logs.items()}}
        with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as fh:
            fh.write(json.dumps(record) + "\n")


HELD_OUT = re.compile(r"^held_out-step(\d+)\.json$")  # write_held_out's files, one per evaluated step


def write_held_out(run_dir: str, step: int, result: dict) -> str:
    """`<run_dir>/held_out-step<step>.json`: a held-out evaluation's accuracy and every greedy generation."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, f"held_out-step{step}.json")
    # RL adds the run's reward functions' score ("reward", weighted as in training; "reward_funcs", each one's mean)
    reward = {k: result[k] for k in ("reward", "reward_funcs") if k in result}
    record = {"step": step, "accuracy": result["accuracy"], "rows": result["n"], "scored_by": "exact_match",
              **reward, "generations": result["generations"]}
    with open(path, "w") as fh:
        json.dump(record, fh, indent=1)
    return path


def trim_log(path: str, step: int) -> None:
    """Keep only the lines of a JSON-lines log (metrics.jsonl, rollouts.jsonl) logged at `step` or before: a run
    resumed from that step's checkpoint logs the later steps again, and the files, summary and plot must show each
    step once."""
    if not os.path.exists(path):
        return
    with open(path) as fh:
        lines = [line for line in fh if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) < len(lines):
        with open(path + ".tmp", "w") as fh:
            fh.writelines(kept)
        os.replace(path + ".tmp", path)


def _plain(value):
    """A JSON value: NaN and infinity (a skipped step's loss) are null, which strict JSON readers accept."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


# Panels of training_curves.png: (title, ((metrics.jsonl key, legend label), ...), y axis from zero). A key ending in
# "/*" stands for every key under it (RL's reward per function, drawn when there are several). RL panels are those
# an RL user reads first: reward, completion length, groups with no signal, entropy, KL and the importance ratio.
CURVES = (("loss", (("loss", "train"), ("eval_loss", "eval")), False),
          ("token accuracy", (("token_accuracy", None),), False),
          ("reward", (("reward", "rollouts"), ("eval/reward", "held-out"), ("reward/*", None)), False),
          ("completion length (tokens)", (("completion_len", "mean"), ("completion_len_max", "max")), True),
          ("frac_reward_zero_std", (("frac_reward_zero_std", None),), True),
          ("entropy", (("entropy", None),), True),
          ("KL", (("kl", "to the start model"), ("mismatch_kl", "sampler mismatch")), True),
          ("importance ratio", (("importance_ratio", "mean"), ("importance_ratio_min", "min"),
                                ("importance_ratio_max", "max")), False),
          ("tokens / s", (("tokens_per_second", None),), True))


class RunSummaryCallback(TrainerCallback):
    """At the end of training (main process): a summary table on the console and
    `<output_dir>/training_curves.png` (loss, accuracy, eval reward, throughput over steps)."""

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        records = read_metrics(os.path.join(args.output_dir, "metrics.jsonl"))
        if not records:
            return
        print_summary(records, state.global_step)
        plot_curves(records, os.path.join(args.output_dir, "training_curves.png"))


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def print_summary(records: list[dict], steps: int) -> None:
    from rich.table import Table

    table = Table(title=f"vftrain: {steps} optimizer steps")
    table.add_column("metric")
    table.add_column("first", justify="right")
    table.add_column("last", justify="right")
    for key in ("loss", "token_accuracy", "eval_loss", "reward", "frac_reward_zero_std", "completion_len",
                "eval/reward", "grad_norm", "tokens_per_second", "mfu", "peak_memory_gib"):
        values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
        if values:
            table.add_row(key, f"{values[0]:.4g}", f"{values[-1]:.4g}")
    if table.row_count:
        Console().print(table)


def curve_panels(records: list[dict]) -> list[tuple[str, list[tuple[str | None, list]]]]:
    """The panels of CURVES that have data: (title, [(label, [(step, value), ...]), ...])."""
    panels = []
    for title, series, _ in CURVES:
        lines = []
        for key, label in series:
            if key.endswith("/*"):
                keys = sorted({k for r in records for k in r if k.startswith(key[:-1])})
                expanded = [(k, k[len(key) - 1:]) for k in keys] if len(keys) > 1 else []
            else:
                expanded = [(key, label)]
            lines += [(name, [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))])
                      for k, name in expanded]
        lines = [line for line in lines if line[1]]
        if lines:
            panels.append((title, lines))
    return panels


def plot_curves(records: list[dict], path: str) -> str | None:
    """Write the curves that have data to `path`; returns the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.getLogger("vftrain").info("matplotlib not installed: no training_curves.png "
                                          "(pip install 'vftrain[plots]')")
        return None
    panels = curve_panels(records)
    if not panels:
        return None
    cols = min(len(panels), 4)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.remove()
    from_zero = {title for title, _, zero in CURVES if zero}
    for ax, (title, lines) in zip(axes.flat, panels):
        for label, points in lines:
            ax.plot([s for s, _ in points], [v for _, v in points], marker="." if len(points) < 30 else None,
                    label=label)
        if any(label for label, _ in lines):
            ax.legend()
        if title in from_zero:  # a 31k-37k wobble in tokens/s must not look like a collapse
            ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


_SHORT = (("loss", "loss", "{:.4f}"), ("eval_loss", "eval", "{:.4f}"), ("token_accuracy", "acc", "{:.3f}"),
          ("reward", "reward", "{:.3f}"), ("frac_reward_zero_std", "frac_reward_zero_std", "{:.2f}"),
          ("completion_len", "len", "{:.1f}"), ("eval/reward", "eval reward", "{:.3f}"), ("learning_rate", "lr", "{:.2e}"), ("grad_norm", "gnorm", "{:.3g}"),
          ("tokens_per_second", "tok/s", "{:,.0f}"), ("mfu", "mfu", "{:.1%}"), ("peak_memory_gib", "mem", "{:.1f}G"))


class RichProgressCallback(TrainerCallback):
    """A Rich progress bar with ETA and one compact line per logging step (replaces transformers' tqdm bar
    and its dict printing); main process only."""

    def __init__(self):
        self.progress = None
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or args.disable_tqdm:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("eta"), TimeRemainingColumn(), transient=True)
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        line = format_metrics(state.global_step, state.max_steps, logs)
        if line:
            if self.progress is not None:
                self.progress.console.print(line, soft_wrap=True)  # one line, also into a file (no 80-column wrap)
            else:
                print(line)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def format_metrics(step: int, max_steps: int, logs: dict) -> str:
    """'step 100/1000 | loss 2.2510 | acc 0.440 | lr 3.00e-03 | tok/s 83,050' from whichever keys are present."""
    parts = [f"{label} {fmt.format(logs[key])}" for key, label, fmt in _SHORT
             if isinstance(logs.get(key), (int, float))]
    return f"step {step}/{max_steps} | " + " | ".join(parts) if parts else ""
