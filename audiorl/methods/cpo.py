"""CPO on preference pairs, without a reference model: TRL's `CPOTrainer` with its knobs
(`loss_type` one of sigmoid, hinge, ipo, simpo, alphapo; `cpo_alpha`, the NLL weight;
`simpo_gamma`; `alpha`, AlphaPO's reward shape). SimPO is `loss_type: simpo` with `cpo_alpha: 0`.
The losses are `audiorl.objectives.reference_free`. Only the policy is scored, so only the policy
is in memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from audiorl.lazy import on_first_use
from audiorl.methods.base import BuildContext, Method, MethodConfig, Step, disable_dropout, one_loss_type
from audiorl.objectives.reference_free import CPO_LOSS_TYPES

if TYPE_CHECKING:
    from audiorl.models.base import ModelAdapter
    from audiorl.objectives import LossOutput

# torch-bound modules, imported when a step runs (see audiorl.methods.base)
preference: Any = on_first_use("audiorl.methods.dpo")
reference_free: Any = on_first_use("audiorl.objectives.reference_free")
collators: Any = on_first_use("audiorl.data.collate")


class CPOConfig(MethodConfig):
    name: Literal["cpo"] = "cpo"
    loss_type: Literal[CPO_LOSS_TYPES] = Field("sigmoid", description="the preference term")  # type: ignore[valid-type]
    beta: float = Field(0.1, gt=0, description="the temperature β of the preference term (τ of IPO)")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    cpo_alpha: float = Field(1.0, ge=0, description="weight of the chosen transcripts' NLL (0 with SimPO and AlphaPO)")
    simpo_gamma: float = Field(0.5, description="SimPO's target reward margin γ (loss_type simpo)")
    alpha: float = Field(0.0, description="AlphaPO's reward shape: (1 - p^-alpha)/alpha; 0 keeps log-probs")
    disable_dropout: bool = True

    @field_validator("loss_type", mode="before")
    @classmethod
    def _one_loss(cls, value: Any) -> Any:
        return one_loss_type(value, CPO_LOSS_TYPES, "CPO")


class CPOStep(Step):
    def __init__(self, adapter: ModelAdapter, objective: CPOConfig):
        self.adapter = adapter
        self.objective = objective

    def __call__(self, batch: dict[str, Any]) -> LossOutput:
        o = self.objective
        policy = preference.score_pairs(self.adapter, batch).policy
        return reference_free.cpo_loss(policy, loss_type=o.loss_type, beta=o.beta, label_smoothing=o.label_smoothing,
                                       simpo_gamma=o.simpo_gamma, alpha=o.alpha, cpo_alpha=o.cpo_alpha)


class CPO(Method):
    name = "cpo"
    config = CPOConfig
    data_kind = "preference"

    def tag(self, objective: CPOConfig) -> str:
        return f"cpo:{objective.loss_type}"

    def build(self, ctx: BuildContext) -> tuple[Step, Any]:
        objective: CPOConfig = ctx.run.objective  # type: ignore[assignment]
        if objective.disable_dropout:
            disable_dropout(ctx.adapter.model)
        return CPOStep(ctx.adapter, objective), collators.PreferenceCollator(ctx.adapter)


METHOD = CPO()
