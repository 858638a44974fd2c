"""Sampling G hypotheses per clip: the audio encoder (or audio tower) runs once per clip and its
output is repeated for every hypothesis; decoding is batched with the KV cache. Works for every
family through the adapter contract."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from audiorl.models.base import AudioContext, ModelAdapter


@dataclass
class SamplingSettings:
    num_generations: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128


@dataclass
class Rollout:
    """G completions per clip, clip-major: rows i*G .. i*G+G-1 belong to clip i."""

    token_ids: list[list[int]]
    texts: list[str]
    truncated: list[bool]  # ended without a stop token (hit max_new_tokens)
    clip_index: torch.Tensor  # (N,) which clip each completion belongs to
    group_size: int
    token_logps: torch.Tensor | None = None  # (N, L) log-probs under the sampling policy, if asked
    mask: torch.Tensor | None = None


def row_seeds(seed: int, rollout_number: int, clip_indices: list[int], group_size: int) -> list[int]:
    """One seed per completion from (the run's seed, the rollout's number, the clip's dataset
    index, the sample's number), clip-major: a clip's samples are the same whatever batch or rank
    it lands in, and differ from one rollout to the next."""
    return [
        (((seed * 1_000_003 + rollout_number) * 1_000_033 + int(i)) * 1_009 + k) % (2**63 - 1)
        for i in clip_indices
        for k in range(group_size)
    ]


@torch.no_grad()
def sample(
    adapter: ModelAdapter,
    context: AudioContext,
    settings: SamplingSettings,
    *,
    generator: torch.Generator | None = None,
    row_seeds: list[int] | None = None,
    with_logps: bool = False,
    early_stop: bool = True,
) -> Rollout:
    """Sample `settings.num_generations` completions for each clip of an encoded batch.

    With `row_seeds` (one per completion, clip-major) every completion draws from its own seeded
    generator, so what a clip gets does not depend on the batch it sits in (or on the rank)."""
    g = settings.num_generations
    if row_seeds is not None:
        generator = [torch.Generator().manual_seed(seed) for seed in row_seeds]
    out = adapter.generate(
        context,
        max_new_tokens=settings.max_new_tokens,
        do_sample=True,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        num_return_sequences=g,
        generator=generator,
        early_stop=early_stop,
    )
    stops = set(adapter.stop_token_ids)
    truncated = [not ids or ids[-1] not in stops for ids in out.token_ids]
    clip_index = torch.arange(context.batch_size).repeat_interleave(g)
    rollout = Rollout(out.token_ids, out.texts, truncated, clip_index, g)
    if with_logps:
        scored = adapter.sequence_logps(context, out.token_ids, clip_index)
        rollout.token_logps, rollout.mask = scored.token_logps, scored.mask
    return rollout
