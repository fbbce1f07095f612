"""The data path, one module per stage: load -> render (chat template + loss mask) -> tokenize -> pack -> collate.

`prepare_rows` runs the first three stages for a trainer; `pack` and `collate` run inside the data loader.
"""

from __future__ import annotations

from vftrain.data.load import load_rows
from vftrain.data.tokenize import DataReport, TokenizedRows, tokenize_dataset


def prepare_rows(dataset, split: str, tokenizer, args, what: str) -> tuple[TokenizedRows, DataReport]:
    """Load (if `dataset` is a name or path), render, tokenize and filter one split."""
    rows = load_rows(dataset, split)
    return tokenize_dataset(rows, tokenizer, args.max_seq_len, args.long_rows, args.dataset_num_proc, what,
                            args.split_turns)


__all__ = ["DataReport", "TokenizedRows", "load_rows", "prepare_rows", "tokenize_dataset"]
