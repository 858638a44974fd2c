"""MWER on transcripts `{audio, text}`: the expected number of word errors over each clip's N-best
list under the model's renormalised probabilities (`audiorl.objectives.mwer`), plus
`mwer_ce_weight` (the paper's λ, 0.01 there) times the reference's token NLL.

The N-best list is `num_hypotheses` samples of the current policy, decoded with the audio encoded
once per clip (the same states serve sampling and scoring); word errors are counted with
evaluation's scorer and `data.normalize`, so MWER lowers the number the evaluation reports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from audiorl.lazy import on_first_use
from audiorl.methods.base import BuildContext, Method, MethodConfig, Step, disable_dropout

if TYPE_CHECKING:
    from audiorl.config import TextNormalization
    from audiorl.models.base import ModelAdapter
    from audiorl.objectives import LossOutput

# torch-bound modules, imported when a step runs (see audiorl.methods.base)
torch: Any = on_first_use("torch")
objectives: Any = on_first_use("audiorl.objectives")
mwer_math: Any = on_first_use("audiorl.objectives.mwer")
rollouts: Any = on_first_use("audiorl.rollout")
collators: Any = on_first_use("audiorl.data.collate")
scoring: Any = on_first_use("audiorl.scoring")


class MWERConfig(MethodConfig):
    name: Literal["mwer"] = "mwer"
    num_hypotheses: int = Field(4, ge=2, description="N: hypotheses sampled per clip for its N-best list (the paper used 4)")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    max_completion_length: int = Field(128, gt=0)
    mwer_ce_weight: float = Field(0.01, ge=0, description="λ: weight of the reference's token cross-entropy (the paper's 0.01)")
    disable_dropout: bool = True


def word_errors(references: list[str], hypotheses: list[str], normalization: TextNormalization) -> list[int]:
    """Each hypothesis' number of word errors (substitutions, deletions, insertions) against its
    reference, as evaluation counts them."""
    return [u.errors for u in scoring.score(references, hypotheses, normalization).utterances]


class MWERStep(Step):
    def __init__(self, adapter: ModelAdapter, objective: MWERConfig, normalization: TextNormalization, *, seed: int = 0,
                 lockstep: bool = False):
        self.adapter = adapter
        self.objective = objective
        self.normalization = normalization
        self.lockstep = lockstep
        self.settings = rollouts.SamplingSettings(num_generations=objective.num_hypotheses, temperature=objective.temperature,
                                                  top_p=objective.top_p, top_k=objective.top_k,
                                                  max_new_tokens=objective.max_completion_length)
        self.seed = seed
        self.rollouts = 0  # checkpointed: sampling seeds depend on it

    def __call__(self, batch: dict[str, Any]) -> LossOutput:
        n = self.settings.num_generations
        context = self.adapter.encode(batch["features"])
        nbest = rollouts.sample(self.adapter, context, self.settings, early_stop=not self.lockstep,
                                row_seeds=rollouts.row_seeds(self.seed, self.rollouts, batch["index"].tolist(), n))
        self.rollouts += 1
        references = [ref for ref in batch["references"] for _ in range(n)]
        errors = torch.tensor(word_errors(references, nbest.texts, self.normalization), dtype=torch.float32)
        keep = torch.tensor(mwer_math.first_occurrences(nbest.texts, n))
        scored = self.adapter.sequence_logps(context, nbest.token_ids, nbest.clip_index)
        out = mwer_math.mwer_loss(scored.sum, errors, n, keep)
        if self.objective.mwer_ce_weight:
            reference = self.adapter.sequence_logps(context, batch["target_ids"])
            ce = objectives.sft_loss(reference.token_logps, reference.mask).loss
            out = objectives.LossOutput(loss=out.loss + self.objective.mwer_ce_weight * ce, metrics={**out.metrics, "loss/ce": ce.detach()})
        return out

    def state_dict(self) -> dict:
        return {"rollouts": self.rollouts}

    def load_state_dict(self, state: dict) -> None:
        self.rollouts = int(state.get("rollouts", 0))


class MWER(Method):
    name = "mwer"
    config = MWERConfig
    data_kind = "transcript"

    def build(self, ctx: BuildContext) -> tuple[Step, Any]:
        objective: MWERConfig = ctx.run.objective  # type: ignore[assignment]
        if objective.disable_dropout:
            disable_dropout(ctx.adapter.model)
        step = MWERStep(ctx.adapter, objective, ctx.run.data.normalize, seed=ctx.run.train.seed, lockstep=ctx.lockstep)
        return step, collators.TranscriptCollator(ctx.adapter)


METHOD = MWER()
