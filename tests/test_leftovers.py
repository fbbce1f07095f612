"""Leftovers of issues 18 and 22: vftrain.serve's gaps (model ids, stop strings, top logprobs, stream, Hermes tool
calls, LoRA adapter folders), truncation marks from the OpenAI backend, reward modules beside the TOML, held-out
settings that would be skipped, RL's held-out reward, every unknown top-level key in one error, and peft's
deprecation warning on adapter folders."""

from __future__ import annotations

import json

import pytest

from conftest import TINY, addition_rows, write_jsonl


def _one_error_line(err: str, prog: str = "vf-sft") -> bool:
    """One `<prog>: error:` line and no traceback (progress bars may share stderr)."""
    return "Traceback" not in err and sum(line.startswith(f"{prog}: error: ") for line in err.splitlines()) == 1


# ---- 7. every unknown top-level key in one error
def test_unknown_top_level_keys_are_listed_together(tmp_path, capsys):
    from vftrain.cli.sft import main

    data = write_jsonl(tmp_path / "add.jsonl", addition_rows(8))
    toml = tmp_path / "c.toml"
    toml.write_text(f'model = "{TINY}"\ndataset = "{data}"\nlearning_rate = 1e-5\nmax_steps = 3\nmodle = "x"\n'
                    "[sft]\nbatch_size = 8\n")
    assert main(["@", str(toml)]) == 2
    err = capsys.readouterr().err
    assert _one_error_line(err)
    line = next(x for x in err.splitlines() if x.startswith("vf-sft: error: "))
    assert "3 unknown top-level keys" in line
    assert "'learning_rate' (a field of the [sft] table: move it below the [sft] line)" in line
    assert "'max_steps' (a field of the [sft] table" in line and "'modle' (did you mean 'model'?)" in line


# ---- 4. a reward module beside the TOML, the run started from another folder
def test_reward_module_beside_the_config_is_found_from_another_folder(tmp_path, capsys, monkeypatch):
    import sys

    from vftrain import rewards
    from vftrain.cli.rl import main

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(rewards, "IMPORT_FOLDERS", [], raising=False)  # a fresh list per test
    sub, elsewhere = tmp_path / "sub", tmp_path / "elsewhere"
    elsewhere.mkdir()
    data = write_jsonl(sub / "add.jsonl", addition_rows(8))
    (sub / "leftovers_beside_rewards.py").write_text("def close(completion, reference):\n    return 1.0\n")
    (sub / "rl.toml").write_text(f'model = "{TINY}"\ndataset = "{data}"\n[rl]\n'
                                 'reward_funcs = ["leftovers_beside_rewards:close"]\n')
    monkeypatch.chdir(elsewhere)
    assert main(["@", "../sub/rl.toml", "--inspect", "1"]) == 0, capsys.readouterr().err
    assert "reward functions: leftovers_beside_rewards:close" in capsys.readouterr().out
    # the current folder comes first: a module of the same name there wins
    assert sys.path.index(str(elsewhere)) < sys.path.index(str(sub))


# ---- 5. eval_generation_rows with nothing held out is said, not skipped without a word
def test_eval_generation_rows_without_held_out_rows_is_warned(tmp_path, capsys):
    from vftrain.cli.sft import main

    data = write_jsonl(tmp_path / "add.jsonl", addition_rows(16))
    code = main(["--model", TINY, "--dataset", data, "--sft.output_dir", str(tmp_path / "run"), "--sft.max_steps", "1",
                 "--sft.batch_size", "8", "--sft.micro_batch_size", "8", "--sft.max_seq_len", "64",
                 "--sft.disable_tqdm", "true", "--sft.eval_generation_rows", "4"])
    out = capsys.readouterr().out
    assert code == 0
    warned = [line for line in out.splitlines() if "eval_generation_rows = 4 is skipped" in line]
    assert len(warned) == 1 and "eval_split" in warned[0] and "eval_size" in warned[0]


# ---- 3. the OpenAI backend marks completions cut by max_new_tokens, as the embedded backend does
@pytest.mark.parametrize("max_new_tokens, truncated", [(1, True), (8, False)])
def test_openai_backend_marks_truncated_samples(tmp_path, max_new_tokens, truncated):
    import datasets

    import vftrain as vf
    from conftest import ROOT, small_config
    from vftrain.sampling import ChatPrompt
    from vftrain.sampling.openai_backend import OpenAIBackend
    from vftrain.serve import serve

    model = str(ROOT / "assets" / "addition-noisy-sft")  # answers a sum and stops within a few tokens
    server = serve(model, port=0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        args = small_config(tmp_path, sample_backend="openai", sample_base_url=url, max_new_tokens=max_new_tokens)
        trainer = vf.SFTTrainer(model=model, train_dataset=datasets.Dataset.from_list(addition_rows(16)), args=args)
        [chat] = OpenAIBackend(trainer)([ChatPrompt([{"role": "user", "content": "12+34"}])], step=0)
    finally:
        server.shutdown()
        server.server_close()
    assert chat.truncated is truncated


# ---- 8. no peft deprecation warning when a LoRA adapter folder is the model
def test_adapter_folder_loads_without_peft_deprecation_warning(tmp_path):
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from vftrain.models import get_model_and_tokenizer

    folder = str(tmp_path / "adapter")
    get_peft_model(AutoModelForCausalLM.from_pretrained(TINY), LoraConfig(task_type="CAUSAL_LM", r=4)) \
        .save_pretrained(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = get_model_and_tokenizer(folder, packing=False)
    assert hasattr(model, "peft_config")
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


# ---- 6. RL's held-out figure: the run's reward functions' score beside exact match
def test_rl_held_out_reports_the_run_reward(tmp_path, capsys):
    from conftest import ROOT
    from vftrain.cli.rl import main

    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", addition_rows(16))
    write_jsonl(data / "test.jsonl", addition_rows(4, start=50))
    # a custom reward that exact match cannot stand for: the completion's length, weighted by 0.5
    (tmp_path / "length_reward.py").write_text("def length(completion, reference):\n    return len(completion)\n")
    out = tmp_path / "run"
    code = main(["--model", str(ROOT / "assets" / "addition-noisy-sft"), "--dataset", str(data),
                 "--rl.reward_funcs", f'["{tmp_path / "length_reward.py"}:length"]', "--rl.reward_weights", "[0.5]",
                 "--rl.eval_split", "test", "--rl.eval_generation_rows", "4", "--rl.output_dir", str(out),
                 "--rl.max_steps", "1", "--rl.batch_size", "4", "--rl.micro_batch_size", "4",
                 "--rl.rollouts_per_example", "2", "--rl.max_new_tokens", "6", "--rl.max_seq_len", "40", "--rl.max_prompt_len", "30",
                 "--rl.disable_tqdm", "true", "--rl.save_strategy", "no"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr[-2000:]
    record = json.loads((out / "held_out-step0.json").read_text())
    lengths = [len(g["completion"]) for g in record["generations"]]
    assert record["scored_by"] == "exact_match" and record["reward_funcs"] == {"length_reward:length":
                                                                                sum(lengths) / 4}
    assert record["reward"] == pytest.approx(0.5 * sum(lengths) / 4) and record["reward"] > 0
    assert [g["reward"] for g in record["generations"]] == [0.5 * n for n in lengths]
    before = next(line for line in stdout.splitlines() if "held-out exact-match accuracy before RL" in line)
    assert f"reward {record['reward']:.3f} (length_reward:length {sum(lengths) / 4:.3f})" in before


# ---- 1. vftrain.serve: model ids, stop strings, top logprobs, stream, tools (vLLM's hermes parser)
PROMPT = [18, 19, 12, 20, 21]


@pytest.fixture
def served():
    """`served(model) -> (openai client, url)` for a vftrain.serve of `model` on a free port."""
    from vftrain.serve import serve

    running = []

    def start(model: str = TINY):
        import openai

        running.append(serve(model, port=0))
        url = f"http://127.0.0.1:{running[-1].server_address[1]}/v1"
        return openai.OpenAI(base_url=url, api_key="x", max_retries=0), url

    yield start
    for server in running:
        server.shutdown()
        server.server_close()


def _post(url: str, route: str, body: dict) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url + route, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_serve_wrong_model_id_and_stream_are_one_clean_line(served):
    client, url = served()
    status, body = _post(url, "/chat/completions", {"model": "x", "messages": [{"role": "user", "content": "1+1"}]})
    assert status == 404 and body["error"]["message"] == f"model 'x' is not served; the served ids are {TINY}"
    status, body = _post(url, "/unload_lora_adapter", {})
    assert status == 400 and body["error"]["message"] == "the request needs 'lora_name' (a string)"
    status, body = _post(url, "/completions", {"model": TINY, "prompt": PROMPT, "stream": True})
    assert status == 400 and "stream=true is not supported" in body["error"]["message"]


def test_serve_stop_strings_end_the_text_before_them(served):
    client, _ = served()
    whole = client.completions.create(model=TINY, prompt=PROMPT, max_tokens=12, temperature=0,
                                      extra_body={"return_token_ids": True}).choices[0]
    stop = whole.text[3:5]
    cut = client.completions.create(model=TINY, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop, "never"],
                                    extra_body={"return_token_ids": True}).choices[0]
    at = whole.text.find(stop)
    assert cut.text == whole.text[:at] and cut.finish_reason == "stop" and cut.stop_reason == stop
    # the tokens end with the one that completed the stop string (one character per token here), as vLLM's
    assert cut.token_ids == whole.token_ids[:at + len(stop)]


def test_serve_top_logprobs_are_those_of_the_sampled_distribution(served):
    import torch

    from vftrain.models import get_model_and_tokenizer
    from vftrain.sampling.tokens import sampling_logits

    client, _ = served()
    model, tokenizer = get_model_and_tokenizer(TINY, packing=False)
    out = client.completions.create(model=TINY, prompt=PROMPT, max_tokens=4, temperature=0.7, top_p=0.05, seed=3,
                                    logprobs=3, extra_body={"return_token_ids": True}).choices[0]
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.tensor([PROMPT + out.token_ids])).logits[0, len(PROMPT) - 1:-1]
    want = sampling_logits(logits, 0.7, 0.05).log_softmax(-1).topk(3, -1)
    for step, (top, token, logprob) in enumerate(zip(out.logprobs.top_logprobs, out.token_ids,
                                                    out.logprobs.token_logprobs)):
        expected = {tokenizer.decode([i]): max(v, -9999.0) for i, v in zip(want.indices[step].tolist(),
                                                                            want.values[step].tolist())}
        assert top.keys() >= expected.keys() and top[tokenizer.decode([token])] == logprob
        assert all(abs(top[t] - v) < 1e-4 for t, v in expected.items())
        assert -9999.0 in expected.values()  # top_p 0.05 keeps fewer than 3 tokens: the rest are cut, as vLLM shows
    chat = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "12+34"}], max_tokens=3,
                                          logprobs=True, top_logprobs=2, temperature=1.0, seed=0).choices[0]
    for entry in chat.logprobs.content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-5


WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}}}}}]


def test_serve_renders_tools_and_parses_hermes_tool_calls(served, tmp_path, monkeypatch):
    import shutil

    from vftrain.serve import ModelHost
    from vftrain.sampling.tokens import Sample

    model = tmp_path / "tiny-with-tools"  # the tiny model with a template that renders the tools' names (a real
    shutil.copytree(TINY, model)  # one, as Qwen's, renders whole schemas: beyond the tiny model's 256 positions)
    template = (model / "chat_template.jinja").read_text()
    (model / "chat_template.jinja").write_text(
        "{%- if tools %}{{- 'tools: ' }}{%- for t in tools %}{{- t.function.name + ' ' }}{%- endfor %}{%- endif %}"
        + template)
    client, _ = served(str(model))
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    reply = client.chat.completions.create(model=str(model), messages=messages, tools=WEATHER, max_tokens=2,
                                           extra_body={"return_token_ids": True})
    assert "get_weather" in client_decode(model, reply.prompt_token_ids)

    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'

    def generate(self, prompt, p):  # the tiny model cannot call a tool: the server's reply is given
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [min(self.stops)]
        return [Sample(prompt, ids, [0.0] * len(ids), "stop")] * p["n"]

    monkeypatch.setattr(ModelHost, "_generate", generate)
    choice = client.chat.completions.create(model=str(model), messages=messages, tools=WEATHER).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look.\n"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("chatcmpl-tool-") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo"}
    plain = client.chat.completions.create(model=str(model), messages=messages).choices[0]  # no tools: no parsing
    assert plain.finish_reason == "stop" and plain.message.tool_calls is None and "<tool_call>" in plain.message.content


def test_serve_renders_tools_as_vllm_renders_them(served, tmp_path):
    """vLLM validates tools and renders their dump (name, description, parameters; null where missing); a template
    that writes `tool|tojson` (Qwen's, Mistral's) showed the request's own keys and order instead (audit, finding 7)."""
    import shutil

    model = tmp_path / "tiny-tools-json"
    shutil.copytree(TINY, model)
    template = (model / "chat_template.jinja").read_text()
    (model / "chat_template.jinja").write_text("{%- for t in tools or [] %}{{- t|tojson }}{%- endfor %}" + template)
    client, _ = served(str(model))
    tools = [{"type": "function", "function": {"parameters": {"type": "object"}, "name": "add", "extra": 1}}]
    reply = client.chat.completions.create(model=str(model), messages=[{"role": "user", "content": "2+3"}], tools=tools,
                                           max_tokens=1, extra_body={"return_token_ids": True})
    assert client_decode(model, reply.prompt_token_ids).startswith(
        '{"type": "function", "function": {"name": "add", "description": null, "parameters": {"type": "object"}}}')


def test_serve_parses_llama3_json_tool_calls_under_a_llama_template(served, tmp_path, monkeypatch):
    """Under a template that writes Llama 3's calls, the reply's JSON objects are its calls (vLLM's llama3_json)."""
    import shutil

    from vftrain.serve import ModelHost
    from vftrain.sampling.tokens import Sample

    model = tmp_path / "tiny-llama-calls"
    shutil.copytree(TINY, model)
    template = (model / "chat_template.jinja").read_text()  # Llama 3's templates write '"parameters": ' for a call
    (model / "chat_template.jinja").write_text('{#- a call renders as {"name": ..., "parameters": ...} -#}' + template)
    client, _ = served(str(model))

    def generate(self, prompt, p):
        ids = self.tokenizer('{"name": "get_weather", "parameters": {"city": "Oslo"}}',
                             add_special_tokens=False)["input_ids"] + [min(self.stops)]
        return [Sample(prompt, ids, [0.0] * len(ids), "stop")] * p["n"]

    monkeypatch.setattr(ModelHost, "_generate", generate)
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    choice = client.chat.completions.create(model=str(model), messages=messages, tools=WEATHER).choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo"}


def client_decode(model, ids) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model)).decode(ids)


# ---- 2. vftrain.serve --model <LoRA adapter folder>: its base with the adapter; a full-weight push replaces both
def test_serve_an_adapter_folder(served, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = str(tmp_path / "adapter")
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_dropout=0.5, init_lora_weights=False)  # B != 0: it matters
    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(TINY), config)
    adapted.save_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(TINY)
    client, url = served(folder)
    assert [m.id for m in client.models.list().data] == [folder]

    def served_logprobs():
        out = client.completions.create(model=folder, prompt=PROMPT + [22, 23], max_tokens=1, temperature=1.0,
                                        extra_body={"prompt_logprobs": 0})
        return torch.tensor([e[str(t)]["logprob"] for e, t in zip(out.choices[0].prompt_logprobs[1:], [19, 12, 20,
                                                                                                       21, 22, 23])])

    def own(model):
        with torch.no_grad():
            logits = model.eval()(input_ids=torch.tensor([PROMPT + [22, 23]])).logits[0, :-1]
        return logits.log_softmax(-1).gather(-1, torch.tensor([19, 12, 20, 21, 22, 23])[:, None])[:, 0]

    first, again = served_logprobs(), served_logprobs()
    assert torch.equal(first, again)  # eval mode: the adapter's dropout is off
    assert (first - own(adapted)).abs().max() < 1e-5 and (first - own(base)).abs().max() > 1e-3
    assert _post(url, "/update_weights", {"path": TINY})[0] == 200  # a full-weight push: the served id is now it
    assert (served_logprobs() - own(base)).abs().max() < 1e-5
