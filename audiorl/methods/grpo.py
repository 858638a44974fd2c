"""GRPO: sample G transcripts per clip with the current policy (audio encoded once per clip),
score them with the composed reward, normalise the rewards within each group, then take the
clipped-surrogate loss (`audiorl.objectives.grpo`) on the policy's log-probs of those transcripts.

Knobs and defaults are TRL's (`trl.GRPOConfig`): `loss_type` is one string (default `dapo`) and
`beta` defaults to 0, which loads no reference model. With `num_iterations` > 1 the same rollouts
serve that many optimizer steps (the trainer repeats the batch), and the log-probs at sampling
time are the "old" policy of the ratio. `sft_weight` adds the token NLL of each clip's reference
transcript: what the reward teaches, plus the words no sample spelled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from audiorl.errors import ConfigError
from audiorl.lazy import on_first_use
from audiorl.methods.base import BuildContext, Method, MethodConfig, Step, build_reference, one_loss_type
from audiorl.objectives.grpo import ADVANTAGE_ESTIMATORS, AGGREGATIONS, GRPO_LOSS_TYPES
from audiorl.sections import Section

if TYPE_CHECKING:
    from audiorl.models.base import ModelAdapter
    from audiorl.objectives import LossOutput
    from audiorl.reference import Reference

# torch-bound modules, imported when a step runs (see audiorl.methods.base)
torch: Any = on_first_use("torch")
objectives: Any = on_first_use("audiorl.objectives")
grpo_math: Any = on_first_use("audiorl.objectives.grpo")
rollouts: Any = on_first_use("audiorl.rollout")
collators: Any = on_first_use("audiorl.data.collate")
reward_composer: Any = on_first_use("audiorl.rewards")
distributed: Any = on_first_use("audiorl.distributed")


class RewardConfig(Section):
    """One term of the composed reward: a built-in (wer, cer, hotword, hallucination, language,
    length), `package.module:function`, or an `audiorl.rewards` entry point."""

    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = Field(default_factory=dict)


class GRPOConfig(MethodConfig):
    name: Literal["grpo"] = "grpo"
    loss_type: Literal[GRPO_LOSS_TYPES] = Field("dapo", description="how token losses become one number")  # type: ignore[valid-type]
    beta: float = Field(0.0, ge=0, description="KL weight to the reference (0: no reference model is loaded)")
    num_generations: int = Field(8, ge=2)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    max_completion_length: int = Field(128, gt=0)
    epsilon: float = Field(0.2, gt=0)
    epsilon_high: float | None = Field(None, gt=0)
    scale_rewards: Literal["group", "batch", "none"] = "group"
    importance_sampling_level: Literal["token", "sequence"] = "token"
    num_iterations: int = Field(1, ge=1)
    steps_per_generation: int = Field(
        1, ge=1, description="micro-batches one rollout feeds: the batch's clips are sampled at once, then trained on in this many slices"
    )
    mask_truncated_completions: bool = False
    sapo_temperature_pos: float = Field(1.0, gt=0, description="SAPO's gate temperature for tokens with a positive advantage")
    sapo_temperature_neg: float = Field(1.05, gt=0, description="SAPO's gate temperature for the other tokens")
    top_entropy_quantile: float = Field(
        1.0, gt=0, le=1, description="train only on this share of completion tokens, those of highest next-token entropy (1: all)"
    )
    advantage_estimator: Literal[ADVANTAGE_ESTIMATORS] = Field(  # type: ignore[valid-type]
        "grpo", description="the baseline: the group's mean (grpo), or the mean of the group's other completions (rloo)"
    )
    multi_objective_aggregation: Literal[AGGREGATIONS] = Field(  # type: ignore[valid-type]
        "sum_then_normalize", description="weigh and sum the rewards, then normalise (TRL's default); or normalise each first (GDPO)"
    )
    sft_weight: float = Field(
        0.0, ge=0, description="add this weight times the token NLL of each clip's reference transcript (an SFT term beside the reward)"
    )
    rewards: list[RewardConfig] = Field(default_factory=lambda: [RewardConfig(name="wer")])

    @field_validator("loss_type", mode="before")
    @classmethod
    def _one_loss(cls, value: Any) -> Any:
        return one_loss_type(value, GRPO_LOSS_TYPES, "GRPO")

    @model_validator(mode="after")
    def _check(self) -> GRPOConfig:
        if not self.rewards:
            raise ValueError("GRPO needs at least one reward in rewards")
        if self.multi_objective_aggregation == "normalize_then_sum" and self.advantage_estimator != "grpo":
            raise ValueError("advantage_estimator=rloo works on the summed reward; normalize_then_sum normalises each reward itself")
        return self


class GRPOStep(Step):
    def __init__(self, adapter: ModelAdapter, objective: GRPOConfig, reference: Reference | None, reward, *,
                 seed: int = 0, lockstep: bool = False):
        self.adapter = adapter
        self.objective = objective
        self.reference = reference
        self.reward = reward
        self.lockstep = lockstep
        # each batch serves steps_per_generation slices, each num_iterations times (TRL's order:
        # the slices in turn, then again for the next iteration)
        self.batch_repeats = objective.num_iterations * objective.steps_per_generation
        self._calls = 0  # calls served by the current rollout (checkpointed: which slice comes next)
        self.settings = rollouts.SamplingSettings(
            num_generations=objective.num_generations,
            temperature=objective.temperature,
            top_p=objective.top_p,
            top_k=objective.top_k,
            max_new_tokens=objective.max_completion_length,
        )
        self._cached: tuple[dict[str, Any], dict[str, Any]] | None = None
        self.seed = seed
        self.rollouts = 0  # checkpointed: sampling seeds depend on it

    def _rollout(self, batch: dict[str, Any]) -> dict[str, Any]:
        # the cache holds the batch itself, so its identity cannot be reused by a later batch
        if self._cached is not None and self._cached[0] is batch:
            return self._cached[1]
        if self._cached is not None:
            self._calls = 0  # a new batch (after a resume, the checkpoint's count stands for the batch served again)
        g = self.settings.num_generations
        with torch.no_grad():
            context = self.adapter.encode(batch["features"])
            rollout = rollouts.sample(
                self.adapter, context, self.settings, row_seeds=rollouts.row_seeds(self.seed, self.rollouts, batch["index"].tolist(), g),
                with_logps=self.batch_repeats > 1, early_stop=not self.lockstep,
            )
            self.rollouts += 1
            columns = {k: [v for v in values for _ in range(g)] for k, values in batch["columns"].items()}
            total, parts = self.reward(rollout.texts, **columns)
            rewards = torch.tensor(total, dtype=torch.float32)
            if self.objective.multi_objective_aggregation == "normalize_then_sum":
                per_reward = torch.tensor([[float("nan") if v is None else float(v) for v in values] for values in parts.values()]).T
                weights = torch.tensor([spec.weight for spec in self.reward.specs])
                advantages = grpo_math.normalize_then_sum(per_reward, weights, g)
            else:
                advantages = grpo_math.group_advantages(rewards, g, self.objective.scale_rewards, estimator=self.objective.advantage_estimator)
        data = {"rollout": rollout, "rewards": rewards, "parts": parts, "advantages": advantages}
        if not self.adapter.encoder_trainable:
            # no gradient goes into the encoder: the loss scores the completions against the
            # states the rollout computed (the audio encoder runs once per clip and step)
            data["context"] = context
        self._cached = (batch, data)
        return data

    def _slice(self, batch: dict[str, Any], data: dict[str, Any]) -> tuple[dict[str, Any], Any, list | None, Any]:
        """This call's share of the rollout: (data, rollout, the references' token ids, their clips);
        with one step per generation, all of it."""
        k = self.objective.steps_per_generation
        part = self._calls % k
        self._calls += 1
        rollout = data["rollout"]
        if k == 1:
            return data, rollout, batch["target_ids"], None
        g = self.settings.num_generations
        per_slice = len(batch["target_ids"]) // k
        clips = list(range(part * per_slice, (part + 1) * per_slice))
        rows = torch.tensor([c * g + j for c in clips for j in range(g)])
        token_logps = rollout.token_logps[rows] if rollout.token_logps is not None else None
        sliced = rollouts.Rollout([rollout.token_ids[r] for r in rows.tolist()], [rollout.texts[r] for r in rows.tolist()],
                                  [rollout.truncated[r] for r in rows.tolist()], rollout.clip_index[rows], g, token_logps)
        part_data = {"rewards": data["rewards"][rows], "advantages": data["advantages"][rows],
                     "parts": {name: [values[r] for r in rows.tolist()] for name, values in data["parts"].items()}}
        return part_data, sliced, [batch["target_ids"][c] for c in clips], torch.tensor(clips)

    def __call__(self, batch: dict[str, Any]) -> LossOutput:
        full = self._rollout(batch)
        context = full["context"] if "context" in full else self.adapter.encode(batch["features"])
        data, rollout, targets, target_clips = self._slice(batch, full)
        scored = self.adapter.sequence_logps(context, rollout.token_ids, rollout.clip_index)
        mask = scored.mask
        if self.objective.mask_truncated_completions:
            keep = torch.tensor([not t for t in rollout.truncated], dtype=mask.dtype, device=mask.device)
            mask = mask * keep.unsqueeze(-1)
        old = rollout.token_logps.to(mask.device) if rollout.token_logps is not None else scored.token_logps.detach()
        ref = None
        if self.reference is not None:
            ref = self.reference.score(batch, context, rollout.token_ids, rollout.clip_index).token_logps
        entropy_mask = None
        if self.objective.top_entropy_quantile < 1.0:
            entropy_mask = grpo_math.high_entropy_mask(scored.entropy(), scored.mask, self.objective.top_entropy_quantile,
                                                       gather=distributed.gather_across_ranks)
        out = grpo_math.grpo_loss(
            scored.token_logps,
            old,
            data["advantages"].to(mask.device),
            mask,
            ref_token_logps=ref,
            beta=self.objective.beta,
            epsilon=self.objective.epsilon,
            epsilon_high=self.objective.epsilon_high,
            loss_type=self.objective.loss_type,
            importance_sampling_level=self.objective.importance_sampling_level,
            max_completion_length=self.objective.max_completion_length,
            sapo_temperature_pos=self.objective.sapo_temperature_pos,
            sapo_temperature_neg=self.objective.sapo_temperature_neg,
            entropy_mask=entropy_mask,
        )
        if self.objective.sft_weight:
            # the reference transcripts against the same encoder states: what SFT learns, beside
            # what the reward teaches (the rollouts cannot teach a word no sample spelled)
            reference = self.adapter.sequence_logps(context, targets, target_clips)
            sft = objectives.sft_loss(reference.token_logps, reference.mask).loss
            out = objectives.LossOutput(loss=out.loss + self.objective.sft_weight * sft, metrics={**out.metrics, "loss/sft": sft.detach()})
        out.metrics.update(self._reward_metrics(data, scored.mask, rollout))
        return out

    def state_dict(self) -> dict:
        return {"rollouts": self.rollouts, "calls": self._calls}

    def load_state_dict(self, state: dict) -> None:
        # a run resumed in the middle of a rollout's slices samples that batch again, from the
        # resumed weights, and goes on with the slice that comes next
        self.rollouts = int(state.get("rollouts", 0))
        self._calls = int(state.get("calls", 0))

    def _reward_metrics(self, data, mask, rollout) -> dict[str, Any]:
        g = self.settings.num_generations
        rewards = data["rewards"]
        metrics = {
            "reward": rewards.mean(),
            "reward_std": rewards.view(-1, g).std(dim=1).mean(),
            "frac_reward_zero_std": (rewards.view(-1, g).std(dim=1) == 0).float().mean(),
            "advantages/mean_abs": data["advantages"].abs().mean(),
            "completions/mean_length": mask.sum(-1).float().mean().detach().cpu(),
            "completions/clipped_ratio": torch.tensor(sum(rollout.truncated) / len(rollout.truncated)),
        }
        for name, values in data["parts"].items():
            present = torch.tensor([v for v in values if v is not None], dtype=torch.float32)
            if present.numel():
                metrics[f"rewards/{name}/mean"] = present.mean()
                metrics[f"rewards/{name}/std"] = present.std() if present.numel() > 1 else torch.tensor(0.0)
        return metrics


class GRPO(Method):
    name = "grpo"
    config = GRPOConfig
    data_kind = "transcript"

    def needs_reference(self, objective: GRPOConfig) -> bool:
        return objective.beta != 0.0  # TRL's convention: beta 0 loads no reference model

    def tag(self, objective: GRPOConfig) -> str:
        return f"grpo:{objective.loss_type}"

    def build(self, ctx: BuildContext) -> tuple[Step, Any]:
        objective: GRPOConfig = ctx.run.objective  # type: ignore[assignment]
        if ctx.run.train.per_device_train_batch_size % objective.steps_per_generation:
            raise ConfigError(f"objective.steps_per_generation={objective.steps_per_generation} must divide "
                              f"train.per_device_train_batch_size={ctx.run.train.per_device_train_batch_size}: the clips sampled "
                              "together are trained on in that many equal slices")
        if ctx.run.data.batch_seconds is not None and objective.steps_per_generation > 1:
            raise ConfigError("data.batch_seconds with objective.steps_per_generation > 1: a batch by length holds any number of "
                              "clips, which cannot be cut into equal slices; use one of them")
        collate = collators.TranscriptCollator(ctx.adapter)
        reference = build_reference(ctx, collate) if self.needs_reference(objective) else None
        reward = reward_composer.build_reward([r.model_dump() for r in objective.rewards], ctx.run.data.normalize)
        step = GRPOStep(ctx.adapter, objective, reference, reward, seed=ctx.run.train.seed, lockstep=ctx.lockstep)
        return step, collate


METHOD = GRPO()
