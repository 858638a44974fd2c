"""ORPO on preference pairs, without a reference model: TRL's `ORPOTrainer` (`beta` is the
paper's λ, the weight of the odds-ratio term beside the chosen transcripts' NLL). The loss is
`audiorl.objectives.reference_free.orpo_loss`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from audiorl.lazy import on_first_use
from audiorl.methods.base import BuildContext, Method, MethodConfig, Step, disable_dropout

if TYPE_CHECKING:
    from audiorl.models.base import ModelAdapter
    from audiorl.objectives import LossOutput

# torch-bound modules, imported when a step runs (see audiorl.methods.base)
preference: Any = on_first_use("audiorl.methods.dpo")
reference_free: Any = on_first_use("audiorl.objectives.reference_free")
collators: Any = on_first_use("audiorl.data.collate")


class ORPOConfig(MethodConfig):
    name: Literal["orpo"] = "orpo"
    beta: float = Field(0.1, gt=0, description="λ: the weight of the odds-ratio term")
    disable_dropout: bool = True


class ORPOStep(Step):
    def __init__(self, adapter: ModelAdapter, beta: float):
        self.adapter = adapter
        self.beta = beta

    def __call__(self, batch: dict[str, Any]) -> LossOutput:
        return reference_free.orpo_loss(preference.score_pairs(self.adapter, batch).policy, beta=self.beta)


class ORPO(Method):
    name = "orpo"
    config = ORPOConfig
    data_kind = "preference"

    def build(self, ctx: BuildContext) -> tuple[Step, Any]:
        objective: ORPOConfig = ctx.run.objective  # type: ignore[assignment]
        if objective.disable_dropout:
            disable_dropout(ctx.adapter.model)
        return ORPOStep(ctx.adapter, objective.beta), collators.PreferenceCollator(ctx.adapter)


METHOD = ORPO()
