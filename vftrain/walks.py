"""The per-step walks over the model's modules and parameters, made cheap: `model.train()` on every micro-batch and
`model.zero_grad()` and gradient clipping over `model.parameters()` on every step (transformers' training loop).

Why: each call walks the whole module tree in Python. A Qwen2.5-7B LoRA model has 2,333 modules and 731 parameters;
on the development CPU `train()` took 6.6 ms, `zero_grad()` 2.7 ms and clipping 3.1 ms, and the H200's host spent
~10 ms in each (benchmarks/RESULTS.md, session 34), on steps where the GPU already waits for the host. Here the
modules and parameters are listed once and listed again whenever any module anywhere registers a submodule or a
parameter (torch's global registration hooks: peft adding an adapter, a model being built). `train(mode)` changes
nothing when every listed module is already in `mode`, which is the case on all but the first micro-batch after an
`eval()`; otherwise it is the module's own `train`. So every result is the one the full walk gives.
"""

from __future__ import annotations

import torch
from torch.nn.modules.module import register_module_module_registration_hook, \
    register_module_parameter_registration_hook

_registrations = 0  # how many submodules and parameters have been registered on any module, in this process


def _count(*_args) -> None:
    global _registrations
    _registrations += 1


register_module_module_registration_hook(_count)
register_module_parameter_registration_hook(_count)


class ModuleWalk:
    """`model`'s modules and parameters as lists, renewed after any registration."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.seen = -1
        self.modules: list[torch.nn.Module] = []
        self.params: list[torch.nn.Parameter] = []

    def _current(self) -> None:
        if self.seen != _registrations:
            self.modules, self.params = list(self.model.modules()), list(self.model.parameters())
            self.seen = _registrations

    def train(self, mode: bool = True) -> torch.nn.Module:
        self._current()
        if all(m.training == mode for m in self.modules):
            return self.model
        return type(self.model).train(self.model, mode)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none:
            return type(self.model).zero_grad(self.model, set_to_none)
        self._current()
        for p in self.params:
            if p.grad is not None:
                p.grad = None

    def parameters(self) -> list[torch.nn.Parameter]:
        self._current()
        return self.params


def walk(model: torch.nn.Module) -> ModuleWalk:
    """`model`'s walk, installed on first use: its `train` and `zero_grad` become the walk's (instance attributes:
    the class and every other model are untouched)."""
    found = vars(model).get("_vf_walk")
    if found is None:
        found = ModuleWalk(model)
        for name, value in (("_vf_walk", found), ("train", found.train), ("zero_grad", found.zero_grad)):
            object.__setattr__(model, name, value)
    return found
