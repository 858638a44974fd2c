"""KTO on unpaired completions `{audio, completion, label}`: TRL's `KTOTrainer` with its knobs
(`beta`, `desirable_weight`, `undesirable_weight`, `loss_type` kto or apo_zero_unpaired). The loss
is `audiorl.objectives.kto`; `audiorl data pairs --format unpaired` writes such records from a
model's own samples.

Each clip is encoded once. Its completion is scored against it by the policy and the reference;
for KTO's reference point each clip is also scored with the previous clip's completion (the batch
cycled by one, as TRL's collator builds its mismatched pairs), by the policy without gradient and
by the reference, and the mean log-ratio of those is averaged over ranks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from audiorl.errors import ConfigError
from audiorl.lazy import on_first_use
from audiorl.methods.base import BuildContext, Method, MethodConfig, Step, build_reference, disable_dropout
from audiorl.objectives.kto import KTO_LOSS_TYPES

if TYPE_CHECKING:
    from audiorl.models.base import ModelAdapter
    from audiorl.objectives import LossOutput
    from audiorl.reference import Reference

# torch-bound modules, imported when a step runs (see audiorl.methods.base)
torch: Any = on_first_use("torch")
kto_math: Any = on_first_use("audiorl.objectives.kto")
collators: Any = on_first_use("audiorl.data.collate")
distributed: Any = on_first_use("audiorl.distributed")


class KTOConfig(MethodConfig):
    name: Literal["kto"] = "kto"
    loss_type: Literal[KTO_LOSS_TYPES] = Field("kto", description="kto, or apo_zero_unpaired (no reference point)")  # type: ignore[valid-type]
    beta: float = Field(0.1, gt=0)
    desirable_weight: float = Field(1.0, gt=0, description="λ_D: the weight of desirable completions' losses")
    undesirable_weight: float = Field(1.0, gt=0, description="λ_U: the weight of undesirable completions' losses")
    disable_dropout: bool = True


class KTOStep(Step):
    def __init__(self, adapter: ModelAdapter, objective: KTOConfig, reference: Reference):
        self.adapter = adapter
        self.objective = objective
        self.reference = reference

    def __call__(self, batch: dict[str, Any]) -> LossOutput:
        o = self.objective
        completions = batch["completion_ids"]
        n = len(completions)
        context = self.adapter.encode(batch["features"])
        logps = self.adapter.sequence_logps(context, completions).sum
        own = torch.arange(n)
        kl = torch.zeros((), dtype=logps.dtype, device=logps.device)
        if o.loss_type == "kto":
            mismatched = completions[-1:] + completions[:-1]  # clip i with clip i - 1's completion
            with torch.no_grad():
                policy_kl = self.adapter.sequence_logps(context, mismatched).sum
            ref = self.reference.logps(batch, context, completions + mismatched, own.repeat(2)).to(logps.device, logps.dtype)
            ref, ref_kl = ref[:n], ref[n:]
            kl = distributed.mean_tensor_across_ranks(kto_math.kl_estimate(policy_kl, ref_kl))
        else:
            ref = self.reference.logps(batch, context, completions, own).to(logps.device, logps.dtype)
        return kto_math.kto_loss(logps, ref, batch["desirable"].to(logps.device), kl=kl, beta=o.beta, desirable_weight=o.desirable_weight,
                                 undesirable_weight=o.undesirable_weight, loss_type=o.loss_type)


class KTO(Method):
    name = "kto"
    config = KTOConfig
    data_kind = "unpaired"

    def needs_reference(self, objective: KTOConfig) -> bool:
        return True

    def tag(self, objective: KTOConfig) -> str:
        return f"kto:{objective.loss_type}"

    def build(self, ctx: BuildContext) -> tuple[Step, Any]:
        objective: KTOConfig = ctx.run.objective  # type: ignore[assignment]
        if objective.loss_type == "kto" and ctx.run.train.per_device_train_batch_size < 2:
            raise ConfigError("objective.name=kto: train.per_device_train_batch_size must be at least 2; KTO's reference point "
                              "scores each clip with another clip's completion from the same batch")
        if objective.disable_dropout:
            disable_dropout(ctx.adapter.model)
        collate = collators.UnpairedCollator(ctx.adapter)
        return KTOStep(ctx.adapter, objective, build_reference(ctx, collate)), collate


METHOD = KTO()
