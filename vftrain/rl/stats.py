"""What an RL run logs each logging step: rollout statistics (rewards, groups, lengths), per-token loss statistics
(importance ratio, masking, clipping, entropy, mismatch KL, KL to the reference) and where the time went. Token statistics accumulate
on the device (no host sync per micro-batch) and are reduced over processes at logging time, as `StepStats` does
for SFT."""

from __future__ import annotations

import time

import numpy as np
import torch

from vftrain.loss import POLICY_STATS, TOKEN_COLUMNS
from vftrain.metrics import row_counts
from vftrain.rl.rollouts import rollout_metrics

_COL = {name: i for i, name in enumerate(TOKEN_COLUMNS + POLICY_STATS)}
_SUMS = ("loss_sum", "completion_tokens", "entropy", "ratio", "masked", "clipped", "mismatch_kl", "kl", "tokens",
         "attn_sq")


class RLStats:
    """Accumulates between logging steps; `pop(reduce)` -> (metrics, sum of squared row lengths) like StepStats."""

    def __init__(self, group_size: int, kl: bool = False):
        self.group_size, self.kl = group_size, kl  # kl: log the KL to the reference (beta > 0)
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.extremes: dict[str, torch.Tensor] = {}
        self.rollouts: list[tuple] = []  # each step's (rewards, rewards per function, advantages, samples)
        self.per_step: list[dict] = []  # values averaged over the window's steps
        self.timing = {"generate": 0.0, "score": 0.0, "sync": 0.0}
        self.beside: dict[str, float] = {}  # seconds spent beside training (rollouts sampled ahead)
        self.since = time.perf_counter()

    def restart_clock(self) -> None:
        """time/train counts from now (the first step's start)."""
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

    def add_rollouts(self, rewards, per_func: dict, advantages, samples: list) -> None:
        """One step's rollouts, already of all processes: the logged statistics are over every rollout of the
        logging window (a mean of per-step means would weigh a step whose function scored one completion as much
        as one where it scored all)."""
        self.rollouts.append((rewards, per_func, advantages, samples))

    def add_step_value(self, **values: float) -> None:
        """Values of one step, logged as their mean over the window's steps."""
        self.per_step.append(values)

    def _rollout_metrics(self) -> dict:
        rewards, per_func, advantages, samples = zip(*self.rollouts)
        names = dict.fromkeys(k for step in per_func for k in step)  # an environment's functions may vary by task
        pooled = {k: np.concatenate([step.get(k, np.full(len(r), np.nan)) for step, r in zip(per_func, rewards)])
                  for k in names}
        return rollout_metrics(np.concatenate(rewards), pooled, np.concatenate(advantages),
                               [s for step in samples for s in step], self.group_size)

    def add_timing(self, beside: bool = False, **seconds: float) -> None:
        """Seconds the step spent outside training, or, `beside`, on another thread while it trained (logged under
        the same names, not taken off time/train)."""
        timing = self.beside if beside else self.timing
        for key, value in seconds.items():
            timing[key] = timing.get(key, 0.0) + value

    def pop(self, reduce=lambda t, op="sum": t) -> tuple[dict, float]:
        out: dict = {}
        if self.rollouts:
            out.update(self._rollout_metrics())
        for key in dict.fromkeys(k for r in self.per_step for k in r):
            values = [r[key] for r in self.per_step if key in r]
            out[key] = sum(values) / len(values)
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
