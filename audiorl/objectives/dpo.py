"""The DPO loss family on sequence log-probabilities, with TRL's names for each member.

Inputs are summed completion log-probabilities of shape (B,) for the policy and the reference,
plus completion token counts (B,). Nothing here calls a model or touches I/O.

Members (beta = β, label_smoothing = ε, Δ = chosen log-ratio − rejected log-ratio):
- sigmoid       DPO, Rafailov et al. 2023 (arXiv 2305.18290): −log σ(βΔ)
- hinge         SLiC, Zhao et al. 2023 (arXiv 2305.10425): max(0, 1 − βΔ)
- ipo           IPO, Azar et al. 2023 (arXiv 2310.12036), Eq. 17, log-ratios averaged per token
- exo_pair      EXO, Ji et al. 2024 (arXiv 2402.00856), Eq. 16 with K = 2
- nca_pair      NCA, Chen et al. 2024 (arXiv 2402.05369)
- robust        robust DPO, Chowdhury et al. 2024 (arXiv 2403.00409)
- bco_pair      BCO, Jung et al. 2024 (arXiv 2404.04656); with `bco_running_mean` the rewards are
                shifted by a running mean δ of past rewards, as the MPO paper's code does
- sppo_hard     SPPO with hard win probabilities, Wu et al. 2024 (arXiv 2405.00675)
- aot           AOT, Melnyk et al. 2024 (arXiv 2406.05882), paired
- aot_unpaired  AOT, unpaired
- apo_zero      APO-zero, D'Oosterlinck et al. 2024 (arXiv 2408.06266), Eq. 7
- apo_down      APO-down, same paper, Eq. 8
- discopop      DiscoPOP, Chris Lu et al. 2024 (arXiv 2406.08414), Eq. 5
- sft           negative log-likelihood of the chosen completions, per token
- sigmoid_norm  DPO on per-token-averaged log-ratios (SimPO-style length normalisation)

Any other name is a user loss passed in `custom` (see audiorl.plugins).

MPO (Wang et al. 2024, arXiv 2411.10442) is `loss_type=[sigmoid, bco_pair, sft]` with
`loss_weights=[0.8, 0.2, 1.0]`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PreferenceLogps:
    """Summed completion log-probs and token counts for B preference pairs, each of shape (B,)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


@dataclass
class LossOutput:
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class RunningMean:
    """Mean of every reward seen so far (the δ of BCO). Kept in checkpoints via `state_dict`."""

    def __init__(self) -> None:
        self.mean = 0.0
        self.count = 0

    def update(self, values: torch.Tensor) -> float:
        n = values.numel()
        if n:
            total = self.mean * self.count + float(values.detach().double().sum())
            self.count += n
            self.mean = total / self.count
        return self.mean

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])


class PreferenceLoss:
    """A weighted sum of DPO-family losses, each averaged over the batch."""

    def __init__(
        self,
        loss_type: list[str],
        loss_weights: list[float] | None = None,
        *,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        discopop_tau: float = 0.05,
        bco_running_mean: bool = False,
        custom: dict[str, Callable[..., torch.Tensor]] | None = None,
    ):
        self.loss_type = list(loss_type)
        self.loss_weights = list(loss_weights) if loss_weights is not None else [1.0] * len(self.loss_type)
        if len(self.loss_weights) != len(self.loss_type):
            raise ValueError("loss_weights must have one entry per loss_type")
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.discopop_tau = discopop_tau
        self.running = RunningMean() if bco_running_mean else None
        # user losses: fn(policy: PreferenceLogps, ref_chosen, ref_rejected, beta) -> per-pair loss (B,)
        self.custom = dict(custom or {})

    def __call__(self, policy: PreferenceLogps, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor) -> LossOutput:
        beta, eps = self.beta, self.label_smoothing
        chosen_ratio = policy.chosen - ref_chosen  # log π(y_c|x)/π_ref(y_c|x), (B,)
        rejected_ratio = policy.rejected - ref_rejected
        delta = chosen_ratio - rejected_ratio
        total = policy.chosen.new_zeros(())
        metrics: dict[str, torch.Tensor] = {}
        for name, weight in zip(self.loss_type, self.loss_weights):
            per_pair = self._loss(name, policy, ref_chosen, ref_rejected, chosen_ratio, rejected_ratio, delta, beta, eps)
            term = per_pair.mean()
            metrics[f"loss/{name}"] = term.detach()
            total = total + weight * term

        chosen_rewards = (beta * chosen_ratio).detach()
        rejected_rewards = (beta * rejected_ratio).detach()
        metrics.update(
            {
                "rewards/chosen": chosen_rewards.mean(),
                "rewards/rejected": rejected_rewards.mean(),
                "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                "logps/chosen": policy.chosen.detach().mean(),
                "logps/rejected": policy.rejected.detach().mean(),
            }
        )
        if self.running is not None and "bco_pair" in self.loss_type:
            metrics["bco/delta"] = torch.tensor(self.running.mean)
        return LossOutput(loss=total, metrics=metrics)

    def _loss(self, name, policy, ref_chosen, ref_rejected, chosen_ratio, rejected_ratio, delta, beta, eps):
        if name in self.custom:
            return self.custom[name](policy, ref_chosen, ref_rejected, beta)
        if name == "sigmoid":
            return -F.logsigmoid(beta * delta)
        if name == "hinge":
            return torch.relu(1 - beta * delta)
        if name == "ipo":
            # IPO's log-ratios are averaged per completion token so that β means the same for short
            # and long transcripts (TRL does the same, confirmed with the IPO authors).
            avg = chosen_ratio / policy.chosen_tokens.clamp(min=1) - rejected_ratio / policy.rejected_tokens.clamp(min=1)
            return (avg - 1 / (2 * beta)) ** 2
        if name == "exo_pair":
            # KL(p_θ || p_target) over {chosen, rejected} with target [1 − ε, ε]
            eps_t = torch.tensor(eps, dtype=delta.dtype, device=delta.device)
            logit = beta * delta
            return torch.sigmoid(logit) * (F.logsigmoid(logit) - torch.log1p(-eps_t)) + torch.sigmoid(-logit) * (
                F.logsigmoid(-logit) - torch.log(eps_t)
            )
        if name == "nca_pair":
            rc, rr = beta * chosen_ratio, beta * rejected_ratio
            return -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)
        if name == "robust":
            clean = -(1 - eps) * F.logsigmoid(beta * delta)
            flipped = -eps * F.logsigmoid(-beta * delta)
            return (clean - flipped) / (1 - 2 * eps)
        if name == "bco_pair":
            rc, rr = beta * chosen_ratio, beta * rejected_ratio
            shift = 0.0
            if self.running is not None:
                shift = self.running.update(torch.cat([rc, rr]))
            return -F.logsigmoid(rc - shift) - F.logsigmoid(-(rr - shift))
        if name == "sppo_hard":
            return (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
        if name == "aot":
            # optimal transport between the policy's and the reference's log-ratio distributions
            ours, _ = torch.sort(policy.chosen - policy.rejected, dim=0)
            ref, _ = torch.sort(ref_chosen - ref_rejected, dim=0)
            d = ours - ref
            return -F.logsigmoid(beta * d) * (1 - eps) - F.logsigmoid(-beta * d) * eps
        if name == "aot_unpaired":
            c, _ = torch.sort(chosen_ratio, dim=0)
            r, _ = torch.sort(rejected_ratio, dim=0)
            d = c - r
            return -F.logsigmoid(beta * d) * (1 - eps) - F.logsigmoid(-beta * d) * eps
        if name == "apo_zero":
            return (1 - torch.sigmoid(beta * chosen_ratio)) + torch.sigmoid(beta * rejected_ratio)
        if name == "apo_down":
            return torch.sigmoid(beta * chosen_ratio) + (1 - torch.sigmoid(beta * delta))
        if name == "discopop":
            logit = beta * delta
            mix = torch.sigmoid(logit / self.discopop_tau)
            return -F.logsigmoid(logit) * (1 - mix) + torch.exp(-logit) * mix
        if name == "sft":
            # one scalar per batch: NLL averaged over every chosen token
            nll = -policy.chosen.sum() / policy.chosen_tokens.sum().clamp(min=1)
            return nll.expand(policy.chosen.shape[0])
        if name == "sigmoid_norm":
            avg = chosen_ratio / policy.chosen_tokens.clamp(min=1) - rejected_ratio / policy.rejected_tokens.clamp(min=1)
            return -F.logsigmoid(beta * avg)
        raise ValueError(f"unknown loss_type {name!r}")

    def state_dict(self) -> dict:
        return {"running": self.running.state_dict()} if self.running is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.running is not None and "running" in state:
            self.running.load_state_dict(state["running"])

