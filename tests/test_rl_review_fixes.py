"""The outside review of the merged RL changes: a dropout-free KL reference adapter, eval/reward weighted as the
training reward, held-out samples through the OpenAI backend rendered with the run's template, vLLM launched on a
LoRA run folder's base, the FSDP ranks that build an adapter folder without weights training it, and the verifiers
environment + OpenAI backend on 2 processes without a hang."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import datasets
import pytest
import torch

import vftrain as vf
from conftest import TINY, addition_rows, tiny_tokenizer, worker_env
from rl_worker import config, digits
from test_rl_env import envs  # noqa: F401  (a fixture: the tool environments on PYTHONPATH)


def _metrics(out_dir) -> dict[int, dict]:
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


def _adapter_folder(folder: Path, **lora) -> str:
    """A LoRA run's folder (adapter + tokenizer) whose adapter changes the outputs (B not zero)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = vf.get_model_and_tokenizer(TINY, dtype="float32")[0]
    lora = {"r": 4, "lora_alpha": 8, **lora}
    peft = get_peft_model(base, LoraConfig(target_modules="all-linear", init_lora_weights=False, **lora))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    peft.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


# ---- 1. the KL reference adapter without dropout
def test_kl_reference_adapter_has_no_dropout(tmp_path):
    """An adapter saved with lora_dropout 0.3: the reference copy kept it (added after dropout was switched off)
    and its train-mode forward dropped activations: KL 0.014 with a policy that never moves (learning rate 0)."""
    folder = _adapter_folder(tmp_path / "lora-run", lora_dropout=0.3)
    cfg = config(str(tmp_path / "rl"), 2, use_lora=True, beta=0.5, learning_rate=0.0, save_strategy="no",
                 dtype="float32")
    vf.RLTrainer(model=folder, train_dataset=datasets.Dataset.from_list(addition_rows(40)), args=cfg,
                 reward_funcs=[digits]).train()
    metrics = _metrics(tmp_path / "rl")
    assert [metrics[s]["kl"] for s in (1, 2)] == [0.0, 0.0]


# ---- 3. eval/reward weighted as the training reward
def test_eval_reward_is_weighted_as_the_training_reward(tmp_path):
    """Two reward functions of 1.0, reward_weights unset: the training reward is their sum (2.0), and eval/reward
    was their mean (1.0)."""
    def one(completion, reference):
        return 1.0

    def also_one(completion, reference):
        return 1.0

    cfg = config(str(tmp_path / "rl"), 1, save_strategy="no", sample_every_n_steps=1, num_samples=2,
                 dtype="float32")
    vf.RLTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(40)), args=cfg,
                 reward_funcs=[one, also_one]).train()
    records = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval/reward"] for r in records if "eval/reward" in r] == [2.0]
    assert [r["reward"] for r in records if "reward" in r] == [2.0]


# ---- 6. an adapter folder built without weights (FSDP ranks > 0) is trainable
def test_adapter_folder_without_weights_trains_the_same_parameters(tmp_path):
    """The FSDP ranks that receive their shards from rank 0 build the adapter from its saved config, which records
    inference_mode true: nothing was trainable on them."""
    from vftrain.models import load_adapter_folder

    folder = _adapter_folder(tmp_path / "lora-run")
    trainable = {}
    for load_weights in (True, False):
        model, _ = load_adapter_folder(folder, dtype="float32", load_weights=load_weights)
        trainable[load_weights] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable[True] and trainable[False] == trainable[True]


# ---- 4. held-out samples through the OpenAI backend rendered with the run's chat_template
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}: {{ m.content }}<|im_end|>{% endfor %}"
            "{% if tools %}tools: {{ tools | length }}{% endif %}"
            "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}")


def test_openai_held_out_samples_use_the_runs_chat_template(tmp_path, monkeypatch):
    """The samples went to /chat/completions, which the server renders with its own template: the server now
    receives the ids training renders (the run's chat_template, the row's tools), and stops where the embedded
    backend does."""
    from conftest import small_config
    from vftrain.data.render import render_prompt
    from vftrain.sampling import ChatPrompt
    from vftrain.sampling.embedded import generate
    from vftrain.sampling.openai_backend import OpenAIBackend
    from vftrain.serve import ModelHost, serve

    received, complete = [], ModelHost.complete
    monkeypatch.setattr(ModelHost, "complete", lambda self, body, chat: received.append((body, chat)) or
                        complete(self, body, chat))
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    prompt = ChatPrompt([{"role": "user", "content": "12+34"}], tools)
    server = serve(TINY, port=0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        args = small_config(tmp_path, sample_backend="openai", sample_base_url=url, chat_template=TEMPLATE,
                            max_new_tokens=8, dtype="float32")
        trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(16)), args=args)
        [served] = OpenAIBackend(trainer)([prompt], step=0)
    finally:
        server.shutdown()
        server.server_close()
    tokenizer = trainer.processing_class
    body, chat = next((b, c) for b, c in received if b.get("max_tokens") == 8)
    assert not chat and body["prompt"] == render_prompt(tokenizer, prompt.messages, tools)
    [embedded] = generate(trainer.model, tokenizer, [prompt], max_new_tokens=8)
    assert (served, served.truncated) == (embedded, embedded.truncated)


# ---- 5. vf-rl's vLLM server for a LoRA run folder
@pytest.mark.parametrize("use_lora", [True, False])
def test_vllm_launcher_serves_a_lora_run_folders_base(tmp_path, monkeypatch, use_lora):
    """The adapter folder went to vLLM as --model (vLLM exits: no config.json), with --max-lora-rank from
    lora_rank (8) while the continued adapter keeps its saved rank (12 -> vLLM's 16)."""
    from vftrain.sampling.vllm_server import VLLMServer, launched_vllm

    folder = _adapter_folder(tmp_path / "lora-run", r=12)
    commands = []
    monkeypatch.setattr(VLLMServer, "start", lambda self: commands.append(self.command))
    monkeypatch.setattr(VLLMServer, "stop", lambda self: None)
    cfg = config(str(tmp_path / "rl"), 1, use_lora=use_lora, rl_backend="openai", vllm_python=sys.executable,
                 sample_base_url="http://127.0.0.1:8765/v1")
    with launched_vllm(cfg, folder):
        pass
    [command] = commands
    assert command[command.index("--model") + 1] == TINY
    rank = command[command.index("--max-lora-rank") + 1] if "--max-lora-rank" in command else None
    assert rank == ("16" if use_lora else None)


def test_merged_lora_run_folder_samples_from_the_served_base(tmp_path):
    """use_lora false merges the folder's adapter and pushes full weights to the server, which serves the base
    under the base's name: the samples asked for the adapter folder's (vftrain.serve: 404)."""
    from conftest import small_config
    from vftrain.sampling import ChatPrompt
    from vftrain.sampling.openai_backend import OpenAIBackend
    from vftrain.serve import serve

    folder = _adapter_folder(tmp_path / "lora-run")
    server = serve(TINY, port=0)  # the base, as vf-rl's launcher serves it
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        args = small_config(tmp_path, sample_backend="openai", sample_base_url=url, use_lora=False, dtype="float32",
                            max_new_tokens=8)
        trainer = vf.SFTTrainer(model=folder, train_dataset=datasets.Dataset.from_list(addition_rows(16)), args=args)
        [completion] = OpenAIBackend(trainer)([ChatPrompt([{"role": "user", "content": "12+34"}])], step=0)
    finally:
        server.shutdown()
        server.server_close()
    assert isinstance(completion, str)


# ---- 2. the verifiers environment + the OpenAI backend on 2 processes
def test_env_with_openai_backend_on_two_processes_finishes(tmp_path, envs):
    """tests/rl_env_worker.py against vftrain.serve: only rank 0's episodes have a second turn. The rollouts'
    weight push used to wait for every process at every sampler call (a barrier per tool turn): rank 1, one turn
    short, hung. Every process now makes the same collective calls (the timeout turns a hang into a failure)."""
    import os
    import subprocess

    from conftest import ROOT
    from vftrain.serve import serve

    server = serve(TINY, port=0)
    env = worker_env(envs)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(28800 + os.getpid() % 1000)]
    try:
        proc = subprocess.run([*launcher, str(ROOT / "tests" / "rl_env_worker.py"), str(tmp_path / "out"),
                               f"http://127.0.0.1:{server.server_address[1]}/v1"], env=env, capture_output=True,
                              text=True, timeout=240, start_new_session=True)
    except subprocess.TimeoutExpired:
        pytest.fail("the 2-process run hung (processes made different collective calls)")
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    # each rank prints one JSON object; the other rank's progress line can land on the same line of the shared stdout
    starts = [m.start() for m in re.finditer(r'\{"rank"', proc.stdout)]
    found = [json.JSONDecoder().raw_decode(proc.stdout, start)[0] for start in starts]
    turns = {r["rank"]: r["turns"] for r in found}
    assert turns == {0: [0, 1], 1: [0]}  # sampling from a server takes no collective: rank 1 has no turn to drop
    lines = [json.loads(x) for x in (tmp_path / "out" / "rollouts.jsonl").read_text().splitlines()]
    assert sorted(r["reward"] for r in lines) == [0.0] * 4 + [1.0] * 4
