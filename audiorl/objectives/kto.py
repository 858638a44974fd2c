"""KTO on unpaired completions, as TRL's `KTOTrainer` computes it (knob and metric names theirs).

KTO (Ethayarajh et al. 2024, arXiv 2402.01306), Eq. 7: each completion is desirable or
undesirable on its own, no pair needed. With r = log π(y|x) − log π_ref(y|x) and the reference
point z0 (an estimate of KL(π ‖ π_ref)):

    desirable     λ_D · (1 − σ(β (r − z0)))
    undesirable   λ_U · (1 − σ(β (z0 − r)))

averaged over every completion of the batch (`desirable_weight` λ_D, `undesirable_weight` λ_U).
z0 is estimated the way TRL does: on mismatched pairs within the batch (each clip scored with
another clip's completion), z0 = max(0, mean(log π(y'|x) − log π_ref(y'|x))), without gradient;
under DDP/FSDP the mean is over every rank's batch (the method averages it before the loss).
`loss_type: apo_zero_unpaired` (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 7 unpaired)
drops z0: 1 − σ(β r) for desirable, σ(β r) for undesirable.

Shapes: every tensor is (N,), one row per completion; `desirable` is a bool mask.
"""

from __future__ import annotations

from typing import Any

from audiorl.lazy import on_first_use
from audiorl.objectives.dpo import LossOutput

# the run schema reads KTO_LOSS_TYPES without loading torch (see audiorl.lazy)
torch: Any = on_first_use("torch")

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kl_estimate(mismatched_logps: torch.Tensor, ref_mismatched_logps: torch.Tensor) -> torch.Tensor:
    """The batch's mean log-ratio on mismatched pairs (before the clamp at 0 and any average
    across ranks), without gradient."""
    return (mismatched_logps - ref_mismatched_logps).mean().detach()


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    *,
    kl: torch.Tensor | float = 0.0,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> LossOutput:
    """`logps`, `ref_logps`: summed completion log-probs (N,); `kl`: the reference point
    before clamping (`kl_estimate`, averaged over ranks); returns the batch's mean loss."""
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {list(KTO_LOSS_TYPES)}, not {loss_type!r}")
    desirable = desirable.to(torch.bool)
    z0 = torch.as_tensor(kl, dtype=logps.dtype, device=logps.device).clamp(min=0)
    if loss_type == "apo_zero_unpaired":
        z0 = torch.zeros_like(z0)
    ratio = logps - ref_logps
    chosen, rejected = ratio[desirable], ratio[~desirable]
    if loss_type == "kto":
        chosen_losses = 1 - torch.sigmoid(beta * (chosen - z0))
        rejected_losses = 1 - torch.sigmoid(beta * (z0 - rejected))
    else:
        chosen_losses = 1 - torch.sigmoid(beta * chosen)
        rejected_losses = torch.sigmoid(beta * rejected)
    losses = torch.cat([desirable_weight * chosen_losses, undesirable_weight * rejected_losses])
    metrics: dict[str, torch.Tensor] = {"kl": z0.detach()}
    if chosen.numel():
        metrics["rewards/chosen"] = (beta * chosen).detach().mean()
        metrics["logps/chosen"] = logps[desirable].detach().mean()
    if rejected.numel():
        metrics["rewards/rejected"] = (beta * rejected).detach().mean()
        metrics["logps/rejected"] = logps[~desirable].detach().mean()
    if chosen.numel() and rejected.numel():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return LossOutput(loss=losses.mean(), metrics=metrics)
