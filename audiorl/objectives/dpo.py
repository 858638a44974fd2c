"""The DPO loss family on sequence log-probabilities, each member a small registered function
under TRL's name for it (`trl.DPOConfig.loss_type`).

A loss takes one `Pairs` (summed completion log-probs of the policy and the reference for B
preference pairs, each of shape (B,), their token counts, β, the label smoothing ε, ...) and
returns the per-pair loss, shape (B,); `PreferenceLoss` averages each over the batch and sums
them with `loss_weights`. Δ below is the chosen log-ratio minus the rejected one. Nothing here
calls a model or touches I/O.

`LOSSES` is the registry: the run schema's list of valid `loss_type` names comes from it. A user
loss (`package.module:function`, or an `audiorl.losses` entry point; see audiorl.plugins) has
the same signature, `fn(pairs: Pairs) -> Tensor (B,)`.

MPO (Wang et al. 2024, arXiv 2411.10442) is `loss_type=[sigmoid, bco_pair, sft]` with
`loss_weights=[0.8, 0.2, 1.0]`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from audiorl.lazy import on_first_use

# the run schema reads LOSSES to check loss names without loading torch (see audiorl.lazy)
torch: Any = on_first_use("torch")
F: Any = on_first_use("torch.nn.functional")


@dataclass
class PreferenceLogps:
    """Completion log-probs and token counts for B preference pairs, each of shape (B,); the sums
    are LD-DPO's weighted sums when `ld_alpha` is set. The token-level fields, (B, L) each, carry
    what losses that weigh tokens read (WPO's weights, a plug-in's own): the policy's log-prob of
    each token (0 past the end), the completion mask, and log Σ_v p(v)² at each position."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    chosen_token_logps: torch.Tensor | None = None
    rejected_token_logps: torch.Tensor | None = None
    chosen_mask: torch.Tensor | None = None
    rejected_mask: torch.Tensor | None = None
    chosen_log_sum_sq_probs: torch.Tensor | None = None
    rejected_log_sum_sq_probs: torch.Tensor | None = None


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# the losses that read the f-divergence's scores in place of the log-ratios (as TRL allows)
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


def f_divergence_score(log_ratio: torch.Tensor, f_divergence_type: str = "reverse_kl", alpha: float = 0.5) -> torch.Tensor:
    """f'(t) at t = π/π_ref, the score f-DPO (Wang et al. 2023, arXiv 2309.16240, Table 1) puts in
    place of DPO's log-ratio: reverse KL log t; forward KL 1 − 1/t; Jensen-Shannon log(2t/(1 + t));
    α-divergence (t^(α−1) − 1)/(α − 1), which is reverse KL at α = 1 (its exponent clamped at 80, as
    TRL does, so that exp stays finite)."""
    if f_divergence_type == "reverse_kl":
        return log_ratio
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-log_ratio)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(log_ratio)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return log_ratio
        t = torch.clamp(((alpha - 1.0) * log_ratio).float(), max=11.0 if log_ratio.dtype == torch.float16 else 80.0)
        return (torch.exp(t) - 1.0).to(log_ratio.dtype) / (alpha - 1.0)
    raise ValueError(f"f_divergence_type must be one of {list(F_DIVERGENCES)}, not {f_divergence_type!r}")


def ld_weighted(token_logps: torch.Tensor, mask: torch.Tensor, shared: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """LD-DPO (Liu et al. 2024, arXiv 2409.06411): a completion's log-prob with the tokens past the
    length it shares with the other side of its pair weighed by α: Σ_{t ≤ shared} log p_t + α Σ_{t > shared} log p_t.
    token_logps, mask (N, L); shared (N,) token counts (min of the pair's two lengths)."""
    position = mask.cumsum(dim=1)
    in_shared = (position > 0) & (position <= shared.unsqueeze(1))
    in_tail = position > shared.unsqueeze(1)
    return (token_logps * in_shared).sum(1) + ld_alpha * (token_logps * in_tail * mask).sum(1)


def wpo_weights(policy: PreferenceLogps) -> torch.Tensor:
    """WPO (Zhou et al. 2024, arXiv 2406.11827), Eq. 2 as TRL computes it: per pair, the product of
    the chosen and the rejected completion's exp(mean over tokens of log p_t − log Σ_v p(v)²),
    without gradient. (B,)"""
    if policy.chosen_log_sum_sq_probs is None or policy.chosen_token_logps is None:
        raise ValueError("use_weighting needs the token log-probs and log Σ p² of both completions")

    def weight(token_logps, log_sum_sq, mask):
        aligned = ((token_logps - log_sum_sq) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.exp(aligned)

    with torch.no_grad():
        return (weight(policy.chosen_token_logps, policy.chosen_log_sum_sq_probs, policy.chosen_mask)
                * weight(policy.rejected_token_logps, policy.rejected_log_sum_sq_probs, policy.rejected_mask))


@dataclass
class LossOutput:
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class RunningMean:
    """BCO's reward shift δ as the MPO paper's code (InternVL, on TRL 0.10's `RunningMoments`)
    keeps it: each batch adds the mean of its rewards as one value, so δ is the mean of the
    per-batch means (a short last batch counts as much as a full one, not by its size). With
    `reduce` (the method sets it to the mean over ranks under DDP/FSDP) each batch's mean is first
    averaged over the ranks' batches, so every rank holds the same δ. A batch whose mean is not
    finite is left out. Kept in checkpoints via `state_dict`, so a resumed run continues it."""

    def __init__(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.mean = 0.0
        self.count = 0
        self.reduce = reduce

    def update(self, values: torch.Tensor) -> float:
        if values.numel():
            batch_mean = values.detach().double().mean()
            if self.reduce is not None:
                batch_mean = self.reduce(batch_mean)
            if torch.isfinite(batch_mean):
                self.count += 1
                self.mean += (float(batch_mean) - self.mean) / self.count
        return self.mean

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])


@dataclass
class Pairs:
    """What every DPO-family loss receives: B preference pairs, each tensor of shape (B,)."""

    policy: PreferenceLogps
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    beta: float = 0.1
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    running: RunningMean | None = None  # BCO's running reward mean δ, when asked for
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5

    def __post_init__(self) -> None:
        self.chosen_ratio = self.policy.chosen - self.ref_chosen  # log π(y_c|x)/π_ref(y_c|x)
        self.rejected_ratio = self.policy.rejected - self.ref_rejected
        self.delta = self.chosen_ratio - self.rejected_ratio  # Δ
        # what the f-divergence puts in place of each log-ratio (the log-ratio itself for reverse KL)
        self.chosen_score = f_divergence_score(self.chosen_ratio, self.f_divergence_type, self.f_alpha_divergence_coef)
        self.rejected_score = f_divergence_score(self.rejected_ratio, self.f_divergence_type, self.f_alpha_divergence_coef)
        self.delta_score = self.chosen_score - self.rejected_score

    def per_token(self) -> torch.Tensor:
        """Δ (of the f-divergence's scores) with each side averaged over its completion's tokens."""
        return (self.chosen_score / self.policy.chosen_tokens.clamp(min=1)
                - self.rejected_score / self.policy.rejected_tokens.clamp(min=1))


Loss = Callable[[Pairs], "torch.Tensor"]
LOSSES: dict[str, Loss] = {}


def register_loss(name: str) -> Callable[[Loss], Loss]:
    """Register a built-in loss under its TRL name."""

    def add(fn: Loss) -> Loss:
        if name in LOSSES:
            raise ValueError(f"loss_type {name!r} is registered twice")
        LOSSES[name] = fn
        return fn

    return add


def loss_names() -> list[str]:
    return list(LOSSES)


@register_loss("sigmoid")
def sigmoid(p: Pairs) -> torch.Tensor:
    """DPO, Rafailov et al. 2023 (arXiv 2305.18290): −log σ(βΔ) (Δ of the f-divergence's scores)."""
    return -F.logsigmoid(p.beta * p.delta_score)


@register_loss("hinge")
def hinge(p: Pairs) -> torch.Tensor:
    """SLiC, Zhao et al. 2023 (arXiv 2305.10425): max(0, 1 − βΔ)."""
    return torch.relu(1 - p.beta * p.delta_score)


@register_loss("ipo")
def ipo(p: Pairs) -> torch.Tensor:
    """IPO, Azar et al. 2023 (arXiv 2310.12036), Eq. 17: (Δ̄ − 1/2β)², with the log-ratios averaged
    per completion token so that β means the same for short and long transcripts (TRL does the
    same, confirmed with the IPO authors)."""
    return (p.per_token() - 1 / (2 * p.beta)) ** 2


@register_loss("exo_pair")
def exo_pair(p: Pairs) -> torch.Tensor:
    """EXO, Ji et al. 2024 (arXiv 2402.00856), Eq. 16 with K = 2: KL(p_θ || p_target) over
    {chosen, rejected} with the target [1 − ε, ε] (ε > 0)."""
    eps = torch.tensor(p.label_smoothing, dtype=p.delta.dtype, device=p.delta.device)
    logit = p.beta * p.delta_score
    return torch.sigmoid(logit) * (F.logsigmoid(logit) - torch.log1p(-eps)) + torch.sigmoid(-logit) * (
        F.logsigmoid(-logit) - torch.log(eps)
    )


@register_loss("nca_pair")
def nca_pair(p: Pairs) -> torch.Tensor:
    """NCA, Chen et al. 2024 (arXiv 2402.05369): −log σ(r_c) − ½ log σ(−r_c) − ½ log σ(−r_r), r = β·log-ratio."""
    rc, rr = p.beta * p.chosen_ratio, p.beta * p.rejected_ratio
    return -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)


@register_loss("robust")
def robust(p: Pairs) -> torch.Tensor:
    """Robust DPO, Chowdhury et al. 2024 (arXiv 2403.00409): unbiased under a label-flip rate ε."""
    eps = p.label_smoothing
    clean = -(1 - eps) * F.logsigmoid(p.beta * p.delta_score)
    flipped = -eps * F.logsigmoid(-p.beta * p.delta_score)
    return (clean - flipped) / (1 - 2 * eps)


@register_loss("bco_pair")
def bco_pair(p: Pairs) -> torch.Tensor:
    """BCO, Jung et al. 2024 (arXiv 2404.04656): −log σ(r_c − δ) − log σ(−(r_r − δ)); δ is 0, or with
    `bco_running_mean` the running mean of the batches' mean rewards, this batch's included, as
    the MPO paper's code does (`RunningMean`)."""
    rc, rr = p.beta * p.chosen_ratio, p.beta * p.rejected_ratio
    shift = p.running.update(torch.cat([rc, rr])) if p.running is not None else 0.0
    return -F.logsigmoid(rc - shift) - F.logsigmoid(-(rr - shift))


@register_loss("sppo_hard")
def sppo_hard(p: Pairs) -> torch.Tensor:
    """SPPO with hard win probabilities, Wu et al. 2024 (arXiv 2405.00675)."""
    return (p.chosen_ratio - 0.5 / p.beta) ** 2 + (p.rejected_ratio + 0.5 / p.beta) ** 2


def _smoothed_logistic(d: torch.Tensor, p: Pairs) -> torch.Tensor:
    return -F.logsigmoid(p.beta * d) * (1 - p.label_smoothing) - F.logsigmoid(-p.beta * d) * p.label_smoothing


@register_loss("aot")
def aot(p: Pairs) -> torch.Tensor:
    """AOT, Melnyk et al. 2024 (arXiv 2406.05882), paired: optimal transport between the policy's
    and the reference's sorted chosen-minus-rejected log-prob distributions."""
    ours, _ = torch.sort(p.policy.chosen - p.policy.rejected, dim=0)
    ref, _ = torch.sort(p.ref_chosen - p.ref_rejected, dim=0)
    return _smoothed_logistic(ours - ref, p)


@register_loss("aot_unpaired")
def aot_unpaired(p: Pairs) -> torch.Tensor:
    """AOT, unpaired: the sorted chosen log-ratios against the sorted rejected ones."""
    chosen, _ = torch.sort(p.chosen_ratio, dim=0)
    rejected, _ = torch.sort(p.rejected_ratio, dim=0)
    return _smoothed_logistic(chosen - rejected, p)


@register_loss("apo_zero")
def apo_zero(p: Pairs) -> torch.Tensor:
    """APO-zero, D'Oosterlinck et al. 2024 (arXiv 2408.06266), Eq. 7: push chosen up, rejected down."""
    return (1 - torch.sigmoid(p.beta * p.chosen_ratio)) + torch.sigmoid(p.beta * p.rejected_ratio)


@register_loss("apo_down")
def apo_down(p: Pairs) -> torch.Tensor:
    """APO-down, same paper, Eq. 8: push both down, rejected more."""
    return torch.sigmoid(p.beta * p.chosen_ratio) + (1 - torch.sigmoid(p.beta * p.delta))


@register_loss("discopop")
def discopop(p: Pairs) -> torch.Tensor:
    """DiscoPOP, Chris Lu et al. 2024 (arXiv 2406.08414), Eq. 5: logistic and exponential losses
    mixed by σ(βΔ/τ)."""
    logit = p.beta * p.delta_score
    mix = torch.sigmoid(logit / p.discopop_tau)
    return -F.logsigmoid(logit) * (1 - mix) + torch.exp(-logit) * mix


@register_loss("sft")
def sft(p: Pairs) -> torch.Tensor:
    """Negative log-likelihood of the chosen completions, averaged over every chosen token in the
    batch (one value, repeated per pair); from the token log-probs when the pairs carry them, so
    LD-DPO's weighting of the sums does not reach it (as in TRL)."""
    tokens = p.policy.chosen_token_logps
    total = tokens.sum() if tokens is not None else p.policy.chosen.sum()
    nll = -total / p.policy.chosen_tokens.sum().clamp(min=1)
    return nll.expand(p.policy.chosen.shape[0])


@register_loss("sigmoid_norm")
def sigmoid_norm(p: Pairs) -> torch.Tensor:
    """DPO on per-token-averaged log-ratios (SimPO-style length normalisation): −log σ(βΔ̄)."""
    return -F.logsigmoid(p.beta * p.per_token())


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
        custom: dict[str, Loss] | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        use_weighting: bool = False,
    ):
        self.loss_type = list(loss_type)
        self.loss_weights = list(loss_weights) if loss_weights is not None else [1.0] * len(self.loss_type)
        if len(self.loss_weights) != len(self.loss_type):
            raise ValueError("loss_weights must have one entry per loss_type")
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.discopop_tau = discopop_tau
        self.running = RunningMean(reduce) if bco_running_mean else None
        if f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"f_divergence_type must be one of {list(F_DIVERGENCES)}, not {f_divergence_type!r}")
        self.f_divergence_type = f_divergence_type
        self.f_alpha_divergence_coef = f_alpha_divergence_coef
        self.use_weighting = use_weighting
        # user losses come from the config's names (audiorl.methods.dpo resolves them) and have the
        # built-ins' signature
        losses = {**LOSSES, **(custom or {})}
        unknown = [name for name in self.loss_type if name not in losses]
        if unknown:
            raise ValueError(f"unknown loss_type {unknown}; choose from {loss_names()}")
        self.losses = [losses[name] for name in self.loss_type]

    def __call__(self, policy: PreferenceLogps, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor) -> LossOutput:
        pairs = Pairs(policy, ref_chosen, ref_rejected, beta=self.beta, label_smoothing=self.label_smoothing,
                      discopop_tau=self.discopop_tau, running=self.running, f_divergence_type=self.f_divergence_type,
                      f_alpha_divergence_coef=self.f_alpha_divergence_coef)
        weights = wpo_weights(policy) if self.use_weighting else None
        total = policy.chosen.new_zeros(())
        metrics: dict[str, torch.Tensor] = {}
        for name, fn, weight in zip(self.loss_type, self.losses, self.loss_weights):
            per_pair = fn(pairs)
            term = (per_pair * weights if weights is not None else per_pair).mean()
            metrics[f"loss/{name}"] = term.detach()
            total = total + weight * term

        chosen_rewards = (self.beta * pairs.chosen_ratio).detach()
        rejected_rewards = (self.beta * pairs.rejected_ratio).detach()
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

    def state_dict(self) -> dict:
        return {"running": self.running.state_dict()} if self.running is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.running is not None and "running" in state:
            self.running.load_state_dict(state["running"])
