"""User extensions without changing AudioRL: a model family (a `ModelAdapter` subclass) or a
preference loss, named in the config as `package.module:Name`, or registered by an installed
package under an entry point group:

    [project.entry-points."audiorl.model_families"]
    my_asr = "my_pkg.adapter:MyAdapter"

    [project.entry-points."audiorl.losses"]
    margin = "my_pkg.losses:margin_loss"
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from audiorl.errors import ConfigError

FAMILY_GROUP = "audiorl.model_families"
LOSS_GROUP = "audiorl.losses"


def load_object(spec: str, key: str) -> Any:
    """Import `package.module:Name`; `key` is the config key that named it, for the error."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{key}={spec!r}: expected package.module:Name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{key}={spec!r}: cannot import {module_name!r} ({exc}); is the package installed?") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{key}={spec!r}: {module_name!r} has no {attr!r}") from None


def entry_point_names(group: str) -> list[str]:
    return sorted(ep.name for ep in entry_points(group=group))


def resolve(name: str, group: str, key: str) -> Any | None:
    """A `module:Name` spec or an entry point of `group`; None when it is neither."""
    if ":" in name:
        return load_object(name, key)
    for ep in entry_points(group=group):
        if ep.name == name:
            try:
                return ep.load()
            except ImportError as exc:
                raise ConfigError(f"{key}={name!r}: the entry point {ep.value!r} does not import ({exc})") from None
    return None
