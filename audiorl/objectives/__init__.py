"""Objectives: tensor math only (no model calls, no I/O).

Attributes are imported on first use, so that the run schema can read the DPO loss registry
(`audiorl.objectives.dpo.LOSSES`) without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"LossOutput": "dpo", "Pairs": "dpo", "PreferenceLogps": "dpo", "PreferenceLoss": "dpo", "RunningMean": "dpo",
          "LOSSES": "dpo", "register_loss": "dpo", "sft_loss": "sft"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'audiorl.objectives' has no attribute {name!r}")
    return getattr(importlib.import_module(f"audiorl.objectives.{_WHERE[name]}"), name)
