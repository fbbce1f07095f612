"""LoRA: only adapter weights train; every lora_* field reaches peft; the adapter saves and loads back."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from conftest import TINY, addition_rows, small_config
from vftrain.errors import ConfigError


def _trainer(tmp_path, **overrides):
    import datasets

    import vftrain as vf

    cfg = small_config(tmp_path, use_lora=True, lora_rank=4, lora_alpha=8, learning_rate=1e-2, max_steps=3,
                       **overrides)
    return vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(32)), args=cfg)


def test_lora_fields_are_passed_to_peft(tmp_path):
    trainer = _trainer(tmp_path, lora_dropout=0.1, lora_use_rslora=True, lora_modules_to_save=["lm_head"],
                       lora_target_modules=["q_proj", "v_proj"])
    cfg = trainer.model.peft_config["default"]
    assert cfg.r == 4 and cfg.lora_alpha == 8 and cfg.lora_dropout == 0.1 and cfg.use_rslora
    assert set(cfg.target_modules) == {"q_proj", "v_proj"} and "lm_head" in cfg.modules_to_save


def test_only_adapters_train_and_adapter_round_trips(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer = _trainer(tmp_path)
    names = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and changed <= names  # some adapters moved, no base weight did
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)

    out = tmp_path / "adapter"
    trainer.save_model(str(out))
    assert (out / "adapter_config.json").exists() and (out / "vftrain_config.json").exists()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY), str(out)).eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)


def test_merged_export_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from vftrain.cli.sft import main

    trainer = _trainer(tmp_path, lora_modules_to_save=["lm_head"])
    trainer.train()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits
    merged = trainer.save_merged()
    with torch.no_grad():
        # The live model keeps its (unmerged) adapters.
        torch.testing.assert_close(trainer.model(input_ids=ids).logits, expected)
        plain = AutoModelForCausalLM.from_pretrained(merged).eval()
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    # The layout vLLM's loaders read: the base checkpoint's tensor names, plus the trained head, declared untied
    # (a tied flag would make vLLM skip lm_head.weight and use the embedding).
    base_keys = set(safe_open(os.path.join(TINY, "model.safetensors"), "pt").keys())
    merged_keys = set(safe_open(os.path.join(merged, "model.safetensors"), "pt").keys())
    assert merged_keys == base_keys | {"lm_head.weight"}
    assert json.loads(open(os.path.join(merged, "config.json")).read())["tie_word_embeddings"] is False
    assert not os.path.exists(os.path.join(merged, "adapter_config.json"))

    adapter = tmp_path / "adapter"
    trainer.save_model(str(adapter))
    assert main(["export", str(adapter), "--out", str(tmp_path / "exported")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported")).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert main(["export", str(tmp_path / "exported")]) == 2  # not an adapter folder: one-line error


def test_seed_fixes_the_adapters_initial_weights(tmp_path):
    """The same seed gives the same LoRA initialisation in every run (and so on every process of a launch)."""
    def lora_a(seed):
        trainer = _trainer(tmp_path / str(seed), seed=seed)
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_A" in n}

    first, again, other = lora_a(1), lora_a(1), lora_a(2)
    assert first and all(torch.equal(first[n], again[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first)


@pytest.mark.parametrize("targets", ["q_proj", r".*\.(q|v)_proj"])
def test_one_module_name_or_a_regex_targets_modules(tmp_path, targets):
    """A plain name is that module (peft would read 'q_proj' as a regular expression matching no whole name)."""
    from peft.tuners.lora import LoraLayer

    model = _trainer(tmp_path, lora_target_modules=targets).model
    adapted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    assert adapted == ({"q_proj"} if targets == "q_proj" else {"q_proj", "v_proj"})


@pytest.mark.parametrize("targets,message", [
    (["nonexistent"], "lora_target_modules = ['nonexistent'] matches no module of the model; its linear modules are "
                      "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    ("q_proj|v_proj", "lora_target_modules = 'q_proj|v_proj' matches no module of the model; its linear modules are "
                      "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj (a regular expression "
                      "must match a whole dotted name such as 'model.layers.0.self_attn.q_proj')"),
])
def test_targets_matching_nothing_name_the_linear_modules(tmp_path, targets, message):
    with pytest.raises(ConfigError) as info:
        _trainer(tmp_path, lora_target_modules=targets)
    assert str(info.value) == message


def test_trls_peft_config_argument_trains_that_adapter(tmp_path):
    """TRL's `SFTTrainer(..., peft_config=LoraConfig(...))` / `GRPOTrainer(..., peft_config=...)`: a TypeError
    from transformers' Trainer after the model was loaded and the data tokenized. Now that adapter trains, as
    `lora_config` with use_lora does."""
    import datasets
    from peft import LoraConfig

    import vftrain as vf
    from rl_worker import config as rl_config

    rows = datasets.Dataset.from_list(addition_rows(16))
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    sft = vf.SFTTrainer(model=TINY, train_dataset=rows, args=small_config(tmp_path), peft_config=peft)
    rl = vf.RLTrainer(model=TINY, train_dataset=rows, args=rl_config(str(tmp_path / "rl"), 1), peft_config=peft,
                      reward_funcs=["exact_match"])
    for trainer in (sft, rl):
        config = trainer.model.peft_config["default"]
        assert trainer.args.use_lora and config.r == 4 and set(config.target_modules) == {"q_proj"}
        trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
        assert trained and all("q_proj.lora_" in n for n in trained)
    sft.train()


@pytest.mark.parametrize("argument, message", [
    ("formatting_func", "SFTTrainer takes no formatting_func= \\(TRL's\\): rows are rendered with the chat template"),
    ("data_collator", "takes no data_collator= \\(TRL's\\): rows are packed and collated by vftrain"),
    ("compute_loss_func", "takes no compute_loss_func= \\(TRL's\\): the loss is vftrain's"),
])
def test_trl_arguments_done_another_way_are_one_line_errors(tmp_path, argument, message):
    import datasets

    import vftrain as vf

    with pytest.raises(ConfigError, match=message):
        vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(16)),
                      args=small_config(tmp_path), **{argument: lambda *a: None})
