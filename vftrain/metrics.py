"""Training statistics accumulated on the device between logging steps (no host sync per micro-batch)."""

from __future__ import annotations

import torch


class StepStats:
    """Sums of per-micro-batch counters; `pop(reduce)` returns the logged values and resets."""

    KEYS = ("loss_sum", "correct", "trained_tokens", "tokens", "slots")

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, **values: torch.Tensor | int | float) -> None:
        for key, value in values.items():
            value = torch.as_tensor(value, dtype=torch.float64).detach()
            current = self.sums.get(key)
            self.sums[key] = value.to(current.device) + current if current is not None else value

    def pop(self, reduce=lambda t: t) -> dict[str, float]:
        """Metrics since the last call. `reduce` sums a stacked tensor over processes (e.g. accelerator.reduce)."""
        if not self.sums:
            return {}
        keys = [k for k in self.KEYS if k in self.sums]
        device = next(iter(self.sums.values())).device
        totals = reduce(torch.stack([self.sums[k].to(device) for k in keys])).tolist()
        self.sums = {}
        s = dict(zip(keys, totals))
        out = {}
        if s.get("trained_tokens"):
            out["token_accuracy"] = s["correct"] / s["trained_tokens"]
            out["trained_tokens"] = int(s["trained_tokens"])
        if s.get("tokens"):
            out["tokens"] = int(s["tokens"])
            out["trained_fraction"] = s.get("trained_tokens", 0) / s["tokens"]
        if s.get("slots"):
            out["padding_efficiency"] = s["tokens"] / s["slots"]
        return out
