"""Stage 3: render every row (in parallel through `datasets.map`), apply the long-row policy, drop rows that
cannot be trained, and keep the result in flat numpy buffers (a row is a slice, so millions of rows cost two
integer arrays rather than millions of Python lists). Counts of everything dropped are reported before training.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter

import numpy as np

from vftrain.data.load import detect_format, float_arguments, plain_row
from vftrain.data.render import Renderer, RowError
from vftrain.errors import DataError

log = logging.getLogger("vftrain")


@dataclasses.dataclass
class DataReport:
    """What the data path did to the rows: kept, truncated, dropped (by reason, with a first example)."""

    format: str
    rows_in: int
    rows_kept: int = 0
    truncated: int = 0
    dropped: dict = dataclasses.field(default_factory=dict)  # reason -> (count, first row index)
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0
    split: int = 0  # conversations trained in several rows (split_turns), the rows and tokens that added
    split_rows: int = 0
    split_tokens: int = 0

    def lines(self) -> list[str]:
        share = self.trained_tokens / max(self.tokens, 1)
        out = [f"{self.rows_kept:,} rows kept from {self.rows_in:,} dataset rows ({self.format} format); "
               f"{self.tokens:,} tokens, {self.trained_tokens:,} trained ({share:.1%}); "
               f"longest row {self.longest:,} tokens"]
        if self.split:
            out.append(f"{self.split:,} conversations split into one row per turn the template renders differently "
                       f"later (split_turns): +{self.split_rows:,} rows, +{self.split_tokens:,} tokens")
        if self.truncated:
            out.append(f"{self.truncated:,} rows truncated to max_seq_len")
        for reason, (count, first) in sorted(self.dropped.items(), key=lambda kv: -kv[1][0]):
            out.append(f"{count:,} rows dropped: {reason} (first: row {first})")
        return out


class TokenizedRows:
    """Rows as slices of one token buffer and one mask buffer; `rows[i]` -> (input_ids, loss_mask) arrays."""

    def __init__(self, tokens: np.ndarray, masks: np.ndarray, offsets: np.ndarray):
        self.tokens, self.masks, self.offsets = tokens, masks, offsets
        self.lengths = np.diff(offsets)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.tokens[a:b], self.masks[a:b]

    @classmethod
    def from_lists(cls, rows: list[tuple[list[int], list[int]]]) -> "TokenizedRows":
        lengths = np.array([len(ids) for ids, _ in rows], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.fromiter((t for ids, _ in rows for t in ids), dtype=np.int64, count=int(offsets[-1]))
        masks = np.fromiter((m for _, mask in rows for m in mask), dtype=np.uint8, count=int(offsets[-1]))
        return cls(tokens, masks, offsets)


def tokenize_dataset(dataset, tokenizer, max_seq_len: int, long_rows: str = "drop", num_proc: int | None = None,
                     what: str = "train", split_turns: bool = True) -> tuple[TokenizedRows, DataReport]:
    """Render, tokenize and filter a `datasets.Dataset`; raise DataError if no row is left to train on."""
    fmt = detect_format(list(dataset.column_names))
    floats = float_arguments(dataset.features)
    if floats:
        log.warning("%s data: tool-call arguments %s are stored as floats (a struct column: parquet, or a Dataset "
                    "built in memory), so an integer written there trains as a float (10 -> 10.0); store arguments "
                    "as JSON strings to keep them as written", what, ", ".join(floats))
    rendered = _render_all(dataset, Renderer(tokenizer, fmt, split_turns), num_proc, what)
    report = DataReport(format=fmt, rows_in=len(dataset))
    kept, sources, errors, lost = [], [], Counter(), []
    first_error: dict[str, int] = {}
    for row in rendered:
        ids, mask, reason = row["input_ids"], row["loss_mask"], row["error"]
        if row["lost"] and not row["part"]:
            lost.append((row["index"], row["lost"]))
        if row["part"]:  # a further row of a split conversation
            report.split += row["part"] == 1
            report.split_rows += 1
            report.split_tokens += len(ids)
        if not reason:
            ids, mask, reason = _apply_length_policy(ids, mask, max_seq_len, long_rows, row["index"], report)
        if not reason and not any(mask[1:]):  # position 0 is never a prediction target
            reason = "no trained tokens"
        if reason:
            errors[reason] += 1
            first_error.setdefault(reason, row["index"])
            continue
        kept.append((ids, mask))
        sources.append(row["index"])
    report.dropped = {r: (n, first_error[r]) for r, n in errors.items()}
    if not kept:
        raise DataError(f"no {what} row is left to train on: " + "; ".join(report.lines()[1:]))
    if lost:
        log.warning("%s data: %s rows lose characters of their prompt that the tokenizer cannot encode: %r "
                    "(first: row %d); the model never sees them", what, f"{len(lost):,}",
                    "".join(sorted({c for _, chars in lost for c in chars})), lost[0][0])
    rows = TokenizedRows.from_lists(kept)
    rows.sources = np.array(sources, dtype=np.int64)  # the dataset row of each kept row, as drop messages count
    report.rows_kept, report.tokens = len(rows), int(rows.offsets[-1])
    report.trained_tokens = int(sum(m[1:].sum() for _, m in (rows[i] for i in range(len(rows)))))
    report.longest = int(rows.lengths.max())
    return rows, report


def _render_all(dataset, renderer: Renderer, num_proc: int | None, what: str):
    """One output row per training row (a split conversation gives several, numbered by `part`), or one with the
    reason it cannot be trained (`error`); `index` is the dataset row it came from."""
    columns = dataset.features

    def render(batch: dict, indices: list[int]) -> dict:
        out = {"input_ids": [], "loss_mask": [], "lost": [], "error": [], "index": [], "part": []}
        for k, index in enumerate(indices):
            try:
                parts, error = renderer(plain_row({c: batch[c][k] for c in batch}, columns)), ""
            except RowError as exc:
                parts, error = [{"input_ids": [], "loss_mask": []}], str(exc)
            for n, part in enumerate(parts):
                for key, value in (("input_ids", part["input_ids"]), ("loss_mask", part["loss_mask"]),
                                   ("lost", part.get("lost", "")), ("error", error), ("index", index), ("part", n)):
                    out[key].append(value)
        return out

    if num_proc is None and len(dataset) >= 20_000:  # chat templating is Python-bound: use the cores (torchtune#1097)
        num_proc = min(8, os.cpu_count() or 1)
    import datasets

    # Declared, not inferred: a batch of only failed rows would otherwise type input_ids as a list of nulls.
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int64")),
                                  "loss_mask": datasets.List(datasets.Value("int8")), "lost": datasets.Value("string"),
                                  "error": datasets.Value("string"),
                                  "index": datasets.Value("int64"), "part": datasets.Value("int32")})
    return dataset.map(render, batched=True, with_indices=True, remove_columns=list(dataset.column_names),
                       features=features, num_proc=num_proc if num_proc and num_proc > 1 else None,
                       desc=f"Tokenizing {what} rows")


def _apply_length_policy(ids, mask, max_seq_len: int, policy: str, index: int, report: DataReport):
    if len(ids) <= max_seq_len:
        return ids, mask, ""
    if policy == "error":
        raise DataError(f"row {index} has {len(ids)} tokens, more than max_seq_len = {max_seq_len} "
                        "(set long_rows = 'drop' or 'truncate', or raise max_seq_len)")
    if policy == "drop":
        return ids, mask, f"longer than max_seq_len ({max_seq_len})"
    report.truncated += 1
    return ids[:max_seq_len], mask[:max_seq_len], ""
