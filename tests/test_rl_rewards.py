"""How rewards are resolved, weighted, scored and reported: weights per function actually used, functions that
share a name, held-out RL samples scored (and prompted) as training is, rollouts.jsonl numbering / references /
resume, reward functions from the current folder or a file, the reward-function contract (vftrain's and TRL's
shapes) checked when the trainer is built, and sample panels of tool conversations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from io import StringIO
from pathlib import Path

import datasets
import pytest
from rich.console import Console

import vftrain as vf
from conftest import TINY, addition_rows, small_config, write_jsonl
from rl_worker import config
from vftrain.errors import ConfigError
from vftrain.rewards import resolve_rewards
from vftrain.sampling import prompt_and_reference
from vftrain.sampling.callback import SampleCallback

TOOLS = [{"type": "function", "function": {"name": "add", "description": "add two numbers",
                                           "parameters": {"type": "object", "properties": {}}}}]


def one(completion: str, reference: str) -> float:
    return 1.0


def ten(completion: str, reference: str) -> float:
    return 10.0


def make(value: float):
    def reward(completion: str, reference: str) -> float:  # every function of this factory is named "reward"
        return value
    return reward


def _rl(tmp_path, reward_funcs, rows=None, **overrides):
    cfg = config(str(tmp_path / "out"), overrides.pop("max_steps", 1), **{
        **dict(batch_size=8, rollouts_per_example=4, micro_batch_size=8, save_strategy="no"), **overrides})
    return vf.RLTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(rows or addition_rows(12)), args=cfg,
                        reward_funcs=reward_funcs)


def _logged(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def _rollouts(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "rollouts.jsonl").read_text().splitlines()]


# ---- 1. reward_weights: one per function the run uses
def test_one_weight_per_callable_weighs_every_callable(tmp_path):
    trainer = _rl(tmp_path, [one, ten], reward_weights=[1.0, 0.5])  # refused before: the config has 1 name
    trainer.train()
    [step] = [r for r in _logged(tmp_path / "out") if "reward" in r]
    assert step["reward"] == pytest.approx(6.0)
    assert (step["reward/one"], step["reward/ten"]) == (1.0, 10.0)


def test_fewer_weights_than_callables_is_an_error_before_sampling(tmp_path):
    with pytest.raises(ConfigError, match=r"reward_weights = \[1.0\] has 1 weights for 2 reward functions"):
        _rl(tmp_path, [one, ten], reward_weights=[1.0])  # the second function silently left out before


# ---- 2. functions sharing a name
def test_callables_sharing_a_name_each_count_and_are_logged_apart(tmp_path):
    trainer = _rl(tmp_path, [make(1.0), make(2.0), lambda c, r: 3.0, lambda c, r: 4.0])
    assert list(trainer.reward_funcs) == ["reward", "reward_2", "<lambda>", "<lambda>_2"]
    trainer.train()
    [step] = [r for r in _logged(tmp_path / "out") if "reward" in r]
    assert step["reward"] == pytest.approx(10.0)
    assert [step[f"reward/{n}"] for n in ("reward", "reward_2", "<lambda>", "<lambda>_2")] == [1.0, 2.0, 3.0, 4.0]
    assert _rollouts(tmp_path / "out")[0]["rewards"] == {"reward": 1.0, "reward_2": 2.0, "<lambda>": 3.0,
                                                         "<lambda>_2": 4.0}


def test_config_entries_named_twice_both_count():
    assert list(resolve_rewards(["exact_match", "exact_match"])) == ["exact_match", "exact_match_2"]


# ---- 3 + 4. held-out RL samples: the run's rewards and weights, the row's tools
def test_held_out_rl_samples_are_scored_by_the_run_rewards_and_prompted_with_the_tools(tmp_path):
    rows = [{**row, "tools": TOOLS} for row in addition_rows(14)]
    trainer = _rl(tmp_path, [one, ten], rows=rows, reward_weights=[2.0, 0.5], sample_every_n_steps=1,
                  num_samples=2)
    sampler = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SampleCallback))
    seen = []
    sampler.backend = lambda prompts, step: seen.extend(prompts) or ["x"] * len(prompts)
    sampler.console = Console(file=StringIO())
    trainer.train()
    evals = [r for r in _logged(tmp_path / "out") if "eval/reward" in r]
    assert evals and evals[0]["eval/reward"] == pytest.approx(2.0 * 1 + 0.5 * 10)  # as the training reward
    assert "eval/reward/exact_match" not in evals[0] and evals[0]["eval/reward/ten"] == 10.0
    assert len(seen) == 2 and all(p.tools and p.tools[0]["function"]["name"] == "add" for p in seen)


# ---- 5. rollouts.jsonl
def test_rollouts_are_numbered_as_metrics_and_carry_the_reference(tmp_path):
    rows = addition_rows(12)
    trainer = _rl(tmp_path, [lambda c, r: float(len(c))], rows=rows, max_steps=2)
    trainer.train()
    rollouts = _rollouts(tmp_path / "out")
    metrics = {r["step"]: r for r in _logged(tmp_path / "out") if "reward" in r}
    assert sorted({r["step"] for r in rollouts}) == [1, 2] == sorted(metrics)
    for step in (1, 2):
        mine = [r["reward"] for r in rollouts if r["step"] == step]
        assert sum(mine) / len(mine) == pytest.approx(metrics[step]["reward"])
    answers = {json.dumps(r["prompt"]): r["completion"][0]["content"] for r in rows}
    assert all(r["reference"] == answers[json.dumps(r["prompt"])] for r in rollouts)


def test_resumed_run_replaces_the_rollouts_of_the_steps_it_samples_again(tmp_path):
    first = _rl(tmp_path, [lambda c, r: float(len(c))], max_steps=2, save_strategy="steps", save_steps=1)
    first.train()
    before = _rollouts(tmp_path / "out")
    resumed = _rl(tmp_path, [lambda c, r: float(len(c))], max_steps=3, save_strategy="steps", save_steps=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))
    after = _rollouts(tmp_path / "out")
    assert Counter(r["step"] for r in after) == {1: 8, 2: 8, 3: 8}  # an uninterrupted run's counts
    assert after[:16] == before  # step 2 sampled again exactly as before, recorded once


# ---- 6. reward functions from the current folder or a file
def _without_cwd(monkeypatch, folder):
    """sys.path as a console script has it: its bin folder first, neither '' nor the current folder."""
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(folder), os.getcwd())])


def test_reward_module_in_the_current_folder_or_given_by_path(tmp_path, monkeypatch):
    (tmp_path / "here_rewards.py").write_text("def close(completion, reference):\n    return 0.5\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "helper.py").write_text("VALUE = 0.25\n")
    (tmp_path / "sub" / "by_path.py").write_text("from helper import VALUE\n\ndef close(completion, reference):\n"
                                                 "    return VALUE\n")
    _without_cwd(monkeypatch, tmp_path)
    funcs = resolve_rewards(["here_rewards:close", "./sub/by_path.py:close", "sub/by_path.py:close"])
    assert list(funcs) == ["here_rewards:close", "by_path:close", "by_path:close_2"]
    assert [float(f(["a"], ["b"])[0]) for f in funcs.values()] == [0.5, 0.25, 0.25]


def test_reward_module_failing_inside_is_quoted(tmp_path, monkeypatch):
    (tmp_path / "broken_rewards.py").write_text("import numpyy\n\ndef close(completion, reference):\n    return 1\n")
    _without_cwd(monkeypatch, tmp_path)
    for entry in ("broken_rewards:close", "broken_rewards.py:close"):
        with pytest.raises(ConfigError, match="ModuleNotFoundError: No module named 'numpyy'"):
            resolve_rewards([entry])
    with pytest.raises(ConfigError, match="no such file 'missing.py'"):
        resolve_rewards(["missing.py:close"])
    with pytest.raises(ConfigError, match="no module 'nowhere_rewards' is installed or in the current folder"):
        resolve_rewards(["nowhere_rewards:close"])
    with pytest.raises(ConfigError, match="write 'path/to/file.py:function'"):
        resolve_rewards(["./broken_rewards:close"])  # a traceback (relative import) before


def test_vf_rl_finds_a_reward_module_beside_it(tmp_path):
    script = Path(sys.executable).parent / "vf-rl"
    if not script.exists():
        pytest.skip("the vf-rl console script is not installed")
    (tmp_path / "my_rewards.py").write_text("def close(completion, reference):\n    return 1.0\n")
    write_jsonl(tmp_path / "prompts.jsonl", addition_rows(4))
    (tmp_path / "rl.toml").write_text(f'model = "{TINY}"\ndataset = "prompts.jsonl"\n[rl]\n'
                                      'reward_funcs = ["my_rewards:close", "./my_rewards.py:close"]\n')
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    out = subprocess.run([str(script), "@", "rl.toml", "--inspect", "1"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "reward functions: my_rewards:close, my_rewards:close_2" in out.stdout


# ---- 7. the contract, checked when the trainer is built
def test_no_reward_function_or_a_wrong_signature_is_an_error_before_sampling(tmp_path):
    with pytest.raises(ConfigError, match="reward_funcs is empty"):
        _rl(tmp_path, [])

    def takes_one(completion):
        return 1.0

    with pytest.raises(ConfigError, match=r"'takes_one' has the signature takes_one\(completion\); a reward "
                                          r"function is fn\(completion: str, reference: str\) -> float, or TRL's"):
        _rl(tmp_path, [takes_one])

    def needs_solution(prompts, completions, solution, **kwargs):
        return [1.0] * len(completions)

    with pytest.raises(ConfigError, match="'needs_solution' needs the column\\(s\\) solution"):
        _rl(tmp_path, [needs_solution])


def test_trl_shaped_reward_gets_the_batch_and_the_rows_columns(tmp_path):
    calls = []

    def trl_style(prompts, completions, answer, **kwargs):
        calls.append(dict(prompts=prompts, completions=completions, answer=answer, **kwargs))
        return [float(c[0]["content"] == a) + 0.5 for c, a in zip(completions, answer)]

    rows = [{"prompt": r["prompt"], "answer": r["completion"][0]["content"], "level": i % 3}
            for i, r in enumerate(addition_rows(12))]
    trainer = _rl(tmp_path, [trl_style], rows=rows)
    trainer.train()
    [call] = calls
    assert len(call["completions"]) == 8 and call["completions"][0][0]["role"] == "assistant"
    assert call["prompts"][0][0]["role"] == "user" and len(call["completion_ids"]) == 8
    assert call["trainer_state"] is trainer.state and all(level in (0, 1, 2) for level in call["level"])
    prompt_answer = {json.dumps(r["prompt"]): r["answer"] for r in rows}
    assert call["answer"] == [prompt_answer[json.dumps(p)] for p in call["prompts"]]
    [step] = [r for r in _logged(tmp_path / "out") if "reward" in r]
    rollouts = _rollouts(tmp_path / "out")
    assert step["reward"] == pytest.approx(sum(r["reward"] for r in rollouts) / 8) and step["reward"] >= 0.5


# ---- 7b. None / NaN: the function does not score that completion (TRL's rule), for either shape
def test_a_function_that_does_not_score_a_completion_adds_nothing_and_is_averaged_over_the_rest(tmp_path, caplog):
    """A pair-shaped function returning None (a traceback before) or NaN (before: every advantage of its group NaN,
    then "the loss became NaN") and a TRL-shaped one returning None (before: counted as 0 in its logged mean) add
    nothing to the reward; each function's mean and pass rate are over the completions it scored; rollouts.jsonl
    says null; a completion no function scores gets 0, with a warning; the run trains on."""
    import math

    def odd_only(completion: str, reference: str):  # scores every other call
        odd_only.calls += 1
        return 2.0 if odd_only.calls % 2 else (None if odd_only.calls % 4 else math.nan)
    odd_only.calls = 0

    def trl_half(prompts, completions, **kwargs):
        return [None if i % 2 else 1.0 for i in range(len(completions))]

    trainer = _rl(tmp_path, [odd_only, trl_half], reward_weights=[1.0, 3.0], max_steps=2)
    with caplog.at_level("WARNING", logger="vftrain"):
        trainer.train()
    steps = [r for r in _logged(tmp_path / "out") if "reward" in r]
    rollouts = _rollouts(tmp_path / "out")
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in _logged(tmp_path / "out") if "loss" in r)
    for step in steps:
        assert (step["reward/odd_only"], step["pass_rate/odd_only"]) == (2.0, 1.0)
        assert (step["reward/trl_half"], step["pass_rate/trl_half"]) == (1.0, 1.0)
    for i, r in enumerate(rollouts[:8]):
        mine = r["rewards"]
        assert mine["trl_half"] == (None if i % 2 else 1.0) and mine["odd_only"] == (2.0 if i % 2 == 0 else None)
        assert r["reward"] == (5.0 if i % 2 == 0 else 0.0)
    assert "4 of 8 completions were scored by no reward function (odd_only, trl_half" in caplog.text


def test_a_reward_that_is_no_number_is_a_one_line_error_naming_the_function():
    from vftrain.rewards import score

    def says(completion: str, reference: str):
        return "yes"

    with pytest.raises(ConfigError, match=r"reward function 'says' returned 'yes' \(str\); a reward is a number"):
        score(resolve_rewards([says]), None, ["a"], ["b"])


# ---- 8. sample panels of tool conversations
WEATHER = {"prompt": [{"role": "user", "content": "Weather in Roma?"}],
           "completion": [{"role": "assistant", "content": "",
                           "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                            "arguments": {"city": "Roma"}}}]},
                          {"role": "tool", "content": "9 C, windy"},
                          {"role": "assistant", "content": "9 C, windy."}]}


def test_tool_conversation_samples_continue_the_context_their_reference_answers():
    prompt, reference = prompt_and_reference(WEATHER)
    assert reference == "9 C, windy."
    assert [m["role"] for m in prompt.messages] == ["user", "assistant", "tool"]
    assert prompt.messages[1]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_panel_cut_by_max_new_tokens_says_so(tmp_path):
    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(20)),
                            args=small_config(tmp_path, max_steps=1, sample_every_n_steps=1, num_samples=1,
                                              max_new_tokens=1))
    sampler = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SampleCallback))
    sampler.console = Console(file=StringIO(), width=200)
    sampler.sample(1)
    assert "(truncated: max_new_tokens)" in sampler.console.file.getvalue()


def test_a_reasoning_block_is_not_part_of_the_answer_scored(tmp_path, monkeypatch):
    """Qwen3 writes `<think>...</think>` (empty without reasoning) as text tokens, which decoding keeps: exact match
    and vftrain-shaped rewards compared it with the reference, so a right answer scored 0 (RL rewarded dropping the
    block; held-out accuracy read 0%). They now score the answer after it; TRL-shaped functions get the text as
    TRL gives it."""
    from vftrain.rewards import answer_text, score

    assert answer_text("<think>\n\n</think>\n\nok") == answer_text("carry the 1</think> ok") == "ok"
    assert answer_text("no block") == "no block" and answer_text("<think>cut short") == "<think>cut short"
    seen = []

    def trl_raw(prompts, completions, **kwargs):
        seen.extend(completions)
        return [0.0] * len(completions)

    total, per_func = score(resolve_rewards(["exact_match", trl_raw]), None, ["<think>\n</think>\n\n12", "13"],
                            ["12", "12"], prompts=["a", "b"])
    assert list(per_func["exact_match"]) == [1.0, 0.0] and seen == ["<think>\n</think>\n\n12", "13"]
    import vftrain.sampling.embedded as embedded

    monkeypatch.setattr(embedded, "generate", lambda model, tok, prompts, *a, **k: [
        "<think>\n\n</think>\n\n" + p.messages[-1]["content"].replace("+", "") for p in prompts])
    rows = [{"prompt": [{"role": "user", "content": "1+2"}], "completion": [{"role": "assistant", "content": "12"}]}]
    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(16)),
                            args=small_config(tmp_path))
    assert trainer.evaluate_generations(rows=rows, save=False)["accuracy"] == 1.0
