"""Objectives: tensor math only (no model calls, no I/O)."""

from audiorl.objectives.dpo import LossOutput, PreferenceLogps, PreferenceLoss, RunningMean
from audiorl.objectives.sft import sft_loss

__all__ = ["LossOutput", "PreferenceLogps", "PreferenceLoss", "RunningMean", "sft_loss"]
