"""The per-step walks listed once (vftrain/walks.py): `train()`, `zero_grad()` and clipping give what the full walk
gives, also after modules are switched one by one, added, or given new parameters; and a LoRA run trains and logs
exactly as with transformers' own walks."""

from __future__ import annotations

import json

import datasets
import torch
from torch import nn

import vftrain as vf
import vftrain.trainer as trainer_module
from conftest import TINY, addition_rows, small_config
from vftrain.walks import walk
from transformers import Trainer


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)))


def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_train_sets_every_module_also_one_switched_alone():
    model = _model()
    walk(model)
    model.train()
    model[2][1].eval()  # a submodule switched directly, not through the root
    assert model.train() is model and all(_modes(model))
    model.eval()
    assert not any(_modes(model))
    model.train()
    assert all(_modes(model))


def test_modules_and_parameters_added_later_are_walked():
    """A module registered after the lists were made (peft adding an adapter, say): train() and zero_grad() reach
    it. Without the registration count the stale list held every listed module in training mode and skipped it."""
    model = _model()
    walk(model).train()
    model.extra = nn.Dropout(0.5).eval()
    model[2].add_module("deep", nn.Sequential(nn.Dropout(0.1)).eval())
    model.train()
    assert all(_modes(model))
    model.scale = nn.Parameter(torch.ones(3))
    model.extra.register_parameter("bias", nn.Parameter(torch.zeros(2)))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert len(walk(model).parameters()) == len(list(model.parameters())) == 6


class _Sliced(nn.Module):
    """A forward that slices its ModuleList, as transformers' decoders do: a new ModuleList every call, with every
    layer registered into it."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    def forward(self, x):
        for layer in self.layers[:2]:
            x = layer(x)
        return x


def test_the_lists_outlive_a_forward():
    """Registrations into modules outside the model (the slice's new ModuleList) do not make the walk list the
    model again: with a count of every registration anywhere it did so on every forward, as slow as the full
    walk (seen in a CPU profile of an RL step)."""
    model = _Sliced()
    listed = walk(model)
    model.train()
    modules = listed.modules
    model(torch.ones(2, 4)).sum().backward()
    model.zero_grad()
    model.train()
    assert listed.modules is modules and all(p.grad is None for p in model.parameters())


def test_zero_grad_to_zeros_keeps_torchs_meaning():
    model = _model()
    walk(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def _metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_a_lora_run_trains_as_with_transformers_own_walks(tmp_path, monkeypatch):
    """Clipping at a max_grad_norm small enough to clip every step: the same losses, grad norms and adapters."""
    def run(folder):
        args = small_config(folder, use_lora=True, max_steps=4, max_grad_norm=0.01, micro_batch_size=4)
        trainer = vf.SFTTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(32)), args=args)
        trainer.train()
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        return _metrics(folder / "out"), weights, "_vf_walk" in vars(trainer.model_wrapped)

    listed, listed_weights, installed = run(tmp_path / "a")
    monkeypatch.setattr(trainer_module, "walk", lambda model: None)
    monkeypatch.setattr(trainer_module.VFTrainer, "_clip_grad_norm", Trainer._clip_grad_norm)
    full, full_weights, _ = run(tmp_path / "b")
    assert installed
    norms = [r["grad_norm"] for r in listed if "grad_norm" in r]
    assert len(norms) == 4 and min(norms) > 0.01  # every step clipped
    assert [(r.get("loss"), r.get("grad_norm")) for r in listed] == [(r.get("loss"), r.get("grad_norm")) for r in full]
    assert all(torch.equal(listed_weights[n], full_weights[n]) for n in full_weights)
