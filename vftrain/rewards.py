"""Reward functions: they score SFT samples and RL rollouts. Two shapes are accepted, told apart by the signature:

- vftrain's `fn(completion: str, reference: str) -> float`, called once per completion with its answer
  (`answer_text`: after a `<think>...</think>` reasoning block, which Qwen3 writes even when empty);
- TRL's (GRPOTrainer) `fn(prompts, completions, **kwargs) -> list[float]`, called once per batch with keyword
  arguments, as TRL calls it (`GRPOTrainer._calculate_rewards`): `prompts` (messages or strings),
  `completions` (`[{"role": "assistant", "content": text}]` for message prompts, else the text; as decoded,
  reasoning block included, as TRL passes them), `completion_ids`,
  `trainer_state`, and every other column of the rows (all but prompt / completion / messages) as one list each.

Either shape may return None (or NaN) for a completion: that function does not score it (TRL: it does not apply to
that row). It then adds nothing to the reward, as in TRL's nansum; a completion no function scores gets reward 0,
with a warning (TRL's rule). Each function's logged mean is over the completions it scored (`function_means`).

`resolve_rewards` turns config entries ('exact_match', 'package.module:function', 'path/to/file.py:function') and
callables into `Reward`s under unique names; `score` weighs them into the reward.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import logging
import math
import os
import re
import sys
from typing import Any, Callable

import numpy as np

from vftrain.errors import ConfigError

log = logging.getLogger("vftrain")

PAIR = "fn(completion: str, reference: str) -> float"
TRL = "fn(prompts, completions, **kwargs) -> list[float]"
TRL_ARGS = ("prompts", "completions", "completion_ids", "trainer_state")  # what TRL passes besides the columns
NOT_COLUMNS = ("prompt", "completion", "messages")  # row columns that are no keyword argument (TRL: prompt,
# completion; `messages` is the prompt and reference of a messages row)


def split_reasoning(completion: str) -> tuple[str | None, str]:
    """(reasoning or None, answer) of a decoded completion: the text inside its `<think>...</think>` block (the
    opening tag may be in the prompt: DeepSeek-R1's) and the text after it; (None, all of it) without one."""
    head, end, answer = completion.rpartition("</think>")
    return (head.split("<think>", 1)[-1].strip("\n"), answer.lstrip()) if end else (None, completion)


def answer_text(completion: str) -> str:
    """The answer of a decoded completion, after its reasoning block. Qwen3 and DeepSeek-R1 write `<think>...</think>`
    as text tokens, which decoding keeps: a Qwen3 model trained on `<think>\n\n</think>\n\nok` answered "ok" and
    exact match scored it 0 (and RL rewarded dropping the block)."""
    return split_reasoning(completion)[1]


def exact_match(completion: str, reference: str) -> float:
    """1.0 when the completion equals the reference after stripping surrounding whitespace, else 0.0."""
    return float(completion.strip() == reference.strip())


BUILTIN = {"exact_match": exact_match}


@dataclasses.dataclass(frozen=True)
class Reward:
    """A reward function under the name it is logged as; `batched`: TRL's shape."""

    name: str
    fn: Callable
    batched: bool

    def __call__(self, completions: list[str], references: list[str], prompts: list | None = None,
                 rows: list[dict] | None = None, completion_ids: list | None = None, trainer_state: Any = None
                 ) -> np.ndarray:
        """One score per completion (NaN: not scored, the function returned None or NaN); `prompts`, `rows` (the
        other columns), `completion_ids` and `trainer_state` are what a TRL-shaped function receives."""
        if not self.batched:
            return np.array([self._number(self.fn(answer_text(c), r))
                             for c, r in zip(completions, references, strict=True)])
        n, rows, prompts = len(completions), rows or [{}] * len(completions), prompts or [None] * len(completions)
        kwargs = {k: [row.get(k) for row in rows] for k in dict.fromkeys(k for row in rows for k in row)}
        kwargs.update(prompts=prompts, completion_ids=completion_ids, trainer_state=trainer_state,
                      completions=[[{"role": "assistant", "content": c}] if isinstance(p, list) else c
                                   for c, p in zip(completions, prompts)])
        params = inspect.signature(self.fn).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            kwargs = {k: v for k, v in kwargs.items() if k in params}
        out = list(self.fn(**kwargs))
        if len(out) != n:
            raise ConfigError(f"reward function {self.name!r} returned {len(out)} scores for {n} completions; a "
                              f"TRL-shaped {TRL} returns one per completion")
        return np.array([self._number(x) for x in out])

    def _number(self, value) -> float:
        if value is None:
            return math.nan
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"reward function {self.name!r} returned {value!r} ({type(value).__name__}); a reward "
                              "is a number, or None where the function does not score the completion") from None

    def check_columns(self, columns) -> None:
        """A TRL-shaped function's required arguments must be columns of the rows (or what TRL passes)."""
        if not self.batched:
            return
        missing = [name for name, p in inspect.signature(self.fn).parameters.items()
                   if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                   and name not in TRL_ARGS and name not in columns]
        if missing:
            raise ConfigError(f"reward function {self.name!r} needs the column(s) {', '.join(missing)}, which the "
                              f"rows lack (columns: {', '.join(sorted(columns)) or 'none'})")


def reward_columns(row: dict) -> dict:
    """The columns of a row a TRL-shaped reward function gets as keyword arguments."""
    return {k: v for k, v in row.items() if k not in NOT_COLUMNS}


def resolve_rewards(spec) -> dict[str, Reward]:
    """The reward functions of `spec` (a callable, a config entry or a list of them), each under its own name: the
    function's `__name__` or the config entry, with `_2`, `_3`... when names repeat (two lambdas, or two functions
    of one factory, must not replace one another). Each signature is checked here, before any sampling."""
    entries = [spec] if callable(spec) or isinstance(spec, str) else list(spec or [])
    out: dict[str, Reward] = {}
    for entry in entries:
        name, fn = (_callable_name(entry), entry) if callable(entry) else _load(entry)
        unique, k = name, 1
        while unique in out:
            k += 1
            unique = f"{name}_{k}"
        out[unique] = Reward(unique, fn, _batched(unique, fn))
    return out


def score(rewards: dict[str, Reward], weights: list[float] | None, completions: list[str], references: list[str],
          **inputs) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(reward per completion [n], score per function {name: [n], NaN where it did not score}): reward = sum of
    weight x score over the functions that scored the completion. `inputs`: what TRL-shaped functions also receive
    (`Reward.__call__`)."""
    per_func = {name: reward(completions, references, **inputs) for name, reward in rewards.items()}
    weights = [1.0] * len(per_func) if weights is None else weights
    scores = np.array(list(per_func.values()), dtype=np.float64).reshape(len(per_func), len(completions))
    unscored = int(np.isnan(scores).all(axis=0).sum())
    if unscored:
        log.warning("%d of %d completions were scored by no reward function (%s returned None or NaN); their reward "
                    "is 0", unscored, len(completions), ", ".join(per_func))
    return np.nansum(np.asarray(weights, dtype=np.float64).reshape(-1, 1) * scores, axis=0), per_func


def function_means(per_func: dict[str, np.ndarray]) -> dict[str, float]:
    """Each function's mean score over the completions it scored; a function that scored none is left out."""
    return {name: float(np.nanmean(v)) for name, v in per_func.items() if len(v) and not np.isnan(v).all()}


def _callable_name(fn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _load(entry) -> tuple[str, Callable]:
    """(name, function) of a config entry: built in, 'module:function' (the current folder importable, as for
    `python -m`), or 'path/to/file.py:function' (the file loaded by path, its folder importable for its own
    imports, as `env = "file.py"` does)."""
    if not isinstance(entry, str):
        raise ConfigError(f"reward_funcs entry {entry!r} must be a function or a string")
    if entry in BUILTIN:
        return entry, BUILTIN[entry]
    where, _, attr = entry.rpartition(":")
    if not where or not attr:
        raise ConfigError(f"reward_funcs entry {entry!r} is neither built in ({', '.join(BUILTIN)}) nor "
                          "'module:function' or 'path/to/file.py:function' (reward models, which TRL takes by name, "
                          "are not supported: wrap one in a reward function)")
    if not where.endswith(".py") and ("/" in where or os.sep in where or where.startswith(".")):
        raise ConfigError(f"reward_funcs entry {entry!r}: {where!r} is neither a module name nor a .py file; "
                          "write 'path/to/file.py:function'")
    try:
        module = _load_file(entry, where) if where.endswith(".py") else _import(entry, where)
    except ConfigError:
        raise
    except Exception as exc:  # whatever the module raised while importing (SyntaxError too), quoted in one line
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(f"reward_funcs entry {entry!r}: importing {where!r} failed: {type(exc).__name__}"
                          f"{': ' + detail if detail else ''}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"reward_funcs entry {entry!r}: {where!r} has no function {attr!r}")
    name = f"{os.path.basename(where)[:-3]}:{attr}" if where.endswith(".py") else entry
    return name, fn


# Folders after the current one where 'module:function' entries are looked for: the config file's (`vf-rl @
# sub/rl.toml` finds sub/my_module.py run from anywhere); set by the CLI, which knows the file.
IMPORT_FOLDERS: list[str] = []


def import_beside(folder: str) -> None:
    """Make 'module:function' reward entries importable from `folder` too, after the current folder."""
    folder = os.path.abspath(folder)
    if folder not in IMPORT_FOLDERS:
        IMPORT_FOLDERS.append(folder)


def _import(entry: str, module: str):
    """`module` imported with the current folder, then `IMPORT_FOLDERS`, on sys.path: a console script's sys.path[0]
    is its bin folder, not the folder it runs in. Appended, so that nothing installed is shadowed."""
    cwd = os.getcwd()
    for folder in ([] if "" in sys.path else [cwd]) + IMPORT_FOLDERS:
        if folder not in sys.path:
            sys.path.append(folder)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module == exc.name or module.startswith(exc.name + ".")):
            raise  # a module that the reward module imports is missing: quoted by the caller
        where = " or ".join([f"the current folder ({cwd})", *(f"the config file's folder ({f})"
                                                              for f in IMPORT_FOLDERS if f != cwd)])
        raise ConfigError(f"reward_funcs entry {entry!r}: no module {module!r} is installed or in {where}; give "
                          "its file instead, 'path/to/file.py:function'") from None


def _load_file(entry: str, path: str):
    """The module of a .py file, loaded once per file under a name of its own (a file called like an installed
    module does not replace it) and registered in sys.modules (dataclasses and pickling look modules up there)."""
    if not os.path.isfile(path):
        raise ConfigError(f"reward_funcs entry {entry!r}: no such file {path!r} (relative to {os.getcwd()})")
    path = os.path.abspath(path)
    name = "vftrain_reward_file_" + re.sub(r"\W", "_", path)
    if name in sys.modules:
        return sys.modules[name]
    if os.path.dirname(path) not in sys.path:
        sys.path.insert(0, os.path.dirname(path))
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _batched(name: str, fn: Callable) -> bool:
    """True for TRL's shape (a `completions` parameter, or keywords only), False for vftrain's; anything else is
    a ConfigError naming both shapes."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: called as documented
        return False
    if "completions" in sig.parameters:
        return True
    for args, kwargs, batched in ((("c", "r"), {}, False), ((), {"prompts": [], "completions": []}, True)):
        try:
            sig.bind(*args, **kwargs)
            return batched
        except TypeError:
            pass
    raise ConfigError(f"reward function {name!r} has the signature {name.split(':')[-1]}{sig}; a reward function is "
                      f"{PAIR}, or TRL's {TRL}")
