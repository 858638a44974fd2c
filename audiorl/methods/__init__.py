"""Training methods, one module each: `sft`, `dpo` (the preference family, MPO included),
`cpo` and `orpo` (preference losses without a reference model), `kto` (unpaired completions),
`grpo` and `mwer` (both on the policy's own samples). See `audiorl.methods.base` for what a method owns.

`METHODS` is the registry. The run schema's `objective` section is `ObjectiveConfig`: one of the
methods' config classes, picked by `objective.name` (default `dpo`), so a key of another method
is an error naming the key. Adding a method is one module here (its config, its step, its
`Method`) plus a line in `METHODS`.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag

from audiorl.methods import cpo, dpo, grpo, kto, mwer, orpo, sft
from audiorl.methods.base import BuildContext, Method, MethodConfig, Step

METHODS: dict[str, Method] = {m.name: m for m in (dpo.METHOD, grpo.METHOD, sft.METHOD, cpo.METHOD, orpo.METHOD, kto.METHOD,
                                                       mwer.METHOD)}

DEFAULT_METHOD = "dpo"


def method_for(objective: MethodConfig | str) -> Method:
    """The method of an `objective` section (or of a method name)."""
    name = objective if isinstance(objective, str) else objective.name
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"no method named {name!r}; the methods are {sorted(METHODS)}") from None


def _objective_name(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("name", DEFAULT_METHOD)
    return getattr(value, "name", DEFAULT_METHOD)


ObjectiveConfig = Annotated[
    Union[tuple(Annotated[m.config, Tag(name)] for name, m in METHODS.items())],  # noqa: UP007 (built from the registry)
    Discriminator(_objective_name, custom_error_type="unknown_method",
                  custom_error_message=f"objective.name must be one of {sorted(METHODS)}"),
]


def default_objective() -> MethodConfig:
    return METHODS[DEFAULT_METHOD].config()


def keys_of_other_methods(key: str, name: str) -> list[str]:
    """The methods other than `name` whose section has `key` (for the error on a misplaced knob)."""
    return [other for other, m in METHODS.items() if other != name and key in m.config.model_fields]


__all__ = ["BuildContext", "METHODS", "Method", "MethodConfig", "ObjectiveConfig", "Step", "default_objective",
           "keys_of_other_methods", "method_for"]
