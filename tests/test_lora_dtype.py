"""LoRA adapters on bf16 base weights train in bf16 where the optimizer keeps their updates
(lora.adapters_in_base_dtype): no float32 casts around every adapted linear, and the adapters' updates and loss
curve are those of peft's float32 adapters within the bf16 forward's noise; without master weights, and on float32
base weights, they stay float32."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

import vftrain as vf
import vftrain.trainer as trainer_module
from conftest import TINY, addition_rows, small_config
from vftrain.lora import adapter_dtype, adapters_in_base_dtype
from vftrain.optim import CompensatedAdamW
from vftrain.trainer import VFTrainer


def _train(tmp_path, master="kahan-bf16", **overrides):
    """12 LoRA steps at lr 5e-5 on the bf16 tiny model; returns the trainer and its adapters' starting weights."""
    settings = dict(dtype="bfloat16", use_lora=True, master_weights=master, learning_rate=5e-5, max_steps=12,
                    warmup_steps=0, lr_scheduler_type="constant", micro_batch_size=4)
    args = small_config(tmp_path, **{**settings, **overrides})
    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(64)), args=args)
    start = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    return trainer, start


def _update(start, weights) -> torch.Tensor:
    return torch.cat([(weights[n].detach().float() - w).flatten() for n, w in start.items()])


def _losses(folder) -> list[float]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


@pytest.fixture(scope="module")
def float32_adapters(tmp_path_factory):
    """peft's float32 adapters on the bf16 model (as before): their update and losses."""
    tmp = tmp_path_factory.mktemp("float32_adapters")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module, "adapters_in_base_dtype", lambda model: None)
        trainer, start = _train(tmp)
    assert adapter_dtype(trainer.model) == torch.float32
    return dict(update=_update(start, dict(trainer.model.named_parameters())), losses=_losses(tmp / "out"))


def test_bf16_adapters_keep_the_float32_adapters_updates(tmp_path, float32_adapters, monkeypatch):
    """The default (compensated AdamW): bf16 adapters whose held weights (bf16 + compensation) follow the float32
    adapters' update to within a few percent and whose loss curve is theirs within bf16 forward noise, where bf16
    adapters under plain AdamW lose much of the update (the control: the same cast without master weights)."""
    trainer, start = _train(tmp_path / "default")
    assert adapter_dtype(trainer.model) == torch.bfloat16
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(optimizer, CompensatedAdamW)
    held = {n: p.detach().float() + optimizer.state[p]["compensation"].float()
            for n, p in trainer.model.named_parameters() if p.requires_grad}
    reference = float32_adapters["update"]
    size = reference.abs().mean()
    assert (_update(start, held) - reference).abs().mean() < 0.05 * size
    assert _losses(tmp_path / "default" / "out") == pytest.approx(float32_adapters["losses"], abs=2e-3)

    original = VFTrainer._prepare_model

    def bf16_adapters_anyway(self, model, args):
        model = original(self, model, args)
        adapters_in_base_dtype(model)
        return model

    monkeypatch.setattr(VFTrainer, "_prepare_model", bf16_adapters_anyway)
    pure, pure_start = _train(tmp_path / "pure", master=False)
    assert adapter_dtype(pure.model) == torch.bfloat16
    lost = _update(pure_start, dict(pure.model.named_parameters()))
    assert (lost - reference).abs().mean() > 0.2 * size


@pytest.mark.parametrize("settings", [dict(master_weights=False), dict(dtype="float32")])
def test_adapters_stay_float32_without_master_weights_or_on_float32_weights(tmp_path, settings):
    """Plain AdamW would round the adapters' updates away in bf16, so they stay peft's float32; a float32 model's
    adapters are float32 anyway."""
    args = small_config(tmp_path, **{"dtype": "bfloat16", "use_lora": True, **settings})
    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(8)), args=args)
    assert adapter_dtype(trainer.model) == torch.float32


def test_the_rl_reference_adapter_takes_the_policy_adapters_dtype():
    """RL's KL reference (a frozen copy of a continued adapter) computes in the policy adapter's dtype: bf16 where
    the policy's is (peft's add_adapter would make it float32), float32 where the policy's is."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from vftrain.rl.trainer import copy_adapter

    for autocast, dtype in ((False, torch.bfloat16), (True, torch.float32)):
        base = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.bfloat16)
        model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"), autocast_adapter_dtype=autocast)
        copy_adapter(model, "reference")
        dtypes = {p.dtype for n, p in model.named_parameters() if ".reference." in n}
        assert dtypes == {dtype} and adapter_dtype(model) == dtype


def test_a_resumed_bf16_lora_run_is_the_uninterrupted_run(tmp_path):
    """Resuming loads the checkpoint's adapter through peft's load_adapter, which cast it back to float32: the
    resumed run then built torch's AdamW for the compensated one's saved state and stopped at its first step. The
    adapters stay bf16, and 4 steps resumed at step 2 end on the uninterrupted run's weights exactly."""
    import shutil

    def run(folder, resume=None):
        args = small_config(folder, dtype="bfloat16", use_lora=True, max_steps=4, learning_rate=1e-4,
                            save_strategy="steps", save_steps=2, micro_batch_size=4)
        trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(32)), args=args)
        trainer.train(resume_from_checkpoint=resume)
        assert adapter_dtype(trainer.model) == torch.bfloat16
        assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), CompensatedAdamW)
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}

    uninterrupted = run(tmp_path / "a")
    checkpoint = tmp_path / "b" / "out" / "checkpoint-2"
    shutil.copytree(tmp_path / "a" / "out" / "checkpoint-2", checkpoint)
    resumed = run(tmp_path / "b", resume=str(checkpoint))
    assert resumed.keys() == uninterrupted.keys()
    for name, weight in resumed.items():
        assert torch.equal(weight, uninterrupted[name]), name


def test_the_best_adapter_loaded_at_the_end_stays_bf16(tmp_path):
    """load_best_model_at_end loads the best checkpoint's adapter through peft's load_adapter, which cast it to
    float32: the run's last evaluations, generations and saved adapter then ran in float32. It comes back bf16, with
    the best checkpoint's weights."""
    from safetensors.torch import load_file

    args = small_config(tmp_path, dtype="bfloat16", use_lora=True, max_steps=4, learning_rate=1e-4, micro_batch_size=4,
                        save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2, eval_size=8,
                        load_best_model_at_end=True)
    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(40)), args=args)
    trainer.train()
    assert adapter_dtype(trainer.model) == torch.bfloat16
    best = load_file(f"{trainer.state.best_model_checkpoint}/adapter_model.safetensors")
    weights = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert len(best) == len(weights)
    for name, saved in best.items():
        loaded = next(w for n, w in weights.items() if n.replace(".default", "").endswith(name.split("base_model.")[-1]))
        assert torch.equal(loaded, saved.to(loaded.dtype)), name
    trainer.save_model()
    assert {t.dtype for t in load_file(str(tmp_path / "out" / "adapter_model.safetensors")).values()} == {torch.bfloat16}
