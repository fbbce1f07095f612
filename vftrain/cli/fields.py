"""The config fields as the command line needs them (names, and the `--help` text), without importing torch.

The configs subclass `transformers.TrainingArguments`, and importing that takes seconds (torch, transformers):
`vf-sft --help` took 3.6-5.3 s, and so did an unknown key. The table is built once from the config classes and kept
in the user's cache folder under a key of everything it is derived from (vftrain/config.py's bytes, the vftrain,
transformers and Python versions), so an edited config or an upgraded transformers builds a new one. Later
`--help` calls and key checks read it in well under a second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import textwrap
from importlib import metadata

SECTIONS = {"sft": "SFTConfig", "rl": "RLConfig"}
_CONFIG_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config.py")


def field_table(section: str) -> dict:
    """{"names": [field, ...], "help": the fields part of --help} for `section` ('sft' or 'rl')."""
    path = _cache_path()
    try:
        with open(path) as fh:
            return json.load(fh)[section]
    except (OSError, ValueError, KeyError):
        pass
    tables = _build()
    try:  # a cache that cannot be written only costs the next call its seconds
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(tables, fh)
        os.replace(tmp, path)  # atomic: concurrent launches never read half a file
    except OSError:
        pass
    return tables[section]


def _cache_path() -> str:
    key = hashlib.sha1()
    with open(_CONFIG_PY, "rb") as fh:
        key.update(fh.read())
    for package in ("vftrain", "transformers"):
        try:
            key.update(metadata.version(package).encode())
        except metadata.PackageNotFoundError:
            key.update(b"-")
    key.update(sys.version.encode())
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vftrain", f"fields-{key.hexdigest()[:16]}.json")


def _build() -> dict:
    from vftrain import config

    shared = {f.name for f in dataclasses.fields(config.TrainerConfig) if f.metadata.get("vftrain")}
    tables = {}
    for section, name in SECTIONS.items():
        fields = [f for f in dataclasses.fields(getattr(config, name)) if f.init]
        ours = [f for f in fields if f.metadata.get("vftrain")]
        inherited = [f for f in fields if not f.metadata.get("vftrain")]
        other = "RL" if section == "sft" else "SFT"
        lines = [f"\n[{section}] fields (vftrain; * = shared with {other}):"]
        lines += [line for f in ours for line in _field_lines(f, "* " if f.name in shared else "  ")]
        lines.append(f"\n[{section}] fields inherited from transformers.TrainingArguments:")
        lines += [line for f in inherited for line in _field_lines(f, "  ")]
        tables[section] = {"names": [f.name for f in fields], "help": "\n".join(lines)}
    return tables


def _field_lines(f, mark: str) -> list[str]:
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    help_text = " ".join(str(f.metadata.get("help", "")).split())
    lines = [f"  {mark}{f.name} = {default!r}"]
    if help_text:
        lines.append(textwrap.fill(help_text, width=100, initial_indent=" " * 8, subsequent_indent=" " * 8))
    return lines
