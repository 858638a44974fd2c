"""How a batch becomes a loss for each objective: the glue between adapter, reference and the
tensor math in `objectives/`. The trainer calls a recipe and knows nothing else about models.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from audiorl.config import ObjectiveConfig
from audiorl.models.base import ModelAdapter
from audiorl.objectives import LossOutput, PreferenceLogps, PreferenceLoss, sft_loss
from audiorl.reference import Reference


def disable_dropout(module: nn.Module) -> None:
    """DPO compares log-probs of two forward passes; dropout noise would swamp small margins."""
    for child in module.modules():
        if isinstance(child, nn.Dropout):
            child.p = 0.0


def custom_losses(names: list[str]) -> dict:
    """Resolve the loss names that are not built in (package.module:function or entry points)."""
    from audiorl.errors import ConfigError
    from audiorl.objectives.dpo import LOSSES
    from audiorl.plugins import LOSS_GROUP, resolve

    found = {}
    for name in names:
        if name in LOSSES:
            continue
        fn = resolve(name, LOSS_GROUP, "objective.loss_type")
        if not callable(fn):
            raise ConfigError(f"objective.loss_type: {name!r} is not a callable loss")
        found[name] = fn
    return found


class Recipe:
    adapter: ModelAdapter
    #: how many optimizer steps each batch is used for (GRPO's num_iterations)
    batch_repeats: int = 1
    #: set by the trainer under FSDP: every rank must make the same model calls in a step
    lockstep: bool = False

    @property
    def model(self) -> nn.Module:
        return self.adapter.model

    def __call__(self, batch: dict[str, Any]) -> LossOutput:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PreferenceRecipe(Recipe):
    """DPO/MPO: encode each clip once, score chosen and rejected against it in one decoder pass."""

    def __init__(self, adapter: ModelAdapter, objective: ObjectiveConfig, reference: Reference):
        self.adapter = adapter
        self.reference = reference
        self.loss = PreferenceLoss(
            objective.loss_type,
            objective.weights,
            beta=objective.beta,
            label_smoothing=objective.label_smoothing,
            discopop_tau=objective.discopop_tau,
            bco_running_mean=objective.bco_running_mean,
            custom=custom_losses(objective.loss_type),
        )

    def __call__(self, batch: dict[str, Any]) -> LossOutput:
        n = len(batch["chosen_ids"])
        targets = batch["chosen_ids"] + batch["rejected_ids"]
        index = torch.arange(n).repeat(2)
        context = self.adapter.encode(batch["features"])
        scored = self.adapter.sequence_logps(context, targets, index)
        sums, counts = scored.sum, scored.num_tokens
        policy = PreferenceLogps(chosen=sums[:n], rejected=sums[n:], chosen_tokens=counts[:n], rejected_tokens=counts[n:])
        ref = self.reference.logps(batch, context, targets, index).to(sums.device, sums.dtype)
        return self.loss(policy, ref[:n], ref[n:])

    def state_dict(self) -> dict:
        return self.loss.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loss.load_state_dict(state)


class SFTRecipe(Recipe):
    """Token NLL of the reference; with `ctc_weight`, plus that weight times an auxiliary CTC loss
    on the encoder output (the adapter's training-only head)."""

    def __init__(self, adapter: ModelAdapter, ctc_weight: float = 0.0):
        self.adapter = adapter
        self.ctc_weight = ctc_weight
        if ctc_weight:
            adapter.add_ctc_head()

    def __call__(self, batch: dict[str, Any]) -> LossOutput:
        context = self.adapter.encode(batch["features"])
        scored = self.adapter.sequence_logps(context, batch["target_ids"])
        out = sft_loss(scored.token_logps, scored.mask)
        if self.ctc_weight:
            ctc = self.adapter.ctc_loss(context, batch["target_ids"])
            out = LossOutput(loss=out.loss + self.ctc_weight * ctc, metrics={**out.metrics, "loss/ctc": ctc.detach()})
        return out


class GRPORecipe(Recipe):
    """GRPO: sample G transcripts per clip with the current policy (audio encoded once per clip),
    score them with the composed reward, normalise the rewards within each group, then take the
    clipped-surrogate loss on the policy's log-probs of those transcripts.

    With `num_iterations` > 1 the same rollouts serve that many optimizer steps (the trainer
    repeats the batch), and the log-probs at sampling time are the "old" policy of the ratio.
    """

    def __init__(self, adapter: ModelAdapter, objective: ObjectiveConfig, reference: Reference | None, reward, seed: int = 0):
        from audiorl.rollout import SamplingSettings

        self.adapter = adapter
        self.objective = objective
        self.reference = reference
        self.reward = reward
        self.batch_repeats = objective.num_iterations
        self.settings = SamplingSettings(
            num_generations=objective.num_generations,
            temperature=objective.temperature,
            top_p=objective.top_p,
            top_k=objective.top_k,
            max_new_tokens=objective.max_completion_length,
        )
        self._cached: tuple[dict[str, Any], dict[str, Any]] | None = None
        self.seed = seed
        self.rollouts = 0  # checkpointed: sampling seeds depend on it

    def _row_seeds(self, indices: torch.Tensor) -> list[int]:
        """One seed per completion from (seed, rollout number, the clip's dataset index, sample
        number): a clip's samples are the same whatever batch or rank it lands in."""
        g = self.settings.num_generations
        return [
            (((self.seed * 1_000_003 + self.rollouts) * 1_000_033 + int(i)) * 1_009 + k) % (2**63 - 1)
            for i in indices.tolist()
            for k in range(g)
        ]

    def _rollout(self, batch: dict[str, Any]) -> dict[str, Any]:
        from audiorl.objectives.grpo import group_advantages
        from audiorl.rollout import sample

        # the cache holds the batch itself, so its identity cannot be reused by a later batch
        if self._cached is not None and self._cached[0] is batch:
            return self._cached[1]
        g = self.settings.num_generations
        with torch.no_grad():
            context = self.adapter.encode(batch["features"])
            rollout = sample(
                self.adapter, context, self.settings, row_seeds=self._row_seeds(batch["index"]),
                with_logps=self.objective.num_iterations > 1, early_stop=not self.lockstep,
            )
            self.rollouts += 1
            columns = {k: [v for v in values for _ in range(g)] for k, values in batch["columns"].items()}
            total, parts = self.reward(rollout.texts, **columns)
            rewards = torch.tensor(total, dtype=torch.float32)
            advantages = group_advantages(rewards, g, self.objective.scale_rewards)
        data = {"rollout": rollout, "rewards": rewards, "parts": parts, "advantages": advantages}
        if not self.adapter.encoder_trainable:
            # no gradient goes into the encoder: the loss scores the completions against the
            # states the rollout computed (the audio encoder runs once per clip and step)
            data["context"] = context
        self._cached = (batch, data)
        return data

    def __call__(self, batch: dict[str, Any]) -> LossOutput:
        from audiorl.objectives.grpo import grpo_loss

        data = self._rollout(batch)
        rollout = data["rollout"]
        context = data["context"] if "context" in data else self.adapter.encode(batch["features"])
        scored = self.adapter.sequence_logps(context, rollout.token_ids, rollout.clip_index)
        mask = scored.mask
        if self.objective.mask_truncated_completions:
            keep = torch.tensor([not t for t in rollout.truncated], dtype=mask.dtype, device=mask.device)
            mask = mask * keep.unsqueeze(-1)
        old = rollout.token_logps.to(mask.device) if rollout.token_logps is not None else scored.token_logps.detach()
        ref = None
        if self.objective.beta != 0.0 and self.reference is not None:
            ref = self.reference.score(batch, context, rollout.token_ids, rollout.clip_index).token_logps
        out = grpo_loss(
            scored.token_logps,
            old,
            data["advantages"].to(mask.device),
            mask,
            ref_token_logps=ref,
            beta=self.objective.beta,
            epsilon=self.objective.epsilon,
            epsilon_high=self.objective.epsilon_high,
            loss_type=self.objective.loss_type[0],
            importance_sampling_level=self.objective.importance_sampling_level,
            max_completion_length=self.objective.max_completion_length,
        )
        out.metrics.update(self._reward_metrics(data, scored.mask, rollout))
        return out

    def state_dict(self) -> dict:
        return {"rollouts": self.rollouts}

    def load_state_dict(self, state: dict) -> None:
        self.rollouts = int(state.get("rollouts", 0))

    def _reward_metrics(self, data, mask, rollout) -> dict[str, torch.Tensor]:
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
