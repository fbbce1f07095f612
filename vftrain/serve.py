"""A small OpenAI-compatible server over transformers generation: `python -m vftrain.serve --model PATH`.

For tests and small models (and, later, RL rollouts on one machine); production sampling should use vLLM or
SGLang. It speaks `/v1/models`, `/v1/chat/completions`, `/v1/completions`, vLLM's runtime LoRA endpoints
(`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`), and `/v1/update_weights {"path"}` for full-weight pushes.
Written on the standard library's HTTP server so that serving needs no web framework.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from vftrain.sampling.embedded import generate


class ModelHost:
    """The served model (with named LoRA adapters) behind one lock: requests are generated one at a time."""

    def __init__(self, path: str):
        from vftrain.models import get_model_and_tokenizer

        self.name = path
        self.model, self.tokenizer = get_model_and_tokenizer(path, packing=False)  # generation: no packed rows
        self.adapters: set[str] = set()
        self.lock = threading.Lock()

    def complete(self, body: dict, chat: bool) -> str:
        prompt = body["messages"] if chat else body["prompt"]
        with self.lock:
            name = body.get("model", self.name)
            if name not in self.adapters and name != self.name:
                raise KeyError(f"model {name!r} is not served; have {[self.name, *sorted(self.adapters)]}")
            if self.adapters:
                if name == self.name:
                    with self.model.disable_adapter():
                        return self._generate(prompt, body)
                self.model.set_adapter(name)
            return self._generate(prompt, body)

    def _generate(self, prompt, body: dict) -> str:
        return generate(self.model, self.tokenizer, [prompt], int(body.get("max_tokens") or 256),
                        float(body.get("temperature") or 0.0), float(body.get("top_p") or 1.0))[0]

    def load_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        with self.lock:
            if not self.adapters:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            else:
                self.model.load_adapter(path, adapter_name=name)
            self.adapters.add(name)

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            if name in self.adapters and len(self.adapters) > 1:
                self.model.delete_adapter(name)
                self.adapters.discard(name)

    def update_weights(self, path: str) -> None:
        from transformers import AutoModelForCausalLM

        fresh = AutoModelForCausalLM.from_pretrained(path, dtype=self.model.dtype)
        with self.lock:
            self.model.load_state_dict(fresh.state_dict())


def make_handler(host: ModelHost):
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

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                names = [host.name, *sorted(host.adapters)]
                return self._reply(200, {"object": "list", "data": [{"id": n, "object": "model"} for n in names]})
            self._reply(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            route = self.path.rstrip("/")
            try:
                if route in ("/v1/chat/completions", "/v1/completions"):
                    chat = route.endswith("chat/completions")
                    text = host.complete(body, chat)
                    choice = {"index": 0, "finish_reason": "stop",
                              **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
                    return self._reply(200, {"id": "vf-0", "object": "chat.completion" if chat else "text_completion",
                                             "created": int(time.time()), "model": body.get("model", host.name),
                                             "choices": [choice]})
                if route == "/v1/load_lora_adapter":
                    host.load_adapter(body["lora_name"], body["lora_path"])
                elif route == "/v1/unload_lora_adapter":
                    host.unload_adapter(body["lora_name"])
                elif route == "/v1/update_weights":
                    host.update_weights(body["path"])
                else:
                    return self._reply(404, {"error": {"message": f"no route {self.path}"}})
                return self._reply(200, {"status": "ok"})
            except KeyError as exc:
                return self._reply(404, {"error": {"message": str(exc)}})
            except Exception as exc:  # report, keep serving
                return self._reply(500, {"error": {"message": f"{type(exc).__name__}: {exc}"}})

    return Handler


def serve(model: str, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """Start serving in a background thread; returns the server (`.shutdown()` stops it)."""
    server = ThreadingHTTPServer((host, port), make_handler(ModelHost(model)))
    threading.Thread(target=server.serve_forever, daemon=True, name="vftrain-serve").start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="hub name or local folder of the model to serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    server = serve(args.model, args.host, args.port)
    print(f"serving {args.model} at http://{args.host}:{server.server_address[1]}/v1", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


if __name__ == "__main__":
    main()
