"""verifiers environments for RL: prompts from an environment's taskset, rewards from its tasks' reward functions,
tool calls answered by its tool servers, every rollout trained as the token ids that were sampled.

verifiers 0.4.0 (`verifiers.v1`) splits an environment into a taskset (tasks: a prompt and task data, `@vf.reward`
and `@vf.metric` methods, tool servers as `vf.Toolset`s) and a harness: a program (a PEP 723 script that `uv`
installs from the network, run in a subprocess, container or sandbox) whose model calls go through verifiers'
interception server to a `Client` (prime-rl's renders to token ids and calls vLLM). That path cannot run offline
and sends every turn over HTTP twice. vftrain keeps the taskset half and plays the harness in process, the way
verifiers' own tool-calling chat loop does (`harnesses/utils/core.py::run_chat_loop`):

- `vf.resolve_env_config({"taskset": {"id": env, **env_args}})` + `vf.load_environment`: the environment's module
  is imported by id (`-` -> `_`; installed or on PYTHONPATH; `env` may also be the path of a module file, whose
  folder then goes on sys.path) and its `__all__` names its Taskset; env_args are the taskset config's fields.
- each model turn is sampled by the trainer's backend (embedded sampler or OpenAI-compatible server, token ids in
  and out) and committed into a real `vf.Trace` with `verifiers.v1.graph.prepare_turn(...).commit(Response(tokens=
  TurnTokens(...)))`, the call verifiers' interception server makes. The training row is the trace's branch
  (`Branch.token_ids` / `sampled_mask` / `logprobs`): verifiers' own attribution of sampled and environment tokens.
- no decode -> re-encode: turn k+1's prompt ids are turn k's prompt ids + its sampled ids + the template tokens of
  the environment's messages (tool results) and the next generation prompt, so a branch never forks.
- tools: the task's and taskset's `Toolset`s, each registered on its own in-memory MCP server and called in process,
  named as verifiers' harnesses name them (`<server_name>_<tool>`). Tool calls are read from a reply as vLLM's
  parser for the chat template's dialect reads them (`sampling/tool_calls.py`: Hermes / Qwen `<tool_call>` blocks,
  Llama 3's JSON, Mistral's `[TOOL_CALLS]`), from the reply decoded with its special tokens as vLLM decodes it for
  them, so the policy learns the calls its server will run.
- rewards: `Task.score(trace)` without a runtime; reward = sum of weight x score (`Trace.reward`), per function
  `trace.rewards[name].score`. Functions that need a runtime (a sandbox) are refused when the environment loads.
- sharded weights (FSDP / ZeRO-3) with the embedded sampler: every sampler call is a collective, so all processes
  sample the same number of rows each turn, until every process's episodes are done.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import os
import sys
import time
from functools import partial
from typing import Any, Callable

import numpy as np
from jinja2 import TemplateError

from vftrain.data.render import clean_message, stop_token_ids, template_kwargs
from vftrain.errors import ConfigError, DataError
from vftrain.rewards import split_reasoning
from vftrain.rl.rollouts import PromptSet
from vftrain.sampling.tokens import Sample
from vftrain.sampling.tool_calls import call_id, dialect, parse_tool_calls, reply_text

INSTALL = "pip install 'vftrain[verifiers]'"
log = logging.getLogger("vftrain")

# sample_fn(prompt ids, n, turn) -> one list of n Samples per prompt (the trainer's backend)
SampleFn = Callable[[list[list[int]], int, int], list[list[Sample]]]
# most_rows(this process's row count) -> the largest over all processes (every process calls it)
MostRows = Callable[[int], int]


def import_verifiers():
    try:
        import verifiers.v1 as vf
    except ImportError:
        raise ConfigError(f"env needs the verifiers package (Python >= 3.11): {INSTALL}") from None
    return vf


@dataclasses.dataclass
class _Rollout:
    """One episode in progress: its task, conversation (verifiers messages), trace and current prompt ids."""

    task: Any
    messages: list
    trace: Any
    ids: list[int]
    first_ids: list[int]
    finish_reason: str = "length"
    done: bool = False


class VerifiersEnv:
    """A loaded verifiers environment: `prompts` (a PromptSet for the trainer's step schedule) and `rollouts`."""

    def __init__(self, env_id: str, env_args: dict | None, tokenizer, max_prompt_len: int, max_turns: int):
        self.vf = vf = import_verifiers()
        env_id = _importable(env_id)
        try:
            env = vf.load_environment(vf.resolve_env_config({"taskset": {"id": env_id, **(env_args or {})}}))
        except (ImportError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"env = {env_id!r}: {str(exc).splitlines()[0]}") from None
        if not env.taskset.bounded:
            raise ConfigError(f"env = {env_id!r} has an infinite taskset; bound it through env_args")
        self.tokenizer, self.max_turns = tokenizer, max_turns
        self.stop_ids, self.dialect = sorted(stop_token_ids(tokenizer)), dialect(tokenizer)
        self.refusals: set[str] = set()
        per_task = _task_agnostic(type(env.taskset).task_type().toolsets(env.taskset.config.task))
        self.toolsets = [*env.taskset.toolsets(env.taskset.config), *per_task]
        self.loop = asyncio.new_event_loop()
        self.servers, self.tools = self.loop.run_until_complete(self._tool_servers())
        self.schemas = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                          "parameters": t.parameters}} for t in self.tools] or None
        self.tasks, self.prompts = self._prompt_set(list(env.taskset), max_prompt_len)
        self.reward_names = _reward_names(env_id, self.tasks)
        if self.schemas and self.tasks:
            self._check_tool_turns(env_id)

    def _check_tool_turns(self, env_id: str) -> None:
        """A tool episode extends the prompt's tokens turn by turn (`env_tokens`), so the template must render the
        conversation before a call alike once the call's result follows. Mistral's (Nemo, 7B v0.3) write a system
        message only into a last user turn: refused here, before the first step, rather than at the first call."""
        calls = [{"id": call_id(self.dialect, 0), "type": "function",
                  "function": {"name": self.schemas[0]["function"]["name"], "arguments": "{}"}}]
        conversation = [_wire(m) for m in self.initial_messages(self.tasks[0])] + [
            {"role": "assistant", "content": "", "tool_calls": calls}]
        result = [{"role": "tool", "tool_call_id": calls[0]["id"], "content": "0"}]
        try:
            env_tokens(self.tokenizer, conversation, result, self.stop_ids[0], self.stop_ids, self.schemas)
        except TemplateError:  # a call the template refuses ends its episode (`_advance`)
            return
        except DataError:
            system = " (Mistral's templates write a system message only into a last user turn: give the tasks no " \
                "system prompt)" if conversation[0]["role"] == "system" else ""
            raise ConfigError(f"env = {env_id!r}: the chat template renders a task's conversation otherwise once a "
                              f"tool call and its result follow it{system}, so its tool episodes cannot go on from "
                              "their sampled tokens; set chat_template to one that keeps it") from None

    def _prompt_set(self, tasks: list, max_prompt_len: int) -> tuple[list, PromptSet]:
        """(the tasks kept, their PromptSet): prompts the template rejects or longer than max_prompt_len dropped."""
        items = (([_wire(m) for m in self.initial_messages(task)], "", self.schemas) for task in tasks)
        prompts = PromptSet.from_prompts(items, self.tokenizer, max_prompt_len)
        return [tasks[i] for i in prompts.kept], prompts

    def initial_messages(self, task) -> list:
        """The conversation the model starts from: the task's system prompt and prompt (as verifiers messages)."""
        vf, data = self.vf, task.data
        prompt = [vf.UserMessage(content=data.prompt)] if isinstance(data.prompt, str) else list(data.prompt or [])
        return ([vf.SystemMessage(content=data.system_prompt)] if data.system_prompt else []) + prompt

    async def _tool_servers(self):
        """({tool name: (its toolset's in-memory MCP server, the toolset's own name for it)}, the tools as verifiers
        `Tool`s). Named as verifiers' harnesses name a toolset's tools (`harnesses/utils/mcp.py`:
        `<server_name>_<tool>`, the bare name when `TOOL_PREFIX = None`), so a policy trained here calls the names it
        is offered under verifiers; one server per toolset, as there, so two toolsets' tools of one name do not
        replace each other."""
        from mcp.server.mcpserver import MCPServer

        servers, tools = {}, []
        for toolset in self.toolsets:
            server = MCPServer(toolset.server_name or "vftrain")
            await toolset.setup()
            toolset.register(server)
            for tool in await server.list_tools():
                name = f"{toolset.server_name}_{tool.name}" if toolset.server_name else tool.name
                if name in servers:
                    raise ConfigError(f"env: two toolsets offer a tool named {name!r}; give one of them a distinct "
                                      "TOOL_PREFIX")
                servers[name] = (server, tool.name)
                tools.append(self.vf.Tool(name=name, description=tool.description or "",
                                          parameters=tool.input_schema))
        return servers, tools

    # ---- rollouts
    def rollouts(self, indices, n: int, sample_fn: SampleFn, max_seq_len: int, max_new_tokens: int,
                 most_rows: MostRows | None = None) -> dict:
        """`n` episodes of each prompt index: {"samples", "texts", "rewards", "per_func", "score_seconds"}. A
        Sample's completion is everything after the first prompt, with `mask` 1 on sampled tokens only.
        `most_rows`: set when every process must make the same sampler calls (sharded weights: each forward gathers
        them from all processes); a turn is then sampled while any process has an episode going, and every process
        samples as many rows as the busiest one (so also as many 256-row chunks), padding with a copy of a prompt
        whose samples are dropped."""
        runs = [self._start(self.tasks[i], self.prompts.ids[i]) for i in indices for _ in range(n)]
        for turn in range(self.max_turns):
            active = [r for r in runs if not r.done]
            rows = len(active) if most_rows is None else most_rows(len(active))
            if not rows:
                break
            if turn == 0:  # groups share their prompt: sample them together (the same count on every process)
                groups = sample_fn([self.prompts.ids[i] for i in indices], n, 0)
                samples = [s for group in groups for s in group]
            else:
                prompts = [r.ids for r in active]
                padding = [(prompts or [runs[0].first_ids])[-1]] * (rows - len(active))
                samples = [g[0] for g in sample_fn(prompts + padding, 1, turn)][:len(active)]
            last = turn + 1 == self.max_turns
            self._run(self._advance(r, s, last, max_seq_len - max_new_tokens) for r, s in zip(active, samples))
        clock = time.perf_counter()
        self._run(r.task.score(r.trace) for r in runs)
        scored = time.perf_counter() - clock
        return {"samples": [self._sample(r) for r in runs], "texts": [self._text(r) for r in runs],
                "rewards": np.array([float(r.trace.reward) for r in runs]),
                "per_func": self._per_func(runs), "score_seconds": scored}

    def _run(self, coroutines) -> list:
        """The coroutines' results, run concurrently on the environment's own loop (tools and rewards are async)."""
        async def gather():
            return await asyncio.gather(*coroutines)

        return self.loop.run_until_complete(gather())

    def _start(self, task, ids: list[int]) -> _Rollout:
        vf = self.vf
        trace = vf.Trace(task=vf.TraceTask(type=type(task).__name__, data=task.data, key=task.key, hash=task.hash),
                         agent=vf.AgentInfo(config=vf.AgentConfig()))
        return _Rollout(task, self.initial_messages(task), trace, list(ids), list(ids))

    async def _advance(self, run: _Rollout, sample: Sample, last: bool, longest_prompt: int) -> None:
        """Commit one sampled turn to the trace; answer its tool calls, or end the episode."""
        from verifiers.v1.graph import prepare_turn

        vf = self.vf
        if self.schemas:
            text = reply_text(self.tokenizer, sample.completion_ids, sample.finish_reason, self.stop_ids, self.dialect)
            content, calls = parse_tool_calls(text, self.dialect)
        else:
            content, calls = self.tokenizer.decode(sample.completion_ids, skip_special_tokens=True), []
        calls = [vf.ToolCall(id=call_id(self.dialect, i), **call) for i, call in enumerate(calls)]
        reasoning, content = split_reasoning(content or "")  # the environment's rewards read the answer (Qwen3's think)
        message = vf.AssistantMessage(content=content, reasoning_content=reasoning, tool_calls=calls or None)
        finish = "tool_calls" if calls and sample.finish_reason == "stop" else sample.finish_reason
        tokens = vf.TurnTokens(prompt_ids=run.ids, completion_ids=list(sample.completion_ids),
                               completion_logprobs=list(sample.logprobs))
        prepare_turn(run.trace, run.messages, self.tools).commit(vf.Response(
            id=f"{run.trace.id}-{len(run.messages)}", created=0, model="policy", message=message,
            finish_reason=finish, tokens=tokens))
        run.messages.append(message)
        run.finish_reason = sample.finish_reason
        if finish != "tool_calls" or last:  # a truncated turn's tool calls are not run
            run.done = True
            return
        results = [vf.ToolMessage(tool_call_id=c.id, content=await self._call(c)) for c in calls]
        try:
            tail = env_tokens(self.tokenizer, [_wire(m) for m in run.messages], [_wire(m) for m in results],
                              sample.completion_ids[-1], self.stop_ids, self.schemas)
        except TemplateError as exc:  # e.g. Llama 3's "only supports single tool-calls": vLLM answers such a turn 400
            self._refused(str(exc))
            run.done = True
            return
        run.messages += results
        run.ids = run.ids + list(sample.completion_ids) + tail
        if len(run.ids) > longest_prompt:  # the next turn would not fit max_seq_len
            run.finish_reason, run.done = "length", True

    def _refused(self, reason: str) -> None:
        if reason not in self.refusals:
            self.refusals.add(reason)
            log.warning("the chat template refuses a sampled turn's tool calls (%s): such episodes end at that turn, "
                        "scored as they stand", reason)

    async def _call(self, call) -> str:
        """A tool's result as text; an unknown tool, bad arguments or a failing tool answer with the error (the model
        sees it, as in verifiers' chat loop)."""
        if call.name not in self.servers:
            return f"error: unknown tool {call.name!r}"
        server, name = self.servers[call.name]
        try:
            arguments = json.loads(call.arguments or "{}")
            result = await server.call_tool(name, arguments)
        except Exception as exc:  # the tool's own failure is the model's observation
            return f"error: {exc}"
        return "\n".join(getattr(block, "text", "") for block in result.content)

    def _sample(self, run: _Rollout) -> Sample:
        branches = run.trace.branches
        if len(branches) != 1:
            raise DataError(f"a rollout's turns did not extend one token sequence ({len(branches)} branches)")
        branch, start = branches[0], len(run.first_ids)
        return Sample(prompt_ids=run.first_ids, completion_ids=branch.token_ids[start:],
                      logprobs=branch.logprobs[start:], finish_reason=run.finish_reason,
                      mask=[int(m) for m in branch.sampled_mask[start:]])

    def _text(self, run: _Rollout):
        """What rollouts.jsonl shows as the completion: the reply (one turn without tool calls) or the messages after
        the prompt (a tool call is parsed out of the reply's text into the message's `tool_calls`)."""
        after = run.messages[len(self.initial_messages(run.task)):]
        if len(after) == 1 and not after[0].tool_calls:
            return after[0].content or ""
        return [_wire(m) for m in after]

    def _per_func(self, runs: list[_Rollout]) -> dict[str, np.ndarray]:
        names = list(dict.fromkeys(k for r in runs for k in r.trace.rewards))
        return {k: np.array([_score(r.trace.rewards.get(k)) for r in runs]) for k in names}


def _importable(env_id: str) -> str:
    """The id verifiers imports: `env_id` itself, or for a path to a `.py` file its name, with the file's folder put
    on sys.path (verifiers imports environments by module name only)."""
    if not env_id.endswith(".py"):
        return env_id
    if not os.path.isfile(env_id):
        raise ConfigError(f"env = {env_id!r}: no such environment file")
    folder = os.path.dirname(os.path.abspath(env_id))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return os.path.basename(env_id)[:-3]


def _task_agnostic(toolsets: list) -> list:
    """`toolsets` (a task's), refused when one sets up per-task state: verifiers calls `setup_task` on each rollout's
    own server; here one server answers every rollout and its per-task setup would not run."""
    from verifiers.v1.mcp.server import ServerBase

    for toolset in toolsets:
        if type(toolset).setup_task is not ServerBase.setup_task:
            raise ConfigError(f"env: toolset {type(toolset).__name__} sets up per-task state (setup_task), which "
                              "vftrain's shared in-process tool servers do not run; use task-agnostic tools")
    return toolsets


def _reward_names(env_id: str, tasks: list) -> list[str]:
    """The rewards the tasks record (reward functions and plugged judges, over every kind of task). Refused, since
    they would not run without a word: signals that need a runtime (vftrain scores without one, and verifiers'
    `Task.score` then skips every metric, reward or judge with a required `runtime` parameter, its own test in
    `task.py`, logging it at INFO only), and `@vf.stop` / `@vf.intercept` hooks (run by verifiers' rollout session
    around each model call, not by vftrain's in-process loop)."""
    from verifiers.v1.utils.decorators import discover_decorated

    names, needs_runtime, hooks = {}, {}, {}
    kinds = {(type(task), id(task.config)): task for task in tasks}.values()  # tasks share their config object
    for task in kinds:
        rewards = [(fn.__name__, fn) for fn in task.hooks("reward")]
        rewards += [(judge.reward_name, judge.score) for judge in task.plugged_judges()]
        names.update(dict.fromkeys(name for name, _ in rewards))
        for name, fn in [(fn.__name__, fn) for fn in task.hooks("metric")] + rewards:
            runtime = inspect.signature(fn).parameters.get("runtime")
            if runtime is not None and runtime.default is inspect.Parameter.empty:
                needs_runtime[name] = None
        hooks.update(dict.fromkeys(fn.__name__ for fn in (*task.hooks("stop"), *discover_decorated(task, "intercept"))))
    if needs_runtime:
        raise ConfigError(f"env = {env_id!r}: {', '.join(needs_runtime)} need a runtime (a sandbox), which vftrain "
                          "does not run (it would skip them and train on the other rewards); use an environment "
                          "whose rewards run offline")
    if hooks:
        raise ConfigError(f"env = {env_id!r}: the @vf.stop / @vf.intercept hooks {', '.join(hooks)} would not run "
                          "(vftrain plays the harness in process, without verifiers' rollout session); use an "
                          "environment without them")
    return list(names)


def _score(reward) -> float:
    return float(reward.score) if reward is not None else 0.0  # None: the function did not run (an error)


def env_tokens(tokenizer, conversation: list[dict], new: list[dict], stop_id: int, stop_ids: list[int],
               tools=None) -> list[int]:
    """Token ids between a sampled turn's stop token `stop_id` and the next generation prompt's end: the chat
    template's text after its end of that turn (e.g. a newline), the environment's messages and the generation
    prompt. Only this text is encoded; the sampled tokens before it, the stop token included, are kept as they are.
    The turn's end is the sampled stop token's text, or where the template does not write that one (a turn ended
    on eos, `<|endoftext|>`, under Qwen's template, which writes `<|im_end|>`) the last of any of `stop_ids`' texts.

    The template may render the sampled turn itself otherwise once messages follow it (Qwen3 drops its empty
    `<think>` block): the model keeps its turn as sampled, and the text after that turn's end is taken from the
    longer rendering. What comes before the turn must render alike in both."""
    variables = template_kwargs(tokenizer)
    render = partial(tokenizer.apply_chat_template, tools=tools, tokenize=False, **variables)
    # arguments as dicts; a sampled call vLLM would keep (no name, arguments no JSON object) as vLLM renders it
    conversation, new = [clean_message(m, served=True) for m in conversation], [clean_message(m) for m in new]
    before, after = render(conversation), render(conversation + new, add_generation_prompt=True)
    earlier = render(conversation[:-1]) if len(conversation) > 1 else ""
    texts = [t for t in tokenizer.batch_decode([[i] for i in stop_ids]) if t and t in before[len(earlier):]]
    stop = tokenizer.decode([stop_id])
    stop = stop if stop in texts else max(texts, key=before.rfind, default=None)
    turn_end = after.find(stop, len(earlier)) if stop is not None else -1
    if not (before.startswith(earlier) and after.startswith(earlier)) or turn_end < 0:
        raise DataError("the chat template renders the conversation before a sampled turn differently once tool "
                        "results follow it (tool turns need one that does not)")
    return tokenizer(after[turn_end + len(stop):], add_special_tokens=False)["input_ids"]


def _wire(message) -> dict:
    """A verifiers message as a chat-template dict (content always a string, as simple templates expect)."""
    out = {"role": message.role, "content": message.content or ""}
    if getattr(message, "reasoning_content", None) is not None:  # Qwen3's template renders it in its think block
        out["reasoning_content"] = message.reasoning_content
    if getattr(message, "tool_calls", None):
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments}} for c in message.tool_calls]
    if getattr(message, "tool_call_id", None):
        out["tool_call_id"] = message.tool_call_id
    return out
