"""The base of every section of the run schema: unknown keys are errors, assignments are checked."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # inf and nan are never a learning rate, a beta or a size: `.inf` in YAML is a mistake to name
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
