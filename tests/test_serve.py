"""`vftrain.serve` as a token-in/token-out sampler and the `openai` backend's `sample_tokens` against it: ids and
logprobs as vLLM returns them, seeded reproducibility, truthful finish reasons, logprobs equal to the trained
model's own forward after a weight push (full weights and LoRA; stale weights differ), the API key, and a server
that is down, overloaded or stuck. All on localhost with the bundled tiny model."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import datasets
import openai
import pytest
import torch

import vftrain as vf
from conftest import TINY, addition_rows, small_config, tiny_tokenizer
from vftrain.data.render import stop_token_ids
from vftrain.errors import SamplerError
from vftrain.sampling.openai_backend import OpenAIBackend
from vftrain.sampling.tokens import Sample
from vftrain.serve import serve

PROMPTS = [[18, 19, 12, 20, 21], [22, 23, 12, 18]]


@pytest.fixture
def server():
    running = []

    def start(**kwargs):
        running.append(serve(TINY, port=0, **kwargs))
        return f"http://127.0.0.1:{running[-1].server_address[1]}/v1"

    yield start
    for s in running:
        s.shutdown()
        s.server_close()


def _trainer(tmp_path, url: str, timeout: float = 30.0, **overrides):
    cfg = small_config(tmp_path, sample_backend="openai", sample_base_url=url, sample_timeout=timeout,
                       learning_rate=5e-2, **overrides)
    return vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(16)), args=cfg)


def _free_url() -> str:
    probe = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = probe.server_address[1]
    probe.server_close()
    return f"http://127.0.0.1:{port}/v1"


@torch.no_grad()
def _forward_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    """The trained model's float32 logprobs of `completion` after `prompt` at `temperature` (one full forward)."""
    model.eval()
    logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1].float()
    return (logits / temperature).log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def _max_gap(model, rollouts, temperature: float) -> float:
    return max((_forward_logprobs(model, s.prompt_ids, s.completion_ids, temperature)
                - torch.tensor(s.logprobs)).abs().max().item() for group in rollouts for s in group)


def _complete(url: str, **body):
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
    return client.completions.create(model=TINY, prompt=body.pop("prompt", PROMPTS[0]), logprobs=0,
                                     extra_body={"return_token_ids": True, **body.pop("extra", {})}, **body)


def test_token_ids_in_ids_and_logprobs_out_seeded_and_truthful(server):
    url = server()
    first = _complete(url, n=4, max_tokens=8, temperature=1.0, seed=7)
    again = _complete(url, n=4, max_tokens=8, temperature=1.0, seed=7)
    other = _complete(url, n=4, max_tokens=8, temperature=1.0, seed=8)
    ids = [c.token_ids for c in first.choices]
    assert ids == [c.token_ids for c in again.choices]
    assert [c.logprobs.token_logprobs for c in first.choices] == [c.logprobs.token_logprobs for c in again.choices]
    assert ids != [c.token_ids for c in other.choices]
    assert len(set(map(tuple, ids))) > 1  # the n completions of one request are distinct draws
    stops = stop_token_ids(tiny_tokenizer())  # the model's own: <|im_end|> and <|endoftext|>
    for c in first.choices:
        assert c.prompt_token_ids == PROMPTS[0]
        assert len(c.logprobs.token_logprobs) == len(c.token_ids) and all(lp <= 0 for lp in c.logprobs.token_logprobs)
        ended = [i for i, t in enumerate(c.token_ids) if t in stops]
        if c.finish_reason == "length":
            assert len(c.token_ids) == 8 and not ended
        else:
            assert c.finish_reason == "stop" and ended == [len(c.token_ids) - 1]
    # Every token a stop token: each completion is its first token, ended by it ("stop", vLLM's stop_reason).
    stopped = _complete(url, n=3, max_tokens=8, temperature=1.0, seed=1, extra={"stop_token_ids": list(range(99))})
    for c in stopped.choices:
        assert len(c.token_ids) == 1 and c.finish_reason == "stop" and c.stop_reason == c.token_ids[0]
    # Several prompts in one request (vLLM's list of token lists): choices in prompt order, each prompt sampled
    # as it would be alone.
    both = _complete(url, prompt=PROMPTS, n=2, max_tokens=4, temperature=1.0, seed=7)
    assert [c.prompt_token_ids for c in both.choices] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    alone = _complete(url, prompt=PROMPTS[1], n=2, max_tokens=4, temperature=1.0, seed=7)
    assert [c.token_ids for c in both.choices[2:]] == [c.token_ids for c in alone.choices]


def test_greedy_and_bad_requests(server):
    url = server()
    a, b = _complete(url, n=2, max_tokens=6, temperature=0.0).choices
    assert a.token_ids == b.token_ids and a.logprobs.token_logprobs == b.logprobs.token_logprobs
    model, _ = vf.get_model_and_tokenizer(TINY)
    logprobs = _forward_logprobs(model, PROMPTS[0], a.token_ids, 1.0)
    assert (logprobs - torch.tensor(a.logprobs.token_logprobs)).abs().max() < 1e-5
    logits = model(input_ids=torch.tensor([PROMPTS[0] + a.token_ids])).logits[0, len(PROMPTS[0]) - 1:-1]
    assert logits.argmax(-1).tolist() == a.token_ids  # greedy: each token the most likely one
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
    for body, field in [({"logprobs": 21}, "logprobs"), ({"max_tokens": 10_000}, "context"),
                        ({"prompt": [1, 10_000]}, "vocabulary"), ({"top_p": 0.0}, "top_p"), ({"n": 0}, "n=0"),
                        ({"stream": True}, "stream"), ({"stop": [""]}, "stop")]:
        with pytest.raises(openai.BadRequestError, match=field):
            client.completions.create(**{"model": TINY, "prompt": PROMPTS[0], "max_tokens": 4, **body})


def _trained_backend(tmp_path, url, monkeypatch, key=None, **overrides):
    if key:
        monkeypatch.setenv("VFTRAIN_API_KEY", key)
    trainer = _trainer(tmp_path, url, max_steps=3, **overrides)
    trainer.train()
    return trainer, OpenAIBackend(trainer)


def test_full_weight_push_serves_the_trained_logprobs(tmp_path, server, monkeypatch):
    url = server(api_key="sekret")
    trainer, backend = _trained_backend(tmp_path, url, monkeypatch, key="sekret")
    model = trainer.accelerator.unwrap_model(trainer.model)
    temperature = 0.7
    # Stale: the server still has the base weights, whose logprobs are not the trained model's.
    stale = [[s] for s in _samples_from(url, "sekret", temperature)]
    assert _max_gap(model, stale, temperature) > 1e-2
    rollouts = backend.sample_tokens(PROMPTS, step=3, n=3, max_new_tokens=6, temperature=temperature, top_p=1.0,
                                     stop_ids={98}, seed=0)
    assert [len(g) for g in rollouts] == [3, 3] and [g[0].prompt_ids for g in rollouts] == PROMPTS
    assert _max_gap(model, rollouts, temperature) < 1e-5
    # Same step and seed: the same rollouts, without a second push.
    assert backend.sample_tokens(PROMPTS, step=3, n=3, max_new_tokens=6, temperature=temperature, top_p=1.0,
                                 stop_ids={98}, seed=0) == rollouts


def _samples_from(url: str, key: str, temperature: float):
    client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
    out = []
    for prompt in PROMPTS:
        choice = client.completions.create(model=TINY, prompt=prompt, max_tokens=6, temperature=temperature,
                                           seed=0, logprobs=0, extra_body={"return_token_ids": True}).choices[0]
        out.append(Sample(prompt, choice.token_ids, choice.logprobs.token_logprobs, choice.finish_reason))
    return out


def test_lora_push_serves_the_trained_logprobs(tmp_path, server, monkeypatch):
    url = server()
    trainer, backend = _trained_backend(tmp_path, url, monkeypatch, use_lora=True)
    model = trainer.accelerator.unwrap_model(trainer.model)
    temperature = 1.3
    stale = [[s] for s in _samples_from(url, "x", temperature)]  # the base model, served by its own name
    assert _max_gap(model, stale, temperature) > 1e-3
    rollouts = backend.sample_tokens(PROMPTS, step=3, n=2, max_new_tokens=6, temperature=temperature, top_p=1.0,
                                     stop_ids={98}, seed=1)
    assert backend.current_adapter[0].endswith("-step-3")
    assert _max_gap(model, rollouts, temperature) < 1e-5


def _status(url: str, route: str, body: dict | None, key: str | None) -> int:
    request = urllib.request.Request(url + route, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_api_key_guards_every_route(server, tmp_path, monkeypatch):
    url = server(api_key="sekret")
    completion = {"model": TINY, "prompt": PROMPTS[0], "max_tokens": 2}
    push = {"path": TINY}
    adapter = {"lora_name": "a", "lora_path": str(tmp_path / "none")}
    for route, body in [("/completions", completion), ("/update_weights", push), ("/load_lora_adapter", adapter),
                        ("/models", None)]:
        assert _status(url, route, body, None) == 401
        assert _status(url, route, body, "wrong") == 401
    assert _status(url, "/completions", completion, "sekret") == 200
    assert _status(url, "/update_weights", push, "sekret") == 200
    assert _status(url, "/models", None, "sekret") == 200
    # The backend without the key: a one-line error that says which setting to fix.
    monkeypatch.delenv("VFTRAIN_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    backend = OpenAIBackend(_trainer(tmp_path, url))
    with pytest.raises(SamplerError, match="refused the API key.*VFTRAIN_API_KEY"):
        backend.sample_tokens(PROMPTS, step=0, n=1, max_new_tokens=2, temperature=1.0, top_p=1.0, stop_ids={98},
                              seed=0)


def test_command_line_reads_the_key_from_the_environment(tmp_path):
    """`python -m vftrain.serve` as the README runs it, with VFTRAIN_API_KEY set."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "VFTRAIN_API_KEY": "from-env"}
    process = subprocess.Popen([sys.executable, "-m", "vftrain.serve", "--model", TINY, "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        url = process.stdout.readline().split(" at ")[-1].strip()
        assert url.startswith("http://127.0.0.1:")
        assert _status(url, "/models", None, None) == 401
        assert _status(url, "/models", None, "from-env") == 200
    finally:
        process.terminate()
        process.wait(30)


def test_binding_beyond_localhost_without_key_warns(capsys):
    for kwargs, warned in [({}, True), ({"api_key": "k"}, False)]:
        s = serve(TINY, host="0.0.0.0", port=0, **kwargs)
        s.shutdown()
        s.server_close()
        assert ("without an API key" in capsys.readouterr().err) == warned


def test_server_down_is_a_clear_error(tmp_path):
    url = _free_url()
    backend = OpenAIBackend(_trainer(tmp_path, url))
    start = time.monotonic()
    with pytest.raises(SamplerError, match=f"no server at {url}.*vftrain.serve"):
        backend.sample_tokens(PROMPTS, step=0, n=1, max_new_tokens=2, temperature=1.0, top_p=1.0, stop_ids={98},
                              seed=0)
    assert time.monotonic() - start < 5  # nothing listening: no waiting out the timeout


class Stub:
    """A fake server: weight pushes answer at once; completion requests follow `plan`, one entry per request
    ((seconds to wait, HTTP status)), the last entry repeating; a 200 echoes the prompt with two tokens."""

    def __init__(self, plan, token_ids=True):
        self.plan, self.token_ids, self.pushes, self.completions = plan, token_ids, 0, 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path.endswith("/update_weights"):
                    stub.pushes += 1
                    return self._send(200, {"status": "ok"})
                delay, status = stub.plan[min(stub.completions, len(stub.plan) - 1)]
                stub.completions += 1
                time.sleep(delay)
                self._send(status, stub.answer(body) if status == 200 else {"error": {"message": "overloaded"}})

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, body):
        choice = {"index": 0, "text": "ab", "finish_reason": "length",
                  "logprobs": {"tokens": ["a", "b"], "token_logprobs": [-1.0, -2.0], "text_offset": [0, 1],
                               "top_logprobs": [{"a": -1.0}, {"b": -2.0}]}}
        if self.token_ids:
            choice.update(token_ids=[5, 6], prompt_token_ids=body["prompt"])
        return {"id": "x", "object": "text_completion", "created": 0, "model": body["model"], "choices": [choice]}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _sample(backend, step=0):
    return backend.sample_tokens(PROMPTS[:1], step=step, n=1, max_new_tokens=2, temperature=1.0, top_p=1.0,
                                 stop_ids={98}, seed=0)


@pytest.mark.parametrize("plan, timeout, error", [
    ([(0.2, 503), (0.2, 503), (0.0, 200)], 20.0, None),   # overloaded twice, then answers: retried
    ([(0.1, 503)], 1.5, r"still failing after \d+ attempts within sample_timeout=1.5s: HTTP 503"),
    ([(10.0, 200)], 1.0, r"no answer within sample_timeout=1s"),  # stuck
])
def test_slow_server_is_retried_within_the_timeout(tmp_path, plan, timeout, error, monkeypatch):
    monkeypatch.setattr(OpenAIBackend, "_check_served", lambda self, name: None)  # the stub serves no model
    stub = Stub(plan)
    try:
        backend = OpenAIBackend(_trainer(tmp_path, stub.url, timeout=timeout))
        start = time.monotonic()
        if error is None:
            assert _sample(backend) == [[Sample(PROMPTS[0], [5, 6], [-1.0, -2.0], "length")]]
            assert stub.completions == 3
            _sample(backend)
            assert stub.pushes == 1  # the weights of one step are pushed once
            _sample(backend, step=1)
            assert stub.pushes == 2
        else:
            with pytest.raises(SamplerError, match=error):
                _sample(backend)
            assert stub.completions >= (2 if "attempts" in error else 1)
            assert time.monotonic() - start < timeout + 2
    finally:
        stub.close()


def test_server_without_token_ids_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(OpenAIBackend, "_check_served", lambda self, name: None)  # the stub serves no model
    stub = Stub([(0.0, 200)], token_ids=False)
    try:
        with pytest.raises(SamplerError, match="no token ids.*vLLM >= 0.10.2"):
            _sample(OpenAIBackend(_trainer(tmp_path, stub.url)))
    finally:
        stub.close()
