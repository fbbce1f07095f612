"""Command-line and TOML parsing shared by the entry points: `@ config.toml`, dotted overrides, type checks.

Precedence: config defaults < TOML file < command line. Every key is checked against the config dataclass's
fields: an unknown key gets a did-you-mean, a wrong type names the key, the value and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import sys
import types
import typing
from typing import Any

from vftrain.errors import ConfigError
from vftrain.peer_names import translation

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

TOP_LEVEL = ("model", "dataset")


@dataclasses.dataclass
class Invocation:
    """What the command line asked for: the config table, top-level values, and the command's own flags."""

    table: dict  # fields of the [section] table
    top: dict  # model, dataset
    flags: dict  # entry-point flags such as inspect / json / help
    config_path: str | None = None
    cli_text: dict = dataclasses.field(default_factory=dict)  # each --section.key override as typed


def parse_argv(argv: list[str], section: str, flag_names: dict[str, bool]) -> Invocation:
    """Split argv into `@ file`, `--section.key value` overrides, top-level `--model x`, and flags.

    `flag_names` maps each entry-point flag to whether it takes a value (`--inspect 5`) or not (`--json`).
    """
    inv = Invocation(table={}, top={}, flags={})
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "@" or (arg.startswith("@") and len(arg) > 1):
            path = arg[1:] if len(arg) > 1 else (argv[i + 1] if i + 1 < len(argv) else None)
            if path is None:
                raise ConfigError("'@' must be followed by the path of a TOML config file")
            i += 1 if len(arg) > 1 else 2
            inv.config_path = path
            _merge_toml(inv, read_toml(path), section)
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; use @ config.toml and --{section}.key value overrides")
        key, eq, value = arg[2:].partition("=")
        takes_value = flag_names.get(key, True)
        if not eq and takes_value:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or nxt.startswith("--"):
                value = "true"  # a bare --sft.use_lora means true
            else:
                value, i = nxt, i + 1
        i += 1
        if key in flag_names:
            inv.flags[key] = value if takes_value else True
        elif key in TOP_LEVEL:
            inv.top[key] = value
        elif key.startswith(section + "."):
            inv.cli_text[key[len(section) + 1:]] = value
        else:
            allowed = [*TOP_LEVEL, f"{section}.<field>", *flag_names]
            hint = difflib.get_close_matches(key, allowed, n=1)
            raise ConfigError(f"unknown option --{key}" + (f"; did you mean --{hint[0]}?" if hint else
                                                            f"; options are {', '.join('--' + a for a in allowed)}"))
    # Applied after every file, wherever `@ file` stood: the command line beats the TOML.
    inv.table.update({key: parse_value(text) for key, text in inv.cli_text.items()})
    return inv


def import_beside_config(inv: Invocation) -> None:
    """'module:function' reward entries are also looked for beside the TOML file (after the current folder), so
    that `vf-rl @ sub/rl.toml` finds sub/my_module.py from any folder, as the file's author saw it."""
    if inv.config_path:
        from vftrain.rewards import import_beside

        import_beside(os.path.dirname(os.path.abspath(inv.config_path)))


def read_toml(path: str) -> dict:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path!r}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None


def _merge_toml(inv: Invocation, data: dict, section: str) -> None:
    unknown = []
    for key, value in data.items():
        if key == section:
            if not isinstance(value, dict):
                raise ConfigError(f"[{section}] must be a table of config fields")
            inv.table.update(value)
        elif key in TOP_LEVEL:
            inv.top[key] = value
        else:
            unknown.append(key)
    if unknown:  # every one in one error, as check_keys lists a table's: one run to fix them all
        raise ConfigError(_unknown_top_level(unknown, inv.config_path, section))


def _unknown_top_level(keys: list[str], path: str | None, section: str) -> str:
    """One line naming each unknown top-level key with what to write instead: a field of the [section] table placed
    above it (TOML reads `learning_rate = 1e-5` before `[sft]` as top-level), another entry point's table, a peer
    project's name for model / dataset, or the closest allowed name."""
    from vftrain.cli.fields import SECTIONS, field_table

    names = field_table(section)["names"]
    notes = []
    allowed_names = [*TOP_LEVEL, section]
    for key in keys:
        # difflib's ratio is case-sensitive: [SFT] scores nothing against sft
        hint = [n for n in allowed_names if n == key.lower()] or difflib.get_close_matches(key, allowed_names, n=1)
        if key in names:
            note = f"a field of the [{section}] table: move it below the [{section}] line"
        elif key in SECTIONS:
            note = f"the table of vf-{key}: run vf-{key}, or rename it [{section}]"
        elif key in TOP_LEVEL_NAMES:
            note = f"write {TOP_LEVEL_NAMES[key]} = ..."
        elif hint:
            note = f"did you mean [{section}]?" if hint[0] == section else f"did you mean {hint[0]!r}?"
        else:
            note = None
        notes.append(f"{key!r}" + (f" ({note})" if note else ""))
    allowed = f"allowed: {', '.join(TOP_LEVEL)} and the [{section}] table"
    if len(keys) == 1:
        return f"unknown top-level key {notes[0]} in {path}; {allowed}"
    return f"{len(keys)} unknown top-level keys in {path}: {', '.join(notes)}; {allowed}"


def parse_value(text: str) -> Any:
    """A command-line value as TOML would read it (40 -> int, true -> bool, [..] -> list), else the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


# Fields that take a string where None means "off" (or "the default") and a value spelled "none" names nothing a
# user could mean (no split, template, environment, python or checkpoint is called that), so `--sft.eval_split
# none` unsets them as it does the fields that take no string. Not here, as "none" is a real value there:
# run_name (any text names a run and its folder: omit it for a generated name), output_dir and dataset (a
# folder may be called none), report_to (transformers' own "none"), scale_rewards.
UNSET_BY_NONE = frozenset({"eval_split", "chat_template", "resume_from_checkpoint", "fsdp", "vllm_python", "env"})


def build_config(cls, table: dict, section: str, cli_text: dict | None = None):
    """Instantiate the config dataclass from a checked table.

    A command-line value is read as TOML would read it, except where the field takes a string and the TOML
    reading does not fit: `--sft.run_name 2024` and `--sft.output_dir true` keep the text as typed; and `none` (or
    `null`) unsets a field that takes None but no string, or one of UNSET_BY_NONE (another field that takes a
    string keeps the text "none").
    """
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    table = dict(table)
    check_keys(table, section, list(fields))
    for key, value in table.items():
        text = (cli_text or {}).get(key)
        if not type_matches(value, hints[key]) and text is not None and type_matches(text, hints[key]):
            table[key] = value = text
        elif text is not None and text.lower() in ("none", "null") and type_matches(None, hints[key]) \
                and (key in UNSET_BY_NONE or not type_matches(text, hints[key])):
            table[key] = value = None  # TOML has no null: `--sft.micro_batch_tokens none` unsets a field
        if not type_matches(value, hints[key]):
            raise ConfigError(f"{section}.{key} = {value!r} has the wrong type; expected {type_name(hints[key])}")
    return cls(**table)


TOP_LEVEL_NAMES = {"model": "model", "model_name_or_path": "model", "dataset": "dataset", "dataset_name": "dataset"}


def check_keys(table: dict, section: str, names: list[str] | None = None) -> None:
    """Every key of the [section] table is a field; otherwise one ConfigError that names every unknown key with its
    translation: a peer project's name (FOREIGN), a field of the other entry point's table, a top-level setting, or
    the closest field name. `names` defaults to the cached field table (no torch import: argument errors are fast)."""
    from vftrain.cli.fields import SECTIONS, field_table

    names = names if names is not None else field_table(section)["names"]
    unknown = [key for key in table if key not in names]
    if not unknown:
        return
    others = {other: field_table(other)["names"] for other in SECTIONS if other != section}
    notes = [_translation(key, section, names, others) for key in unknown]
    if len(unknown) == 1:
        raise ConfigError(f"unknown key {section}.{unknown[0]}" + (notes[0] or _closest(unknown[0], section, names,
                                                                                        "; {}")))
    raise ConfigError(f"{len(unknown)} unknown keys in [{section}]: " + "; ".join(
        key + (note or _closest(key, section, names, " ({})")) for key, note in zip(unknown, notes)))


def _translation(key: str, section: str, names: list[str], others: dict) -> str | None:
    """What to write instead of the unknown `key`, as the rest of a sentence that starts with the key (None: no
    better idea than the closest name)."""
    if key in TOP_LEVEL_NAMES:
        return f" is a top-level setting: write {TOP_LEVEL_NAMES[key]} = ... above the [{section}] table"
    return translation(key, names, others, section)


def _closest(key: str, section: str, names: list[str], form: str) -> str:
    hint = difflib.get_close_matches(key, names, n=1)
    return form.format(f"did you mean {section}.{hint[0]}?" if hint else "see --help for the fields")


def type_matches(value: Any, hint: Any) -> bool:
    """Whether a TOML value fits a dataclass annotation (ints are accepted for floats, never bools for ints)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(type_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        inner = typing.get_args(hint)
        return isinstance(value, list) and (not inner or all(type_matches(v, inner[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type):
        if issubclass(hint, str) or hasattr(hint, "__members__"):  # str-valued enums accept their strings
            return isinstance(value, str)
        return isinstance(value, hint)
    return True


def type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "none"
    return getattr(hint, "__name__", str(hint))


def resume_point(config, value: str | bool | None = None) -> str | None:
    """The checkpoint folder `value` (default: `config.resume_from_checkpoint`) names: 'latest' (or True, as in
    transformers) is the newest `checkpoint-<step>` in output_dir, or none yet (a first launch: the same command line
    then serves every restart of a preempted job; a folder with another run's outputs is then refused as a new
    run's, `checkpoint.check_output_dir`)."""
    from transformers.trainer_utils import get_last_checkpoint

    from vftrain.checkpoint import run_outputs

    value = config.resume_from_checkpoint if value is None else value
    if not value:
        return None
    if value is True or value == "latest":
        found = get_last_checkpoint(config.output_dir) if os.path.isdir(config.output_dir) else None
        if found is None and not run_outputs(config.output_dir):  # else refused: check_output_dir says why
            logging.getLogger("vftrain").warning("resume_from_checkpoint = 'latest': no checkpoint in %s yet; "
                                                 "starting at step 0", config.output_dir)
        return found
    if not isinstance(value, str) or not os.path.isdir(value):
        raise ConfigError(f"resume_from_checkpoint = {value!r} is not a checkpoint folder; use 'latest' (the newest "
                          "checkpoint in output_dir) or the path of a checkpoint-<step> folder")
    return value


def resolve_path_or_name(value: str, what: str) -> str:
    """Fail early, with one line, on a local path that does not exist (a hub name passes through)."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what} = {value!r} must be a hub name or a local path")
    looks_local = value.startswith((".", "/", "~")) or os.sep in value.strip("/") and os.path.exists(
        value.split(os.sep)[0])
    if looks_local and not os.path.exists(os.path.expanduser(value)):
        raise ConfigError(f"{what} path {value!r} does not exist")
    return os.path.expanduser(value)


# Fields config.toml leaves out: derived from others, or about one launch rather than the run (a re-run of the file
# with them would resume, or delete the run folder it was read from).
_NOT_RERUN = ("gradient_accumulation_steps", "per_device_train_batch_size", "resume_from_checkpoint",
              "overwrite_output_dir", "lora_config")


def config_toml(config, model: Any) -> str:
    """The run as a `vf-sft` / `vf-rl` TOML file: `model`, `dataset` and the [sft] / [rl] table of the fields given
    other values than their defaults (resolved), so `vf-sft @ config.toml` builds the same config. TOML has no
    null: a field set to None where the default is not is written as a comment."""
    section = config.run_name_prefix
    head = [f"# Re-run: vf-{section} @ <this file> (written by vftrain: the fields that differ from their defaults)"]
    for key, value in (("model", model), ("dataset", config.dataset)):
        head.append(f"{key} = {_toml(value)}" if isinstance(value, str) else f"# {key}: passed as a Python object")
    table = [f"run_name = {_toml(config.run_name)}"]  # also a generated one: its folder is the run's
    for name in getattr(config, "given_fields", ()):
        if name in _NOT_RERUN or name in ("dataset", "run_name"):
            continue
        value = _plain(getattr(config, name))
        table.append(f"{name} = {_toml(value)}" if value is not None else
                     f"# {name} = none  (TOML has no null: --{section}.{name} none)")
    return "\n".join(head + ["", f"[{section}]", *table]) + "\n"


def _plain(value: Any) -> Any:
    """`value` as TOML can hold it: enums as their value, tuples as lists, dataclasses as tables, no None inside."""
    import enum

    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    return value


def _toml(value: Any) -> str:
    """A TOML value (inline arrays and tables; JSON's string escapes are TOML's)."""
    import json
    import math

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value), ensure_ascii=False)
