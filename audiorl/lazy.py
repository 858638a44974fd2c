"""A module imported when first used.

The run schema is read by the operator commands (`audiorl --help`, `render`, `submit`), which
must start in well under a second; importing torch alone takes seconds. Modules the schema reads
(the DPO loss registry, the methods' config sections) name torch through `on_first_use("torch")`
and pay for it only when a tensor is made. bench/cli_startup.py measures what that saves.
"""

from __future__ import annotations

import importlib
from typing import Any


class OnFirstUse:
    """Stands for a module; the first attribute read imports it."""

    def __init__(self, name: str):
        self._module_name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._module_name), attr)


def on_first_use(name: str) -> Any:
    return OnFirstUse(name)
