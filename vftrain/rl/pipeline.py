"""Rollouts sampled ahead of training: `num_batches_ahead` = k with rl_backend = "openai".

A round is the rollouts of one step that makes them (every `num_iterations`-th step). At the start of optimizer
step s (`advance`, called by every process at the same point) the rounds of steps s..s+k not yet requested are
requested: the server first finishes the round it is sampling (a push in the middle of a round would sample one
round from two policies, and under LoRA unload the adapter its requests name), then the weights after s updates
are pushed (in the calling thread: with several processes the push is collective), then the rounds are sampled and
scored on a worker thread, one after another, while step s trains. `take(step)` hands the trainer a round with the
step of the weights that sampled it (its `version`): step s trains on weights at most k updates old, min(s, k)
after a fresh start. With k = 0 a round is pushed, sampled and scored in the calling thread: on-policy, as the
embedded sampler.

Which weights sample which round depends on the step numbers alone, never on timing (prime-rl's
`strict_async_level`; TRL's AsyncGRPO and prime-rl's default let the lag float): a run is reproducible, and the
rounds a checkpoint carries (`pending`, `restore`) resume it exactly. The importance ratio is taken against the
sampler's own logprobs, which is what makes stale rollouts trainable (the loss already does; `rl/trainer.py`).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

from transformers import TrainerCallback


@dataclasses.dataclass
class Round:
    """The scored rollouts of optimizer step `step`, sampled by the weights after `version` updates."""

    step: int
    version: int
    scored: Any  # what `produce(step)` returned
    seconds: float  # wall time sampling and scoring them
    background: bool  # made on the worker thread, beside training
    waited: float = 0.0  # seconds `take` blocked on it


class RolloutPipeline:
    """`produce(step)` makes a round's scored rollouts from the weights now served; `push(step)` serves the weights
    after `step` updates (every process calls it at the same point). `ahead` = num_batches_ahead, `every` =
    num_iterations (a round every `every` steps). `agree(flag)` -> whether any process has the flag set (None: one
    process): every process calls `advance`, `take` and `settle` at the same points, and each samples its own share
    of a round, so waiting for a round is agreed on: the main process pushes only once no process is sampling, and a
    round that failed on one process stops all of them there, none left waiting in a collective."""

    def __init__(self, produce: Callable[[int], Any], push: Callable[[int], None], ahead: int, every: int,
                 agree: Callable[[bool], bool] | None = None):
        self.produce, self.push, self.ahead, self.every = produce, push, ahead, every
        self.agree = agree if ahead else None  # with ahead = 0 a round is made and taken within the step
        self.rounds: dict[int, Future] = {}  # step -> its round, requested and not yet taken
        self.worker: _Worker | None = None

    def advance(self, step: int, last: int) -> float:
        """At the start of optimizer step `step` (`last`: the run's step count, no round is made for it or after):
        request the rounds of steps step..step+ahead not yet requested. Returns the seconds spent waiting for the
        worker to finish the rounds it was sampling."""
        due = [s for s in range(step, min(step + self.ahead, last - 1) + 1) if s % self.every == 0
               and s not in self.rounds]
        return self._request(due, step) if due else 0.0

    def take(self, step: int, now: int) -> Round:
        """The round of step `step`, at optimizer step `now`; one requested by no earlier step (a checkpoint written
        without it) is made now, from the weights after `now` updates."""
        if step not in self.rounds:
            self._request([step], now)
        clock = time.perf_counter()
        out = self._agreed(lambda: self._result(self.rounds.pop(step)))
        out.waited = time.perf_counter() - clock if out.background else 0.0
        return out

    def settle(self) -> float:
        """Wait until no round is being sampled (before the served weights change); returns the seconds waited.
        A round that failed raises its error here (then nothing else runs)."""
        clock = time.perf_counter()
        self._agreed(lambda: [self._result(future) for future in list(self.rounds.values())])
        return time.perf_counter() - clock

    def pending(self) -> list[Round]:
        """The rounds requested and not yet taken (for a checkpoint), once sampled."""
        self.settle()
        return [future.result() for future in self.rounds.values()]

    def restore(self, rounds: list[Round]) -> None:
        """Continue with `rounds` (a checkpoint's `pending`) requested already."""
        self.close()
        for one in rounds:
            future: Future = Future()
            future.set_result(one)
            self.rounds[one.step] = future

    def close(self) -> None:
        """Forget every round; the one being sampled finishes on the worker thread, unread, queued ones never start
        (training ended, stopped or failed)."""
        for future in self.rounds.values():
            future.cancel()
        self.rounds = {}

    # ----
    def _request(self, steps: list[int], version: int) -> float:
        waited = self.settle()
        self.push(version)
        for step in steps:
            if self.ahead:
                self.worker = self.worker or _Worker()
                self.rounds[step] = self.worker.submit(self._make, step, version, True)
            else:
                future: Future = Future()
                future.set_result(self._make(step, version, False))  # errors raise here, in the step itself
                self.rounds[step] = future
        return waited

    def _make(self, step: int, version: int, background: bool) -> Round:
        clock = time.perf_counter()
        scored = self.produce(step)
        return Round(step, version, scored, time.perf_counter() - clock, background)

    def _agreed(self, wait: Callable[[], Any]) -> Any:
        """`wait()`, then one small all-reduce: a failure on any process raises on every one."""
        try:
            out = wait()
        except BaseException:
            if self.agree is not None:
                self.agree(True)
            raise
        if self.agree is not None and self.agree(False):
            self.close()
            raise RuntimeError("the rollouts sampled ahead failed on another process (its error is in its log)")
        return out

    def _result(self, future: Future) -> Round:
        try:
            return future.result()
        except BaseException:
            self.close()  # the rounds after a failed one are not trained on: stop sampling them
            raise


class _Worker:
    """One daemon thread running submitted calls in order: a round still running never holds up the interpreter's
    exit (Ctrl-C, an error in training), unlike concurrent.futures' executors, whose threads are joined at exit."""

    def __init__(self):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, daemon=True, name="vftrain-rollouts").start()

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self.jobs.put((future, fn, args))
        return future

    def _loop(self) -> None:
        while True:
            future, fn, args = self.jobs.get()
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the training thread, which raises it at its next wait
                future.set_exception(exc)


class PipelineCallback(TrainerCallback):
    """Settles the pipeline before held-out samples are drawn from the same server (`server_samples`: their push
    would change the weights under a round being sampled), and forgets its rounds when training ends."""

    def __init__(self, pipeline: RolloutPipeline, server_samples: bool):
        self.pipeline, self.server_samples = pipeline, server_samples

    def on_step_end(self, args, state, control, **kwargs):
        every = args.sample_every_n_steps
        if self.server_samples and every and state.global_step % every == 0:
            self.pipeline.settle()

    def on_train_end(self, args, state, control, **kwargs):
        self.pipeline.close()
