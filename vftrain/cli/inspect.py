"""`--inspect N`: show rows exactly as they will be trained, without loading the model or training.

Rows are labelled by their dataset row, the number the drop messages use. On a terminal trained tokens are green;
into a pipe or file, where colour is lost, they stand between `[[` and `]]`, and no line is wrapped (a wrapped line
would show a line break that is not in the tokens).
"""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.text import Text

OPEN, CLOSE = "[[", "]]"


def print_rows(rows, report, tokenizer, n: int, as_json: bool, held_out: list[str] = ()) -> None:
    """The first `n` tokenized rows: JSON lines on stdout, or the text with its trained tokens marked, plus stats
    (and `held_out`: the lines saying which rows are held out of training)."""
    stats = [*held_out, *report.lines()]
    count = min(n, len(rows))
    if as_json:
        for i in range(count):
            ids, mask = rows[i]
            print(json.dumps({"row": int(rows.sources[i]), "input_ids": ids.tolist(), "loss_mask": mask.tolist(),
                              "text": tokenizer.decode(ids.tolist())}))
        for line in stats:
            print(line, file=sys.stderr)
        return
    console = Console(highlight=False)
    titles = [f"dataset row {rows.sources[i]}: {len(rows[i][0])} tokens, {int(rows[i][1].sum())} trained"
              for i in range(count)]
    if not console.is_terminal:
        for i, title in enumerate(titles):
            print(f"--- {title}")
            print(plain_row(tokenizer, *(part.tolist() for part in rows[i])))
        print("--- masking statistics")
        print("\n".join(stats))
        print(f"trained tokens (loss computed on them) stand between {OPEN} and {CLOSE}, the rest is context only; "
              "--json gives the exact input_ids and loss_mask of each row")
        return
    for i, title in enumerate(titles):
        console.rule(title)
        console.print(render_row(tokenizer, rows[i][0].tolist(), rows[i][1].tolist()), soft_wrap=True)
    console.rule("masking statistics")
    for line in stats:
        console.print(line, soft_wrap=True)
    console.print("[bold green]green[/] = trained (loss computed on it), [dim]dim[/] = context only; --json gives "
                  "the exact input_ids and loss_mask")


def render_row(tokenizer, ids: list[int], mask: list[int]) -> Text:
    """Decoded tokens, trained ones green and bold; special tokens shown as they are written."""
    text = Text()
    for token, trained in zip(ids, mask):
        text.append(tokenizer.decode([token]), style="bold green" if trained else "dim")
    return text


def plain_row(tokenizer, ids: list[int], mask: list[int]) -> str:
    """The row's text with each run of trained tokens between OPEN and CLOSE."""
    out, inside = [], False
    for token, trained in zip(ids, mask):
        if bool(trained) != inside:
            out.append(OPEN if trained else CLOSE)
            inside = bool(trained)
        out.append(tokenizer.decode([token]))
    return "".join(out) + (CLOSE if inside else "")
