"""Reward functions: `fn(completion: str, reference: str) -> float`. The same functions score SFT samples and
RL rollouts. `load_reward_funcs` resolves config names ('exact_match' or 'package.module:function')."""

from __future__ import annotations

import importlib
from typing import Callable

from vftrain.errors import ConfigError


def exact_match(completion: str, reference: str) -> float:
    """1.0 when the completion equals the reference after stripping surrounding whitespace, else 0.0."""
    return float(completion.strip() == reference.strip())


BUILTIN = {"exact_match": exact_match}


def load_reward_funcs(names: list[str] | str) -> dict[str, Callable[[str, str], float]]:
    """Map each configured name to its function; an unknown name is a ConfigError naming it."""
    names = [names] if isinstance(names, str) else list(names or [])
    funcs = {}
    for name in names:
        if name in BUILTIN:
            funcs[name] = BUILTIN[name]
            continue
        module, _, attr = name.partition(":")
        try:
            funcs[name] = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError):
            raise ConfigError(f"reward_funcs entry {name!r} is neither built in ({', '.join(BUILTIN)}) nor an "
                              "importable 'module:function'") from None
    return funcs
