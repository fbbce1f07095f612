"""Stage 1: load rows (hub name, local file or folder, or a ready `datasets.Dataset`), detect their format, and
split off the held-out rows (eval_dataset, eval_split or an eval_size cut)."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

from vftrain.errors import ConfigError, DataError

# Formats, in the order they are recognised from the column names.
FORMATS = {
    "tokenized": ("input_ids",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "text": ("text",),
}
# Other projects' formats, named with the mapping to ours (Axolotl / LLaMA-Factory datasets are often in them).
_FOREIGN_FORMATS = (
    (("conversations",), " (ShareGPT's conversations: map each {from, value} to {role, content} in a messages column, "
                         "human -> user, gpt -> assistant)"),
    (("instruction", "output"), " (Alpaca's: map instruction and input to prompt, output to completion)"),
    (("question", "answer"), " (question / answer rows are RL's; for SFT map them to prompt and completion)"),
)
FILE_SPLIT = "train"  # the one split of a single file (datasets.load_dataset's name for data_files=path)
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(source: Any, split: str):
    """Return the `split` of `source` as a `datasets.Dataset`.

    `source` is a `Dataset` (returned as is), a `DatasetDict` (its `split`), a local file (jsonl, json, parquet,
    csv: it holds one split, 'train', as `datasets.load_dataset` names it), a local folder (split files found by
    name, e.g. `train.jsonl`, `test.jsonl`; a DatasetDict's `save_to_disk` folder; a Dataset's, as one file), or a
    hub dataset name. A split the source does not have is a DataError naming the ones it has (a file's only split
    once answered any name, so `eval_split = "test"` on one file evaluated the training rows and called them held
    out).
    """
    import datasets

    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, datasets.DatasetDict):
        return _pick_split(source, split, "the DatasetDict")
    if isinstance(source, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise DataError("a streaming dataset (IterableDataset) is not supported: vftrain tokenizes and plans the "
                        "whole split before training; load it without streaming=True")
    if not isinstance(source, str) or not source:
        shown = repr(source) if len(repr(source)) < 80 and "\n" not in repr(source) else type(source).__name__
        raise DataError(f"dataset = {shown} is not a dataset name, path or datasets.Dataset (one split: a dict of "
                        "several is not taken)")
    if os.path.isfile(source):
        builder = _FILE_BUILDERS.get(os.path.splitext(source)[1].lower())
        if builder is None:
            raise DataError(f"dataset file {source!r} has an unsupported extension; use one of "
                            + ", ".join(_FILE_BUILDERS))
        _only_train_split(f"dataset file {source!r}", split)
        return _load_file(source, builder, split)
    if os.path.isfile(os.path.join(source, datasets.config.DATASET_STATE_JSON_FILENAME)):
        # a Dataset's save_to_disk folder, which load_dataset refuses ("use load_from_disk"): one split, as a file
        _only_train_split(f"dataset folder {source!r} (a saved Dataset)", split)
        return datasets.load_from_disk(source)
    if os.path.isdir(source):
        return _pick_split(_load(source), split, f"folder {source!r}")
    if source.startswith((".", "/")) or source.endswith(tuple(_FILE_BUILDERS)):
        raise DataError(f"dataset path {source!r} does not exist")
    return _pick_split(_load(source), split, f"hub dataset {source!r}")


def _only_train_split(what: str, split: str) -> None:
    if split != FILE_SPLIT:
        raise DataError(f"{what} holds one split, {FILE_SPLIT!r}, not {split!r}: cut held-out rows from it with "
                        "eval_size (a fraction or a number of rows), or point dataset at a folder holding "
                        f"{FILE_SPLIT}.jsonl and {split}.jsonl")


def _load(*args, **kwargs):
    import datasets

    what = repr(next(iter(kwargs["data_files"].values())) if "data_files" in kwargs else args[0])
    try:
        return datasets.load_dataset(*args, **kwargs)
    except StopIteration:  # datasets' JSON builder on an empty file of a folder
        raise DataError(f"could not load dataset {what}: a data file is empty") from None
    except (FileNotFoundError, ValueError, ConnectionError, OSError, datasets.exceptions.DatasetGenerationError) as exc:
        cause = exc.__cause__ if isinstance(exc, datasets.exceptions.DatasetGenerationError) and exc.__cause__ else exc
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise DataError(f"could not load dataset {what}: {first}") from exc


def _load_file(path: str, builder: str, split: str):
    if _is_blank(path):
        raise DataError(f"dataset file {path!r} is empty")
    json_log = logging.getLogger("datasets.packaged_modules.json.json")
    quiet, json_log.disabled = json_log.disabled, True  # its "Failed to load JSON" line would precede our error
    try:
        return _load(builder, data_files={split: path}, split=split)
    except DataError:
        if builder == "json":
            _raise_on_malformed_json(path)  # names the line; datasets' message does not
        raise
    finally:
        json_log.disabled = quiet


def _is_blank(path: str) -> bool:
    with open(path, "rb") as fh:
        return not any(chunk.strip() for chunk in iter(lambda: fh.read(1 << 16), b""))


def _raise_on_malformed_json(path: str) -> None:
    """DataError naming the first line of `path` that is not JSON (one document, or one per line); else return."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    if text.lstrip().startswith("["):
        documents = [(1, text)]  # one JSON array: the decoder counts lines itself
    else:
        documents = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    for number, document in documents:
        try:
            json.loads(document)
        except json.JSONDecodeError as exc:
            line = number + exc.lineno - 1
            raise DataError(f"dataset file {path!r} line {line} is not valid JSON ({exc.msg}, column "
                            f"{exc.colno})") from None


def cut_eval(rows, size: float, seed: int) -> tuple[Any, Any]:
    """(train rows, eval rows): `size` rows (an integer >= 1) or that fraction (in (0, 1)) of `rows` cut out at
    random as a held-out split, the same rows for the same seed (datasets' `train_test_split`, as TRL users split
    one file; Axolotl's `val_set_size` reads the same two forms). Logged with both row counts."""
    count = int(size) if size >= 1 else math.ceil(size * len(rows))  # train_test_split rounds a fraction up
    if not 1 <= count < len(rows):
        raise DataError(f"eval_size = {size!r} would hold out {count} of the {len(rows)} training rows; use a "
                        f"fraction in (0, 1) or a number of rows from 1 to {len(rows) - 1}")
    parts = rows.train_test_split(test_size=int(size) if size >= 1 else size, seed=seed, shuffle=True)
    logging.getLogger("vftrain").info("eval_size = %s: %d of %d training rows held out as the eval split (random, "
                                      "seed %d); %d left to train on", size, len(parts["test"]), len(rows), seed,
                                      len(parts["train"]))
    return parts["train"], parts["test"]


def _pick_split(dataset_dict, split: str, what: str):
    if split not in dataset_dict:
        raise DataError(f"{what} has no split {split!r}; available: {', '.join(dataset_dict)}")
    return dataset_dict[split]


def plain_row(row: dict, features) -> dict:
    """`row` (as `datasets` decodes it) with what Arrow added removed: a struct column holds the union of every
    row's keys, filling the ones a row lacks with None, so a tool call `{"city": "Paris"}` comes back as
    `{"city": "Paris", "unit": None}` (Dataset.from_list, parquet, every hub dataset). Keys whose value is None are
    dropped at every struct level. Within a struct a null the user wrote cannot be told from an absent key (and
    key order follows the column's schema), so it is dropped too; values stored as JSON strings (or the `Json`
    feature that `load_dataset("json")` infers for mixed structs) are kept exactly, nulls included."""
    return {k: _without_struct_nulls(v, features.get(k)) for k, v in row.items()}


def _without_struct_nulls(value: Any, feature: Any) -> Any:
    if isinstance(feature, dict) and isinstance(value, dict):
        return {k: _without_struct_nulls(v, feature.get(k)) for k, v in value.items() if v is not None}
    inner = getattr(feature, "feature", None)  # List / LargeList / Sequence of something
    if inner is not None and isinstance(value, list):
        return [_without_struct_nulls(v, inner) for v in value]
    return value


def float_arguments(features) -> list[str]:
    """Fields of tool-call `arguments` stored in struct columns as floats. Arrow gives a field one type over all
    rows, so where one row has 10 and another 0.5 the 10 is read back as 10.0, and trains so (JSON files keep
    numbers as written: datasets' `Json` feature)."""
    found: list[str] = []

    def walk(feature, path: str, in_arguments: bool) -> None:
        if isinstance(feature, dict):
            for key, inner in feature.items():
                walk(inner, f"{path}.{key}", in_arguments or key == "arguments")
        elif getattr(feature, "feature", None) is not None:
            walk(feature.feature, path, in_arguments)
        elif in_arguments and str(getattr(feature, "dtype", "")).startswith("float"):
            found.append(path.split(".arguments.", 1)[-1])

    for column, feature in (features or {}).items():
        walk(feature, column, False)
    return sorted(set(found))


def detect_format(columns: list[str]) -> str:
    """Name of the row format that `columns` support, or a DataError listing what is accepted."""
    for name, needed in FORMATS.items():
        if all(c in columns for c in needed):
            return name
    accepted = "; ".join(" + ".join(cols) for cols in FORMATS.values())
    hint = next((h for needed, h in _FOREIGN_FORMATS if all(c in columns for c in needed)), "")
    raise DataError(f"dataset has columns {sorted(columns)} but none of the accepted formats: {accepted}{hint}")


def _raw(dataset, source, split, what):
    if dataset is None and source is None:
        raise ConfigError(f"no {what} data: pass {what}_dataset= or set dataset in the config")
    return load_rows(dataset if dataset is not None else source, split)


def raw_splits(train_dataset, eval_dataset, args):
    """(training rows, held-out rows or None): `eval_dataset`, else `eval_split` of `dataset`, else `eval_size`
    rows cut from the training rows. Shared by the trainers and `vf-sft --inspect`."""
    raw_train, raw_eval = _splits(train_dataset, eval_dataset, args)
    strategy = getattr(args.eval_strategy, "value", args.eval_strategy)
    if raw_eval is None and strategy != "no":  # transformers' own refusal is a traceback in Trainer.__init__
        raise ConfigError(f"eval_strategy = {strategy!r} needs held-out rows to evaluate: set eval_split (a split "
                          "of dataset) or eval_size (rows cut from the training split), pass eval_dataset= "
                          "(Python API), or set eval_strategy = 'no'")
    return raw_train, raw_eval


def _splits(train_dataset, eval_dataset, args):
    raw_train = _raw(train_dataset, args.dataset, args.dataset_split, "train")
    if eval_dataset is None and args.eval_split and not args.dataset:
        raise ConfigError(f"eval_split = {args.eval_split!r} names a split of dataset, which is not set; with "
                          "train_dataset= pass eval_dataset= or set eval_size")
    if eval_dataset is not None or args.eval_split:
        if args.eval_size is not None and eval_dataset is not None:
            raise ConfigError("eval_size cuts held-out rows from the training rows, but eval_dataset was passed "
                              "too; pass one")
        return raw_train, _raw(eval_dataset, args.dataset, args.eval_split, "eval")
    if args.eval_size is not None:
        return cut_eval(raw_train, args.eval_size, data_seed(args))
    return raw_train, None


def data_seed(args) -> int:
    """The seed of everything random about the data (held-out cut, epoch order): data_seed, else seed."""
    return args.data_seed if args.data_seed is not None else args.seed


def held_out_lines(args, raw_eval, sample_rows: int) -> list[str]:
    """The data report's lines for rows taken out of the training split before it was counted: the eval_size
    cut, and the sample panels' rows when there is no held-out split to take them from."""
    lines = []
    if args.eval_size is not None and raw_eval is not None:
        lines.append(f"{len(raw_eval):,} rows held out of training as the eval split (eval_size = "
                     f"{args.eval_size})")
    if sample_rows and (raw_eval is None or not len(raw_eval)):
        lines.append(f"{sample_rows:,} rows held out of training for the sample panels (the split's last "
                     "num_samples: no eval_split or eval_size to take them from)")
    return lines
