"""Choosing the next token from logits: greedy, or sampled with temperature, top-k and top-p.

The warpers are transformers' own, so sampling behaves as `generate` users expect.
"""

from __future__ import annotations

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper


def next_tokens(
    logits: torch.Tensor,
    *,
    do_sample: bool,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids.

    `generator` may be one generator for the batch, or one per row: then each row draws its own
    Gumbel noise (Gumbel-max sampling has the same distribution as multinomial), so a row's
    sample does not depend on which other rows share the batch."""
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError("temperature must be > 0 when sampling; use do_sample=False for greedy decoding")
    scores = logits
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k and top_k > 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    if isinstance(generator, (list, tuple)):
        if len(generator) != scores.shape[0]:
            raise ValueError(f"{len(generator)} generators for {scores.shape[0]} rows")
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g, dtype=torch.float64) for g in generator])
        gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-300))).to(scores.device, scores.dtype)
        return (scores + gumbel).argmax(dim=-1)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
