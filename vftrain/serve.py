"""A small OpenAI-compatible server over transformers: `python -m vftrain.serve --model PATH [--api-key KEY]`.

For tests, small models and RL rollouts on one machine; production sampling should use vLLM or SGLang. It speaks
`/v1/models`, `/v1/chat/completions`, `/v1/completions`, vLLM's runtime LoRA endpoints (`/v1/load_lora_adapter`,
`/v1/unload_lora_adapter`), and `/v1/update_weights {"path"}` for full-weight pushes.

Completions follow vLLM's request and response fields, so one client works against both: `prompt` as token ids
(token-in) or text, `n`, `max_tokens`, `temperature`, `top_p`, `seed`, `stop_token_ids`, `stop` strings,
`logprobs` (completions: the sampled token's in `choices[i].logprobs.token_logprobs`, and N > 0 adds the N most
likely tokens per step; chat: true, with `top_logprobs` N), `return_token_ids` (vLLM >= 0.10.2: per-choice
`prompt_token_ids` and `token_ids`; chat puts `prompt_token_ids` at the top level). Temperature > 0 samples
through `vftrain.sampling.tokens.sample`, whose logprobs are those of the distribution drawn from (vLLM's
`--logprobs-mode processed_logprobs`); temperature 0 decodes greedily. Requests run one at a time; `stream` is
refused. Chat renders `tools` through the chat template and parses the reply's tool calls into
`message.tool_calls` (finish_reason "tool_calls"), as `vllm serve --enable-auto-tool-choice --tool-call-parser
hermes` (or `llama3_json` for a Llama 3 template) does (`sampling/tool_calls.py`). `--model` may be a LoRA
adapter folder: its base model with the adapter, served under the folder's name.

With an API key (`--api-key`, or `VFTRAIN_API_KEY`; as `vllm serve --api-key` / `VLLM_API_KEY`) every request,
weight pushes included, needs `Authorization: Bearer KEY`. Written on the standard library's HTTP server so
that serving needs no web framework.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hmac
import ipaddress
import json
import os
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from vftrain.data.render import RowError, render_prompt, stop_token_ids
from vftrain.sampling.embedded import generate_ids, pad_token_id
from vftrain.sampling.openai_backend import NEUTRAL_SAMPLING
from vftrain.sampling.tokens import Sample, sample, sampling_logits
from vftrain.sampling.tool_calls import dialect, parse_tool_calls, reply_ids

COMPLETION_MAX_TOKENS = 16  # the OpenAI completions default (vLLM's too); chat defaults to the context left
MAX_LOGPROBS = 20  # most top logprobs per token: vLLM's default --max-logprobs, OpenAI chat's top_logprobs limit


class BadRequest(ValueError):
    """A request field that is not allowed (HTTP 400)."""


class NotFound(LookupError):
    """A model or adapter name that is not served (HTTP 404); unlike KeyError, its text is the message as is."""


@dataclasses.dataclass
class Choice:
    """One completion as the response shows it: the sample (cut at a stop string), its text, the stop string that
    ended it, and per token the top logprobs [(token id, logprob)] when asked for."""

    sample: Sample
    text: str
    stop: str | None = None
    top: list | None = None


class ModelHost:
    """The served model (with named LoRA adapters) behind one lock: requests are generated one at a time."""

    def __init__(self, path: str):
        from vftrain.models import get_model_and_tokenizer

        self.name = path
        # generation: no packed rows. A LoRA adapter folder loads as its base model with the adapter (models.py).
        self.model, self.tokenizer = get_model_and_tokenizer(path, packing=False)
        self.model.eval().requires_grad_(False)  # an adapter folder loads trainable, with dropout on
        self.peft = hasattr(self.model, "peft_config")  # a PeftModel: an adapter folder, or an adapter loaded since
        # The adapter that `name` itself serves (an adapter folder as --model); None: the base model's weights.
        self.own_adapter = self.model.active_adapter if self.peft else None
        self.adapters: set[str] = set()  # the adapters loaded at run time (by name)
        self.lock = threading.Lock()
        self.stops = stop_token_ids(self.tokenizer)
        self.pad = pad_token_id(self.tokenizer)
        self.vocab = self.model.get_input_embeddings().num_embeddings
        self.context = getattr(self.model.config, "max_position_embeddings", None)

    # ---- completions
    def complete(self, body: dict, chat: bool) -> dict:
        params = _params(body, chat, self.vocab)
        prompts = [self._chat_prompt(body, params)] if chat else self._prompts(body.get("prompt"))
        for ids in prompts:
            self._check_length(ids, params, chat)
        with self.lock, self._serving(body.get("model") or self.name):
            results = [[self._choice(s, params) for s in self._generate(ids, params)] for ids in prompts]
            scored = [self._prompt_logprobs(ids) for ids in prompts] if params["prompt_logprobs"] is not None \
                else None
        return self._response(body, chat, params, prompts, results, scored)

    def _chat_prompt(self, body: dict, p: dict) -> list[int]:
        """The messages (and `tools`) rendered by the chat template, with the generation prompt."""
        if not (isinstance(body.get("messages"), list) and body["messages"]):
            raise BadRequest("messages must be a non-empty list of chat messages")
        try:
            return render_prompt(self.tokenizer, body["messages"], p["tools"], served=True)
        except RowError as exc:
            raise BadRequest(f"messages: {exc}") from None

    def _choice(self, s: Sample, p: dict) -> Choice:
        """The response's view of a sample: decoded, cut at the first `stop` string, top logprobs added."""
        # with tools, as vLLM hands the reply to the tool parser (decoded here a prefix at a time: stop strings)
        ids, skip = reply_ids(s.completion_ids, s.finish_reason, self.stops, dialect(self.tokenizer)) \
            if p["parse_tools"] else (s.completion_ids, True)
        decode = lambda k: self.tokenizer.decode(ids[:k], skip_special_tokens=skip)  # noqa: E731
        choice = Choice(s, decode(len(ids)))
        hits = sorted((choice.text.find(x), x) for x in p["stop"] if x in choice.text)
        if hits:  # vLLM: the text ends before the stop string; the tokens end with the one that completed it
            at, choice.stop = hits[0]
            k = next(k for k in range(1, len(ids) + 1) if len(decode(k)) >= at + len(choice.stop))
            choice.sample = Sample(s.prompt_ids, s.completion_ids[:k], s.logprobs[:k], "stop", s.mask)
            choice.text = choice.text[:at]
        if p["top_logprobs"]:
            choice.top = self._top_logprobs(choice.sample, p)
        return choice

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

    def _logits(self, ids: list[int]):
        """float32 logits predicting each token of `ids` after the ones before it (one forward, no grad)."""
        import torch

        with torch.no_grad():
            return self.model(input_ids=torch.tensor([ids], device=self.model.device)).logits[0, :-1].float()

    def _top_logprobs(self, s: Sample, p: dict) -> list[list[tuple[int, float]]]:
        """Per completion token, the `top_logprobs` most likely tokens [(id, logprob)] of the distribution it was
        drawn from (temperature then top-p, `sampling_logits`, as the sampled token's own logprob; greedy: the
        model's), from one forward over prompt + completion. -inf (cut by top-p) is -9999.0, as vLLM writes it."""
        logits = self._logits(s.prompt_ids + s.completion_ids)[len(s.prompt_ids) - 1:]
        if p["temperature"] > 0:
            logits = sampling_logits(logits, p["temperature"], p["top_p"])
        values, tokens = logits.log_softmax(-1).topk(p["top_logprobs"], dim=-1)
        return [[(t, max(v, -9999.0)) for t, v in zip(ts, vs)] for ts, vs in zip(tokens.tolist(), values.tolist())]

    def _prompt_logprobs(self, ids: list[int]) -> list:
        """vLLM's `prompt_logprobs` (0: each prompt token's own): None for the first token, then {id: {logprob,
        rank, decoded_token}} from one forward over the prompt, unscaled by temperature as vLLM's."""
        import torch

        logits = self._logits(ids)
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
        """The served model (the base, or the adapter folder given as --model) or a loaded adapter, for the duration
        of one request (under the lock)."""
        if name not in self.adapters and name != self.name:
            raise NotFound(f"model {name!r} is not served; the served ids are {', '.join(self.names())}")
        if not self.peft:
            yield
        elif name == self.name and self.own_adapter is None:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(self.own_adapter if name == self.name else name)
            yield

    def names(self) -> list[str]:
        """The model ids requests may name: --model's, then the loaded adapters'."""
        return [self.name, *sorted(self.adapters)]

    def _response(self, body: dict, chat: bool, p: dict, prompts: list, results: list[list[Choice]],
                  scored: list | None) -> dict:
        choices = []
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        for k, (prompt, group) in enumerate(zip(prompts, results)):
            for c in group:
                s = c.sample
                last = s.completion_ids[-1] if s.finish_reason == "stop" and c.stop is None else None
                # vLLM's stop_reason: the requested stop string or token that ended the completion (None for eos).
                choice = {"index": len(choices), "finish_reason": s.finish_reason,
                          "stop_reason": c.stop if c.stop is not None else
                          last if last in p["stop_token_ids"] else None}
                if chat:
                    choice["message"] = self._message(c.text, choice, p)
                else:
                    choice["text"] = c.text
                if p["logprobs"] is not None:
                    choice["logprobs"] = self._logprobs(c, chat, as_ids)
                if body.get("return_token_ids"):
                    choice["token_ids"] = s.completion_ids
                    if not chat:
                        choice["prompt_token_ids"] = prompt  # vLLM: per choice for completions
                if scored is not None and not chat:
                    choice["prompt_logprobs"] = scored[k]
                choices.append(choice)
        completion_tokens = sum(len(c.sample.completion_ids) for group in results for c in group)
        prompt_tokens = sum(len(p) for p in prompts)
        out = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{time.time_ns()}",
               "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
               "model": body.get("model") or self.name, "choices": choices,
               "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}}
        if chat and body.get("return_token_ids"):
            out["prompt_token_ids"] = prompts[0]
        return out

    def _message(self, text: str, choice: dict, p: dict) -> dict:
        """The assistant message; with tools, its tool calls parsed out as vLLM's parser for the template's dialect
        gives them (finish_reason "tool_calls"; arguments as a JSON string, ids "chatcmpl-tool-<hex>", Mistral's 9
        random letters and digits)."""
        style = dialect(self.tokenizer)
        content, calls = parse_tool_calls(text, style) if p["parse_tools"] else (text, [])
        if not calls:
            return {"role": "assistant", "content": content}
        choice["finish_reason"] = "tool_calls"
        new_id = (lambda: uuid.uuid4().hex[:9]) if style.startswith("mistral") else \
            (lambda: f"chatcmpl-tool-{uuid.uuid4().hex}")
        calls = [{"id": new_id(), "type": "function", "function": c} for c in calls]
        return {"role": "assistant", "content": content, "tool_calls": calls}

    def _logprobs(self, c: Choice, chat: bool, as_ids: bool) -> dict:
        name = (lambda t: f"token_id:{t}") if as_ids else (lambda t: self.tokenizer.decode([t]))  # noqa: E731
        s = c.sample
        tokens = [name(t) for t in s.completion_ids]
        top = c.top or [[] for _ in tokens]
        if chat:
            entry = lambda t, lp: {"token": t, "logprob": lp, "bytes": list(t.encode())}  # noqa: E731
            return {"content": [{**entry(t, lp), "top_logprobs": [entry(name(i), v) for i, v in best]}
                                for t, lp, best in zip(tokens, s.logprobs, top)]}
        offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        # vLLM: the N most likely tokens and the sampled one
        return {"tokens": tokens, "token_logprobs": s.logprobs, "text_offset": offsets,
                "top_logprobs": [{**{name(i): v for i, v in best}, t: lp}
                                 for t, lp, best in zip(tokens, s.logprobs, top)]}

    # ---- weights
    def load_adapter(self, name: str, path: str) -> None:
        """vLLM's runtime LoRA load, with its refusals: a name already loaded (without load_inplace, which this
        server does not implement) or the served model's name is HTTP 400."""
        from peft import PeftModel

        from vftrain.models import peft_quiet

        with self.lock:
            if name in self.adapters or name == self.name or name in getattr(self.model, "peft_config", {}):
                raise BadRequest(f"The lora adapter '{name}' has already been loaded (or names the served model)")
            with peft_quiet():
                if not self.peft:
                    self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
                    self.peft = True
                else:
                    self.model.load_adapter(path, adapter_name=name)
            self.adapters.add(name)

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            if name not in self.adapters:
                raise NotFound(f"The lora adapter '{name}' cannot be found.")
            self.adapters.discard(name)
            if len(self.model.peft_config) > 1:  # peft keeps its last adapter: unlisted, never served
                self.model.delete_adapter(name)

    def update_weights(self, path: str) -> None:
        """Serve the full model saved in `path` under the served name (an adapter folder's adapter is then off:
        the pushed weights are the whole model); loaded adapters stay, on the new weights, as in vLLM."""
        from transformers import AutoModelForCausalLM

        fresh = AutoModelForCausalLM.from_pretrained(path, dtype=self.model.dtype).state_dict()
        with self.lock:
            if not self.peft:
                self.model.load_state_dict(fresh)
                return
            base = self.model.get_base_model()
            # peft keeps an adapted layer's own weight under `base_layer` (a saved module's under `original_module`)
            own = {k: k.replace(".base_layer.", ".").replace(".original_module.", ".") for k in base.state_dict()
                   if "lora_" not in k and ".modules_to_save." not in k}
            base.load_state_dict({k: fresh[plain] for k, plain in own.items()}, strict=False)
            self.own_adapter = None


def _is_ids(value: list) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _getter(body: dict):
    """`get(key, default, ok, allowed)`: the field's value (default when absent or null); a value that fails
    `ok` is a BadRequest naming the field, the value and what is allowed."""
    def get(key, default, ok, allowed):
        value = body.get(key)
        value = default if value is None else value
        if value is not None and not ok(value):
            raise BadRequest(f"{key}={value!r}: {allowed}")
        return value
    return get


def _params(body: dict, chat: bool, vocab: int) -> dict:
    """The sampling fields of a request, checked; a bad one is a BadRequest naming it and what is allowed."""
    get = _getter(body)
    for key, neutral in NEUTRAL_SAMPLING.items():  # sampled as plain temperature + top-p, nothing else
        value = body.get(key)
        if value is not None and value != neutral and not (key == "top_k" and value == -1):
            raise BadRequest(f"{key}={value!r}: only {neutral!r} (off) is supported")
    if body.get("stream"):
        raise BadRequest("stream=true is not supported (vftrain.serve answers whole responses); send stream=false")
    stop = get("stop", [], lambda v: isinstance(v, str) and v or isinstance(v, list) and all(
        isinstance(x, str) and x for x in v), "a non-empty string or a list of them")
    return {
        "n": get("n", 1, lambda v: _integer(v) and v >= 1, "an integer >= 1"),
        "max_tokens": get("max_tokens", None, lambda v: _integer(v) and v >= 1, "an integer >= 1"),
        "temperature": float(get("temperature", 1.0, lambda v: _number(v) and v >= 0, "a number >= 0")),
        "top_p": float(get("top_p", 1.0, lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]")),
        "seed": get("seed", int.from_bytes(os.urandom(8), "little") >> 1, _integer, "an integer"),
        "stop_token_ids": get("stop_token_ids", [], lambda v: isinstance(v, list) and _is_ids(v)
                              and all(t < vocab for t in v), f"a list of token ids below {vocab}"),
        "stop": [stop] if isinstance(stop, str) else stop,
        **_logprob_fields(get, chat),
        **_tool_fields(get, chat),
    }


def _logprob_fields(get, chat: bool) -> dict:
    """logprobs (None: not asked; 0: the sampled token's), top_logprobs (N most likely per token), prompt_logprobs:
    completions take `logprobs` N, chat `logprobs` true with `top_logprobs` N (OpenAI's fields)."""
    limit = f"an integer from 0 to {MAX_LOGPROBS}"
    if chat:
        wanted = get("logprobs", False, lambda v: isinstance(v, bool), "true or false")
        top = get("top_logprobs", 0, lambda v: _integer(v) and 0 <= v <= MAX_LOGPROBS, limit)
        if top and not wanted:
            raise BadRequest(f"top_logprobs={top} needs logprobs=true")
        return {"logprobs": 0 if wanted else None, "top_logprobs": top,
                "prompt_logprobs": None}
    top = get("logprobs", None, lambda v: _integer(v) and 0 <= v <= MAX_LOGPROBS, limit)
    return {"logprobs": None if top is None else 0, "top_logprobs": top or 0,
            "prompt_logprobs": get("prompt_logprobs", None, lambda v: _integer(v) and v == 0,
                                   "only 0 (each prompt token's own logprob) is supported")}


def _is_tool(tool) -> bool:
    fn = tool.get("function", tool) if isinstance(tool, dict) else None  # OpenAI's form, or the function alone
    return isinstance(fn, dict) and isinstance(fn.get("name"), str)


def _as_vllm_renders(tool: dict) -> dict:
    """A tool as vLLM hands it to the template: validated into its FunctionDefinition and dumped (name, description
    and parameters in that order, null where missing, `strict` only where set, other keys dropped), which templates
    that write a tool with `tojson` show."""
    fn = tool.get("function", tool)
    function = {"name": fn["name"], "description": fn.get("description"), "parameters": fn.get("parameters")}
    if fn.get("strict") is not None:
        function["strict"] = fn["strict"]
    return {"type": "function", "function": function}


def _tool_fields(get, chat: bool) -> dict:
    """tools (rendered by the chat template as vLLM renders them) and whether to parse tool calls from the reply: with
    tools and tool_choice "auto" (the default), as vLLM's --enable-auto-tool-choice; "none" renders them and parses
    nothing."""
    if not chat:
        return {"tools": None, "parse_tools": False}
    tools = get("tools", None, lambda v: isinstance(v, list) and all(map(_is_tool, v)),
                "a list of tools, each {'type': 'function', 'function': {'name': ..., 'parameters': ...}}")
    choice = get("tool_choice", "auto", lambda v: v in ("auto", "none"),
                 "only 'auto' or 'none' (a forced call needs guided decoding, which vftrain.serve does not do)")
    return {"tools": [_as_vllm_renders(t) for t in tools] if tools else None,
            "parse_tools": bool(tools) and choice == "auto"}


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
                return self._reply(200, {"object": "list", "data": [{"id": n, "object": "model"}
                                                                    for n in host.names()]})
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
                    host.load_adapter(_field(body, "lora_name"), _field(body, "lora_path"))
                elif route == "/v1/unload_lora_adapter":
                    host.unload_adapter(_field(body, "lora_name"))
                elif route == "/v1/update_weights":
                    host.update_weights(_field(body, "path"))
                else:
                    return self._error(404, f"no route {self.path}")
                return self._reply(200, {"status": "ok"})
            except (BadRequest, json.JSONDecodeError) as exc:
                return self._error(400, str(exc))
            except NotFound as exc:
                return self._error(404, str(exc))
            except Exception as exc:  # report, keep serving
                return self._error(500, f"{type(exc).__name__}: {exc}")

    return Handler


def _field(body: dict, key: str) -> str:
    if not isinstance(body.get(key), str):
        raise BadRequest(f"the request needs {key!r} (a string)")
    return body[key]


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
