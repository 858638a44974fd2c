"""User extensions without changing AudioRL: a model family (a `ModelAdapter` subclass) or a
preference loss, named in the config as `package.module:Name`, or registered by an installed
package under an entry point group:

    [project.entry-points."audiorl.model_families"]
    my_asr = "my_pkg.adapter:MyAdapter"

    [project.entry-points."audiorl.losses"]
    margin = "my_pkg.losses:margin_loss"

A `module:Name` is imported from an installed package or a folder on the Python path, never from
the working directory unless its top-level module is named in `AUDIORL_LOCAL_PLUGINS`
(comma-separated): under `python -m` and `torchrun --module` (a pod's entry point) the working
directory is importable, and a stray `evil.py` next to a config must not run because a config
names it. An allowed local module is imported from the working directory even where it is not on
the path (the pods run with `PYTHONSAFEPATH=1`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Iterable
from importlib.metadata import entry_points, packages_distributions
from pathlib import Path
from typing import Any

from audiorl.errors import ConfigError

FAMILY_GROUP = "audiorl.model_families"
LOSS_GROUP = "audiorl.losses"
LOCAL_PLUGINS_ENV = "AUDIORL_LOCAL_PLUGINS"


def _allowed_local() -> set[str]:
    return {name.strip() for name in os.environ.get(LOCAL_PLUGINS_ENV, "").split(",") if name.strip()}


def _local_path(top: str) -> Path | None:
    """The working directory's `top.py` or `top/` package, if there is one."""
    cwd = Path.cwd()
    for candidate in (cwd / f"{top}.py", cwd / top / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _in_working_dir(top: str) -> Path | None:
    """Where `top` would be imported from, when that is the working directory and no installed
    distribution provides it."""
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if found is None or top == "audiorl":
        return None
    origin = Path(found.origin) if found.origin else Path(next(iter(found.submodule_search_locations or []), ""))
    try:
        origin.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return None
    # only now the scan of every installed distribution, for the few modules that lie here
    return None if top in packages_distributions() else origin


def _import(module_name: str, spec: str, key: str) -> Any:
    top = module_name.split(".")[0]
    allowed = top in _allowed_local()
    local = _in_working_dir(top)
    if local is not None and not allowed:
        raise ConfigError(
            f"{key}={spec!r}: {top!r} would be imported from the working directory ({local}); plug-ins load from installed "
            f"packages, entry points or folders on PYTHONPATH, or set {LOCAL_PLUGINS_ENV}={top} to allow this one"
        )
    if allowed and local is None and top not in sys.modules and importlib.util.find_spec(top) is None and _local_path(top):
        sys.path.insert(0, str(Path.cwd()))  # the one module allowed from here (PYTHONSAFEPATH keeps the folder off the path)
        try:
            return importlib.import_module(module_name)
        finally:
            sys.path.remove(str(Path.cwd()))
    return importlib.import_module(module_name)


def load_object(spec: str, key: str) -> Any:
    """Import `package.module:Name`; `key` is the config key that named it, for the error."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{key}={spec!r}: expected package.module:Name")
    try:
        module = _import(module_name, spec, key)
    except ImportError as exc:
        hint = f" (a module in the working directory loads only when named in {LOCAL_PLUGINS_ENV})" if _local_path(
            module_name.split(".")[0]) else "; is the package installed?"
        raise ConfigError(f"{key}={spec!r}: cannot import {module_name!r} ({exc}){hint}") from None
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


def check_signature(fn: Any, name: str, key: str, *, shape: str, positional: int = 1, keywords: Iterable[str] = (),
                    var_keyword: bool = False) -> None:
    """Refuse a plug-in that cannot be called the way AudioRL will call it (`positional`
    arguments, then `keywords`, and any other keyword when `var_keyword`), naming the config key
    and the expected `shape`, before a run starts rather than in a traceback at its first step."""
    if not callable(fn):
        raise ConfigError(f"{key}={name!r}: {fn!r} is not callable; it should take {shape}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a callable without an introspectable signature is tried when called
        return
    try:
        signature.bind(*([None] * positional), **dict.fromkeys(keywords))
    except TypeError as exc:
        raise ConfigError(f"{key}={name!r}: {getattr(fn, '__qualname__', fn)!r}{signature} cannot be called as {shape} ({exc})") from None
    if var_keyword and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        raise ConfigError(f"{key}={name!r}: {getattr(fn, '__qualname__', fn)!r}{signature} has no **kwargs; it should take {shape}")
