"""OpenAI-compatible sampling backend (`vllm serve`, SGLang, `python -m vftrain.serve`, ...).

The trained weights are pushed before every sampling round, or the samples would show the base model (the seed
review's bug 7):
- LoRA: the adapter is saved to `<output_dir>/sampling/step-<N>` and loaded through vLLM's runtime LoRA endpoint
  `POST /v1/load_lora_adapter` (vLLM needs `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`); samples
  are then requested from that adapter by name, and the previous round's adapter is unloaded.
- full fine-tuning: the model is saved to `<output_dir>/sampling/latest` and the server is asked to reload it
  with `POST /v1/update_weights {"path": ...}` (the endpoint of `vftrain.serve`; a vLLM deployment needs a
  launcher that exposes the same call, since stock `vllm serve` reloads weights only over NCCL/IPC).

All requests run on one event loop owned by a background thread (an `asyncio.run` per call would break the
async client after the first call: the seed review's bug 4), each bounded by `sample_timeout`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading


class OpenAIBackend:
    """`backend(prompts, step) -> completions` over an OpenAI-compatible server."""

    def __init__(self, trainer):
        try:
            import openai
        except ImportError:
            from vftrain.errors import ConfigError

            raise ConfigError("sample_backend = 'openai' needs the openai client: pip install 'vftrain[serve]'") \
                from None
        self.trainer = trainer
        args = trainer.args
        self.base_url = args.sample_base_url.rstrip("/")
        self.timeout = args.sample_timeout
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="vftrain-sampling").start()
        self.client = openai.AsyncOpenAI(base_url=self.base_url, api_key=os.environ.get("OPENAI_API_KEY", "none"),
                                         timeout=self.timeout, max_retries=0)
        self.served_name = trainer.model_source or "model"
        self.current_adapter: tuple[str, str] | None = None  # (name, folder) of the adapter now served

    def __call__(self, prompts: list, step: int) -> list[str]:
        name = self.push_weights(step)
        return self._run(self._complete_all(prompts, name))

    def participate(self, prompts: list, step: int) -> None:
        """The part of a sampling round that the other processes run when the weights are sharded: their share
        of gathering the weights for the save."""
        self._save(step)

    # ---- weights
    def push_weights(self, step: int) -> str:
        """Make the server serve the weights being trained; returns the model name to sample from."""
        name, path, adapter = self._save(step)
        if not adapter:
            self._post("/update_weights", {"path": path})
            return name
        self._post("/load_lora_adapter", {"lora_name": name, "lora_path": path})
        if self.current_adapter:
            self._unload(*self.current_adapter)
        self.current_adapter = (name, path)
        return name

    def _save(self, step: int) -> tuple[str, str, bool]:
        """(served name, folder, is a LoRA adapter) of the weights written for this round. With sharded weights
        every process takes part (the Trainer's save gathers them); the main process writes."""
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        root = os.path.abspath(os.path.join(trainer.args.output_dir, "sampling"))
        adapter = hasattr(model, "peft_config")
        if adapter:
            name, path = f"{trainer.args.run_name}-step-{step}", os.path.join(root, f"step-{step}")
        else:
            name, path = self.served_name, os.path.join(root, "latest")
            if trainer.args.should_save:
                shutil.rmtree(path, ignore_errors=True)
        if trainer.sharded:
            trainer.save_model(path)
        else:
            model.save_pretrained(path)
            if not adapter:
                trainer.processing_class.save_pretrained(path)
        return name, path, adapter

    def _unload(self, name: str, path: str) -> None:
        try:
            self._post("/unload_lora_adapter", {"lora_name": name})
        except Exception:  # a stale adapter left on the server is harmless
            pass
        shutil.rmtree(path, ignore_errors=True)

    def _post(self, path: str, body: dict) -> None:
        self._run(self.client.post(path, body=body, cast_to=object))

    # ---- completions
    async def _complete_all(self, prompts: list, model: str) -> list[str]:
        return list(await asyncio.gather(*(self._complete(p, model) for p in prompts)))

    async def _complete(self, prompt, model: str) -> str:
        args = self.trainer.args
        common = dict(model=model, max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
        if isinstance(prompt, str):
            response = await self.client.completions.create(prompt=prompt, **common)
            return response.choices[0].text or ""
        tools = {"tools": prompt.tools} if prompt.tools else {}
        response = await self.client.chat.completions.create(messages=prompt.messages, **tools, **common)
        return response.choices[0].message.content or ""

    def _run(self, coroutine):
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coroutine, self.timeout), self.loop)
        return future.result(self.timeout + 5)
