"""The per-step walks over the model's modules and parameters, made cheap: `model.train()` on every micro-batch and
`model.zero_grad()` and gradient clipping over `model.parameters()` on every step (transformers' training loop).

Why: each call walks the whole module tree in Python. A Qwen2.5-7B LoRA model has 2,333 modules and 731 parameters;
on the development CPU `train()` took 6.2 ms, `zero_grad()` 4.1 ms and clipping 5.0 ms, and the H200's host spent
~20 ms in each (benchmarks/RESULTS.md, session 34), on steps where the GPU already waits for the host. Here the
modules and parameters are listed once, and listed again whenever a module of the model registers a submodule or a
parameter (torch's global registration hooks: peft adding an adapter, a layer replaced). Registrations into modules
outside the model do not count: transformers' decoder forward slices its ModuleList of layers, which builds a new
ModuleList and registers every layer into it, on every forward. `train(mode)` changes nothing when every listed
module is already in `mode`, as on all but the first micro-batch after an `eval()`; otherwise it is the module's own
`train`. So every result is the one the full walk gives (a module deleted from the model stays listed: its mode
does not matter, and its gradient stays None).
"""

from __future__ import annotations

import weakref

import torch
from torch.nn.modules.module import register_module_module_registration_hook, \
    register_module_parameter_registration_hook

_walks: weakref.WeakSet = weakref.WeakSet()  # every ModuleWalk alive


def _registered(parent: torch.nn.Module, *_args) -> None:
    for listed in _walks:
        if id(parent) in listed.ids:
            listed.ids = set()  # listed again at its next use


register_module_module_registration_hook(_registered)
register_module_parameter_registration_hook(_registered)


class ModuleWalk:
    """`model`'s modules and parameters as lists, renewed after a registration into one of its modules."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.ids: set[int] = set()  # the listed modules' ids; empty: to be listed
        self.modules: list[torch.nn.Module] = []
        self.params: list[torch.nn.Parameter] = []
        _walks.add(self)

    def _current(self) -> None:
        if not self.ids:
            self.modules, self.params = list(self.model.modules()), list(self.model.parameters())
            self.ids = {id(m) for m in self.modules}

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
