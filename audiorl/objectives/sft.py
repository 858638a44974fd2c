"""Supervised fine-tuning: negative log-likelihood of the reference transcript, per token.

Used for warm-starting a model before preference tuning and as MPO's generation term.
"""

from __future__ import annotations

import torch

from audiorl.objectives.dpo import LossOutput


def sft_loss(token_logps: torch.Tensor, mask: torch.Tensor) -> LossOutput:
    """token_logps, mask: (B, L). Loss = −Σ log p / Σ tokens (every token weighs the same)."""
    tokens = mask.sum()
    nll = -token_logps.sum() / tokens.clamp(min=1)
    return LossOutput(loss=nll, metrics={"nll": nll.detach(), "num_tokens": tokens.detach()})
