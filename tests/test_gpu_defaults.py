"""The GPU defaults (liger-kernel, the varlen kernel, bf16) follow the device the model runs on, not whether the
machine has a GPU: `use_cpu = true` and a model kept on the CPU get neither; liger patches only the model it is
applied to (a peft model through its base model), and an explicit `use_liger = true` that would patch nothing is an
error (review sft-2026-12-02, finding 5). On a CPU machine a GPU is simulated as the review did
(`torch.cuda.is_available` patched to True; liger's patching is pure Python); with CUDA, the last test trains with
the defaults on the GPU."""

from __future__ import annotations

import contextlib
import logging

import datasets
import pytest
import torch

import vftrain as vf
from conftest import TINY, addition_rows, small_config, tiny_tokenizer
from vftrain.errors import ConfigError

pytest.importorskip("liger_kernel")


@contextlib.contextmanager
def gpu_machine():
    """As on a machine with an Ampere-or-newer CUDA GPU (an H100 here; no-op where there is one)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: True)
        mp.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        mp.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        yield


def _is_liger(module) -> bool:
    return "liger" in getattr(module.forward, "__module__", "")


def _tiny_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY)


def test_use_cpu_on_a_gpu_machine_trains_without_liger_or_varlen(tmp_path, monkeypatch):
    """use_cpu = true where a GPU is: float32, the model's own attention, no liger, and a step trains (liger's Triton
    kernels crashed on the CPU tensors at the first forward)."""
    import vftrain.trainer as trainer_module

    load = trainer_module.get_model_and_tokenizer

    def load_on_a_gpu_machine(*args, **kwargs):  # the review patched the GPU in during model loading only
        with gpu_machine():
            return load(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "get_model_and_tokenizer", load_on_a_gpu_machine)
    trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(16)),
                            args=small_config(tmp_path, max_steps=1, use_cpu=True))
    model = trainer.model
    assert model.config._attn_implementation != "varlen"
    assert not any(_is_liger(m) for m in model.modules())
    assert next(model.parameters()).dtype == torch.float32
    trainer.train()
    assert trainer.state.global_step == 1


def test_use_cpu_turns_bf16_autocast_off_on_a_gpu_machine(tmp_path):
    with gpu_machine():
        assert vf.SFTConfig(output_dir=str(tmp_path), use_cpu=True).bf16 is False


def test_a_model_on_the_cpu_gets_the_cpu_defaults_on_a_gpu_machine():
    """The Python API with a model kept on the CPU (or a name, loaded onto the CPU): no liger, no varlen, float32,
    as the model's device says; asked for the GPU, the same call gives the GPU defaults."""
    with gpu_machine():
        model, _ = vf.get_model_and_tokenizer(TINY, dtype="auto")
        assert next(model.parameters()).dtype == torch.float32
        assert model.config._attn_implementation != "varlen"
        assert not any(_is_liger(m) for m in model.modules())
        model, _ = vf.get_model_and_tokenizer(_tiny_model().to(torch.bfloat16), tokenizer=tiny_tokenizer(),
                                              device="cuda")
        assert model.config._attn_implementation == "varlen"
        assert _is_liger(model.model.norm) and _is_liger(model.model.layers[0].mlp)


def test_liger_patches_a_peft_model_through_its_base_model():
    """A PeftModel passed as the model: liger's decoder lookup went through peft to the causal LM ('no attribute
    norm'); now the base model's norms and MLPs are liger's and the LoRA adapters stay in place."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_tiny_model(), LoraConfig(task_type="CAUSAL_LM", r=2, target_modules="all-linear"))
    with gpu_machine():
        model, _ = vf.get_model_and_tokenizer(peft_model, tokenizer=tiny_tokenizer(), attn_implementation="sdpa",
                                              device="cuda")
    base = model.get_base_model()
    assert _is_liger(base.model.norm) and all(_is_liger(layer.mlp) for layer in base.model.layers)
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_liger_does_not_leak_to_later_models_of_the_family():
    """liger's apply rebinds the family's module-level classes and RoPE: a model built afterwards (a reference
    model, the merged export loaded for a check) was built from liger's modules and crashed on the CPU."""
    from transformers.models.qwen2 import modeling_qwen2

    before = {name: getattr(modeling_qwen2, name) for name in ("Qwen2RMSNorm", "Qwen2MLP", "apply_rotary_pos_emb")}
    with gpu_machine():
        patched, _ = vf.get_model_and_tokenizer(_tiny_model(), tokenizer=tiny_tokenizer(), device="cuda")
    assert _is_liger(patched.model.norm)
    assert {name: getattr(modeling_qwen2, name) for name in before} == before
    other = _tiny_model()
    assert not any(_is_liger(m) for m in other.modules())
    assert torch.isfinite(other(input_ids=torch.tensor([[3, 4, 5]])).logits).all()  # runs on the CPU


def test_explicit_use_liger_that_would_patch_nothing_is_an_error(caplog):
    """use_liger = true on a model type liger has no kernels for was logged as 'liger kernels: on'; on a model that
    runs on the CPU it would crash at the first forward."""
    from transformers import AutoConfig, AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2,
                                                                 vocab_size=128))
    with gpu_machine():
        with pytest.raises(ConfigError, match="no kernels for model type 'gpt2'"):
            vf.get_model_and_tokenizer(gpt2, use_liger=True, tokenizer=tiny_tokenizer(), device="cuda")
        with caplog.at_level(logging.INFO, logger="vftrain"):
            vf.get_model_and_tokenizer(gpt2, tokenizer=tiny_tokenizer(), device="cuda")  # unset: on where it applies
        assert "liger kernels: off" in caplog.text
        with pytest.raises(ConfigError, match="use_liger = true, but the model runs on the CPU"):
            vf.get_model_and_tokenizer(_tiny_model(), use_liger=True, tokenizer=tiny_tokenizer())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_default_run_on_the_gpu_trains_like_the_plain_model(tmp_path):
    """On a CUDA GPU the defaults (bf16, varlen, liger) are on and give the loss curve of the model's own modules
    and SDPA, within bf16 tolerance."""
    losses = {}
    for name, settings in {"defaults": {}, "plain": dict(use_liger=False, attn_implementation="sdpa")}.items():
        args = small_config(tmp_path / name, use_cpu=False, max_steps=4, **settings)
        trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(64)), args=args)
        if name == "defaults":
            model = trainer.model
            assert next(model.parameters()).is_cuda and next(model.parameters()).dtype == torch.bfloat16
            assert model.config._attn_implementation == "varlen" and _is_liger(model.model.norm)
        trainer.train()
        losses[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses["defaults"][-1] < losses["defaults"][0]
    assert losses["defaults"] == pytest.approx(losses["plain"], rel=2e-2)
