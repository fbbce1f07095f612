"""Errors the user can act on. The CLI prints their message as one line and exits with code 2."""


class VFTrainError(ValueError):
    """Base class: a problem with the user's input, not a bug in vftrain."""


class ConfigError(VFTrainError):
    """A config key or value that is not allowed."""


class DataError(VFTrainError):
    """A dataset, row or chat template that cannot be trained on correctly."""


class SamplerError(VFTrainError):
    """A sampling server that is down, refuses the request, or does not answer in time."""
