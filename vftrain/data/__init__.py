"""The data path, one module per stage: load -> render (chat template + loss mask) -> tokenize -> pack -> collate.

`load_rows` is the first stage, `prepare_rows` the next two (for a trainer's split); `pack` and `collate` run inside
the data loader.
"""

from __future__ import annotations

from vftrain.data.load import load_rows
from vftrain.data.tokenize import DataReport, TokenizedRows, tokenize_dataset


def prepare_rows(rows, tokenizer, args, what: str) -> tuple[TokenizedRows, DataReport]:
    """Render, tokenize and filter the rows (a `datasets.Dataset`) of one split, `what` ("train", "eval"), as the
    config says."""
    return tokenize_dataset(rows, tokenizer, args.max_seq_len, args.long_rows, args.dataset_num_proc, what,
                            args.split_turns)


__all__ = ["DataReport", "TokenizedRows", "load_rows", "prepare_rows", "tokenize_dataset"]
