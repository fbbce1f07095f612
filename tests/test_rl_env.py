"""RL on verifiers environments (`vftrain/rl/environment.py`) against the real verifiers package: prompts from the
taskset, rewards from the tasks' reward functions, multi-turn tool rollouts trained as sampled (environment tokens
never), the CLI. The environments are Python modules written into tmp_path, as a user's would be installed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import vftrain as vf
from conftest import TINY
from rl_worker import config
from vftrain.errors import ConfigError
from vftrain.sampling.tokens import Sample


def test_env_beside_a_dataset_or_reward_funcs_is_an_error(tmp_path):
    for overrides, needle in ((dict(dataset="data"), "leave dataset unset"),
                              (dict(reward_funcs=["m:f"]), "leave reward_funcs unset"),
                              (dict(env_args={"n": 1}, env=None), "env_args is set without env")):
        with pytest.raises(ConfigError, match=needle):
            config(str(tmp_path), 1, **{"env": "addition", **overrides})


def test_env_without_verifiers_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "verifiers" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'vftrain\[verifiers\]'"):
        config(str(tmp_path), 1, env="addition")


ENVS = '''
import verifiers.v1 as vf


class AdditionData(vf.TaskData):
    answer: str


class AdditionConfig(vf.TasksetConfig):
    num_tasks: int = 16
    reward: str = "exact"  # or "length": a rubric that rewards long replies


class AdditionTask(vf.Task[AdditionData, vf.State, vf.TaskConfig]):
    @vf.reward
    async def exact_match(self, task, trace) -> float:
        return float(trace.last_reply.strip() == task.answer)


class LengthTask(vf.Task[AdditionData, vf.State, vf.TaskConfig]):
    @vf.reward(weight=0.5)
    async def length(self, trace) -> float:
        return float(len(trace.last_reply))


def rows(n):
    for k in range(n):
        a, b = 10 + k % 90, 10 + (k * 7) % 90
        yield [{"role": "user", "content": f"{a}+{b}"}], str(a + b)


class AdditionTaskset(vf.Taskset[AdditionTask, AdditionConfig]):
    def load(self):
        task = LengthTask if self.config.reward == "length" else AdditionTask
        for prompt, answer in rows(self.config.num_tasks):
            yield task(AdditionData(prompt=prompt, answer=answer), self.config.task)
'''

TOOLS = '''
import verifiers.v1 as vf


class Calculator(vf.Toolset):
    TOOL_PREFIX = None

    @vf.tool
    async def add(self, a: int, b: int) -> int:
        """Add two integers."""
        return a + b


class SumTask(vf.Task[vf.TaskData, vf.State, vf.TaskConfig]):
    @classmethod
    def toolsets(cls, config):
        return [Calculator(vf.ToolsetConfig())]

    @vf.reward
    async def used_tool(self, trace) -> float:
        return float(len(trace.tool_messages) > 0)


class SumTaskset(vf.Taskset[SumTask, vf.TasksetConfig]):
    def load(self):
        for k in range(8):
            yield SumTask(vf.TaskData(prompt=f"{k}+1"), self.config.task)
'''


@pytest.fixture
def envs(tmp_path, monkeypatch):
    """Two installed environments: `vf-addition` (single turn) and `vf-sum-tools` (a tool server). Tests that use
    them need the real package (the `verifiers` extra, Python >= 3.11)."""
    pytest.importorskip("verifiers")
    folder = tmp_path / "envs"
    folder.mkdir()
    (folder / "vf_addition.py").write_text(ENVS + '\n__all__ = ["AdditionTaskset"]\n')
    (folder / "vf_sum_tools.py").write_text(TOOLS + '\n__all__ = ["SumTaskset"]\n')
    monkeypatch.syspath_prepend(str(folder))
    return folder


def _trainer(tmp_path, env="vf-addition", env_args=None, **overrides):
    cfg = config(str(tmp_path / "out"), overrides.pop("max_steps", 1), save_strategy="no", env=env,
                 env_args=env_args, **overrides)
    return vf.RLTrainer(model=TINY, args=cfg)


def _rollouts(tmp_path) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / "out" / "rollouts.jsonl").read_text().splitlines()]


def test_prompts_come_from_the_taskset(tmp_path, envs):
    trainer = _trainer(tmp_path, env_args={"num_tasks": 12})
    assert len(trainer.prompts.ids) == 12
    assert trainer.processing_class.decode(trainer.prompts.ids[0]).endswith("10+10<|im_end|>\n<|im_start|>assistant\n")
    assert list(trainer.reward_funcs) == ["exact_match"]


def test_rewards_come_from_the_tasks_reward_functions(tmp_path, envs):
    """The same rollouts (same seed) scored by exact match and by a weighted length reward: the rewards and
    advantages are the environment's, per function in rollouts.jsonl."""
    got = {}
    for reward in ("exact", "length"):
        out = tmp_path / reward
        _trainer(out, env_args={"reward": reward}, temperature=1.0).train()
        got[reward] = _rollouts(out)
    exact, length = got["exact"], got["length"]
    assert [r["completion"] for r in exact] == [r["completion"] for r in length]
    assert all(set(r["rewards"]) == {"exact_match"} for r in exact)
    for r in length:
        assert r["rewards"] == {"length": float(len(r["completion"].strip()))}
        assert r["reward"] == pytest.approx(0.5 * r["rewards"]["length"])
    assert [r["advantage"] for r in length] != [r["advantage"] for r in exact]


class ScriptedTurns:
    """A stand-in sampler: turn 0 calls the tool, turn 1 answers; token ids of the tiny vocabulary, logprobs known."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.sampled: list[list[int]] = []

    def __call__(self, prompts, n, turn):
        text = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>' if turn == 0 else "5"
        ids = self.tok(text, add_special_tokens=False)["input_ids"] + [self.stop]
        self.sampled.append(ids)
        logp = [-0.5] * len(ids)
        return [[Sample(list(p), list(ids), logp, "stop") for _ in range(n)] for p in prompts]


def test_multi_turn_rollout_trains_sampled_tokens_only(tmp_path, envs):
    """A tool turn: the trained row is prompt + sampled call + tool result + sampled answer, token ids as sampled;
    the tool result and template tokens have mask 0 (no gradient), the sampled ones (stop tokens too) mask 1."""
    # Scripted tokens are far off the model's distribution: no ratio masking or clipping, so every trained token
    # has a gradient.
    trainer = _trainer(tmp_path, env="vf-sum-tools", max_seq_len=160, max_prompt_len=24, max_new_tokens=40,
                       mask_ratio_low=0.0, mask_ratio_high=1e30, epsilon=1e9)
    script = ScriptedTurns(trainer.processing_class)
    out = trainer.env.rollouts([0], 2, script, max_seq_len=160, max_new_tokens=40)
    sample = out["samples"][0]
    assert out["rewards"].tolist() == [1.0, 1.0] and out["per_func"]["used_tool"].tolist() == [1.0, 1.0]
    call, answer = script.sampled
    ids, mask = sample.completion_ids, np.array(sample.mask)
    assert ids[:len(call)] == call and ids[-len(answer):] == answer  # trained ids are the sampled ids
    assert mask.sum() == len(call) + len(answer) and mask[:len(call)].all() and mask[-len(answer):].all()
    env_text = trainer.processing_class.decode(ids[len(call):-len(answer)])
    assert env_text == "\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n"
    assert [lp for lp, m in zip(sample.logprobs, mask) if m] == [-0.5] * int(mask.sum())
    assert out["texts"][0][1] == {"role": "tool", "content": "5", "tool_call_id": "call_0"}
    _assert_gradient_only_on_sampled_tokens(trainer, sample)


def _assert_gradient_only_on_sampled_tokens(trainer, sample):
    """The loss's gradient reaches the final hidden state exactly at the positions that predict sampled tokens (the
    output head is per position, so a position's hidden state feeds only its own prediction)."""
    from vftrain.rl import rollouts as R

    batch = trainer.collator(R.training_rows([sample], np.array([1.0])))
    hidden = {}
    norm = trainer.model.model.norm
    handle = norm.register_forward_hook(lambda mod, inp, out: hidden.setdefault("h", out).retain_grad())
    try:
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(sum(sample.mask)))
        loss.backward()
    finally:
        handle.remove()
    has_grad = hidden["h"].grad[0].abs().sum(-1) > 0
    predicts_sampled = np.zeros(has_grad.shape[0], bool)
    predicts_sampled[len(sample.prompt_ids) - 1 + np.flatnonzero(sample.mask)] = True
    assert torch.isfinite(loss) and has_grad.tolist() == predicts_sampled.tolist()


def test_tool_environment_trains_with_the_embedded_sampler(tmp_path, envs):
    """The real tiny model on the tool environment: the tool is offered, rollouts are sampled and scored, a step
    trains with a finite loss (the untrained model does not call tools: rewards 0)."""
    trainer = _trainer(tmp_path, env="vf-sum-tools", max_steps=2, max_seq_len=96, max_prompt_len=32,
                       max_new_tokens=16)
    assert [t.name for t in trainer.env.tools] == ["add"]
    trainer.train()
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert {tuple(r["rewards"]) for r in _rollouts(tmp_path)} == {("used_tool",)}


def test_rl_on_an_environment_raises_reward(tmp_path, envs):
    """A short run on the single-turn environment with a graded reward (the length reward: easy to move) trains
    with a finite loss, logs the reward per function and raises the mean reward."""
    _trainer(tmp_path, env_args={"reward": "length"}, max_steps=12, learning_rate=3e-2, temperature=1.0,
             max_new_tokens=6).train()
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    assert all(np.isfinite(r["loss"]) for r in steps) and "reward/length" in steps[0]
    first, last = np.mean([r["reward"] for r in steps[:3]]), np.mean([r["reward"] for r in steps[-3:]])
    assert last > first, (first, last)


def test_environment_with_the_openai_backend(tmp_path, envs):
    """env with rl_backend = "openai" (`vftrain.serve`): each step's weights are pushed before the environment's
    turns are sampled, so the server's logprobs are the trainer's (ratio 1), and the environment's reward
    functions score the rollouts."""
    from vftrain.serve import serve

    server = serve(TINY, port=0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        _trainer(tmp_path, env_args={"reward": "length"}, rl_backend="openai", sample_base_url=url, max_steps=2,
                 learning_rate=3e-2, max_new_tokens=6).train()
    finally:
        server.shutdown()
        server.server_close()
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    assert len(steps) == 2 and "reward/length" in steps[0]
    for r in steps:
        assert abs(r["importance_ratio_min"] - 1) < 1e-4 and abs(r["importance_ratio_max"] - 1) < 1e-4, r
    assert {tuple(r["rewards"]) for r in _rollouts(tmp_path)} == {("length",)}


def test_cli_with_env_in_the_toml(tmp_path, envs):
    toml = tmp_path / "rl.toml"
    toml.write_text(textwrap.dedent(f'''\
        model = "{TINY}"

        [rl]
        env = "vf-addition"
        env_args = {{ num_tasks = 8 }}
        output_dir = "{tmp_path / 'out'}"
        max_steps = 1
        batch_size = 8
        rollouts_per_example = 4
        micro_batch_size = 4
        max_seq_len = 32
        max_prompt_len = 24
        max_new_tokens = 6
        save_strategy = "no"
        '''))
    env = {"PYTHONPATH": str(envs), "PATH": str(Path(sys.executable).parent), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(Path(sys.executable).parent / "vf-rl"), "@", str(toml)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = _rollouts(tmp_path)
    assert len(lines) == 8 and all(set(r["rewards"]) == {"exact_match"} for r in lines)
