"""What RL and SFT train and what RL's KL reference is: a LoRA run's folder as `model` (its adapter trained on, or
merged), the README's Python SFT -> RL as written, the KL reference = the policy as RL starts (model objects,
trained adapters, adapter folders, padded batches), and no dropout noise in the on-policy ratio."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pytest
import torch

import vftrain as vf
from conftest import ROOT, TINY, addition_rows, small_config, tiny_tokenizer
from rl_worker import config, digits
from vftrain.errors import ConfigError


def _metrics(out_dir) -> dict[int, dict]:
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


def _rl(tmp_path, model, **overrides):
    tokenizer = overrides.pop("tokenizer", None)
    cfg = config(str(tmp_path / "rl"), overrides.pop("max_steps", 1), save_strategy="no", **overrides)
    return vf.RLTrainer(model=model, train_dataset=datasets.Dataset.from_list(addition_rows(40)), args=cfg,
                        reward_funcs=[digits], processing_class=tokenizer)


def _trained_adapter():
    """The tiny model with a LoRA adapter whose B is not zero (as after training): it changes the outputs."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = vf.get_model_and_tokenizer(TINY, dtype="float32")[0]
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    return peft


@pytest.fixture
def adapter_folder(tmp_path) -> str:
    """A LoRA run's folder as save_model writes it: the adapter and the tokenizer (marked, to tell it from the
    base model's)."""
    folder = tmp_path / "lora-run"
    _trained_adapter().save_pretrained(folder)
    tokenizer = tiny_tokenizer()
    tokenizer.model_max_length = 123
    tokenizer.save_pretrained(folder)
    return str(folder)


def _lora_weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k and ".default." in k}


# ---- 1. a LoRA run's folder as model
@pytest.mark.parametrize("trainer", ["rl", "sft"])
def test_adapter_folder_trains_its_adapter_on(tmp_path, adapter_folder, trainer):
    """use_lora: the folder's adapter is loaded trainable (its weights, its rank) and moves; the base stays."""
    if trainer == "rl":
        t = _rl(tmp_path, adapter_folder, use_lora=True, max_steps=2, learning_rate=3e-2)
    else:
        t = vf.SFTTrainer(model=adapter_folder, train_dataset=datasets.Dataset.from_list(addition_rows(16)),
                          args=small_config(tmp_path, use_lora=True, lora_rank=8))
    assert t.processing_class.model_max_length == 123  # the folder's tokenizer
    start = _lora_weights(t.model)
    saved = _lora_weights(_trained_adapter())
    assert start.keys() == saved.keys() and all(torch.equal(start[k], saved[k]) for k in saved)
    base = {k: v.clone() for k, v in t.model.named_parameters() if "lora_" not in k}
    t.train()
    after = _lora_weights(t.model)
    assert any(not torch.equal(after[k], start[k]) for k in start)
    assert all(torch.equal(v, dict(t.model.named_parameters())[k]) for k, v in base.items())


def test_adapter_folder_is_merged_without_use_lora(tmp_path, adapter_folder, caplog):
    """use_lora = false: the adapter is merged into the base model and every weight trains (and the log says so)."""
    caplog.set_level("INFO", logger="vftrain")
    t = _rl(tmp_path, adapter_folder, max_steps=1, learning_rate=3e-2)
    assert not hasattr(t.model, "peft_config")
    assert all(p.requires_grad for p in t.model.parameters())
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(t.model(input_ids=ids).logits, _trained_adapter()(input_ids=ids).logits)
    assert "merged it into its base model" in caplog.text
    before = [p.detach().clone() for p in t.model.parameters()]
    t.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, t.model.parameters()))


def test_adapter_attached_by_transformers_is_refused(tmp_path, adapter_folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY)
    model.load_adapter(adapter_folder)
    with pytest.raises(ConfigError, match="attached through transformers.*is_trainable=True"):
        _rl(tmp_path, model, tokenizer=tiny_tokenizer())


def test_lora_run_records_its_base_as_an_absolute_path(tmp_path, monkeypatch):
    """NC 20: a LoRA run from a relative local path records the base absolutely, so that `vf-sft export` run from
    another folder finds it."""
    from vftrain.cli.sft import main

    monkeypatch.chdir(ROOT)
    t = vf.SFTTrainer(model="assets/tiny-chat", train_dataset=datasets.Dataset.from_list(addition_rows(16)),
                      args=small_config(tmp_path, use_lora=True, max_steps=1))
    t.train()
    t.save_model()
    out = t.args.output_dir
    assert json.loads(Path(out, "adapter_config.json").read_text())["base_model_name_or_path"] == TINY
    monkeypatch.chdir(tmp_path)
    assert main(["export", out, "--out", str(tmp_path / "merged")]) == 0


def test_readme_lora_pair_runs_from_the_command_line(tmp_path, monkeypatch):
    """The README's SFT (LoRA) -> RL pair as a user runs it (tiny step counts): RL trains the SFT run's adapter."""
    from safetensors.torch import load_file

    from vftrain.cli import rl, sft

    for name in ("examples", "assets"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    assert sft.main(["@", "examples/sft_then_rl/lora_sft.toml", "--sft.max_steps", "2", "--sft.eval_generation_rows",
                     "2"]) == 0
    assert rl.main(["@", "examples/sft_then_rl/lora_rl.toml", "--rl.max_steps", "2", "--rl.eval_generation_rows",
                    "2", "--rl.batch_size", "16", "--rl.micro_batch_size", "16", "--rl.save_steps", "2"]) == 0
    sft_out, rl_out = tmp_path / "outputs" / "sft-then-rl-lora-sft", tmp_path / "outputs" / "sft-then-rl-lora-rl"
    before, after = (load_file(f / "adapter_model.safetensors") for f in (sft_out, rl_out))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


# ---- 2. the README's Python API
def test_run_folder_without_a_model_names_its_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-20").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"checkpoint-20.*save_model\(\)"):
        _rl(tmp_path, str(run))


def readme_python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def test_readme_python_code_runs_as_written(tmp_path, monkeypatch):
    """The README's ```python blocks in order, in a folder where its paths exist, with tiny step counts appended
    (as tests/test_readme.py does for its command lines): SFT, save, then RL from the saved run folder."""
    from vftrain.config import RLConfig, SFTConfig

    tiny = dict(max_steps=2, batch_size=16, micro_batch_size=16, eval_generation_rows=0)
    monkeypatch.setattr(vf, "SFTConfig", lambda **kw: SFTConfig(**{**kw, **tiny}), raising=False)
    monkeypatch.setattr(vf, "RLConfig", lambda **kw: RLConfig(**{**kw, **tiny}), raising=False)
    (tmp_path / "assets").symlink_to(ROOT / "assets")
    monkeypatch.chdir(tmp_path)
    blocks = readme_python_blocks()
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert any(Path("outputs").glob("*/config.json")) and len(list(Path("outputs").iterdir())) >= 2


# ---- 3, 4. the KL reference is the policy as RL starts
def _step1_kl(tmp_path, model, **overrides) -> float:
    t = _rl(tmp_path, model, beta=0.1, **overrides)
    t.train()
    return _metrics(tmp_path / "rl")[1]["kl"]


@pytest.mark.parametrize("moved", [False, True])
def test_kl_reference_of_a_model_object_is_the_object(tmp_path, moved):
    """The review's repro: weights changed in memory (as by an SFT run in the same process); step-1 KL was 0.108."""
    model = vf.get_model_and_tokenizer(TINY, dtype="float32")[0]
    if moved:
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    assert _step1_kl(tmp_path, model, tokenizer=tiny_tokenizer()) < 1e-7


def test_kl_reference_of_a_trained_peft_model_is_its_adapter(tmp_path):
    """A PeftModel with a trained adapter: the reference is a frozen copy of that adapter, not adapters off; the
    trained adapter alone stays trainable, and the KL grows once it moves."""
    peft = _trained_adapter()
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    t = _rl(tmp_path, peft, tokenizer=tiny_tokenizer(), beta=0.1, use_lora=True, max_steps=3, learning_rate=3e-2)
    assert sum(p.numel() for p in t.model.parameters() if p.requires_grad) == trainable
    t.train()
    kls = [_metrics(tmp_path / "rl")[s]["kl"] for s in (1, 2, 3)]
    assert kls[0] < 1e-7 and kls[2] > 1e-5, kls


@pytest.mark.parametrize("use_lora", [True, False])
def test_kl_reference_of_an_adapter_folder_is_the_adapter(tmp_path, adapter_folder, use_lora):
    assert _step1_kl(tmp_path, adapter_folder, use_lora=use_lora) < 1e-7


def test_kl_reference_of_an_adapter_folder_on_bf16_weights_is_the_adapter(tmp_path, adapter_folder):
    """On bf16 weights the policy's adapter is bf16 (lora.adapters_in_base_dtype), and so is its frozen reference
    copy: step-1 KL 0. A float32 copy (peft's add_adapter casts new adapters up) rounded differently: 2e-6."""
    assert _step1_kl(tmp_path, adapter_folder, use_lora=True, dtype="bfloat16") < 1e-7


def test_kl_reference_runs_padded_batches_where_varlen_exists(tmp_path, monkeypatch):
    """RL 11: packing = false where the varlen kernel exists (any CUDA torch >= 2.10): the reference used to load
    with varlen attention and fail at step 1 on the padded micro-batches; it runs as the policy does."""
    import vftrain.attention

    monkeypatch.setattr(vftrain.attention, "kernel_available", lambda *a, **k: True)
    assert _step1_kl(tmp_path, TINY, packing=False) < 1e-7


# ---- 5. dropout
def test_lora_dropout_leaves_the_on_policy_ratio_at_one(tmp_path):
    """RL 16: lora_dropout 0.1 made step 2's ratio 0.87-1.09 (step 1's B = 0 hides dropout); the policy's forward
    now runs without dropout, as the sampler's does."""
    t = _rl(tmp_path, TINY, use_lora=True, lora_dropout=0.1, max_steps=2, learning_rate=3e-2)
    t.train()
    record = _metrics(tmp_path / "rl")[2]
    assert abs(record["importance_ratio_min"] - 1) < 1e-5 and abs(record["importance_ratio_max"] - 1) < 1e-5
