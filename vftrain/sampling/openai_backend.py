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
import re
import shutil
import socket
import threading
import time

from vftrain.data.render import stop_token_ids
from vftrain.errors import ConfigError, SamplerError
from vftrain.models import served_model
from vftrain.sampling import Completion
from vftrain.sampling.embedded import encode_prompt
from vftrain.sampling.tokens import Sample, seed_for

# Overloaded, restarting or behind a proxy that timed out. Not 500: an error in the server, which a retry repeats.
RETRIED_STATUS = {408, 429, 502, 503, 504}
# Every sampling field a server may fill from the checkpoint's generation_config.json when a request leaves it
# unset, at its neutral value: vLLM takes "user -> server default -> OpenAI default", and the server default with
# `--generation-config auto` is generation_config.json (Qwen2.5/3: top_k 20, repetition_penalty 1.05), so rollouts
# would come from a distribution the trainer does not model (issue 18 item 4; vLLM 0.32
# `entrypoints/openai/completion/protocol.py` `to_sampling_params`, `config/model.py` `get_diff_sampling_param`).
# top_k 0 is "disabled" in vLLM 0.32 (`SamplingParams`: "top_k must be 0 (disable), or at least 1"; -1 is still
# accepted quietly). temperature and top_p are sent from the config on every request.
NEUTRAL_SAMPLING = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
                    "frequency_penalty": 0.0}
# After every push the server's logprobs of this text are compared with the trainer's (`_check_served`).
PROBE_TEXT = "The weights were pushed at this step: 12 + 34 = 46."
# Mean |server - trainer| logprob of the probe above which the server serves other weights: far above float32
# noise (~1e-6 on the tiny test model) and bfloat16's (~1e-2), far below a different model's.
PROBE_TOLERANCE = 0.5


class OpenAIBackend:
    """`backend(prompts, step) -> completions` and `sample_tokens(...)` over an OpenAI-compatible server."""

    def __init__(self, trainer):
        try:
            import openai
        except ImportError:
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
        # vLLM's dev routes (/pause, /collective_rpc, ...) sit at the server's root, beside /v1
        self.root = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        # A LoRA run folder is served as its base (vLLM loads no adapter folder): merged, its weights go by that name
        self.served_name = served_model(trainer.model_source) or "model"
        self.nonce = _process_start_nonce(args)
        self.probe_ids = trainer.processing_class(PROBE_TEXT)["input_ids"]
        self.server: str | None = None  # "vllm" or "vftrain", found at the first full-weight push
        self.current_adapter: tuple[str, str] | None = None  # (name, folder) of the adapter now served
        self.previous_folder: str | None = None  # full weights: the folder pushed last, deleted after the next
        self.saved: tuple[int, tuple[str, str, bool]] | None = None  # (step, what _save wrote)
        self.expected = None  # (step, the trainer's probe logprobs) of the weights saved last
        self.previous_expected = None  # the trainer's probe logprobs of the weights saved before those
        self.pushed_step: int | None = None
        self.context_checked = False

    def __call__(self, prompts: list, step: int) -> list[str]:
        name = self.push_weights(step)
        completions = self._run(lambda deadline: _all(self._complete(p, name, deadline) for p in prompts))
        self._check_served(name)
        return completions

    def sample_tokens(self, prompts: list[list[int]], *, step: int, n: int, max_new_tokens: int,
                      temperature: float, top_p: float, stop_ids, seed: int, push: bool = True) -> list[list[Sample]]:
        """`n` completions of each prompt (token ids) from the weights of optimizer step `step` (pushed first),
        as `vftrain.sampling.tokens.sample` returns them: one list of `n` Samples per prompt, with the server's
        token ids and per-token logprobs (processed ones with `vllm serve --logprobs-mode processed_logprobs`).
        Prompt i is sampled with seed `seed_for(seed, i)`: the same call gives the same rollouts from a server
        whose seeded sampling is reproducible (vftrain.serve; vLLM per its own batch-invariance). The round ends
        with a check that the server still serves the pushed weights (`_check_served`). `push=False`: `step`'s
        weights are served already (RL pushes before each round: `rl/pipeline.py`, whose rounds may run on a worker
        thread, which must take no part in the processes' collectives)."""
        name = self.push_weights(step, everyone=self.trainer.args.world_size > 1) if push else self._name(step)
        self._check_context(name)
        body = {"model": name, "n": n, "max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                "logprobs": 0, "extra_body": {**NEUTRAL_SAMPLING, "return_token_ids": True,
                                              "stop_token_ids": sorted(stop_ids)}}
        samples = self._run(lambda deadline: _all(self._sample(list(p), {**body, "seed": seed_for(seed, i)},
                                                               deadline) for i, p in enumerate(prompts)))
        self._check_served(name)
        return samples

    def participate(self, prompts: list, step: int) -> None:
        """The part of a sampling round that the other processes run when the weights are sharded: their share
        of gathering the weights for the save."""
        self._save(step)

    def _check_context(self, name: str) -> None:
        """Once per process: the server's context holds the run's longest rollout. vLLM shortens a request's
        max_tokens to what its context (`--max-model-len`) leaves after the prompt, without an error: rollouts
        would end early and be counted as cut by max_new_tokens. vLLM's /v1/models says the length
        (`max_model_len`); a server that does not, or has no such route, is not checked."""
        if self.context_checked:
            return
        try:
            listed = self._get("/models")
        except SamplerError as exc:
            if not _no_such_route(exc):
                raise
            listed = None
        models = [m for m in (listed.get("data") if isinstance(listed, dict) else None) or [] if isinstance(m, dict)]
        entry = next((m for m in models if m.get("id") == name), models[0] if models else {})
        context, args = entry.get("max_model_len"), self.trainer.args
        self.context_checked = True
        if isinstance(context, int) and context < args.longest_row():
            longest = "max_seq_len" if args.env else \
                f"max_prompt_len {args.max_prompt_len} + max_new_tokens {args.max_new_tokens}"
            raise ConfigError(f"{self.base_url} serves {name!r} with max_model_len {context}, less than the longest "
                              f"rollout ({longest} = {args.longest_row()} tokens): vLLM would end rollouts early "
                              f"without an error; start it with --max-model-len {args.longest_row()} or more "
                              "(vllm_args with vllm_python), or lower max_new_tokens or max_prompt_len")

    # ---- weights
    def push_weights(self, step: int, everyone: bool = False) -> str:
        """Make the server serve the weights of optimizer step `step` (once per step); returns the model name
        to sample from. `everyone`: every process calls this at the same point (RL rollouts): the main process
        saves (all take part when the weights are sharded) and pushes, and the others wait for it, at every call
        (a push already made for this step, e.g. by the held-out samples sharing this backend, included)."""
        trainer = self.trainer
        main = trainer.args.should_save
        try:
            if self.pushed_step != step and (main or trainer.sharded):
                name, path, adapter = self._save(step)
                if main:
                    self._push(name, path, adapter)
            self.pushed_step = step
        finally:
            if everyone:
                trainer.accelerator.wait_for_everyone()
        return self._name(step)

    def _name(self, step: int) -> str:
        """The served model name: the base model's for full weights; for LoRA a name of this process start
        (`nonce`), so that no adapter a previous process left on the server (a resume, a re-run with the same
        run_name) has it: vLLM refuses to load a name twice, and keys its prefix cache by (name, folder)."""
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        if not hasattr(model, "peft_config"):
            return self.served_name
        return f"{self.trainer.args.run_name}-{self.nonce}-step-{step}"

    def _push(self, name: str, path: str, adapter: bool) -> None:
        if adapter:
            if self.current_adapter is None:
                self._unload_stale()
            self._post("/load_lora_adapter", {"lora_name": name, "lora_path": path})
            if self.current_adapter:
                self._unload(*self.current_adapter)
            self.current_adapter = (name, path)
        else:
            if self.server is None:
                self.server = self._detect_server()
            if self.server == "vllm":
                self._reload_vllm(path)
            else:
                self._update_weights(path)
            if self.previous_folder:
                shutil.rmtree(self.previous_folder, ignore_errors=True)
            self.previous_folder = path
        self._check_served(name)

    def _detect_server(self) -> str:
        """"vllm" for a vLLM server in dev mode (it answers GET /is_paused), else "vftrain" (the server must
        then take POST /v1/update_weights, as vftrain.serve does)."""
        try:
            self._get(self.root + "/is_paused")
            return "vllm"
        except SamplerError as exc:
            if not _no_such_route(exc):
                raise
        return "vftrain"

    def _reload_vllm(self, path: str) -> None:
        """Stock vLLM (>= 0.32, VLLM_SERVER_DEV_MODE=1): pause (in-flight requests finish), reload every weight
        from the folder (`/collective_rpc` -> the worker's `reload_weights`), drop the prefix cache (its KV
        blocks were computed with the old weights and are keyed by tokens only), resume."""
        self._post(self.root + "/pause", {}, params={"mode": "wait"})
        try:
            self._post(self.root + "/collective_rpc", {"method": "reload_weights",
                                                       "kwargs": {"weights_path": path}})
            reset = self._post(self.root + "/reset_prefix_cache", {})
            if not (isinstance(reset, dict) and reset.get("success")):
                raise SamplerError(f"{self.root}/reset_prefix_cache failed after a weight push ({reset!r}): "
                                   "its cached KV blocks would come from the old weights")
        finally:
            self._post(self.root + "/resume", {})

    def _update_weights(self, path: str) -> None:
        try:
            self._post("/update_weights", {"path": path})
        except SamplerError as exc:
            if "HTTP 404" not in str(exc):
                raise
            raise SamplerError(f"{exc}; full-weight pushes need vLLM started with VLLM_SERVER_DEV_MODE=1 on "
                               "127.0.0.1 (README, sampling) or python -m vftrain.serve; or train LoRA (use_lora)") \
                from None

    def _save(self, step: int) -> tuple[str, str, bool]:
        """(served name, folder, is a LoRA adapter) of the weights written for this step, written once to a
        folder of its own (vLLM reports stale weights when a folder is overwritten in place, vllm#32718), with
        the trainer's logprobs of the probe text that `_check_served` compares. With sharded weights every
        process takes part (the Trainer's save and the probe's forward gather them); the main process writes."""
        if self.saved and self.saved[0] == step:
            return self.saved[1]
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        adapter = hasattr(model, "peft_config")
        name = self._name(step)
        path = os.path.join(os.path.abspath(os.path.join(trainer.args.output_dir, "sampling")),
                            f"{self.nonce}-step-{step}")
        if self.saved is None and trainer.args.should_save:  # folders a previous process left
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
        if trainer.sharded:
            trainer.save_model(path)
        else:
            model.save_pretrained(path)
            if not adapter:
                trainer.processing_class.save_pretrained(path)
        self.previous_expected = self.expected[1] if self.expected else None
        self.expected = (step, probe_logprobs(trainer, self.probe_ids))
        self.saved = (step, (name, path, adapter))
        return self.saved[1]

    def _unload(self, name: str, path: str) -> None:
        try:
            self._post("/unload_lora_adapter", {"lora_name": name})
        except Exception:  # a stale adapter left on the server is harmless
            pass
        shutil.rmtree(path, ignore_errors=True)

    def _unload_stale(self) -> None:
        """Unload the adapters of this run_name that an earlier process left on the server (a crash, a resume,
        a re-run), before the first load: they hold vLLM's LoRA slots, and vLLM's names must be unique."""
        pattern = re.compile(re.escape(self.trainer.args.run_name) + r"-([0-9a-f]{8}-)?step-\d+")
        models = self._get("/models")
        for card in models.get("data", []) if isinstance(models, dict) else []:
            if isinstance(card, dict) and pattern.fullmatch(str(card.get("id"))):
                self._unload(card["id"], "")

    def _check_served(self, name: str) -> None:
        """Fail unless the server serves the weights pushed last (main process; after the push and after each
        round). The server's logprobs of a fixed probe text are compared with the trainer's from `_save`: a push
        that did not land, or a server restarted since, is a SamplerError, never a step trained on stale
        rollouts."""
        if not self.trainer.args.should_save or self.expected is None:
            return
        step, expected = self.expected
        served = self._run(lambda deadline: self._probe(name, deadline))
        gap = float((served - expected).abs().mean())
        before = None if self.previous_expected is None else float((served - self.previous_expected).abs().mean())
        # Stale: far from these weights (another model, or a server restarted from another checkpoint), or
        # markedly closer to the previous push's than to these. A step that moved the probe by less than the
        # numeric noise leaves both gaps equal, so noise alone never trips the second test.
        if gap > PROBE_TOLERANCE or (before is not None and gap > 2 * before):
            was = "" if before is None else f", {before:.3g} from the previous push's"
            raise SamplerError(f"{self.base_url} does not serve the weights of step {step}: its logprobs of a "
                               f"probe text are {gap:.3g} nats (mean) from the trainer's{was}; the weight push did "
                               "not land, the server restarted, or it still holds the weights an earlier "
                               "full-weight run pushed (restart it). Stopped rather than train on stale rollouts")

    async def _probe(self, name: str, deadline: float):
        """The server's float logprobs of the probe text's tokens (vLLM's `prompt_logprobs`), as a tensor."""
        import torch

        response = await self._request("/completions", deadline, lambda timeout: self.client.completions.create(
            model=name, prompt=self.probe_ids, max_tokens=1, temperature=1.0, top_p=1.0, timeout=timeout,
            extra_body={**NEUTRAL_SAMPLING, "prompt_logprobs": 0}))
        logprobs = (getattr(response.choices[0], "prompt_logprobs", None) or [None])[1:]
        try:
            values = [entry[str(t)]["logprob"] for entry, t in zip(logprobs, self.probe_ids[1:])]
        except (KeyError, TypeError):
            values = []
        if len(values) != len(self.probe_ids) - 1:
            raise SamplerError(f"{self.base_url} returned no prompt_logprobs for the probe that checks each weight "
                               "push: use vLLM or vftrain.serve")
        return torch.tensor(values, dtype=torch.float32)

    def _post(self, path: str, body: dict, params: dict | None = None):
        options = {"params": params} if params else {}
        return self._run(lambda deadline: self._request(
            path, deadline, lambda timeout: self.client.post(path, body=body, cast_to=object,
                                                             options={"timeout": timeout, **options})))

    def _get(self, path: str):
        return self._run(lambda deadline: self._request(
            path, deadline, lambda timeout: self.client.get(path, cast_to=object, options={"timeout": timeout})))

    # ---- requests
    async def _complete(self, prompt, model: str, deadline: float) -> Completion:
        """The completion's text, `truncated` when the server cut it at max_tokens (finish_reason "length"), as
        the embedded backend marks its own. A chat prompt is rendered here as training renders it (the run's
        chat_template, the row's tools) and sent as token ids, as rollouts are: the server's /chat/completions
        would apply its own template. It stops at the tokens that end a turn in that rendering."""
        args = self.trainer.args
        tokenizer = self.trainer.processing_class
        # RL shows greedy held-out samples (sample_temperature 0) while its rollouts use args.temperature
        temperature = getattr(self.trainer, "sample_temperature", args.temperature)
        extra = NEUTRAL_SAMPLING if isinstance(prompt, str) else \
            {**NEUTRAL_SAMPLING, "stop_token_ids": sorted(stop_token_ids(tokenizer))}
        request = prompt if isinstance(prompt, str) else encode_prompt(tokenizer, prompt)
        response = await self._request("/completions", deadline, lambda timeout: self.client.completions.create(
            model=model, prompt=request, max_tokens=args.max_new_tokens, temperature=temperature, top_p=args.top_p,
            extra_body=extra, timeout=timeout))
        choice = response.choices[0]
        return Completion(choice.text or "", choice.finish_reason == "length")

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

        url = what if "://" in what else self.base_url + what
        delay, attempt = 0.5, 0
        while True:
            attempt += 1
            remaining = max(deadline - time.monotonic(), 0.01)
            try:
                # The HTTP timeout bounds each read; wait_for bounds the whole attempt.
                return await asyncio.wait_for(send(remaining), remaining + 0.5)
            except (openai.APITimeoutError, asyncio.TimeoutError):
                raise SamplerError(f"{url}: no answer within sample_timeout={self.timeout:g}s "
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
                    raise SamplerError(f"{url} answered HTTP {exc.status_code}: "
                                       f"{_message(exc)}") from None
                problem = f"HTTP {exc.status_code}: {_message(exc)}"
            if time.monotonic() + delay >= deadline:
                raise SamplerError(f"{url} still failing after {attempt} attempts within "
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


def _no_such_route(exc: SamplerError) -> bool:
    return any(f"HTTP {code}" in str(exc) for code in (404, 405, 501))


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


def _process_start_nonce(args) -> str:
    """8 hex digits new at every process start, the same on every process of the run (all of them send the
    adapter's name; the main one picks it)."""
    nonce = [os.urandom(4).hex()]
    if args.world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(nonce, src=0)
    return nonce[0]


def probe_logprobs(trainer, ids: list[int]):
    """The trained model's float32 logprobs of each token of `ids` after the ones before it (eval mode, no grad);
    with sharded weights every process runs it (the forward gathers them)."""
    import torch

    model = trainer.model if trainer.sharded else trainer.accelerator.unwrap_model(trainer.model)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids], device=trainer.args.device)).logits[0, :-1].float()
    finally:
        model.train(training)
    targets = torch.tensor(ids[1:], device=logits.device)[:, None]
    return logits.log_softmax(-1).gather(-1, targets)[:, 0].cpu()
