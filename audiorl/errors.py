"""AudioRL's exception family.

Every message says what went wrong, where (file, line, record or config key) and what to do.
The CLI prints the message on one line and exits non-zero; `--debug` shows the traceback.
A message never carries a secret: a token, a URL's password or a signed query inside a path or
value it quotes is masked (`audiorl.secrets`) when the error is made, so it stays out of logs,
skipped-record files and MLflow alike.
"""

from __future__ import annotations

from audiorl.secrets import redact


class AudioRLError(Exception):
    """Base class for every error AudioRL raises on purpose."""

    exit_code = 1

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))


class ConfigError(AudioRLError):
    """A run config (or a `--set` override) is malformed or invalid."""

    exit_code = 2


class DataError(AudioRLError):
    """A manifest, dataset or audio file cannot be used."""

    exit_code = 3


class ModelError(AudioRLError):
    """A model cannot be loaded, built or saved."""

    exit_code = 4


class TrainingError(AudioRLError):
    """Training cannot continue (diverged, bad checkpoint, ...)."""

    exit_code = 5


class ToolMissingError(AudioRLError):
    """An external program AudioRL needs (for example espeak-ng) is not installed."""

    exit_code = 6


class ClusterError(AudioRLError):
    """The Kubernetes API cannot be reached, refuses a request, or a job is not in the asked state."""

    exit_code = 7
