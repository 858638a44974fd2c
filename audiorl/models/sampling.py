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

    A sampled token is drawn by inverting the distribution's CDF at a uniform draw: one random
    number per row, where `torch.multinomial` on CPU is several times slower for a 51k-token
    vocabulary (`bench/sampling.py`). `generator` may be one generator for the batch,
    or one per row: then each row draws its own number, so a row's sample does not depend on which
    other rows share the batch."""
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
    rows = scores.shape[0]
    if isinstance(generator, (list, tuple)):
        if len(generator) != rows:
            raise ValueError(f"{len(generator)} generators for {rows} rows")
        uniform = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generator])
    else:
        uniform = torch.rand(rows, generator=generator, dtype=torch.float64)
    return inverse_cdf(torch.softmax(scores.float(), dim=-1), uniform.to(scores.device))


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """(B, V) probabilities and (B,) uniform draws in [0, 1) -> (B,) the token whose CDF interval
    holds each draw: token i with probability probs[i] (one of zero probability never). The CDF
    keeps the probabilities' dtype: torch sums float32 in double on CPU, so each of its values is
    within float32's rounding (6e-8 at 1) of the exact sum, which is how far a token's chance moves."""
    cdf = torch.cumsum(probs, dim=-1)
    target = (uniform.double() * cdf[:, -1].double()).to(cdf.dtype)
    chosen = torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1)
    over = chosen >= probs.shape[-1]  # a draw rounded up onto the total: the last token that can be drawn
    if over.any():
        last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
        chosen = torch.where(over, last, chosen)
    return chosen
