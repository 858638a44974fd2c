"""SFT: the token negative log-likelihood of each clip's reference transcript. The baseline every
preference and RL method is compared with, and a warm start before them.

With `ctc_weight`, plus that weight times a CTC loss on the encoder output, through a
training-only head that checkpoints hold and the export leaves out: it teaches an encoder trained
from scratch to listen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from audiorl.lazy import on_first_use
from audiorl.methods.base import BuildContext, Method, MethodConfig, Step

if TYPE_CHECKING:
    from audiorl.models.base import ModelAdapter
    from audiorl.objectives import LossOutput

# torch-bound modules, imported when a step runs (see audiorl.methods.base)
objectives: Any = on_first_use("audiorl.objectives")
collators: Any = on_first_use("audiorl.data.collate")


class SFTConfig(MethodConfig):
    name: Literal["sft"] = "sft"
    ctc_weight: float = Field(
        0.0, ge=0, description="weight of an auxiliary CTC loss on the encoder output (families with a CTC head; training only)"
    )


class SFTStep(Step):
    def __init__(self, adapter: ModelAdapter, ctc_weight: float = 0.0):
        self.adapter = adapter
        self.ctc_weight = ctc_weight

    def __call__(self, batch: dict[str, Any]) -> LossOutput:
        context = self.adapter.encode(batch["features"])
        scored = self.adapter.sequence_logps(context, batch["target_ids"])
        out = objectives.sft_loss(scored.token_logps, scored.mask)
        if self.ctc_weight:
            ctc = self.adapter.ctc_loss(context, batch["target_ids"])
            out = objectives.LossOutput(loss=out.loss + self.ctc_weight * ctc, metrics={**out.metrics, "loss/ctc": ctc.detach()})
        return out


class SFT(Method):
    name = "sft"
    config = SFTConfig
    data_kind = "transcript"

    def prepare_adapter(self, objective: SFTConfig, adapter: ModelAdapter) -> None:
        if objective.ctc_weight:
            adapter.add_ctc_head()

    def build(self, ctx: BuildContext) -> tuple[Step, Any]:
        objective: SFTConfig = ctx.run.objective  # type: ignore[assignment]
        self.prepare_adapter(objective, ctx.adapter)
        return SFTStep(ctx.adapter, objective.ctc_weight), collators.TranscriptCollator(ctx.adapter)


METHOD = SFT()
