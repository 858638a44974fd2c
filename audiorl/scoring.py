"""WER/CER scoring (jiwer) and hotword matching, torch-free: evaluation, the rewards and
`audiorl promote`'s gate share it, and the operator commands load it without a deep-learning stack."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import jiwer

from audiorl.config import TextNormalization
from audiorl.text import transform


def count_phrase(text: str, phrase: str) -> int:
    """Occurrences of `phrase` in `text`, on word boundaries where the phrase is in a spaced script."""
    text, phrase = text.casefold(), phrase.casefold().strip()
    if not phrase:
        return 0
    if re.search(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]", phrase):
        return text.count(phrase)
    return len(re.findall(rf"(?<!\w){re.escape(phrase)}(?!\w)", text))


def hotword_hits(hypothesis: str, hotwords: list[str], reference: str | None = None, *, strict: bool = False) -> tuple[int, int]:
    """(expected, found): how many of the record's hotwords should come out and how many of those
    the hypothesis has, matched case-insensitively on word boundaries. Expected are those the
    reference contains, when a reference is given; if it contains none, all of them (the reward's
    reading of a hotword list) or, with `strict` (evaluation's), none."""
    expected = [w for w in hotwords if reference is None or count_phrase(reference, w)]
    if not expected and not strict:
        expected = list(hotwords)
    return len(expected), sum(1 for w in expected if count_phrase(hypothesis, w))


def _hotword_totals(utterances: list[Utterance]) -> tuple[int, float | None]:
    """(hotwords expected, corpus recall) over utterances; recall None when none is expected."""
    expected = sum(u.hotwords_expected for u in utterances)
    return expected, (sum(u.hotwords_found for u in utterances) / expected if expected else None)


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
    expected, recall = _hotword_totals(utterances)
    return EvalResult(
        no_speech_clips=len(silent),
        no_speech_output_rate=sum(u.errors > 0 for u in silent) / len(silent) if silent else None,
        hotwords_expected=expected,
        hotword_recall=recall,
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
    pooled_result.hotwords_expected, pooled_result.hotword_recall = _hotword_totals(utterances)
    return pooled_result
