"""A small OpenAI-compatible server over transformers: `python -m vftrain.serve --model PATH [--api-key KEY]`.

For tests, small models and RL rollouts on one machine; production sampling should use vLLM or SGLang. It speaks
`/v1/models`, `/v1/chat/completions`, `/v1/completions`, vLLM's runtime LoRA endpoints (`/v1/load_lora_adapter`,
`/v1/unload_lora_adapter`), and `/v1/update_weights {"path"}` for full-weight pushes.

Completions follow vLLM's request and response fields, so one client works against both: `prompt` as token ids
(token-in) or text, `n`, `max_tokens`, `temperature`, `top_p`, `seed`, `stop_token_ids`, `logprobs` (0: the
sampled token's; `choices[i].logprobs.token_logprobs`), `return_token_ids` (vLLM >= 0.10.2: per-choice
`prompt_token_ids` and `token_ids`; chat puts `prompt_token_ids` at the top level). Temperature > 0 samples
through `vftrain.sampling.tokens.sample`, whose logprobs are those of the distribution drawn from (vLLM's
`--logprobs-mode processed_logprobs`); temperature 0 decodes greedily. Requests run one at a time.

With an API key (`--api-key`, or `VFTRAIN_API_KEY`; as `vllm serve --api-key` / `VLLM_API_KEY`) every request,
weight pushes included, needs `Authorization: Bearer KEY`. Written on the standard library's HTTP server so
that serving needs no web framework.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import ipaddress
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from vftrain.data.render import stop_token_ids
from vftrain.sampling.embedded import encode_prompt, generate_ids, pad_token_id
from vftrain.sampling.openai_backend import NEUTRAL_SAMPLING
from vftrain.sampling.tokens import Sample, sample

COMPLETION_MAX_TOKENS = 16  # the OpenAI completions default (vLLM's too); chat defaults to the context left


class BadRequest(ValueError):
    """A request field that is not allowed (HTTP 400)."""


class ModelHost:
    """The served model (with named LoRA adapters) behind one lock: requests are generated one at a time."""

    def __init__(self, path: str):
        from vftrain.models import get_model_and_tokenizer

        self.name = path
        self.model, self.tokenizer = get_model_and_tokenizer(path, packing=False)  # generation: no packed rows
        self.adapters: set[str] = set()  # the adapters served (by name)
        self.peft = False  # the model is a PeftModel (an adapter was loaded once)
        self.lock = threading.Lock()
        self.stops = stop_token_ids(self.tokenizer)
        self.pad = pad_token_id(self.tokenizer)
        self.vocab = self.model.get_input_embeddings().num_embeddings
        self.context = getattr(self.model.config, "max_position_embeddings", None)

    # ---- completions
    def complete(self, body: dict, chat: bool) -> dict:
        if chat and not (isinstance(body.get("messages"), list) and body["messages"]):
            raise BadRequest("messages must be a non-empty list of chat messages")
        prompts = [encode_prompt(self.tokenizer, body["messages"])] if chat else self._prompts(body.get("prompt"))
        params = _params(body, chat, self.vocab)
        for ids in prompts:
            self._check_length(ids, params, chat)
        with self.lock, self._serving(body.get("model") or self.name):
            results = [self._generate(ids, params) for ids in prompts]
            scored = [self._prompt_logprobs(ids) for ids in prompts] if params["prompt_logprobs"] is not None \
                else None
        return self._response(body, chat, params, prompts, results, scored)

    def _generate(self, prompt: list[int], p: dict) -> list[Sample]:
        stops = self.stops | set(p["stop_token_ids"])
        if p["temperature"] > 0:
            # One call per prompt: a seeded prompt gives the same completions whatever else is in the request.
            return sample(self.model, [prompt], n=p["n"], max_new_tokens=p["max_tokens"],
                          temperature=p["temperature"], top_p=p["top_p"], stop_ids=stops, pad_id=self.pad,
                          seed=p["seed"])[0]
        greedy = generate_ids(self.model, [prompt], p["max_tokens"], stops, self.pad,
                              logprobs=p["logprobs"] is not None)[0]
        return [greedy] * p["n"]  # greedy: every choice is the same completion, as vLLM returns

    def _prompt_logprobs(self, ids: list[int]) -> list:
        """vLLM's `prompt_logprobs` (0: each prompt token's own): None for the first token, then {id: {logprob,
        rank, decoded_token}} from one forward over the prompt, unscaled by temperature as vLLM's."""
        import torch

        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([ids], device=self.model.device)).logits[0, :-1].float()
        targets = torch.tensor(ids[1:], device=logits.device)[:, None]
        values = logits.log_softmax(-1).gather(-1, targets)[:, 0].tolist()
        return [None] + [{str(t): {"logprob": v, "rank": None, "decoded_token": self.tokenizer.decode([t])}}
                         for t, v in zip(ids[1:], values)]

    def _prompts(self, prompt) -> list[list[int]]:
        """`prompt` as vLLM takes it: text, token ids, or a list of either (one completion set per prompt)."""
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and _is_ids(prompt)):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise BadRequest("prompt must be text, a list of token ids, or a non-empty list of either")
        out = []
        for p in prompt:
            ids = self.tokenizer(p)["input_ids"] if isinstance(p, str) else p
            if not isinstance(ids, list) or not ids or not _is_ids(ids):
                raise BadRequest("prompt must be text, a list of token ids, or a non-empty list of either")
            if max(ids) >= self.vocab:
                raise BadRequest(f"prompt token id {max(ids)} is outside the vocabulary (0..{self.vocab - 1})")
            out.append(ids)
        return out

    def _check_length(self, ids: list[int], p: dict, chat: bool) -> None:
        if p["max_tokens"] is None:
            p["max_tokens"] = self.context - len(ids) if chat and self.context else COMPLETION_MAX_TOKENS
        if self.context and len(ids) + p["max_tokens"] > self.context:
            raise BadRequest(f"prompt ({len(ids)} tokens) + max_tokens ({p['max_tokens']}) exceeds the model's "
                             f"context of {self.context} tokens")

    @contextlib.contextmanager
    def _serving(self, name: str):
        """The base model or the named adapter, for the duration of one request (under the lock)."""
        if name not in self.adapters and name != self.name:
            raise KeyError(f"model {name!r} is not served; have {[self.name, *sorted(self.adapters)]}")
        if not self.peft:
            yield
        elif name == self.name:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(name)
            yield

    def _response(self, body: dict, chat: bool, p: dict, prompts: list, results: list[list[Sample]],
                  scored: list | None) -> dict:
        choices = []
        for k, (prompt, samples) in enumerate(zip(prompts, results)):
            for s in samples:
                last = s.completion_ids[-1] if s.finish_reason == "stop" else None
                # vLLM's stop_reason: the requested stop token that ended the completion (None for eos, length).
                choice = {"index": len(choices), "finish_reason": s.finish_reason,
                          "stop_reason": last if last in p["stop_token_ids"] else None}
                text = self.tokenizer.decode(s.completion_ids, skip_special_tokens=True)
                choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
                if p["logprobs"] is not None:
                    choice["logprobs"] = self._logprobs(s, chat, bool(body.get("return_tokens_as_token_ids")))
                if body.get("return_token_ids"):
                    choice["token_ids"] = s.completion_ids
                    if not chat:
                        choice["prompt_token_ids"] = prompt  # vLLM: per choice for completions
                if scored is not None and not chat:
                    choice["prompt_logprobs"] = scored[k]
                choices.append(choice)
        completion_tokens = sum(len(s.completion_ids) for samples in results for s in samples)
        prompt_tokens = sum(len(p) for p in prompts)
        out = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{time.time_ns()}",
               "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
               "model": body.get("model") or self.name, "choices": choices,
               "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}}
        if chat and body.get("return_token_ids"):
            out["prompt_token_ids"] = prompts[0]
        return out

    def _logprobs(self, s: Sample, chat: bool, as_ids: bool) -> dict:
        tokens = [f"token_id:{t}" if as_ids else self.tokenizer.decode([t]) for t in s.completion_ids]
        if chat:
            return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                                for t, lp in zip(tokens, s.logprobs)]}
        offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": s.logprobs, "text_offset": offsets,
                "top_logprobs": [{t: lp} for t, lp in zip(tokens, s.logprobs)]}

    # ---- weights
    def load_adapter(self, name: str, path: str) -> None:
        """vLLM's runtime LoRA load, with its refusals: a name already loaded (without load_inplace, which this
        server does not implement) or the base model's name is HTTP 400."""
        from peft import PeftModel

        with self.lock:
            if name in self.adapters or name == self.name:
                raise BadRequest(f"The lora adapter '{name}' has already been loaded (or names the base model)")
            if not self.peft:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
                self.peft = True
            else:
                self.model.load_adapter(path, adapter_name=name)
            self.adapters.add(name)

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            if name not in self.adapters:
                raise KeyError(f"The lora adapter '{name}' cannot be found.")
            self.adapters.discard(name)
            if len(self.model.peft_config) > 1:  # peft keeps its last adapter: unlisted, never served
                self.model.delete_adapter(name)

    def update_weights(self, path: str) -> None:
        from transformers import AutoModelForCausalLM

        fresh = AutoModelForCausalLM.from_pretrained(path, dtype=self.model.dtype)
        with self.lock:
            base = self.model.get_base_model() if self.peft else self.model
            base.load_state_dict(fresh.state_dict())


def _is_ids(value: list) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)


def _params(body: dict, chat: bool, vocab: int) -> dict:
    """The sampling fields of a request, checked; a bad one is a BadRequest naming it and what is allowed."""
    def get(key, default, ok, allowed):
        value = body.get(key)
        value = default if value is None else value
        if value is not None and not ok(value):
            raise BadRequest(f"{key}={value!r}: {allowed}")
        return value

    integer = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if body.get("stop"):
        raise BadRequest("stop strings are not supported; use stop_token_ids")
    for key, neutral in NEUTRAL_SAMPLING.items():  # sampled as plain temperature + top-p, nothing else
        value = body.get(key)
        if value is not None and value != neutral and not (key == "top_k" and value == -1):
            raise BadRequest(f"{key}={value!r}: only {neutral!r} (off) is supported")
    if body.get("stream"):
        raise BadRequest("stream is not supported; send stream = false")
    if chat:
        logprobs = 0 if get("logprobs", False, lambda v: isinstance(v, bool), "true or false") else None
        get("top_logprobs", 0, lambda v: v == 0, "only 0 (the sampled token's logprob) is supported")
    else:
        logprobs = get("logprobs", None, lambda v: integer(v) and v == 0,
                       "only 0 (the sampled token's logprob) is supported")
    prompt_logprobs = None if chat else get("prompt_logprobs", None, lambda v: integer(v) and v == 0,
                                            "only 0 (each prompt token's own logprob) is supported")
    return {
        "n": get("n", 1, lambda v: integer(v) and v >= 1, "an integer >= 1"),
        "max_tokens": get("max_tokens", None, lambda v: integer(v) and v >= 1, "an integer >= 1"),
        "temperature": float(get("temperature", 1.0, lambda v: number(v) and v >= 0, "a number >= 0")),
        "top_p": float(get("top_p", 1.0, lambda v: number(v) and 0 < v <= 1, "a number in (0, 1]")),
        "seed": get("seed", int.from_bytes(os.urandom(8), "little") >> 1, integer, "an integer"),
        "stop_token_ids": get("stop_token_ids", [], lambda v: isinstance(v, list) and _is_ids(v)
                              and all(t < vocab for t in v), f"a list of token ids below {vocab}"),
        "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs,
    }


def make_handler(host: ModelHost, api_key: str | None = None):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test and training output clean
            pass

        def _reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._reply(status, {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"),
                                           "code": status}})

        def _authorized(self) -> bool:
            if api_key is None:
                return True
            given = self.headers.get("Authorization", "")
            if hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return True
            self._error(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'")
            return False

        def do_GET(self):
            if not self._authorized():
                return
            if self.path.rstrip("/") == "/v1/models":
                names = [host.name, *sorted(host.adapters)]
                return self._reply(200, {"object": "list", "data": [{"id": n, "object": "model"} for n in names]})
            self._error(404, f"no route {self.path}")

        def do_POST(self):
            if not self._authorized():
                return
            route = self.path.rstrip("/")
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not isinstance(body, dict):
                    raise BadRequest("the request body must be a JSON object")
                if route in ("/v1/chat/completions", "/v1/completions"):
                    return self._reply(200, host.complete(body, chat=route.endswith("chat/completions")))
                if route == "/v1/load_lora_adapter":
                    host.load_adapter(body["lora_name"], body["lora_path"])
                elif route == "/v1/unload_lora_adapter":
                    host.unload_adapter(body["lora_name"])
                elif route == "/v1/update_weights":
                    host.update_weights(body["path"])
                else:
                    return self._error(404, f"no route {self.path}")
                return self._reply(200, {"status": "ok"})
            except (BadRequest, json.JSONDecodeError) as exc:
                return self._error(400, str(exc))
            except KeyError as exc:
                return self._error(404, str(exc))
            except Exception as exc:  # report, keep serving
                return self._error(500, f"{type(exc).__name__}: {exc}")

    return Handler


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost, or "" (every interface)
        return False


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None) \
        -> ThreadingHTTPServer:
    """Start serving in a background thread; returns the server (`.shutdown()` stops it). With `api_key`,
    requests without `Authorization: Bearer <api_key>` get 401."""
    server = ThreadingHTTPServer((host, port), make_handler(ModelHost(model), api_key or None))
    if not api_key and not _is_loopback(host):
        print(f"warning: vftrain.serve listens on {host or 'every interface'}:{server.server_address[1]} without "
              "an API key: anyone who reaches it can sample and make it load weights from any path it can read "
              "(/v1/update_weights, /v1/load_lora_adapter). Set --api-key or VFTRAIN_API_KEY.",
              file=sys.stderr, flush=True)
    threading.Thread(target=server.serve_forever, daemon=True, name="vftrain-serve").start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="hub name or local folder of the model to serve")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("VFTRAIN_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on every request (default: $VFTRAIN_API_KEY)")
    args = parser.parse_args()
    server = serve(args.model, args.host, args.port, args.api_key)
    print(f"serving {args.model} at http://{args.host}:{server.server_address[1]}/v1", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


if __name__ == "__main__":
    main()
