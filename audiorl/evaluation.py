"""Batched transcription of test sets, scored by `audiorl.scoring`.

Clips are sorted by length before batching so that padding and decoding steps are not wasted;
results come back in the original order. Decoding is greedy (one beam) unless told otherwise, and
the result says so.
"""

from __future__ import annotations

import torch

from audiorl.audio import AudioLimits
from audiorl.config import TextNormalization
from audiorl.data.records import Record
from audiorl.models.base import ModelAdapter
from audiorl.scoring import EvalResult, score


@torch.no_grad()
def transcribe(
    adapter: ModelAdapter,
    records: list[Record],
    limits: AudioLimits,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    description: str = "transcribing",
) -> list[str]:
    """Greedy transcripts for `records`, in their order."""
    from audiorl.progress import progress_bar

    # sort by length (from the headers) so each batch pads little; decode one batch at a time
    order = sorted(range(len(records)), key=lambda i: records[i].duration())
    texts: list[str] = [""] * len(records)
    was_training = adapter.model.training
    adapter.model.eval()
    try:
        with progress_bar(description, total=len(records)) as advance:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                context = adapter.encode(adapter.features([records[i].load(limits) for i in rows]))
                generated = adapter.generate(context, max_new_tokens=max_new_tokens)
                for row, text in zip(rows, generated.texts):
                    texts[row] = text
                advance(len(rows))
    finally:
        adapter.model.train(was_training)
    return texts


def evaluate(
    adapter: ModelAdapter,
    records: list[Record],
    limits: AudioLimits,
    *,
    normalization: TextNormalization | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    description: str = "evaluating",
) -> EvalResult:
    hypotheses = transcribe(
        adapter, records, limits, batch_size=batch_size, max_new_tokens=max_new_tokens, description=description
    )
    return score([r.reference for r in records], hypotheses, normalization, sources=[r.source for r in records],
                 hotwords=[r.extra.get("hotwords") for r in records])
