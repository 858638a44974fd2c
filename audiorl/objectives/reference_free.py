"""Preference losses without a reference model: CPO (with SimPO and AlphaPO as its loss types)
and ORPO, as TRL's `CPOTrainer` and `ORPOTrainer` define them (knob and metric names theirs).

Both read only the policy's log-probs of the chosen and rejected completions (`PreferenceLogps`,
summed per completion with their token counts), so no reference model is loaded at all. Both add
the chosen completions' token NLL (mean over every chosen token in the batch), which is what keeps
the policy close to the data in place of a reference.

- CPO, Xu et al. 2024 (arXiv 2401.08417), Eq. 3: a DPO-style loss on the policy's own log-probs
  (the reference's term dropped), plus `cpo_alpha` times the NLL. `loss_type`:
    sigmoid  −(1 − ε) log σ(β d) − ε log σ(−β d), d = log π(y_c) − log π(y_r) (summed log-probs)
    hinge    max(0, 1 − β d)
    ipo      (d̄ − 1/2β)², d̄ on per-token-averaged log-probs (Azar et al. 2023, Eq. 17)
    simpo    SimPO, Meng et al. 2024 (arXiv 2405.14734), Eq. 6: the sigmoid loss on
             d̄ − γ/β, with per-token-averaged log-probs and the target margin γ = `simpo_gamma`
             (TRL writes the margin as γ/β inside β(·), which is β d̄ − γ). SimPO proper is
             `cpo_alpha: 0`.
    alphapo  AlphaPO, Gupta et al. 2025 (arXiv 2501.03884): `simpo` with `cpo_alpha` 0, where
             `alpha` ≠ 0 reshapes each reward to (1 − p^(−α))/α, p = exp(average log-prob).
- ORPO, Hong et al. 2024 (arXiv 2403.07691), Eqs. 4-7: NLL − λ · log σ(log odds(y_c) − log odds(y_r)),
  odds(y) = p/(1 − p) on per-token-averaged log-probs, λ = `beta` (TRL's name for it).

Shapes: every tensor of `PreferenceLogps` is (B,); each function returns one `LossOutput` whose
loss is already averaged over the batch.
"""

from __future__ import annotations

import math
from typing import Any

from audiorl.lazy import on_first_use
from audiorl.objectives.dpo import LossOutput, PreferenceLogps

# the run schema reads CPO_LOSS_TYPES without loading torch (see audiorl.lazy)
torch: Any = on_first_use("torch")
F: Any = on_first_use("torch.nn.functional")

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")
# the CPO losses that compare per-token-averaged log-probs (TRL's average_log_prob)
AVERAGED = ("ipo", "simpo", "alphapo")


def chosen_nll(policy: PreferenceLogps) -> torch.Tensor:
    """The chosen completions' negative log-likelihood, averaged over every chosen token in the
    batch (a cross-entropy over the flattened chosen labels)."""
    return -policy.chosen.sum() / policy.chosen_tokens.sum().clamp(min=1)


def averaged(policy: PreferenceLogps) -> tuple[torch.Tensor, torch.Tensor]:
    """Each completion's log-prob divided by its token count: (chosen, rejected), each (B,)."""
    return policy.chosen / policy.chosen_tokens.clamp(min=1), policy.rejected / policy.rejected_tokens.clamp(min=1)


def _preference_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict[str, torch.Tensor]:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


def cpo_loss(
    policy: PreferenceLogps,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    cpo_alpha: float = 1.0,
) -> LossOutput:
    """CPO and its loss types (module docstring): mean of the per-pair loss plus `cpo_alpha` × NLL."""
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {list(CPO_LOSS_TYPES)}, not {loss_type!r}")
    if loss_type == "alphapo":
        loss_type, cpo_alpha = "simpo", 0.0
    if loss_type in AVERAGED:
        chosen, rejected = averaged(policy)
    else:
        chosen, rejected = policy.chosen, policy.rejected
    if alpha != 0.0:
        chosen_rewards = (1 - torch.exp(-alpha * chosen)) / alpha  # (1 − p^−α)/α with p = exp(log-prob)
        rejected_rewards = (1 - torch.exp(-alpha * rejected)) / alpha
    else:
        chosen_rewards, rejected_rewards = chosen, rejected
    d = chosen_rewards - rejected_rewards
    if loss_type == "simpo":
        d = d - simpo_gamma / beta
    if loss_type in ("sigmoid", "simpo"):
        losses = -F.logsigmoid(beta * d) * (1 - label_smoothing) - F.logsigmoid(-beta * d) * label_smoothing
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * d)
    else:  # ipo
        losses = (d - 1 / (2 * beta)) ** 2
    nll = chosen_nll(policy)
    metrics = _preference_metrics(beta * chosen_rewards, beta * rejected_rewards, chosen, rejected)
    metrics["nll_loss"] = nll.detach()
    metrics[f"loss/{loss_type}"] = losses.mean().detach()
    return LossOutput(loss=losses.mean() + cpo_alpha * nll, metrics=metrics)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, without cancellation on either side of −ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(policy: PreferenceLogps, *, beta: float = 0.1) -> LossOutput:
    """ORPO (module docstring): NLL − β · mean log σ(log odds ratio), on per-token-averaged log-probs."""
    # at least float32: log(1 − p) of a half-precision p near 1 is mostly rounding
    chosen, rejected = (t if t.dtype == torch.float64 else t.float() for t in averaged(policy))
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    nll = chosen_nll(policy)
    metrics = _preference_metrics(beta * chosen, beta * rejected, chosen, rejected)
    metrics.update({"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach().mean(), "log_odds_chosen": log_odds.detach().mean()})
    return LossOutput(loss=nll - beta * ratio.mean(), metrics=metrics)
