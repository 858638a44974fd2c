"""How a batch becomes a loss for each objective: the glue between adapter, reference and the
tensor math in `objectives/`. The trainer calls a recipe and knows nothing else about models.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from audiorl.config import ObjectiveConfig
from audiorl.models.base import ModelAdapter
from audiorl.objectives import LossOutput, PreferenceLogps, PreferenceLoss, sft_loss
from audiorl.reference import Reference


def disable_dropout(module: nn.Module) -> None:
    """DPO compares log-probs of two forward passes; dropout noise would swamp small margins."""
    for child in module.modules():
        if isinstance(child, nn.Dropout):
            child.p = 0.0


def custom_losses(names: list[str]) -> dict:
    """Resolve the loss names that are not built in (package.module:function or entry points)."""
    from audiorl.config import DPO_LOSS_TYPES
    from audiorl.errors import ConfigError
    from audiorl.plugins import LOSS_GROUP, resolve

    found = {}
    for name in names:
        if name in DPO_LOSS_TYPES:
            continue
        fn = resolve(name, LOSS_GROUP, "objective.loss_type")
        if not callable(fn):
            raise ConfigError(f"objective.loss_type: {name!r} is not a callable loss")
        found[name] = fn
    return found


class Recipe:
    adapter: ModelAdapter

    @property
    def model(self) -> nn.Module:
        return self.adapter.model

    def __call__(self, batch: dict[str, Any]) -> LossOutput:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PreferenceRecipe(Recipe):
    """DPO/MPO: encode each clip once, score chosen and rejected against it in one decoder pass."""

    def __init__(self, adapter: ModelAdapter, objective: ObjectiveConfig, reference: Reference):
        self.adapter = adapter
        self.reference = reference
        self.loss = PreferenceLoss(
            objective.loss_type,
            objective.weights,
            beta=objective.beta,
            label_smoothing=objective.label_smoothing,
            discopop_tau=objective.discopop_tau,
            bco_running_mean=objective.bco_running_mean,
            custom=custom_losses(objective.loss_type),
        )

    def __call__(self, batch: dict[str, Any]) -> LossOutput:
        n = len(batch["chosen_ids"])
        targets = batch["chosen_ids"] + batch["rejected_ids"]
        index = torch.arange(n).repeat(2)
        context = self.adapter.encode(batch["features"])
        scored = self.adapter.sequence_logps(context, targets, index)
        sums, counts = scored.sum, scored.num_tokens
        policy = PreferenceLogps(chosen=sums[:n], rejected=sums[n:], chosen_tokens=counts[:n], rejected_tokens=counts[n:])
        ref = self.reference.logps(batch, context, targets, index).to(sums.device, sums.dtype)
        return self.loss(policy, ref[:n], ref[n:])

    def state_dict(self) -> dict:
        return self.loss.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loss.load_state_dict(state)


class SFTRecipe(Recipe):
    def __init__(self, adapter: ModelAdapter):
        self.adapter = adapter

    def __call__(self, batch: dict[str, Any]) -> LossOutput:
        context = self.adapter.encode(batch["features"])
        scored = self.adapter.sequence_logps(context, batch["target_ids"])
        return sft_loss(scored.token_logps, scored.mask)
