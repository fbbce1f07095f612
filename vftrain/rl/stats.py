"""What an RL run logs each logging step: rollout statistics (rewards, groups, lengths), per-token loss statistics
(importance ratio, masking, clipping, entropy, mismatch KL, KL to the reference) and where the time went. Token statistics accumulate
on the device (no host sync per micro-batch) and are reduced over processes at logging time, as `StepStats` does
for SFT."""

from __future__ import annotations

import time

import torch

from vftrain.loss import POLICY_STATS, TOKEN_COLUMNS
from vftrain.metrics import row_counts

_COL = {name: i for i, name in enumerate(TOKEN_COLUMNS + POLICY_STATS)}
_SUMS = ("loss_sum", "completion_tokens", "entropy", "ratio", "masked", "clipped", "mismatch_kl", "kl", "tokens",
         "attn_sq")


class RLStats:
    """Accumulates between logging steps; `pop(reduce)` -> (metrics, sum of squared row lengths) like StepStats."""

    def __init__(self, kl: bool = False):
        self.kl = kl  # log the KL to the reference (beta > 0)
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.extremes: dict[str, torch.Tensor] = {}
        self.rollouts: list[dict] = []
        self.timing = {"generate": 0.0, "score": 0.0, "sync": 0.0}
        self.beside: dict[str, float] = {}  # seconds spent beside training (rollouts sampled ahead)
        self.since = time.perf_counter()

    def add_tokens(self, loss_sum: torch.Tensor, stats: torch.Tensor, inputs: dict, labels: torch.Tensor) -> None:
        """One micro-batch: its summed loss and the per-token statistics of `loss.token_loss_sum`."""
        values = {"loss_sum": loss_sum.detach(), "completion_tokens": stats.shape[0], **row_counts(inputs, labels)}
        if stats.shape[0] and stats.shape[1] > _COL["kl"]:
            for name in ("entropy", "ratio", "masked", "clipped", "mismatch_kl", "kl"):
                values[name] = stats[:, _COL[name]].sum()
            ratio = stats[:, _COL["ratio"]]
            self._extreme("ratio_min", ratio.min(), torch.minimum)
            self._extreme("ratio_max", ratio.max(), torch.maximum)
        for key, value in values.items():
            value = torch.as_tensor(value, dtype=torch.float64).detach()
            current = self.sums.get(key)
            self.sums[key] = value.to(current.device) + current if current is not None else value

    def _extreme(self, key: str, value: torch.Tensor, pick) -> None:
        value = value.detach().double()
        current = self.extremes.get(key)
        self.extremes[key] = value if current is None else pick(current, value)

    def add_rollouts(self, metrics: dict) -> None:
        """One step's rollout statistics, already over all processes."""
        self.rollouts.append(metrics)

    def add_timing(self, beside: bool = False, **seconds: float) -> None:
        """Seconds the step spent outside training, or, `beside`, on another thread while it trained (logged under
        the same names, not taken off time/train)."""
        timing = self.beside if beside else self.timing
        for key, value in seconds.items():
            timing[key] = timing.get(key, 0.0) + value

    def pop(self, reduce=lambda t, op="sum": t) -> tuple[dict, float]:
        out: dict = {}
        if self.rollouts:
            for key in dict.fromkeys(k for r in self.rollouts for k in r):  # a step that reuses rollouts logs few
                values = [r[key] for r in self.rollouts if key in r]
                out[key] = max(values) if key.endswith("_max") else sum(values) / len(values)
        attn_sq = 0.0
        if self.sums:
            keys = [k for k in _SUMS if k in self.sums]
            device = next(iter(self.sums.values())).device
            s = dict(zip(keys, reduce(torch.stack([self.sums[k].to(device) for k in keys])).tolist()))
            n = max(s.get("completion_tokens", 0), 1)
            for name in ("entropy", "ratio", "mismatch_kl") + (("kl",) if self.kl else ()):
                if name in s:
                    out[name if name != "ratio" else "importance_ratio"] = s[name] / n
            for name in ("masked", "clipped"):
                if name in s:
                    out[f"{name}_frac"] = s[name] / n
            out["trained_tokens"] = int(s.get("completion_tokens", 0))
            out["tokens"] = int(s.get("tokens", 0))
            attn_sq = s.get("attn_sq", 0.0)
        for key, op in (("ratio_min", "min"), ("ratio_max", "max")):
            if key in self.extremes:
                out[f"importance_{key}"] = float(reduce(self.extremes[key].reshape(1), op)[0])
        wall = time.perf_counter() - self.since
        out.update({f"time/{k}": self.timing.get(k, 0.0) + self.beside.get(k, 0.0)
                    for k in dict.fromkeys([*self.timing, *self.beside])})
        out["time/train"] = max(wall - sum(self.timing.values()), 0.0)
        self._reset()
        return out, attn_sq
