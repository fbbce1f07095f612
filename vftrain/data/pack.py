"""Stage 4: plan which rows go into which micro-batch. Pure functions over row lengths.

An optimizer step takes `batch_size` rows (the seed's meaning of batch_size, on any number of processes) and
splits them into `num_micro_batches` = gradient_accumulation_steps x world_size micro-batches:

- packing: rows are balanced by tokens over the micro-batches (longest row first into the lightest bin, the
  LPT rule, whose heaviest bin is within one row of the mean: Graham 1969), so every micro-batch carries about
  the same work and no tail is wasted on padding;
- padding: rows are sorted by length inside the step and cut into equal-count groups, so each micro-batch
  pads to a near neighbour.

The step's rows are the same either way, and the loss is normalised by the step's trained tokens, so the
update does not depend on how a step is split (tests/test_invariance.py).
"""

from __future__ import annotations

import heapq
from typing import Callable

import numpy as np


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of row indices that depends only on (seed, epoch): resuming replays the same order."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
    """Full steps in an epoch; the remainder rows (fewer than batch_size) wait for the next epoch's shuffle."""
    return num_rows // batch_size


def split_step(lengths: np.ndarray, rows: np.ndarray, num_micro_batches: int, packing: bool) -> list[list[int]]:
    """Split one step's `rows` (indices into `lengths`) into `num_micro_batches` lists of row indices."""
    if len(rows) < num_micro_batches:
        raise ValueError(f"{len(rows)} rows cannot fill {num_micro_batches} micro-batches")
    by_length = sorted(rows.tolist(), key=lambda r: (-int(lengths[r]), r))
    if not packing:
        per = len(rows) // num_micro_batches
        return [sorted(by_length[k * per:(k + 1) * per]) for k in range(num_micro_batches)]
    bins: list[list[int]] = [[] for _ in range(num_micro_batches)]
    heap = [(0, k) for k in range(num_micro_batches)]  # (tokens so far, bin)
    for r in by_length:
        tokens, k = heapq.heappop(heap)
        bins[k].append(r)
        heapq.heappush(heap, (tokens + int(lengths[r]), k))
    return [sorted(b) for b in bins]


def split_by_tokens(lengths: list[int], budget: int) -> list[list[int]]:
    """Best-fit decreasing: positions of `lengths` grouped so that no group exceeds `budget` tokens.

    Each row goes into the fullest group it still fits in (a new group if none), longest rows first; this
    leaves little unused budget per group (BFD uses at most 11/9 of the optimal number of groups + 1, Johnson
    1973). Rows longer than `budget` cannot occur: the config requires budget >= max_seq_len.
    """
    groups: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        fits = [g for g in range(len(groups)) if room[g] >= lengths[i]]
        if fits:
            g = min(fits, key=lambda k: room[k])
            groups[g].append(i)
            room[g] -= lengths[i]
        else:
            groups.append([i])
            room.append(budget - lengths[i])
    return [sorted(g) for g in groups]


def plan_epoch(lengths: np.ndarray, batch_size: int, num_micro_batches: int, packing: bool, seed: int,
               epoch: int) -> list[list[int]]:
    """All micro-batches of one epoch, step after step: micro-batch j of a step goes to process j % world_size."""
    order = epoch_order(len(lengths), seed, epoch)
    plan = []
    for s in range(steps_per_epoch(len(lengths), batch_size)):
        plan.extend(split_step(lengths, order[s * batch_size:(s + 1) * batch_size], num_micro_batches, packing))
    return plan


def eval_batches(lengths: np.ndarray, micro_batch_size: int, rank: int, world_size: int, lockstep: bool,
                 budget: int | None = None) -> tuple[list[list[int]], int]:
    """This process's evaluation micro-batches (runs of consecutive rows: at most `micro_batch_size` rows and, where
    set, `budget` tokens) and how many of the first ones count.

    Micro-batches go round-robin to the processes, each row to exactly one (accelerate's even-batch sharding would
    repeat rows so that every process gets as many, and the repeats would weigh in the eval loss). With
    `lockstep` (sharded weights: every process must take part in every forward) a process short of batches runs
    copies of the first one, which do not count.
    """
    everything, run, tokens = [], [], 0
    for i, n in enumerate(np.asarray(lengths).tolist()):
        if run and (len(run) == micro_batch_size or (budget is not None and tokens + n > budget)):
            everything.append(run)
            run, tokens = [], 0
        run.append(i)
        tokens += n
    everything += [run] if run else []
    mine = everything[rank::world_size]
    counted = len(mine)
    if lockstep and everything:
        mine += [everything[0]] * (-(-len(everything) // world_size) - counted)
    return mine, counted


class StepBatchSampler:
    """A batch sampler over `plan_epoch`: yields lists of row indices, one per micro-batch.

    `steps_done` (the trainer's count of optimizer steps taken) is read when an epoch's iteration starts and
    decides which epoch's order it yields. The usual `set_epoch` cannot be relied on: on a multi-process resume
    accelerate wraps this sampler as SkipBatchSampler(BatchSamplerShard(...)), neither of which forwards
    `set_epoch`, so every process replayed epoch 0's rows. Without `steps_done`, `set_epoch` decides.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, num_micro_batches: int, packing: bool, seed: int,
                 steps_done: Callable[[], int] | None = None):
        self.lengths, self.rows_per_step = lengths, batch_size
        self.num_micro_batches, self.packing, self.seed = num_micro_batches, packing, seed
        self.steps_done = steps_done
        self.epoch = 0
        # Read by accelerate when it shards the sampler over processes: batch_size None means "micro-batches of
        # varying length" (a number would make it wait for batches of exactly that many rows).
        self.batch_size = None
        self.drop_last = True

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.lengths), self.rows_per_step)

    def __len__(self) -> int:
        return self.steps_per_epoch * self.num_micro_batches

    def __iter__(self):
        epoch = self.steps_done() // self.steps_per_epoch if self.steps_done is not None else self.epoch
        yield from plan_epoch(self.lengths, self.rows_per_step, self.num_micro_batches, self.packing, self.seed,
                              epoch)
