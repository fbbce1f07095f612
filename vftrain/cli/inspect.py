"""`--inspect N`: show rows exactly as they will be trained, without loading the model or training."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.text import Text


def print_rows(rows, report, tokenizer, n: int, as_json: bool) -> None:
    """The first `n` tokenized rows: JSON lines on stdout, or coloured text (trained tokens green) plus stats."""
    count = min(n, len(rows))
    if as_json:
        for i in range(count):
            ids, mask = rows[i]
            print(json.dumps({"input_ids": ids.tolist(), "loss_mask": mask.tolist(),
                              "text": tokenizer.decode(ids.tolist())}))
        for line in report.lines():
            print(line, file=sys.stderr)
        return
    console = Console(highlight=False)
    for i in range(count):
        ids, mask = rows[i]
        console.rule(f"row {i}: {len(ids)} tokens, {int(mask.sum())} trained")
        console.print(render_row(tokenizer, ids.tolist(), mask.tolist()))
    console.rule("masking statistics")
    for line in report.lines():
        console.print(line)
    console.print("[bold green]green[/] = trained (loss computed on it), [dim]dim[/] = context only")


def render_row(tokenizer, ids: list[int], mask: list[int]) -> Text:
    """Decoded tokens, trained ones green and bold; special tokens shown as they are written."""
    text = Text()
    for token, trained in zip(ids, mask):
        piece = tokenizer.decode([token])
        text.append(piece, style="bold green" if trained else "dim")
    return text
