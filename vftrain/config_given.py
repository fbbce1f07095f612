"""What a config was given, and a config rebuilt from it with the fields set since.

A config checks its fields and derives settings from them once, when it is built (`__post_init__`): a batch_size
set afterwards was neither checked nor spread to the settings derived from it (an RL run trained 16 rollouts a step
for batch_size = 18, refused at construction). transformers' own scripts set fields after construction as a habit,
so the trainers build the config again from what it was given plus what was set since (`rebuilt`): as if those
values had been passed to the constructor, with the same checks and one-line errors.
"""

from __future__ import annotations

import copy
import dataclasses


def remember_given(config) -> None:
    """Record the fields given other values than their defaults, before any is derived: what config.toml writes
    (`given_fields`) and what `rebuilt` starts from. Once: the first `__post_init__` of the class chain runs it."""
    if "given_values" in vars(config):
        return
    config.given_values = {f.name: copy.copy(getattr(config, f.name)) for f in dataclasses.fields(config)
                           if f.init and getattr(config, f.name) != _default(f)}
    config.given_fields = list(config.given_values)


def remember_resolved(config) -> None:
    """Record every field as built (checked and derived): `rebuilt` compares the config with it."""
    config.resolved_values = {f.name: copy.copy(getattr(config, f.name)) for f in dataclasses.fields(config) if f.init}


def rebuilt(config):
    """`config` itself if no field was set since it was built, else a new one of its class built from its given
    fields and those set since. A name it generated (run_name) is kept, unless run_name itself was set."""
    resolved = getattr(config, "resolved_values", None)
    if resolved is None:
        return config
    changed = {name: getattr(config, name) for name, value in resolved.items()
               if not _same(getattr(config, name), value)}
    if not changed:
        return config
    inputs = {**config.given_values, **changed}
    if config.generated_run_name and "run_name" not in changed:
        inputs["run_name"] = config.run_name  # its folder, outputs/<run_name>, follows when output_dir was not given
    return type(config)(**inputs)


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING \
        else f.default


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # values without a plain truth value (arrays): the same object only
        return a is b
