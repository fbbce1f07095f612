"""Stage 5: turn a micro-batch's rows into tensors.

Labels are shifted here, once, per row: `labels[t]` is the token the logits at position t must predict
(`input_ids[t+1]` where that token is trained, else -100), and the last position of every row is -100. The loss
then needs no shift, and in a packed micro-batch no position is ever asked to predict the first token of
the next row (the cross-row leak of trl#1230).
"""

from __future__ import annotations

import numpy as np
import torch

from vftrain.data.pack import split_by_tokens
from vftrain.data.render import IGNORE_INDEX  # noqa: F401  (shared by SFT and RL losses, and by transformers' own)


def shifted_labels(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-position targets of one row: next token where it is trained, IGNORE_INDEX elsewhere."""
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(mask[1:] > 0, ids[1:], IGNORE_INDEX)
    return labels


def trained_index(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Where the loss looks, computed here on the CPU so the training step needs no host sync to find it:
    `trained_positions`, the sequence positions (dim 1) where any row has a target, and `trained_flat`, the
    entries of the flattened [batch, len(trained_positions)] grid that are real targets."""
    positions = (labels != IGNORE_INDEX).any(dim=0).nonzero()[:, 0]
    flat = (labels[:, positions] != IGNORE_INDEX).reshape(-1).nonzero()[:, 0]
    return {"trained_positions": positions, "trained_flat": flat}


def shifted_values(values: np.ndarray) -> np.ndarray:
    """Per-token values (RL: sampler logprob, advantage; [len] or [len, k]) aligned with `shifted_labels`: position
    t carries the value of token t + 1, the token its logits predict."""
    out = np.zeros_like(values)
    out[:-1] = values[1:]
    return out


def collate_packed(rows: list[tuple[np.ndarray, ...]]) -> dict[str, torch.Tensor]:
    """Rows concatenated into one sequence of shape [1, total]; `position_ids` restart at 0 for every row, which
    is how transformers' SDPA/eager masks know where each row's attention must stop. `cu_seq_lens_*` and
    `max_length_*` (transformers' names for varlen kernels) carry the same boundaries without a host sync.

    Rows are (input_ids, loss_mask) or, for RL, (input_ids, loss_mask, *per-token values): the values come out as
    `token_values` [1, total, k] (float32), shifted like the labels."""
    ids = np.concatenate([r[0] for r in rows])
    labels = np.concatenate([shifted_labels(r[0], r[1]) for r in rows])
    lengths = np.array([len(r[0]) for r in rows])
    positions = np.concatenate([np.arange(n) for n in lengths])
    cu = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    longest = int(lengths.max())
    labels = torch.from_numpy(labels)[None]
    batch = {
        "input_ids": torch.from_numpy(ids.astype(np.int64))[None],
        "position_ids": torch.from_numpy(positions.astype(np.int64))[None],
        "labels": labels, **trained_index(labels),
        "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
    }
    if len(rows[0]) > 2:
        values = np.concatenate([shifted_values(np.stack(r[2:], axis=-1)) for r in rows])
        batch["token_values"] = torch.from_numpy(values.astype(np.float32))[None]
    return batch


def collate_padded(rows: list[tuple[np.ndarray, ...]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows right-padded to the longest one: shape [len(rows), longest], with an attention mask (and, for RL
    rows, `token_values` [len(rows), longest, k] shifted like the labels)."""
    longest = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), longest), dtype=torch.long)
    values = torch.zeros((len(rows), longest, len(rows[0]) - 2), dtype=torch.float32)
    for i, (row_ids, mask, *extra) in enumerate(rows):
        n = len(row_ids)
        ids[i, :n] = torch.from_numpy(row_ids.astype(np.int64))
        labels[i, :n] = torch.from_numpy(shifted_labels(row_ids, mask))
        attention[i, :n] = 1
        if extra:
            values[i, :n] = torch.from_numpy(shifted_values(np.stack(extra, axis=-1)).astype(np.float32))
    batch = {"input_ids": ids, "attention_mask": attention, "labels": labels, **trained_index(labels)}
    if values.shape[-1]:
        batch["token_values"] = values
    return batch


class Collator:
    """Collates the rows of a micro-batch packed or padded. With a token budget (packing only), a micro-batch
    whose rows exceed it becomes `{"micro_batches": [...], "labels": ...}`: several packed forwards of at most
    `budget` tokens each, run back to back in the same accumulation slot (the trainer's `training_step`)."""

    def __init__(self, pad_id: int, packing: bool, budget: int | None = None):
        self.pad_id, self.packing, self.budget = pad_id, packing, budget

    def __call__(self, rows: list[tuple[np.ndarray, ...]]) -> dict:
        if not self.packing:
            return collate_padded(rows, self.pad_id)
        lengths = [len(r[0]) for r in rows]
        if self.budget is None or sum(lengths) <= self.budget:
            return collate_packed(rows)
        parts = [collate_packed([rows[i] for i in group]) for group in split_by_tokens(lengths, self.budget)]
        return {"micro_batches": parts, "labels": torch.cat([p["labels"] for p in parts], dim=1)}
