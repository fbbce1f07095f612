"""Tool calls read from sampled replies as vLLM's parser for the chat template's dialect reads them: Hermes / Qwen
`<tool_call>` blocks, Llama 3's bare JSON calls, Mistral's `[TOOL_CALLS]`. Llama 3.1 tool rollouts in a verifiers
environment ended at the first turn: its calls (`{"name": ..., "parameters": ...}`, no tag) were read as the answer;
Mistral's ended there too (the marker, a special token, was decoded away, and the template refused the call ids)."""

from __future__ import annotations

import json

import pytest

from conftest import TEMPLATES, TINY, family_tokenizer, tiny_tokenizer
from test_rl_env import envs  # noqa: F401  (a fixture)
from vftrain.errors import ConfigError
from vftrain.sampling.tokens import Sample
from vftrain.sampling.tool_calls import dialect, parse_tool_calls

ADD = {"name": "add", "arguments": '{"a": 2, "b": 3}'}


@pytest.mark.parametrize(("family", "style"), [("qwen2.5", "hermes"), ("qwen3", "hermes"),
                                               ("llama3.1", "llama3_json"), ("mistral", "mistral"), ("tiny", "hermes")])
def test_the_dialect_is_the_chat_templates(family, style):
    tok = tiny_tokenizer()
    if family != "tiny":
        tok.chat_template = (TEMPLATES / f"{family}.jinja").read_text()
    assert dialect(tok) == style
    if family == "mistral":  # v11+ tokenizers (Mistral Small 3): as vLLM, told by the vocabulary
        tok.add_special_tokens({"additional_special_tokens": ["[ARGS]"]})
        assert dialect(tok) == "mistral_v11"


HERMES_REPLIES = [
    ('Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>',
     ("Let me add.\n", [ADD])),
    ('<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call><tool_call>{"name": "add", '
     '"arguments": {"a": 2, "b": 3}}', (None, [ADD, ADD])),  # the last block left open
    ('<tool_call>{"name": "add", "arguments": "{\\"a\\": 2}"}</tool_call>',  # a string: encoded again, as vLLM
     (None, [{"name": "add", "arguments": json.dumps('{"a": 2}')}])),
    ('<tool_call>{"name": "add", "arguments": {}}</tool_call><tool_call>{"name": </tool_call>', None),  # one bad: none
    ('<tool_call>{"arguments": {}}</tool_call>', None),
    ('{"name": "add", "arguments": {"a": 2, "b": 3}}', None),  # bare JSON is content to the hermes parser
    ("5", None),
    ('  <tool_call>{"name": "add", "arguments": {}}</tool_call>', (None, [{"name": "add", "arguments": "{}"}])),
]
LLAMA_REPLIES = [
    ('{"name": "add", "parameters": {"a": 2, "b": 3}}', (None, [ADD])),
    ('<|python_tag|>{"name": "add", "arguments": {"a": 2, "b": 3}}; {"name": "add", "parameters": {"a": 2, "b": 3}}',
     (None, [ADD, ADD])),
    ('{"name": "add", "parameters": {"nested": {"x": "{"}}}', (None, [{"name": "add", "arguments": json.dumps(
        {"nested": {"x": "{"}})}])),
    ('{"name": "add"}', None),  # no arguments or parameters
    ('The answer is {"value": 5}', None),
    ("{5", None),
    ("5", None),
]

MISTRAL_REPLIES = [  # before v11 (Mistral 7B v0.3, Nemo): the first JSON value after the marker
    ('Sure.[TOOL_CALLS][{"name": "add", "arguments": {"a": 2, "b": 3}}]', ("Sure.", [ADD])),
    ('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 2, "b": 3}}, {"name": "add", "arguments": "{\\"a\\": 2, '
     '\\"b\\": 3}"}] trailing', (None, [ADD, ADD])),  # string arguments kept as they are
    ('[TOOL_CALLS][TOOL_CALLS]{"name": "add", "arguments": {"a": 2, "b": 3}}', (None, [ADD])),
    ('[TOOL_CALLS]x [{"name": "add", "arguments": {}}] y', (None, [{"name": "add", "arguments": "{}"}])),
    ('[TOOL_CALLS][{"arguments": {"a": 2}}, {"x": 1}, 5]', (None, [{"name": "", "arguments": '{"a": 2}'}])),
    ("Sure.[TOOL_CALLS] garbage", ("garbage", [])),  # no call: the text after the marker is the content
    ('[TOOL_CALLS][{"name": "add", "arguments": {"a": 2, ', ('[{"name": "add", "arguments": {"a": 2,', [])),
    ("[TOOL_CALLS]", (None, [])),
    ("plain 5", ("plain 5", [])),
]
MISTRAL_V11_REPLIES = [  # v11+ (an [ARGS] token): name[ARGS]{...} or name{...} per marker
    ('I will add.[TOOL_CALLS]add[ARGS]{"a": 2, "b": 3}', ("I will add.", [ADD])),
    ('  [TOOL_CALLS]add[ARGS] {"a": 2, "b": 3} trailing[TOOL_CALLS]add{"a": 2, "b": 3}', (None, [ADD, ADD])),
    ('[TOOL_CALLS] add {"a": {"b": "{"}}', (None, [{"name": "add", "arguments": '{"a": {"b": "{"}}'}])),
    ("[TOOL_CALLS]add[ARGS]not json", (None, [{"name": "add", "arguments": "not json"}])),
    ("[TOOL_CALLS] garbage", (None, [{"name": "garbage", "arguments": "{}"}])),
    ('[TOOL_CALLS][TOOL_CALLS]add{"a": 2}', (None, [{"name": "[TOOL_CALLS]add", "arguments": '{"a": 2}'}])),
    ("[TOOL_CALLS]add{}  [TOOL_CALLS]  ", (None, [{"name": "add", "arguments": "{}"},
                                                 {"name": "", "arguments": "{}"}])),
    ("x[TOOL_CALLS]", ("x", [])),
    ("[TOOL_CALLS]", (None, [])),
    ("plain 5", ("plain 5", [])),
]
STYLES = {"hermes": HERMES_REPLIES, "llama3_json": LLAMA_REPLIES, "mistral": MISTRAL_REPLIES,
          "mistral_v11": MISTRAL_V11_REPLIES}




def _expected(text: str, expected):
    """None: no calls, the reply is the content."""
    return (text, []) if expected is None else expected


@pytest.mark.parametrize(("style", "text", "expected"), [(s, t, e) for s, cases in STYLES.items() for t, e in cases])
def test_replies(style, text, expected):
    assert parse_tool_calls(text, style) == _expected(text, expected)


VLLM_PARSE = """
import json, sys
from transformers import AutoTokenizer
from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser
from vllm.tool_parsers.llama_tool_parser import Llama3JsonToolParser
from vllm.tool_parsers.mistral_tool_parser import MistralToolParser


def tokenizer(*specials):
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    tok.add_special_tokens({"additional_special_tokens": list(specials)})
    return tok


tok = tokenizer("<|python_tag|>")
parsers = {"hermes": Hermes2ProToolParser(tok), "llama3_json": Llama3JsonToolParser(tok),
           "mistral": MistralToolParser(tokenizer("[TOOL_CALLS]")),  # vLLM picks the version by the vocabulary
           "mistral_v11": MistralToolParser(tokenizer("[TOOL_CALLS]", "[ARGS]"))}
out = []
for style, text in json.load(sys.stdin):
    got = parsers[style].extract_tool_calls(text, None)
    calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in got.tool_calls]
    # the chat response's content, as parser/abstract_parser.py makes it: whitespace beside calls is None; without
    # calls the reply, or what Mistral's engine-based parser leaves of it
    if got.tools_called:
        out.append([got.content if got.content and got.content.strip() else None, calls])
    else:
        out.append([(got.content or None) if style.startswith("mistral") else text, []])
print(json.dumps(out))
"""


def test_replies_parse_as_vllms_own_parsers_parse_them():
    """The real component: vLLM 0.32's hermes, llama3_json and mistral parsers, run on every reply above."""
    import os
    import subprocess

    python = os.environ.get("VFTRAIN_VLLM_PYTHON")
    if not python or not os.path.exists(python):
        pytest.skip("no vLLM virtualenv: set VFTRAIN_VLLM_PYTHON (.ci/run installs one)")
    cases = [(style, text) for style, replies in STYLES.items() for text, _ in replies]
    proc = subprocess.run([python, "-c", VLLM_PARSE, TINY], input=json.dumps(cases), capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    vllm = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = [parse_tool_calls(text, style) for style, text in cases]
    assert [(v[0], v[1]) for v in vllm] == ours


class _Turns:
    """A policy in a tool environment: a call ended by the family's stop token (Llama 3.1's bare JSON ended by
    <|eot_id|>), then the answer."""

    def __init__(self, tok, call: str, stop: str = "<|eot_id|>"):
        self.tok, self.call, self.stop, self.sampled = tok, call, stop, []

    def __call__(self, prompts, n, turn):
        text = self.call if turn == 0 else "5"
        ids = self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.convert_tokens_to_ids(self.stop)]
        self.sampled.append(ids)
        return [[Sample(list(p), list(ids), [-0.5] * len(ids), "stop") for _ in range(n)] for p in prompts]


def _llama_env():
    from vftrain.rl.environment import VerifiersEnv

    tok = family_tokenizer("llama3.1")
    return tok, VerifiersEnv("vf-sum-tools", None, tok, max_prompt_len=1400, max_turns=4)


def test_a_llama31_tool_rollout_runs_its_call(envs):
    tok, env = _llama_env()
    script = _Turns(tok, '{"name": "add", "parameters": {"a": 2, "b": 3}}')
    out = env.rollouts([0], 2, script, max_seq_len=1600, max_new_tokens=60)
    assert out["rewards"].tolist() == [1.0, 1.0]  # used_tool: the call ran
    call, answer = script.sampled
    sample = out["samples"][0]
    ids = sample.completion_ids
    assert ids[:len(call)] == call and ids[-len(answer):] == answer
    assert tok.decode(ids[len(call):-len(answer)]) == ('<|start_header_id|>ipython<|end_header_id|>\n\n"5"<|eot_id|>'
                                                       '<|start_header_id|>assistant<|end_header_id|>\n\n')
    assert sum(sample.mask) == len(call) + len(answer)
    assert out["texts"][0][0]["tool_calls"][0]["function"] == ADD


def test_two_llama31_calls_in_one_turn_end_the_episode(envs, caplog):
    """Llama 3.1's template refuses a turn with two calls ("This model only supports single tool-calls at once!"),
    as vLLM does with a 400: the episode ends at that turn, with a warning, instead of the run."""
    tok, env = _llama_env()
    call = '{"name": "add", "parameters": {"a": 2, "b": 3}}; {"name": "add", "parameters": {"a": 1, "b": 1}}'
    script = _Turns(tok, call)
    with caplog.at_level("WARNING", logger="vftrain"):
        out = env.rollouts([0], 2, script, max_seq_len=1600, max_new_tokens=60)
    assert len(script.sampled) == 1 and out["samples"][0].completion_ids == script.sampled[0]
    assert "single tool-calls" in caplog.text


def test_a_mistral_tool_rollout_runs_its_call(envs):
    """Mistral Nemo: `[TOOL_CALLS]` is a special token (decoded away before, so the call was the answer), and the
    template refuses call ids other than 9 letters and digits."""
    from vftrain.rl.environment import VerifiersEnv

    tok = family_tokenizer("mistral")
    env = VerifiersEnv("vf-sum-tools", None, tok, max_prompt_len=1400, max_turns=4)
    script = _Turns(tok, '[TOOL_CALLS][{"name": "add", "arguments": {"a": 2, "b": 3}}]', stop="</s>")
    out = env.rollouts([0], 2, script, max_seq_len=1600, max_new_tokens=80)
    assert out["rewards"].tolist() == [1.0, 1.0]
    call, answer = script.sampled
    ids = out["samples"][0].completion_ids
    assert ids[:len(call)] == call and ids[-len(answer):] == answer
    results = '[TOOL_RESULTS]{"content": 5, "call_id": "call00000"}[/TOOL_RESULTS]'
    assert tok.decode(ids[len(call):-len(answer)]) == results
    assert out["texts"][0][0]["tool_calls"][0]["function"] == ADD


def _mistral_env(env_id="vf-sum-tools"):
    from vftrain.rl.environment import VerifiersEnv

    tok = family_tokenizer("mistral")
    return tok, VerifiersEnv(env_id, None, tok, max_prompt_len=1400, max_turns=4)


@pytest.mark.parametrize("call", ['[TOOL_CALLS][{"arguments": {"a": 2, "b": 3}}]',
                                  '[TOOL_CALLS][{"name": "add", "arguments": "a=2, b=3"}]'])
def test_a_call_vllm_returns_without_a_name_or_json_arguments_is_answered(envs, call):
    """vLLM returns such calls (Mistral's parser keeps string arguments as they are) and renders them at the next turn
    with {} arguments; the environment refused them as training data and the run stopped (audit, finding 1)."""
    tok, env = _mistral_env()
    out = env.rollouts([0], 1, _Turns(tok, call, stop="</s>"), max_seq_len=1600, max_new_tokens=80)
    assert out["texts"][0][1]["content"].startswith("error: ")  # the tool's answer: unknown tool, or bad arguments


SYSTEM_TOOLS = '''
import verifiers.v1 as vf
from vf_sum_tools import SumTask


class SystemTaskset(vf.Taskset[SumTask, vf.TasksetConfig]):
    def load(self):
        for k in range(2):
            yield SumTask(vf.TaskData(prompt=f"{k}+1", system_prompt="Use tools."), self.config.task)


__all__ = ["SystemTaskset"]
'''


def test_a_system_prompt_that_a_mistral_template_drops_after_a_call_is_refused_at_load(envs):
    """Mistral Nemo writes the system message only into a last user turn: the run stopped at its first tool call with
    an error about rendering (audit, finding 2); it is now refused before the first step, naming the way out."""
    (envs / "vf_system_tools.py").write_text(SYSTEM_TOOLS)
    with pytest.raises(ConfigError, match="system message only into a last user turn: give the tasks no system"):
        _mistral_env("vf-system-tools")
    _mistral_env()  # without one it loads


def test_a_served_history_renders_as_vllm_renders_it():
    """vftrain.serve answered 400 to a history call vLLM accepts (no name, arguments no JSON: {}), and wrote a call's
    fields in another order than vLLM's validated (arguments, name) under `function|tojson` (audit, findings 4-5)."""
    from vftrain.data.render import render_prompt

    tok = family_tokenizer("mistral")
    history = [{"role": "user", "content": "2+3?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "abcDEF123", "type": "function", "function": {"name": "", "arguments": "not json"}},
                   {"id": "abcDEF124", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}]},
               {"role": "tool", "tool_call_id": "abcDEF123", "content": "5"},
               {"role": "tool", "tool_call_id": "abcDEF124", "content": "5"}]
    text = tok.decode(render_prompt(tok, history, served=True))
    assert '[TOOL_CALLS][{"arguments": {}, "name": "", "id": "abcDEF123"}, {"arguments": {"a": 2}, "name": "add", ' \
        '"id": "abcDEF124"}]</s>' in text
