"""OpenAI-compatible sampling backend (`vllm serve`, SGLang, `python -m vftrain.serve`, ...).

The trained weights are pushed before every sampling round, or the samples would show the base model (the seed
review's bug 7; stale rollout weights are the most reported RL failure: trl#3189, trl#5312):
- LoRA: the adapter is saved to `<output_dir>/sampling/step-<N>` and loaded through vLLM's runtime LoRA endpoint
  `POST /v1/load_lora_adapter` (vLLM needs `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`); samples
  are then requested from that adapter by name, and the previous round's adapter is unloaded.
- full fine-tuning: the model is saved to `<output_dir>/sampling/latest` and the server is asked to reload it
  with `POST /v1/update_weights {"path": ...}` (the endpoint of `vftrain.serve`; a vLLM deployment needs a
  launcher that exposes the same call, since stock `vllm serve` reloads weights only over NCCL/IPC).
The weights of one optimizer step are saved and pushed once, however many rounds sample at that step.

Two kinds of round: `backend(prompts, step)` returns text (SFT sample panels); `sample_tokens` sends token ids
and returns token ids with the server's per-token logprobs (RL rollouts; vLLM's `return_token_ids` and
`logprobs`), never decoding and re-encoding. All requests run concurrently on one event loop owned by a
background thread (an `asyncio.run` per call would break the async client after the first call: the seed
review's bug 4). A round has `sample_timeout` seconds in all: a server that is overloaded or restarting (502-504,
408, 429, dropped connection) is retried with backoff within it; nothing listening at the URL, a refused API key
or a bad request fail at once. Failures are `SamplerError`s naming the URL. `Authorization: Bearer` carries
`$VFTRAIN_API_KEY` (else `$OPENAI_API_KEY`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import threading
import time

from vftrain.errors import SamplerError
from vftrain.sampling.tokens import Sample, seed_for

# Overloaded, restarting or behind a proxy that timed out. Not 500: an error in the server, which a retry repeats.
RETRIED_STATUS = {408, 429, 502, 503, 504}


class OpenAIBackend:
    """`backend(prompts, step) -> completions` and `sample_tokens(...)` over an OpenAI-compatible server."""

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
        key = os.environ.get("VFTRAIN_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none"
        self.client = openai.AsyncOpenAI(base_url=self.base_url, api_key=key, timeout=self.timeout, max_retries=0)
        self.served_name = trainer.model_source or "model"
        self.current_adapter: tuple[str, str] | None = None  # (name, folder) of the adapter now served
        self.saved: tuple[int, tuple[str, str, bool]] | None = None  # (step, what _save wrote)
        self.pushed_step: int | None = None

    def __call__(self, prompts: list, step: int) -> list[str]:
        name = self.push_weights(step)
        return self._run(lambda deadline: _all(self._complete(p, name, deadline) for p in prompts))

    def sample_tokens(self, prompts: list[list[int]], *, step: int, n: int, max_new_tokens: int,
                      temperature: float, top_p: float, stop_ids, seed: int) -> list[list[Sample]]:
        """`n` completions of each prompt (token ids) from the weights of optimizer step `step` (pushed first),
        as `vftrain.sampling.tokens.sample` returns them: one list of `n` Samples per prompt, with the server's
        token ids and per-token logprobs (processed ones with `vllm serve --logprobs-mode processed_logprobs`).
        Prompt i is sampled with seed `seed_for(seed, i)`: the same call gives the same rollouts from a server
        whose seeded sampling is reproducible (vftrain.serve; vLLM per its own batch-invariance)."""
        name = self.push_weights(step, everyone=self.trainer.args.world_size > 1)
        body = {"model": name, "n": n, "max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                "logprobs": 0, "extra_body": {"return_token_ids": True, "stop_token_ids": sorted(stop_ids)}}
        return self._run(lambda deadline: _all(self._sample(list(p), {**body, "seed": seed_for(seed, i)}, deadline)
                                               for i, p in enumerate(prompts)))

    def participate(self, prompts: list, step: int) -> None:
        """The part of a sampling round that the other processes run when the weights are sharded: their share
        of gathering the weights for the save."""
        self._save(step)

    # ---- weights
    def push_weights(self, step: int, everyone: bool = False) -> str:
        """Make the server serve the weights of optimizer step `step` (once per step); returns the model name
        to sample from. `everyone`: every process calls this at the same point (RL rollouts): the main process
        saves (all take part when the weights are sharded) and pushes, and the others wait for it."""
        trainer = self.trainer
        if self.pushed_step == step:
            return self._name(step)
        if everyone and not trainer.sharded and not trainer.args.should_save:
            trainer.accelerator.wait_for_everyone()  # the main process saves and pushes
            self.pushed_step = step
            return self._name(step)
        name, path, adapter = self._save(step)
        if everyone and not trainer.args.should_save:  # a sharded process's part of the save is done
            trainer.accelerator.wait_for_everyone()
            self.pushed_step = step
            return name
        try:
            self._push(name, path, adapter)
        finally:
            if everyone:
                trainer.accelerator.wait_for_everyone()
        self.pushed_step = step
        return name

    def _name(self, step: int) -> str:
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        return f"{self.trainer.args.run_name}-step-{step}" if hasattr(model, "peft_config") else self.served_name

    def _push(self, name: str, path: str, adapter: bool) -> None:
        if not adapter:
            try:
                self._post("/update_weights", {"path": path})
            except SamplerError as exc:
                if "HTTP 404" not in str(exc):
                    raise
                raise SamplerError(f"{exc}; full-weight pushes need a server with POST /v1/update_weights "
                                   "(python -m vftrain.serve); with stock vllm serve train LoRA (use_lora)") from None
        else:
            self._post("/load_lora_adapter", {"lora_name": name, "lora_path": path})
            if self.current_adapter:
                self._unload(*self.current_adapter)
            self.current_adapter = (name, path)

    def _save(self, step: int) -> tuple[str, str, bool]:
        """(served name, folder, is a LoRA adapter) of the weights written for this step, written once. With
        sharded weights every process takes part (the Trainer's save gathers them); the main process writes."""
        if self.saved and self.saved[0] == step:
            return self.saved[1]
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        root = os.path.abspath(os.path.join(trainer.args.output_dir, "sampling"))
        adapter = hasattr(model, "peft_config")
        name = self._name(step)
        if adapter:
            path = os.path.join(root, f"step-{step}")
        else:
            path = os.path.join(root, "latest")
            if trainer.args.should_save:
                shutil.rmtree(path, ignore_errors=True)
        if trainer.sharded:
            trainer.save_model(path)
        else:
            model.save_pretrained(path)
            if not adapter:
                trainer.processing_class.save_pretrained(path)
        self.saved = (step, (name, path, adapter))
        return self.saved[1]

    def _unload(self, name: str, path: str) -> None:
        try:
            self._post("/unload_lora_adapter", {"lora_name": name})
        except Exception:  # a stale adapter left on the server is harmless
            pass
        shutil.rmtree(path, ignore_errors=True)

    def _post(self, path: str, body: dict) -> None:
        self._run(lambda deadline: self._request(
            path, deadline, lambda timeout: self.client.post(path, body=body, cast_to=object,
                                                             options={"timeout": timeout})))

    # ---- requests
    async def _complete(self, prompt, model: str, deadline: float) -> str:
        args = self.trainer.args
        # RL shows greedy held-out samples (sample_temperature 0) while its rollouts use args.temperature
        temperature = getattr(self.trainer, "sample_temperature", args.temperature)
        common = dict(model=model, max_tokens=args.max_new_tokens, temperature=temperature, top_p=args.top_p)
        if isinstance(prompt, str):
            response = await self._request("/completions", deadline, lambda timeout: self.client.completions.create(
                prompt=prompt, timeout=timeout, **common))
            return response.choices[0].text or ""
        tools = {"tools": prompt.tools} if prompt.tools else {}
        response = await self._request("/chat/completions", deadline,
                                       lambda timeout: self.client.chat.completions.create(
                                           messages=prompt.messages, timeout=timeout, **tools, **common))
        return response.choices[0].message.content or ""

    async def _sample(self, prompt: list[int], body: dict, deadline: float) -> list[Sample]:
        response = await self._request("/completions", deadline, lambda timeout: self.client.completions.create(
            prompt=prompt, timeout=timeout, **body))
        return [self._to_sample(prompt, choice) for choice in response.choices]

    def _to_sample(self, prompt: list[int], choice) -> Sample:
        """A Sample from a completion choice, exactly as the server sampled it; anything missing is an error."""
        ids, sent = getattr(choice, "token_ids", None), getattr(choice, "prompt_token_ids", None)
        logprobs = choice.logprobs.token_logprobs if choice.logprobs else None
        if ids is None or logprobs is None:
            raise SamplerError(f"{self.base_url} returned no token ids or logprobs: RL needs a server that "
                               "honours return_token_ids and logprobs (vLLM >= 0.10.2, or vftrain.serve)")
        if sent is not None and list(sent) != prompt or len(logprobs) != len(ids) or None in logprobs:
            raise SamplerError(f"{self.base_url} returned a completion that does not match its request (prompt "
                               "ids changed, or one logprob per token missing)")
        if choice.finish_reason not in ("stop", "length"):
            raise SamplerError(f"{self.base_url} ended a completion with finish_reason={choice.finish_reason!r}")
        return Sample(prompt_ids=prompt, completion_ids=list(ids), logprobs=[float(x) for x in logprobs],
                      finish_reason=choice.finish_reason)

    async def _request(self, what: str, deadline: float, send):
        """`await send(timeout)`, retried with exponential backoff while the server is overloaded or restarting
        and the round's deadline allows; every failure is a one-line SamplerError naming the URL."""
        import openai

        delay, attempt = 0.5, 0
        while True:
            attempt += 1
            remaining = max(deadline - time.monotonic(), 0.01)
            try:
                # The HTTP timeout bounds each read; wait_for bounds the whole attempt.
                return await asyncio.wait_for(send(remaining), remaining + 0.5)
            except (openai.APITimeoutError, asyncio.TimeoutError):
                raise SamplerError(f"{self.base_url}{what}: no answer within sample_timeout={self.timeout:g}s "
                                   f"({attempt} attempt(s)); the server is stuck or too slow for this round "
                                   "(raise sample_timeout)") from None
            except openai.APIConnectionError as exc:
                if _nothing_listening(exc):
                    raise SamplerError(f"no server at {self.base_url} (connection refused): start one, e.g. "
                                       "`python -m vftrain.serve --model MODEL --port PORT` or `vllm serve MODEL` "
                                       "(README, sampling), or fix sample_base_url") from None
                problem = f"connection lost ({exc.__cause__ or exc})"
            except openai.APIStatusError as exc:
                if exc.status_code in (401, 403):
                    raise SamplerError(f"{self.base_url} refused the API key (HTTP {exc.status_code}): set "
                                       "VFTRAIN_API_KEY to the server's --api-key") from None
                if exc.status_code not in RETRIED_STATUS:
                    raise SamplerError(f"{self.base_url}{what} answered HTTP {exc.status_code}: "
                                       f"{_message(exc)}") from None
                problem = f"HTTP {exc.status_code}: {_message(exc)}"
            if time.monotonic() + delay >= deadline:
                raise SamplerError(f"{self.base_url}{what} still failing after {attempt} attempts within "
                                   f"sample_timeout={self.timeout:g}s: {problem}")
            await asyncio.sleep(delay)
            delay = min(2 * delay, 8.0)

    def _run(self, make):
        """Run `make(deadline)` on the backend's loop; the round has `sample_timeout` seconds."""
        future = asyncio.run_coroutine_threadsafe(make(time.monotonic() + self.timeout), self.loop)
        return future.result()


async def _all(coroutines):
    """Results of the coroutines, run concurrently; the first failure cancels the others and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


def _nothing_listening(exc: BaseException) -> bool:
    """Connection refused or an unknown host, anywhere in the cause chain (the HTTP library's own error types
    differ between versions; the operating system's do not)."""
    while exc is not None:
        if isinstance(exc, (ConnectionRefusedError, socket.gaierror)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _message(exc) -> str:
    """The first line of the server's error message (`{"error": {"message": ...}}` as OpenAI and vLLM send)."""
    body = exc.body.get("error", exc.body) if isinstance(exc.body, dict) else exc.body
    text = body.get("message") if isinstance(body, dict) else body
    return str(text or exc.message).splitlines()[0][:300]
