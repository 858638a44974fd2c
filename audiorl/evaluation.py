"""Batched transcription and WER/CER scoring (jiwer).

Clips are sorted by length before batching so that padding and decoding steps are not wasted;
results come back in the original order. Decoding is greedy (one beam) unless told otherwise, and
the result says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import jiwer
import torch

from audiorl.audio import AudioLimits
from audiorl.config import TextNormalization
from audiorl.data.records import Record
from audiorl.models.base import ModelAdapter
from audiorl.rewards.asr import hotword_hits
from audiorl.text import transform


@dataclass
class Utterance:
    source: str
    reference: str
    hypothesis: str
    errors: int
    reference_words: int
    hotwords_expected: int = 0  # the record's hotwords that its reference contains
    hotwords_found: int = 0  # ... of which the hypothesis has

    @property
    def wer(self) -> float:
        return self.errors / self.reference_words if self.reference_words else float(self.errors > 0)


@dataclass
class EvalResult:
    wer: float
    cer: float
    substitutions: int
    deletions: int
    insertions: int
    hits: int
    sentence_error_rate: float
    num_utterances: int
    decoding: str = "greedy"
    utterances: list[Utterance] = field(default_factory=list)
    no_speech_clips: int = 0  # clips whose reference is empty (no speech in them)
    no_speech_output_rate: float | None = None  # share of those the model wrote something for
    hotwords_expected: int = 0  # hotword occurrences over the clips with a `hotwords` column
    hotword_recall: float | None = None  # share of them the model wrote (None: no clip has hotwords)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        keys = ("wer", "cer", "substitutions", "deletions", "insertions", "sentence_error_rate")
        if self.no_speech_output_rate is not None:
            keys += ("no_speech_output_rate",)
        if self.hotword_recall is not None:
            keys += ("hotword_recall",)
        return {f"{prefix}{k}": float(getattr(self, k)) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["utterances"] = [dict(asdict(u), wer=u.wer) for u in self.utterances]
        return out


def score(
    references: list[str],
    hypotheses: list[str],
    normalization: TextNormalization | None = None,
    sources: list[str] | None = None,
    hotwords: list[list[str] | None] | None = None,
) -> EvalResult:
    """Corpus WER/CER (errors summed over utterances, divided by reference words/characters).

    A clip without speech (an empty reference) adds every word written for it as insertions, and
    the result says how many such clips got any output (`no_speech_output_rate`). With `hotwords`
    (per clip, from the manifest's `hotwords` column), the result also has the corpus hotword
    recall: of the hotwords the references contain, the share the hypotheses contain."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if hotwords is not None and len(hotwords) != len(references):
        raise ValueError(f"{len(references)} references but {len(hotwords)} hotword lists")
    if not references:
        raise ValueError("nothing to score")
    norm = normalization or TextNormalization()
    words = transform(norm, "word")
    chars = transform(norm, "char")
    out = jiwer.process_words(references, hypotheses, reference_transform=words, hypothesis_transform=words)
    cer = jiwer.process_characters(references, hypotheses, reference_transform=chars, hypothesis_transform=chars).cer
    utterances = []
    for i, (ref, hyp) in enumerate(zip(references, hypotheses)):
        errors = sum(
            (chunk.ref_end_idx - chunk.ref_start_idx) if chunk.type in ("substitute", "delete") else
            (chunk.hyp_end_idx - chunk.hyp_start_idx) if chunk.type == "insert" else 0
            for chunk in out.alignments[i]
        )
        expected, found = hotword_hits(hyp, hotwords[i], ref, strict=True) if hotwords is not None and hotwords[i] else (0, 0)
        utterances.append(
            Utterance(
                source=sources[i] if sources else str(i),
                reference=ref,
                hypothesis=hyp,
                errors=errors,
                reference_words=len(out.references[i]),
                hotwords_expected=expected,
                hotwords_found=found,
            )
        )
    silent = [u for u in utterances if u.reference_words == 0]
    expected = sum(u.hotwords_expected for u in utterances)
    return EvalResult(
        no_speech_clips=len(silent),
        no_speech_output_rate=sum(u.errors > 0 for u in silent) / len(silent) if silent else None,
        hotwords_expected=expected,
        hotword_recall=sum(u.hotwords_found for u in utterances) / expected if expected else None,
        wer=float(out.wer),
        cer=float(cer),
        substitutions=out.substitutions,
        deletions=out.deletions,
        insertions=out.insertions,
        hits=out.hits,
        sentence_error_rate=sum(u.errors > 0 for u in utterances) / len(utterances),
        num_utterances=len(utterances),
        utterances=utterances,
    )


def pooled(results: list[EvalResult], normalization: TextNormalization | None = None) -> EvalResult:
    """One result over the utterances of several (corpus WER/CER over all of them)."""
    utterances = [u for result in results for u in result.utterances]
    pooled_result = score([u.reference for u in utterances], [u.hypothesis for u in utterances], normalization,
                          sources=[u.source for u in utterances])
    for mine, theirs in zip(pooled_result.utterances, utterances):  # the hotword counts, as each set scored them
        mine.hotwords_expected, mine.hotwords_found = theirs.hotwords_expected, theirs.hotwords_found
    expected = sum(u.hotwords_expected for u in utterances)
    pooled_result.hotwords_expected = expected
    pooled_result.hotword_recall = sum(u.hotwords_found for u in utterances) / expected if expected else None
    return pooled_result


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
