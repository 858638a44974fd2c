"""The DPO family on preference pairs: one or more of the registered losses
(`audiorl.objectives.dpo.LOSSES`, TRL's names) weighed and summed; MPO is
`loss_type: [sigmoid, bco_pair, sft]` with `loss_weights: [0.8, 0.2, 1.0]`.

Each clip is encoded once; chosen and rejected are scored against it in one decoder pass, and
against the reference (precomputed, the LoRA-disabled network, or a frozen copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from audiorl import plugins
from audiorl.lazy import on_first_use
from audiorl.methods.base import BuildContext, Method, MethodConfig, Step, build_reference, disable_dropout
from audiorl.objectives.dpo import F_DIVERGENCE_LOSSES, F_DIVERGENCES, LOSSES, loss_names

if TYPE_CHECKING:
    from audiorl.models.base import ModelAdapter
    from audiorl.objectives import LossOutput
    from audiorl.reference import Reference

# torch-bound modules, imported when a step runs (see audiorl.methods.base)
torch: Any = on_first_use("torch")
objectives: Any = on_first_use("audiorl.objectives")
collators: Any = on_first_use("audiorl.data.collate")
dpo_math: Any = on_first_use("audiorl.objectives.dpo")
distributed: Any = on_first_use("audiorl.distributed")


class DPOConfig(MethodConfig):
    name: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, ge=0, description="DPO's β (τ of IPO)")
    loss_type: list[str] = Field(default_factory=lambda: ["sigmoid"])
    loss_weights: list[float] | None = None
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    discopop_tau: float = Field(0.05, gt=0)
    bco_running_mean: bool = Field(
        False,
        description="shift bco_pair rewards by a running mean of past rewards, as in the MPO paper's code",
    )
    f_divergence_type: Literal[F_DIVERGENCES] = Field(  # type: ignore[valid-type]
        "reverse_kl", description="f-DPO: the divergence to the reference whose f' replaces the log-ratio"
    )
    f_alpha_divergence_coef: float = Field(0.5, description="α of alpha_divergence")
    ld_alpha: float | None = Field(
        None, ge=0, le=1, description="LD-DPO: weight of the tokens past the length chosen and rejected share (None: off)"
    )
    use_weighting: bool = Field(False, description="WPO: weigh each pair's loss by how likely the policy finds both sides")
    precompute_reference: bool = False
    disable_dropout: bool = True

    @field_validator("loss_type", mode="before")
    @classmethod
    def _split_loss_type(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check_losses(self) -> DPOConfig:
        unknown = [name for name in self.loss_type if name not in loss_names() and ":" not in name]
        if unknown:
            unknown = [name for name in unknown if name not in plugins.entry_point_names(plugins.LOSS_GROUP)]
        if unknown:
            raise ValueError(
                f"unknown loss_type {unknown}; choose from {loss_names()}, or name your own as package.module:function"
            )
        if not self.loss_type:
            raise ValueError("loss_type must name at least one loss")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(
                f"loss_weights has {len(self.loss_weights)} entries but loss_type has {len(self.loss_type)}"
            )
        if "exo_pair" in self.loss_type and self.label_smoothing == 0.0:
            raise ValueError("exo_pair needs label_smoothing > 0 (the EXO paper suggests 1e-3)")
        if self.f_divergence_type != "reverse_kl":
            others = [name for name in self.loss_type if name not in F_DIVERGENCE_LOSSES]
            if others:
                raise ValueError(f"f_divergence_type={self.f_divergence_type} works with the losses {list(F_DIVERGENCE_LOSSES)}, "
                                 f"not {others} (they read the log-ratios themselves)")
        if self.use_weighting and {"aot", "aot_unpaired"} & set(self.loss_type):
            raise ValueError("use_weighting does not go with aot or aot_unpaired (they sort pairs across the batch)")
        return self

    @property
    def weights(self) -> list[float]:
        return self.loss_weights if self.loss_weights is not None else [1.0] * len(self.loss_type)


def custom_losses(names: list[str]) -> dict:
    """Resolve the loss names that are not built in (package.module:function or entry points)."""
    found = {}
    for name in names:
        if name in LOSSES:
            continue
        fn = plugins.resolve(name, plugins.LOSS_GROUP, "objective.loss_type")
        if fn is None:
            continue  # not a plug-in either: the loss names it as unknown, with the choices
        plugins.check_signature(fn, name, "objective.loss_type", shape="(pairs) and return one loss per pair")
        found[name] = fn
    return found


@dataclass
class ScoredPairs:
    """A batch of pairs scored by the policy: its log-probs, and what a reference needs to score the same."""

    policy: Any  # objectives.PreferenceLogps
    context: Any  # the encoder states, one row per clip
    targets: list  # chosen then rejected token ids
    index: Any  # (2B,) the clip of each target


def score_pairs(adapter: ModelAdapter, batch: dict[str, Any], *, ld_alpha: float | None = None,
                weighting: bool = False) -> ScoredPairs:
    """Encode each clip once and score its chosen and rejected transcripts in one decoder pass.
    The policy's log-probs come with their token-level fields (log Σ p² only for `weighting`); with
    `ld_alpha`, the sums are LD-DPO's weighted sums."""
    n = len(batch["chosen_ids"])
    targets = batch["chosen_ids"] + batch["rejected_ids"]
    index = torch.arange(n).repeat(2)
    context = adapter.encode(batch["features"])
    scored = adapter.sequence_logps(context, targets, index)
    sums, counts = summed(scored, n, ld_alpha), scored.num_tokens
    tokens, mask = scored.token_logps, scored.mask
    squares = scored.log_sum_sq_probs() if weighting else None
    policy = objectives.PreferenceLogps(
        chosen=sums[:n], rejected=sums[n:], chosen_tokens=counts[:n], rejected_tokens=counts[n:],
        chosen_token_logps=tokens[:n], rejected_token_logps=tokens[n:], chosen_mask=mask[:n], rejected_mask=mask[n:],
        chosen_log_sum_sq_probs=squares[:n] if squares is not None else None, rejected_log_sum_sq_probs=squares[n:] if squares is not None else None,
    )
    return ScoredPairs(policy, context, targets, index)


def summed(scored: Any, n: int, ld_alpha: float | None) -> Any:
    """Each completion's log-prob from a pair batch's scores (chosen rows, then rejected): the sum,
    or with `ld_alpha` LD-DPO's, whose shared part is as long as the pair's shorter side."""
    if ld_alpha is None:
        return scored.sum
    counts = scored.num_tokens
    shared = torch.minimum(counts[:n], counts[n:]).repeat(2)
    return dpo_math.ld_weighted(scored.token_logps, scored.mask, shared, ld_alpha)


class PreferenceStep(Step):
    """Encode each clip once, score chosen and rejected against it in one decoder pass."""

    def __init__(self, adapter: ModelAdapter, objective: DPOConfig, reference: Reference):
        self.adapter = adapter
        self.reference = reference
        self.ld_alpha = objective.ld_alpha
        self.weighting = objective.use_weighting
        self.loss = objectives.PreferenceLoss(
            objective.loss_type,
            objective.weights,
            beta=objective.beta,
            label_smoothing=objective.label_smoothing,
            discopop_tau=objective.discopop_tau,
            bco_running_mean=objective.bco_running_mean,
            custom=custom_losses(objective.loss_type),
            reduce=distributed.mean_tensor_across_ranks,  # one δ on every rank
            f_divergence_type=objective.f_divergence_type,
            f_alpha_divergence_coef=objective.f_alpha_divergence_coef,
            use_weighting=objective.use_weighting,
        )

    def __call__(self, batch: dict[str, Any]) -> LossOutput:
        scored = score_pairs(self.adapter, batch, ld_alpha=self.ld_alpha, weighting=self.weighting)
        n = len(batch["chosen_ids"])
        summarize = None if self.ld_alpha is None else lambda ref_scored: summed(ref_scored, n, self.ld_alpha)
        ref = self.reference.logps(batch, scored.context, scored.targets, scored.index, summarize)
        ref = ref.to(scored.policy.chosen.device, scored.policy.chosen.dtype)
        return self.loss(scored.policy, ref[:n], ref[n:])

    def state_dict(self) -> dict:
        return self.loss.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loss.load_state_dict(state)


class DPO(Method):
    name = "dpo"
    config = DPOConfig
    data_kind = "preference"

    def needs_reference(self, objective: DPOConfig) -> bool:
        return True

    def tag(self, objective: DPOConfig) -> str:
        return f"dpo:{'+'.join(objective.loss_type)}"

    def build(self, ctx: BuildContext) -> tuple[Step, Any]:
        objective: DPOConfig = ctx.run.objective  # type: ignore[assignment]
        if objective.disable_dropout:
            disable_dropout(ctx.adapter.model)
        collate = collators.PreferenceCollator(ctx.adapter)
        ld_alpha = objective.ld_alpha
        reference = build_reference(ctx, collate, precompute=objective.precompute_reference,
                                    summarize=None if ld_alpha is None else lambda scored, n: summed(scored, n, ld_alpha),
                                    summary_key="" if ld_alpha is None else f"-ld{ld_alpha}")
        return PreferenceStep(ctx.adapter, objective, reference), collate


METHOD = DPO()
