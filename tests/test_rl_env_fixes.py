"""RL on verifiers environments, the cases an outside review found (design/reviews/rl-2026-12-02.md items 5, 9, 10,
17; newcomer-2026-12-02.md item 11): reward functions that need a runtime refused when the environment loads, tool
turns that end on any stop token, sharded sampling where one process's episodes run longer, what rollouts.jsonl
shows of a tool call, and `vf-rl --inspect` with `env`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, worker_env
from test_rl_env import ScriptedTurns, _rollouts, _trainer, envs  # noqa: F401  (envs: a fixture)
from vftrain.errors import ConfigError
from vftrain.sampling.tokens import Sample

RUNTIME = '''
import verifiers.v1 as vf


class SandboxTask(vf.Task[vf.TaskData, vf.State, vf.TaskConfig]):
    @vf.reward
    async def replied(self, trace) -> float:
        return 1.0

    @vf.reward
    async def tests_pass(self, trace, runtime) -> float:  # runs the reply in the rollout's sandbox
        return 1.0

    @vf.metric
    async def files_written(self, trace, runtime) -> float:
        return 0.0

    @vf.metric
    async def optional_runtime(self, trace, runtime=None) -> float:  # verifiers calls it with None offline
        return 0.0


class SandboxTaskset(vf.Taskset[SandboxTask, vf.TasksetConfig]):
    def load(self):
        for k in range(8):
            yield SandboxTask(vf.TaskData(prompt=f"{k}+1"), self.config.task)


__all__ = ["SandboxTaskset"]
'''


def test_reward_functions_that_need_a_runtime_are_refused(tmp_path, envs):
    """verifiers' Task.score skips functions with a required `runtime` parameter when scored without one (as vftrain
    scores): refused when the environment loads, naming them, instead of training on the rest without a word."""
    (envs / "vf_sandboxed.py").write_text(RUNTIME)
    with pytest.raises(ConfigError) as err:
        _trainer(tmp_path, env="vf-sandboxed")
    message = str(err.value)
    assert "\n" not in message and "tests_pass" in message and "files_written" in message
    assert "optional_runtime" not in message and "replied" not in message


STOP_HOOK = '''
import verifiers.v1 as vf


class SubmitTask(vf.Task[vf.TaskData, vf.State, vf.TaskConfig]):
    @vf.reward
    async def replied(self, trace) -> float:
        return 1.0

    @vf.stop
    async def submitted(self, trace) -> bool:  # ends the episode once the answer is in
        return "ANSWER" in trace.last_reply


class SubmitTaskset(vf.Taskset[SubmitTask, vf.TasksetConfig]):
    def load(self):
        for k in range(8):
            yield SubmitTask(vf.TaskData(prompt=f"{k}+1"), self.config.task)


__all__ = ["SubmitTaskset"]
'''


def test_stop_hooks_are_refused(tmp_path, envs):
    """A `@vf.stop` hook ends episodes in verifiers' rollout session; vftrain's in-process loop would play on past it
    without a word: refused when the environment loads, naming it."""
    (envs / "vf_submit.py").write_text(STOP_HOOK)
    with pytest.raises(ConfigError, match=r"^env = 'vf-submit': the @vf.stop / @vf.intercept hooks submitted "):
        _trainer(tmp_path, env="vf-submit")


def _stop_script(tokenizer, stop: str) -> ScriptedTurns:
    script = ScriptedTurns(tokenizer)
    script.stop = tokenizer.convert_tokens_to_ids(stop)
    return script


@pytest.mark.parametrize("stop", ["<|im_end|>", "<|endoftext|>"])
def test_a_tool_turn_may_end_on_any_stop_token(tmp_path, envs, stop):
    """Both are stop ids of the tiny tokenizer (as of Qwen2.5's); the chat template writes only <|im_end|>. A tool
    turn ending on either is answered and scored; the sampled stop token stays in the trained row as sampled, and the
    environment's tokens are the template's text after its own end of turn."""
    trainer = _trainer(tmp_path, env="vf-sum-tools", max_seq_len=160, max_prompt_len=24, max_new_tokens=40)
    script = _stop_script(trainer.processing_class, stop)
    assert script.stop in trainer.stop_ids
    out = trainer.env.rollouts([0], 2, script, max_seq_len=160, max_new_tokens=40)
    assert out["rewards"].tolist() == [1.0, 1.0]
    call, answer = script.sampled
    ids = out["samples"][0].completion_ids
    assert ids[:len(call)] == call and ids[-len(answer):] == answer
    assert trainer.processing_class.decode(ids[len(call):-len(answer)]) == \
        "\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n"


def test_a_single_tool_call_turn_shows_in_rollouts_jsonl(tmp_path, envs):
    """max_turns = 1 and the model calls a tool: the episode ends there, and rollouts.jsonl shows the call (it used
    to show an empty completion: the call's block is parsed out of the message content)."""
    trainer = _trainer(tmp_path, env="vf-sum-tools", max_turns=1, max_seq_len=96, max_prompt_len=24,
                       max_new_tokens=40)
    script = ScriptedTurns(trainer.processing_class)
    trainer._sample_groups = lambda prompts, step, n, turn=0: script(prompts, n, turn)
    trainer.train()
    lines = _rollouts(tmp_path)
    assert len(lines) == 16
    for line in lines:
        (message,) = line["completion"]
        assert message["role"] == "assistant"
        assert [c["function"] for c in message["tool_calls"]] == [{"name": "add", "arguments": '{"a": 2, "b": 3}'}]


TWO_TOOLSETS = '''
import verifiers.v1 as vf


class Calculator(vf.Toolset):
    TOOL_PREFIX = None  # its tools keep their own names

    @vf.tool
    async def add(self, a: int, b: int) -> int:
        """Add two integers."""
        return a + b


class Abacus(vf.Toolset):  # the default prefix: verifiers offers its tools as abacus_<tool>
    @vf.tool
    async def add(self, a: int, b: int) -> int:
        """Add two integers, plus 100."""
        return 100 + a + b


class TwoTask(vf.Task[vf.TaskData, vf.State, vf.TaskConfig]):
    @classmethod
    def toolsets(cls, config):
        return [Calculator(vf.ToolsetConfig()), Abacus(vf.ToolsetConfig())]

    @vf.reward
    async def used_tool(self, trace) -> float:
        return float(len(trace.tool_messages) > 0)


class TwoTaskset(vf.Taskset[TwoTask, vf.TasksetConfig]):
    def load(self):
        for k in range(8):
            yield TwoTask(vf.TaskData(prompt=f"{k}+1"), self.config.task)


__all__ = ["TwoTaskset"]
'''


def test_tools_are_named_as_verifiers_names_them(tmp_path, envs):
    """Two toolsets with a tool called `add`: the model is offered both, named as verifiers' harnesses name them
    (`<server_name>_<tool>`, bare with TOOL_PREFIX = None), and a call reaches the tool it names (the second `add`
    used to replace nothing and vanish: one MCP server keyed by bare tool names)."""
    (envs / "vf_two_toolsets.py").write_text(TWO_TOOLSETS)
    trainer = _trainer(tmp_path, env="vf-two-toolsets", max_seq_len=160, max_prompt_len=24, max_new_tokens=40)
    tok = trainer.processing_class
    assert [t.name for t in trainer.env.tools] == ["add", "abacus_add"]

    def script(prompts, n, turn):
        call = '<tool_call>{"name": "abacus_add", "arguments": {"a": 2, "b": 3}}</tool_call>'
        ids = tok(call if turn == 0 else "105", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return [[Sample(list(p), ids, [-0.5] * len(ids), "stop") for _ in range(n)] for p in prompts]

    out = trainer.env.rollouts([0], 1, script, max_seq_len=160, max_new_tokens=40)
    assert out["texts"][0][1] == {"role": "tool", "content": "105", "tool_call_id": "call_0"}


def test_toolsets_with_per_task_state_are_refused(tmp_path, envs):
    """verifiers calls a task-scoped toolset's `setup_task` on each rollout's own server; vftrain's tool servers are
    shared by every rollout and never call it, so the tools would answer from unset state: refused at load."""
    per_task = TWO_TOOLSETS.replace("class Abacus(vf.Toolset):", """class Abacus(vf.Toolset):
    async def setup_task(self, task):
        self.offset = len(task.data.prompt)
""")
    (envs / "vf_per_task.py").write_text(per_task)
    with pytest.raises(ConfigError, match=r"^env: toolset Abacus sets up per-task state \(setup_task\)"):
        _trainer(tmp_path, env="vf-per-task")


@pytest.mark.parametrize("budget", [None, "128"], ids=["rows", "token-budget"])
def test_fsdp2_env_where_one_process_runs_more_turns_finishes(tmp_path, envs, budget):
    """2 CPU processes under FSDP2, the embedded sampler (its forwards gather weights from both processes): only
    rank 0's episodes call the tool, so only rank 0 has a second turn to sample. Every process must still make the
    same sampler calls; they did not (gloo aborts on the mismatched collectives, NCCL hangs: the timeout turns a hang
    into a failure). With a 128-token budget rank 0's longer episodes train in more forwards than rank 1's, which
    repeats one (VFTrainer.training_step)."""
    env = worker_env(envs)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(29800 + os.getpid() % 1000)]
    try:
        proc = subprocess.run([*launcher, str(ROOT / "tests" / "rl_env_worker.py"), str(tmp_path / "out"),
                               *(["", budget] if budget else [])], env=env,
                              capture_output=True, text=True, timeout=240, start_new_session=True)
    except subprocess.TimeoutExpired:
        pytest.fail("the 2-process run hung (processes made different sampler calls)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    turns = {json.loads(line)["rank"]: json.loads(line)["turns"] for line in proc.stdout.splitlines()
             if line.startswith("{")}
    assert turns == {0: [0, 1], 1: [0, 1]}  # rank 1 samples a turn it drops, with rank 0
    lines = [json.loads(x) for x in (tmp_path / "out" / "rollouts.jsonl").read_text().splitlines()]
    assert sorted(r["reward"] for r in lines) == [0.0] * 4 + [1.0] * 4


def test_inspect_shows_the_environments_prompts(tmp_path):
    """The README's example, `vf-rl @ examples/verifiers_env/rl.toml`, with --inspect 2: the environment's first
    two prompts as the sampler continues them (it used to fail: `dataset = None is not a dataset name`)."""
    pytest.importorskip("verifiers")
    for name in ("examples", "assets"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "sft-then-rl-sft").symlink_to(TINY)  # the SFT line's output (its tokenizer is the tiny one)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(["vf-rl", "@", "examples/verifiers_env/rl.toml", "--inspect", "2"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (ROOT / "assets" / "addition" / "train.jsonl").open().readlines()[:3]]
    for row in rows[:2]:
        assert f"<|im_start|>user\n{row['prompt'][0]['content']}<|im_end|>\n<|im_start|>assistant\n" in proc.stdout
    assert rows[2]["prompt"][0]["content"] not in proc.stdout
    assert proc.stdout.startswith("256 prompts")


@pytest.mark.parametrize("thinking", [True, False])
def test_qwen3_tool_turns_continue_after_the_turn_as_sampled(thinking):
    """Qwen3 renders a tool-call turn with an empty think block while it is the last message and without one once
    the tool result follows: the conversation did not extend by appending, and every Qwen3 tool rollout stopped at
    its first call. The sampled turn stays as sampled; the environment's tokens are the template's text after it."""
    from conftest import TEMPLATES, family_tokenizer
    from vftrain.data.render import stop_token_ids
    from vftrain.models import use_template
    from vftrain.rl.environment import env_tokens

    tok = family_tokenizer("qwen2.5")
    use_template(tok, str(TEMPLATES / "qwen3.jinja"), None if thinking else {"enable_thinking": False})
    tools = [{"type": "function", "function": {"name": "add", "description": "add numbers",
                                               "parameters": {"type": "object", "properties": {}}}}]
    call = {"role": "assistant", "content": "", "reasoning_content": "", "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]}
    conversation = [{"role": "user", "content": "2+3?"}, call]
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    ids = env_tokens(tok, conversation, [{"role": "tool", "content": "5", "tool_call_id": "call_0"}], stop,
                     sorted(stop_token_ids(tok)), tools)
    prefill = "" if thinking else "<think>\n\n</think>\n\n"
    assert tok.decode(ids) == ("\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n"
                               "<|im_start|>assistant\n" + prefill)


class _Qwen3Turns(ScriptedTurns):
    """The scripted tool call and answer as a Qwen3 model trained by vf-sft writes them: after an empty think block."""

    def __call__(self, prompts, n, turn):
        text = ('<think>\n\n</think>\n\n<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
                if turn == 0 else "<think>\n\n</think>\n\n5")
        ids = self.tok(text, add_special_tokens=False)["input_ids"] + [self.stop]
        self.sampled.append(ids)
        return [[Sample(list(p), list(ids), [-0.5] * len(ids), "stop") for _ in range(n)] for p in prompts]


def test_a_qwen3_tool_rollout_is_played_and_scored_on_its_answer(tmp_path, envs):
    """Through the environment's loop with Qwen3's template: it stopped at the first tool call (the template
    renders the call turn otherwise once its result follows), and the answer kept its think block, so the
    environment's reward read "<think>...</think>5" and scored 0."""
    from conftest import TEMPLATES

    trainer = _trainer(tmp_path, env="vf-sum-tools", max_seq_len=1600, max_prompt_len=1400, max_new_tokens=60,
                       chat_template=str(TEMPLATES / "qwen3.jinja"))
    script = _Qwen3Turns(trainer.processing_class)
    out = trainer.env.rollouts([0], 2, script, max_seq_len=1600, max_new_tokens=60)
    assert out["rewards"].tolist() == [1.0, 1.0]
    call, answer = script.sampled
    ids = out["samples"][0].completion_ids
    assert ids[:len(call)] == call and ids[-len(answer):] == answer
