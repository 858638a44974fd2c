"""Weighted composition of rewards, and custom rewards named as `package.module:function` (or
registered under the `audiorl.rewards` entry point group), with TRL's reward signature."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from audiorl.config import TextNormalization
from audiorl.errors import ConfigError
from audiorl.plugins import check_signature, resolve
from audiorl.rewards.asr import REWARDS

REWARD_GROUP = "audiorl.rewards"


@dataclass
class RewardSpec:
    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)


def resolve_reward(name: str) -> Callable[..., list]:
    if name in REWARDS:
        return REWARDS[name]
    fn = resolve(name, REWARD_GROUP, "objective.rewards")
    if fn is None:
        raise ConfigError(f"objective.rewards: unknown reward {name!r}; built in: {sorted(REWARDS)}, or package.module:function")
    return fn


class ComposedReward:
    """sum_j weight_j * reward_j per completion; rewards that return None for a completion do
    not count for it (as TRL's nansum)."""

    def __init__(self, specs: list[RewardSpec], normalization: TextNormalization | None = None):
        if not specs:
            raise ConfigError("objective.rewards: name at least one reward (for example wer)")
        self.specs = specs
        self.fns = [resolve_reward(spec.name) for spec in specs]
        for spec, fn in zip(specs, self.fns):
            if spec.name not in REWARDS:  # a plug-in: called as the built-ins are, with the batch's columns as keywords
                check_signature(fn, spec.name, "objective.rewards", var_keyword=True, keywords=spec.kwargs,
                                shape="(completions, **kwargs) and return one number (or None) per completion, as TRL's rewards do")
        # the run's data.normalize, for the rewards that score text (a reward's own kwargs win)
        self.shared = {"normalization": normalization} if normalization is not None else {}

    def __call__(self, completions: list[str], **columns: Any) -> tuple[list[float], dict[str, list[float | None]]]:
        per_reward: dict[str, list[float | None]] = {}
        total = [0.0] * len(completions)
        for spec, fn in zip(self.specs, self.fns):
            values = list(fn(completions, **columns, **{**self.shared, **spec.kwargs}))
            if len(values) != len(completions):
                raise ValueError(f"reward {spec.name!r} returned {len(values)} values for {len(completions)} completions")
            per_reward[spec.name] = values
            for i, value in enumerate(values):
                if value is not None and not math.isnan(value):
                    total[i] += spec.weight * float(value)
        return total, per_reward


def build_reward(specs: list[dict[str, Any] | RewardSpec], normalization: TextNormalization | None = None) -> ComposedReward:
    return ComposedReward([s if isinstance(s, RewardSpec) else RewardSpec(**s) for s in specs], normalization)
