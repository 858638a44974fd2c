"""GRPO and its variants on per-token log-probabilities, with TRL's knob names.

GRPO (Shao et al. 2024, arXiv 2402.03300): G completions per prompt, advantages are rewards
normalised within each group; a PPO-style clipped surrogate on the token importance ratio, plus
β · KL(π ‖ π_ref) with the k3 estimator exp(r) − r − 1, r = log π_ref − log π.

Knobs:
- `scale_rewards`: "group" divides by the group's std, "batch" by the std over the whole batch
  (PPO-Lite, arXiv 2508.08221), "none" only subtracts the group mean (Dr. GRPO, arXiv 2503.20783);
- `epsilon`, `epsilon_high`: the clip range [1 − ε, 1 + ε_high] (DAPO's clip-higher, arXiv 2503.14476);
- `importance_sampling_level`: "token", or "sequence" (GSPO, arXiv 2507.18071: the ratio is the
  geometric mean over the sequence's tokens, shared by all of them);
- `loss_type` (how token losses become one number):
    grpo     mean over each sequence's tokens, then over sequences (length-biased);
    bnpo     sum over all tokens / tokens in the batch;
    dr_grpo  sum over all tokens / (sequences × max_completion_length);
    dapo     sum over all tokens / `num_items` (the tokens of the whole accumulated batch; defaults
             to this batch's tokens, which is the same with one micro-batch per step).

Shapes: token_logps, old_token_logps, ref_token_logps, mask (N, L); advantages (N,).
"""

from __future__ import annotations

from typing import Any

from audiorl.lazy import on_first_use
from audiorl.objectives.dpo import LossOutput

# the run schema reads GRPO_LOSS_TYPES without loading torch (see audiorl.lazy)
torch: Any = on_first_use("torch")

GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """(N,) rewards in groups of `group_size` consecutive rows -> (N,) advantages."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale_rewards == "batch":
        centred = centred / (rewards.std() + eps)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be group, batch or none, not {scale_rewards!r}")
    return centred.reshape(-1)


def grpo_loss(
    token_logps: torch.Tensor,
    old_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_token_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items: float | None = None,
) -> LossOutput:
    mask = mask.to(token_logps.dtype)
    log_ratio = token_logps - old_token_logps
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    elif importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level must be token or sequence, not {importance_sampling_level!r}")
    ratio = torch.exp(log_ratio)
    low, high = 1 - epsilon, 1 + (epsilon_high if epsilon_high is not None else epsilon)
    adv = advantages.unsqueeze(-1)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, low, high) * adv)
    kl = None
    if beta != 0.0:
        if ref_token_logps is None:
            raise ValueError("beta > 0 needs reference log-probs")
        diff = ref_token_logps - token_logps
        kl = torch.exp(diff) - diff - 1
        per_token = per_token + beta * kl
    per_token = per_token * mask
    if loss_type == "grpo":
        loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = per_token.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("dr_grpo needs max_completion_length")
        loss = per_token.sum() / (per_token.shape[0] * max_completion_length)
    elif loss_type == "dapo":
        loss = per_token.sum() / (num_items if num_items else mask.sum().clamp(min=1.0))
    else:
        raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, not {loss_type!r}")

    with torch.no_grad():
        tokens = mask.sum().clamp(min=1.0)
        expanded = ratio.expand_as(mask)
        low_clip = ((expanded < low) & (adv < 0)).to(mask.dtype) * mask
        high_clip = ((expanded > high) & (adv > 0)).to(mask.dtype) * mask
        metrics = {
            "clip_ratio/low_mean": low_clip.sum() / tokens,
            "clip_ratio/high_mean": high_clip.sum() / tokens,
            "clip_ratio/region_mean": (low_clip + high_clip).sum() / tokens,
        }
        if kl is not None:
            metrics["kl"] = (kl * mask).sum() / tokens
    return LossOutput(loss=loss, metrics=metrics)
