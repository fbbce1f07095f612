"""Rollouts sampled ahead of training (`num_batches_ahead`, rl_backend = "openai") against `vftrain.serve`: which
weights sample each step's rollouts (read on the server), the ratio, exact resume with rounds still to train on,
and an error in a round being sampled."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from transformers import TrainerCallback

import vftrain as vf
from conftest import OLD_CPU_RESUME, OLD_CPU_RESUME_REASON, TINY, addition_rows, worker_env
from rl_worker import config, digits
from vftrain.errors import ConfigError, SamplerError
from vftrain.guards import close_process_group
from vftrain.sampling.tokens import seed_for
from vftrain.serve import ModelHost, serve

PER_STEP = 4  # prompts per step: batch_size 16 / rollouts_per_example 4, one request each
HERE = Path(__file__).parent


def _fingerprint(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


@pytest.fixture
def server(monkeypatch):
    """`vftrain.serve` in this process; `.log` lists (request seed, adapter asked for, fingerprint of the weights
    it was served from) per completion request, `.fail(seeds)` makes requests with those seeds fail (500), and
    `.slow(seconds, seeds)` holds requests with those seeds (None: all seeded ones) back before they reach the
    model."""
    log, failing, delays = [], set(), {}
    complete, generate = ModelHost.complete, ModelHost._generate

    def failing_complete(self, body, chat):
        if body.get("seed") in failing:
            raise RuntimeError("injected failure")
        if body.get("seed") is not None:
            time.sleep(delays.get(body["seed"], delays.get(None, 0.0)))  # before the lock: a push sent meanwhile
            # is served first
        return complete(self, body, chat)

    def logged_generate(self, prompt, params):  # under the host's lock: the weights it samples from
        base = self.model.get_base_model() if self.adapters else self.model
        adapter = self.model.active_adapter if self.adapters else None
        log.append((params["seed"], adapter, _fingerprint(base)))
        return generate(self, prompt, params)

    monkeypatch.setattr(ModelHost, "complete", failing_complete)
    monkeypatch.setattr(ModelHost, "_generate", logged_generate)
    handle = serve(TINY, port=0)
    handle.log, handle.fail = log, failing.update
    handle.slow = lambda seconds, seeds=None: delays.update(dict.fromkeys(seeds or [None], seconds))
    handle.url = f"http://127.0.0.1:{handle.server_address[1]}/v1"
    yield handle
    handle.shutdown()
    handle.server_close()


class Weights(TrainerCallback):
    """Fingerprints of the trained weights after each number of updates (0: the starting weights)."""

    def __init__(self):
        self.after: dict[int, float] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.after[state.global_step] = _fingerprint(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after[state.global_step] = _fingerprint(model)


class Interrupt(TrainerCallback):
    """Ctrl-C at the end of step `step`: vftrain saves a checkpoint after the next step end and stops."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def _trainer(out_dir, url, **overrides):
    base = dict(rl_backend="openai", sample_base_url=url, learning_rate=3e-3, save_strategy="no")
    cfg = config(str(out_dir), overrides.pop("max_steps", 5), **{**base, **overrides})
    return vf.RLTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(40)), args=cfg,
                        reward_funcs=[digits])


def _metrics(out_dir) -> dict[int, dict]:
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}  # a resumed run's later line wins


def _rounds(log: list, steps: int, processes: int = 1) -> dict[int, list]:
    """step -> the (adapter, fingerprint) of the server's requests for its rollouts; the trainer seeds prompt i
    of process r's share of step s with seed_for(seed_for(run seed 0, s, r), i). The push probes and held-out
    samples are left out."""
    step_of = {seed_for(seed_for(0, s, r), i): s for s in range(steps) for r in range(processes)
               for i in range(PER_STEP // processes)}
    out: dict[int, list] = {}
    for seed, adapter, fingerprint in log:
        if seed in step_of:
            out.setdefault(step_of[seed], []).append((adapter, fingerprint))
    return out


def _version(weights: "Weights", fingerprint: float) -> int:
    """The number of updates after which the trainer's weights had this fingerprint."""
    return next(v for v, f in weights.after.items() if abs(f - fingerprint) < 1e-9 * max(abs(f), 1))


@pytest.mark.parametrize("ahead, use_lora", [(0, False), (1, False), (2, False), (1, True)])
def test_each_step_trains_on_weights_at_most_k_updates_old(tmp_path, server, ahead, use_lora):
    """Step s's rollouts are sampled by the weights after max(0, s - k) updates: read on the server (the weights it
    served each request from, or the adapter the request named) against the trainer's weights after each update.
    The lag is logged per step and per rollout; the ratio stays within the mask, and with k > 0 it really is
    off-policy (ratio != 1)."""
    steps, weights = 5, Weights()
    trainer = _trainer(tmp_path / "out", server.url, max_steps=steps, num_batches_ahead=ahead, use_lora=use_lora,
                       lora_rank=4, learning_rate=3e-2 if use_lora else 3e-3)
    trainer.add_callback(weights)
    trainer.train()

    served = {s: {int(a.rsplit("-", 1)[1]) if use_lora else _version(weights, f) for a, f in requests}
              for s, requests in _rounds(server.log, steps).items()}
    assert served == {s: {max(0, s - ahead)} for s in range(steps)}
    assert len(set(weights.after.values())) == steps + 1  # every update moved the weights

    rollouts = [json.loads(x) for x in (tmp_path / "out" / "rollouts.jsonl").read_text().splitlines()]
    assert {(r["step"], r["policy_step"]) for r in rollouts} == {(s + 1, max(0, s - ahead)) for s in range(steps)}
    records = _metrics(tmp_path / "out")
    assert sorted(records) == list(range(1, steps + 1))
    for step, record in records.items():
        assert record.get("off_policy_steps", 0) == min(step - 1, ahead)
        assert record["masked_frac"] == 0
        assert 1 / 8 <= record["importance_ratio_min"] <= record["importance_ratio_max"] <= 8
        assert ("time/wait" in record) == (ahead > 0)
    drift = max(max(abs(r["importance_ratio_min"] - 1), abs(r["importance_ratio_max"] - 1)) for r in records.values())
    assert drift > 1e-3 if ahead else drift < 1e-4


def test_held_out_samples_from_the_same_server_wait_for_the_round_being_sampled(tmp_path, server):
    """Held-out samples push the weights after step t to the server at the end of step t, while step t+1's
    rollouts are being sampled from the weights after t-1 updates: the push waits for that round, so each round
    still comes from one set of weights, max(0, s - 1) updates old."""
    steps, weights = 4, Weights()
    server.slow(1.0)  # a round outlasts a training step: the held-out push comes while it is being sampled
    trainer = _trainer(tmp_path / "out", server.url, max_steps=steps, num_batches_ahead=1, sample_every_n_steps=1,
                       num_samples=2, sample_backend="openai")
    trainer.add_callback(weights)
    trainer.train()
    served = {s: {_version(weights, f) for _, f in requests} for s, requests in _rounds(server.log, steps).items()}
    assert served == {s: {max(0, s - 1)} for s in range(steps)}
    assert sum(len(r) for r in _rounds(server.log, steps).values()) < len(server.log) - steps * 2  # held-out drawn


def test_bound_zero_and_one_share_the_first_step(tmp_path, server):
    """Step 1 trains on the starting weights' rollouts whatever the bound: the same rewards and loss; later steps
    differ (k = 1 trains on older rollouts)."""
    for ahead in (0, 1):
        _trainer(tmp_path / str(ahead), server.url, max_steps=3, num_batches_ahead=ahead).train()
    on, ahead = _metrics(tmp_path / "0"), _metrics(tmp_path / "1")
    assert ahead[1]["reward"] == on[1]["reward"] and ahead[1]["loss"] == pytest.approx(on[1]["loss"], rel=1e-6)
    assert ahead[3]["loss"] != pytest.approx(on[3]["loss"], rel=1e-6)


@pytest.mark.parametrize("ahead, num_iterations, stop_after", [(1, 1, 2), (2, 1, 2), (1, 2, 1)])
def test_interrupted_run_resumes_exactly(tmp_path, server, ahead, num_iterations, stop_after):
    """Ctrl-C while a later step's rollouts are being sampled: the checkpoint waits for them and carries them (they
    came from weights the resumed run no longer has), so the resumed run trains on exactly what the uninterrupted
    one did: same rewards and losses at every later step."""
    run = dict(max_steps=6, num_batches_ahead=ahead, num_iterations=num_iterations)
    _trainer(tmp_path / "full", server.url, **run).train()
    stopped = _trainer(tmp_path / "cut", server.url, **run)
    stopped.add_callback(Interrupt(stop_after))
    stopped.train()
    saved = stopped.state.global_step
    assert saved < 6 and (tmp_path / "cut" / f"checkpoint-{saved}" / "vftrain_rollouts_ahead.pt").exists()
    _trainer(tmp_path / "cut", server.url, **run).train(resume_from_checkpoint=True)
    expected, got = _metrics(tmp_path / "full"), _metrics(tmp_path / "cut")
    assert sorted(got) == list(range(1, 7))
    for step in range(saved + 1, 7):
        for key in {"reward", "loss", "importance_ratio_max", "off_policy_steps"} & set(expected[step]):
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-5, abs=1e-7), (step, key)
    lines = [json.loads(x) for x in (tmp_path / "cut" / "rollouts.jsonl").read_text().splitlines()]
    full = [json.loads(x) for x in (tmp_path / "full" / "rollouts.jsonl").read_text().splitlines()]
    assert [(x["step"], x["policy_step"], x["completion"]) for x in lines] == \
        [(x["step"], x["policy_step"], x["completion"]) for x in full]


def test_a_failed_round_surfaces_at_the_next_step(tmp_path, server):
    """Step 3's rollouts (sampled in the background during step 2) fail on the server: the run stops with the
    server's error at the start of step 3, after training steps 0-2, and does not hang."""
    server.fail({seed_for(seed_for(0, 3, 0), i) for i in range(PER_STEP)})
    trainer = _trainer(tmp_path / "out", server.url, max_steps=6, num_batches_ahead=1, sample_timeout=20)
    clock = time.monotonic()
    with pytest.raises(SamplerError, match="HTTP 500"):
        trainer.train()
    assert time.monotonic() - clock < 120  # the worker's error reached the training thread: no hang
    assert sorted(_metrics(tmp_path / "out")) == [1, 2, 3]


@pytest.mark.parametrize("overrides, needle", [
    (dict(num_batches_ahead=1), "num_batches_ahead = 1 needs rl_backend = 'openai'"),
    (dict(num_batches_ahead=-1, rl_backend="openai"), "num_batches_ahead = -1 must be an integer >= 0"),
])
def test_config_refuses_a_bound_it_cannot_keep(tmp_path, overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        config(str(tmp_path), 1, **overrides)



def _launch(out_dir, url: str, resume: bool = False) -> subprocess.CompletedProcess:
    """Two processes under torchrun; on a timeout the whole process group is killed (workers stuck in a collective
    ignore the SIGTERM torchrun forwards: vftrain's Ctrl-C guard waits for the step to end)."""
    env = worker_env()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29600 + os.getpid() % 1000), __file__, str(out_dir), url, "1" if resume else "0"]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as launched:
        try:
            out, err = launched.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(launched.pid, signal.SIGKILL)
            out, err = launched.communicate()
    return subprocess.CompletedProcess(command, launched.returncode, out, err)


def test_two_processes_request_their_shares_from_the_pushed_weights(tmp_path, server):
    """Two processes (LoRA, k = 1, a checkpoint after step 2): the main process pushes, each process samples its
    own prompts of step s from the adapter of step max(0, s - 1), each saves its own rounds still to train on, and
    a resume from step 2 trains on exactly what the uninterrupted run did."""
    # process 1's requests reach the model late: the main process, done with its share, must not push meanwhile
    # (under LoRA the push unloads the adapter process 1's requests name)
    server.slow(1.0, [seed_for(seed_for(0, s, 1), i) for s in range(4) for i in range(PER_STEP // 2)])
    done = _launch(tmp_path / "out", server.url)
    assert done.returncode == 0, done.stderr[-3000:]
    full = _metrics(tmp_path / "out")
    served = {s: {int(a.rsplit("-", 1)[1]) for a, _ in requests}
              for s, requests in _rounds(server.log, 4, processes=2).items()}
    assert served == {s: {max(0, s - 1)} for s in range(4)}
    assert {p.name for p in (tmp_path / "out" / "checkpoint-2").glob("*ahead.pt")} == \
        {"rank0-vftrain_rollouts_ahead.pt", "rank1-vftrain_rollouts_ahead.pt"}
    if OLD_CPU_RESUME:
        pytest.skip(OLD_CPU_RESUME_REASON)
    os.rename(tmp_path / "out" / "checkpoint-4", tmp_path / "checkpoint-4")  # resume from step 2
    done = _launch(tmp_path / "out", server.url, resume=True)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = _metrics(tmp_path / "out")
    for step in (3, 4):
        for key in ("reward", "loss", "off_policy_steps"):
            assert resumed[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-7), (step, key)


def test_a_round_failed_on_one_process_stops_every_process(tmp_path, server):
    """Process 1's share of step 2's rollouts fails on the server: both processes stop at the start of step 2
    (process 1 with the server's error, the main process saying another process failed), none left waiting."""
    server.fail([seed_for(seed_for(0, 2, 1), i) for i in range(PER_STEP // 2)])
    done = _launch(tmp_path / "out", server.url)
    assert done.returncode != 0
    assert "HTTP 500" in done.stderr and "failed on another process" in done.stderr
    assert sorted(_metrics(tmp_path / "out")) == [1, 2]


if __name__ == "__main__":  # one process of test_two_processes_...: out_dir, server url, resume (0/1)
    torch.set_num_threads(1)
    # run_name set: the default (rl-<time>) is taken per process, and two processes a second apart named the
    # adapter differently (rank 1 asked for one the main process had not loaded)
    trainer = _trainer(sys.argv[1], sys.argv[2], max_steps=4, num_batches_ahead=1, use_lora=True, lora_rank=4,
                       learning_rate=3e-2, micro_batch_size=4, save_strategy="steps", save_steps=2,
                       run_name="overlap")
    trainer.train(resume_from_checkpoint=sys.argv[3] == "1" or None)
    close_process_group()
