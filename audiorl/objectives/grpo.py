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
- `loss_type` (the surrogate and how token losses become one number):
    grpo     clipped surrogate; mean over each sequence's tokens, then over sequences (length-biased);
    bnpo     clipped surrogate; sum over all tokens / tokens in the batch;
    dr_grpo  clipped surrogate; sum over all tokens / (sequences × max_completion_length);
    dapo     clipped surrogate; sum over all tokens / `num_items` (the tokens of the whole
             accumulated batch; defaults to this batch's tokens, the same with one micro-batch per step);
    cispo    CISPO (MiniMax-M1, arXiv 2506.13585): the importance weight is clipped and detached,
             −sg(min(r, ε_high)) · A · log π per token, so every token keeps its gradient;
             aggregated as dapo (TRL's ε_high is the weight's cap itself: ScaleRL uses 5);
    sapo     SAPO (Gao et al. 2025, arXiv 2511.20347): a soft gate in place of the clip,
             −σ(τ (r − 1)) · 4/τ · A with τ = `sapo_temperature_pos` for A > 0 and
             `sapo_temperature_neg` otherwise; aggregated as grpo.
- `entropy_mask`: TRL's `top_entropy_quantile` (Wang et al. 2025, arXiv 2506.01939, "80/20"):
  only the tokens whose next-token entropy is in the top share carry policy loss (`high_entropy_mask`).

Advantages (`group_advantages`): the group-mean baseline, or RLOO's leave-one-out baseline
(Ahmadian et al. 2024, arXiv 2402.14740: each completion against the mean of the other G − 1),
then `scale_rewards`; with several rewards, TRL's `multi_objective_aggregation`
`normalize_then_sum` (GDPO) normalises each reward within its group before the weighted sum and
normalises the sum over the batch (`normalize_then_sum`).

Shapes: token_logps, old_token_logps, ref_token_logps, mask, entropies (N, L); advantages (N,).
"""

from __future__ import annotations

from typing import Any

from audiorl.lazy import on_first_use
from audiorl.objectives.dpo import LossOutput

# the run schema reads GRPO_LOSS_TYPES without loading torch (see audiorl.lazy)
torch: Any = on_first_use("torch")

GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo")
ADVANTAGE_ESTIMATORS = ("grpo", "rloo")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group", eps: float = 1e-4,
                     estimator: str = "grpo") -> torch.Tensor:
    """(N,) rewards in groups of `group_size` consecutive rows -> (N,) advantages: minus the group's
    mean (`grpo`) or the mean of the group's other completions (`rloo`), then scaled."""
    grouped = rewards.view(-1, group_size)
    if estimator == "grpo":
        centred = grouped - grouped.mean(dim=1, keepdim=True)
    elif estimator == "rloo":
        centred = grouped - (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    else:
        raise ValueError(f"advantage estimator must be one of {list(ADVANTAGE_ESTIMATORS)}, not {estimator!r}")
    if scale_rewards == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale_rewards == "batch":
        centred = centred / (rewards.std() + eps)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be group, batch or none, not {scale_rewards!r}")
    return centred.reshape(-1)


def _nanstd(values: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """The standard deviation (Bessel-corrected) of the values that are not NaN."""
    centred = values - torch.nanmean(values, dim=dim, keepdim=True)
    count = (~torch.isnan(values)).sum(dim=dim, keepdim=keepdim)
    return torch.sqrt(torch.nanmean(centred**2, dim=dim, keepdim=keepdim) * count / (count - 1).clamp(min=1))


def normalize_then_sum(per_reward: torch.Tensor, weights: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GDPO's aggregation as TRL does it: `per_reward` (N, K), NaN where a reward does not apply;
    each reward is normalised within its group, the weighted sum is normalised over the batch.
    A completion no reward applies to gets advantage 0. -> (N,)"""
    grouped = per_reward.view(-1, group_size, per_reward.shape[1])
    normalised = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (_nanstd(grouped, dim=1, keepdim=True) + eps)
    total = (normalised.view(-1, per_reward.shape[1]) * weights.to(per_reward.dtype)).nansum(dim=1)
    total[torch.isnan(per_reward).all(dim=1)] = float("nan")
    advantages = (total - torch.nanmean(total)) / (_nanstd(total) + eps)
    return torch.nan_to_num(advantages, nan=0.0)


def high_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, top_quantile: float, gather=None) -> torch.Tensor:
    """The tokens whose entropy is at or above the (1 − `top_quantile`) quantile of every
    completion token's entropy (over all ranks when `gather` joins the ranks' values). (N, L) bool."""
    values = entropies[mask.bool()].float()
    if gather is not None:
        values = gather(values)
    if values.numel() == 0:
        return torch.zeros_like(mask, dtype=torch.bool)
    threshold = torch.quantile(values, 1 - top_quantile)
    return (entropies * mask >= threshold) & mask.bool()


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
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    entropy_mask: torch.Tensor | None = None,
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
    if loss_type == "cispo":
        cap = epsilon_high if epsilon_high is not None else epsilon
        per_token = -torch.clamp(ratio, max=cap).detach() * adv * token_logps
    elif loss_type == "sapo":
        temperature = torch.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg).to(ratio.dtype)
        per_token = -torch.sigmoid(temperature * (ratio - 1)) * 4 / temperature * adv
    else:
        per_token = -torch.min(ratio * adv, torch.clamp(ratio, low, high) * adv)
    if entropy_mask is not None:
        per_token = per_token * entropy_mask.to(per_token.dtype)
    kl = None
    if beta != 0.0:
        if ref_token_logps is None:
            raise ValueError("beta > 0 needs reference log-probs")
        diff = ref_token_logps - token_logps
        kl = torch.exp(diff) - diff - 1
        per_token = per_token + beta * kl
    per_token = per_token * mask
    if loss_type in ("grpo", "sapo"):
        loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = per_token.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("dr_grpo needs max_completion_length")
        loss = per_token.sum() / (per_token.shape[0] * max_completion_length)
    elif loss_type in ("dapo", "cispo"):
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
        if loss_type == "cispo":
            capped = ((expanded > (epsilon_high if epsilon_high is not None else epsilon)) & (adv > 0)).to(mask.dtype) * mask
            metrics["cispo_clip_ratio"] = capped.sum() / tokens
        if entropy_mask is not None:
            metrics["entropy_mask/kept"] = (entropy_mask.to(mask.dtype) * mask).sum() / tokens
    return LossOutput(loss=loss, metrics=metrics)
