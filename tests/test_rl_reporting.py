"""What an RL run reports, recomputed from its rollouts (an outside audit of metrics.jsonl against rollouts.jsonl):
groups of equal rewards, an epoch with num_iterations > 1, means over a logging window, a checkpoint between
logging steps, the first step's clocks, and the held-out line's reward functions."""

from __future__ import annotations

import json
import time
from pathlib import Path

import datasets
import numpy as np
import pytest

import vftrain as vf
from conftest import TINY, addition_rows
from rl_worker import config
from vftrain.rl.rollouts import group_advantages, rollout_metrics
from vftrain.sampling.tokens import Sample


def _lines(out_dir, name) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / name).read_text().splitlines()]


def _steps(out_dir) -> dict[int, dict]:
    return {r["step"]: r for r in _lines(out_dir, "metrics.jsonl") if "loss" in r}


def _train(out_dir, reward_funcs, max_steps, rows=16, **overrides):
    cfg = config(str(out_dir), max_steps, **{**dict(save_strategy="no"), **overrides})
    trainer = vf.RLTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(rows)), args=cfg,
                           reward_funcs=reward_funcs)
    trainer.train()
    return trainer


@pytest.mark.parametrize("group_size", [3, 5, 6, 7])
def test_groups_of_equal_rewards_carry_no_signal(group_size):
    """np.std of equal non-dyadic rewards is not 0: groups of three 0.1s counted as carrying signal
    (frac_reward_zero_std 0) and got advantages of -1.4e-13, a gradient from nothing."""
    rewards = np.repeat([0.1, 0.3, 0.7, 0.9], group_size)
    for scale in ("none", "group"):
        advantages = group_advantages(rewards, group_size, scale)
        assert (advantages == 0).all()
    samples = [Sample([1], [2], [-1.0], "stop")] * len(rewards)
    assert rollout_metrics(rewards, {}, advantages, samples, group_size)["frac_reward_zero_std"] == 1.0


def test_an_epoch_of_num_iterations_2_passes_every_prompt_once(tmp_path):
    """Rollouts are made every num_iterations-th step; they took that step's slice of the epoch's shuffle, so the
    odd slices were never trained and an 'epoch' covered half the prompts."""
    cfg = dict(num_iterations=2, max_steps=-1, num_train_epochs=1, batch_size=8, rollouts_per_example=4)
    _train(tmp_path, [lambda completion, reference: 1.0], **cfg)
    prompts = [r["prompt"][-1]["content"] for r in _lines(tmp_path, "rollouts.jsonl")]
    assert sorted(set(prompts)) == sorted(r["prompt"][0]["content"] for r in addition_rows(16))
    assert len(prompts) == 16 * 4 and max(_steps(tmp_path)) == 16  # 8 rounds of 2 prompts, 2 updates each


def sometimes(completion: str, reference: str):
    """Scores about half the completions (None: not scored)."""
    return float(len(completion) % 3 == 0) if len(completion) % 2 else None


def test_a_logging_window_pools_its_rollouts(tmp_path):
    """With logging_steps 2 the per-function means and pass rates were means of the steps' means: a step whose
    function scored one completion weighed as much as one where it scored all."""
    _train(tmp_path, [sometimes, lambda completion, reference: float(len(completion))], 4, logging_steps=2,
           reward_weights=[2.0, 0.5])
    rollouts = _lines(tmp_path, "rollouts.jsonl")
    for step, line in _steps(tmp_path).items():
        window = [r for r in rollouts if step - 2 < r["step"] <= step]
        scored = [r["rewards"]["sometimes"] for r in window if r["rewards"]["sometimes"] is not None]
        assert line["reward/sometimes"] == pytest.approx(np.mean(scored))
        assert line["pass_rate/sometimes"] == pytest.approx(np.mean(np.array(scored) >= 1))
        assert line["reward"] == pytest.approx(np.mean([r["reward"] for r in window]))
        assert line["reward_std"] == pytest.approx(np.std([r["reward"] for r in window]))
        assert line["completion_len_max"] == max(r["completion_tokens"] for r in window)


def test_a_checkpoint_between_logging_steps_is_logged(tmp_path):
    """A run resumed from checkpoint-3 of a logging_steps = 2 run starts a new window: step 3's metrics were never
    logged. Every checkpoint now logs its window."""
    _train(tmp_path, [lambda completion, reference: 1.0], 4, logging_steps=2, save_strategy="steps", save_steps=3)
    assert sorted(_steps(tmp_path)) == [2, 3, 4]
    state = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())
    assert [r["step"] for r in state["log_history"] if "loss" in r] == [2, 3]


def test_the_first_steps_clocks_start_with_its_rollouts(tmp_path):
    """time/train of step 1 counted from the trainer's construction (loading, the before-RL held-out run, a
    resume's checkpoint), and its tokens/s left out the step's generation, which later steps include."""
    cfg = config(str(tmp_path), 2, save_strategy="no")
    trainer = vf.RLTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(16)), args=cfg,
                           reward_funcs=[lambda completion, reference: 1.0])
    time.sleep(1.5)  # what a slow start-up adds
    trainer.train()
    for line in _steps(tmp_path).values():
        spent = line["time/train"] + line["time/generate"] + line["time/score"]
        assert line["time/train"] < 1.5
        assert line["tokens"] / line["tokens_per_second"] == pytest.approx(spent, rel=0.1, abs=0.05)


def never(completion: str, reference: str):
    return None


def half(completion: str, reference: str) -> float:
    return 0.5


def test_the_held_out_line_names_every_reward_function(tmp_path, capsys):
    """A function that scored no held-out completion was left off the line, as if the run did not use it."""
    from vftrain.cli.sft import report_generation_accuracy

    cfg = config(str(tmp_path), 1, save_strategy="no", eval_size=4, eval_generation_rows=4)
    trainer = vf.RLTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(20)), args=cfg,
                           reward_funcs=[never, half])
    report_generation_accuracy(trainer, cfg)
    assert "; reward 0.500 (never scored none, half 0.500) (4 rows" in capsys.readouterr().out
