"""The built-in ASR rewards. Each is a small function of (completions, **columns).

Columns they read (from the record): `reference` (the transcript; `text` or `chosen` in a
manifest), `hotwords` (a list of strings), `language` (a code such as "en", "zh"), `no_speech`
(true for clips with no speech in them).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import jiwer

from audiorl.config import TextNormalization
from audiorl.scoring import count_phrase, hotword_hits
from audiorl.text import transform

Rewards = list[float | None]


def _norm_words(text: str, normalization: TextNormalization) -> list[str]:
    return transform(normalization, "word")([text])[0] if text.strip() else []


def error_rate(reference: str, hypothesis: str, normalization: TextNormalization, unit: str) -> float:
    """WER or CER of one utterance; an empty reference gives 0 for an empty hypothesis, else 1."""
    to_units = transform(normalization, unit)
    ref_units = to_units([reference])[0] if reference.strip() else []
    if not ref_units:
        hyp_units = to_units([hypothesis])[0] if hypothesis.strip() else []
        return 0.0 if not hyp_units else 1.0
    process = jiwer.process_words if unit == "word" else jiwer.process_characters
    out = process([reference], [hypothesis], reference_transform=to_units, hypothesis_transform=to_units)
    return float(out.wer if unit == "word" else out.cer)


def _per_record(values, n: int, name: str) -> list:
    if values is None:
        raise ValueError(f"this reward needs the record column {name!r}")
    if isinstance(values, str) or not isinstance(values, Sequence):
        return [values] * n
    if len(values) != n:
        raise ValueError(f"column {name!r} has {len(values)} values for {n} completions")
    return list(values)


def wer(completions: list[str], reference=None, normalization: TextNormalization | None = None, **_) -> Rewards:
    """Accuracy reward 1 − WER, clipped at 0 (a hypothesis with more errors than words gets 0)."""
    refs = _per_record(reference, len(completions), "reference")
    norm = normalization or TextNormalization()
    return [max(0.0, 1.0 - error_rate(r, h, norm, "word")) for r, h in zip(refs, completions)]


def cer(completions: list[str], reference=None, normalization: TextNormalization | None = None, **_) -> Rewards:
    """1 − CER, clipped at 0: the accuracy reward for languages written without spaces."""
    refs = _per_record(reference, len(completions), "reference")
    norm = normalization or TextNormalization()
    return [max(0.0, 1.0 - error_rate(r, h, norm, "char")) for r, h in zip(refs, completions)]


def hotword(completions: list[str], hotwords=None, reference=None, mode: str = "recall", **_) -> Rewards:
    """How well the record's hotwords come out.

    recall: share of the hotwords (that the reference contains, when a reference is given) found
    in the hypothesis; precision: share of hotword occurrences in the hypothesis that the
    reference backs; f1: their harmonic mean. None for records without hotwords.
    """
    n = len(completions)
    words = _per_record(hotwords, n, "hotwords") if hotwords is not None else [None] * n
    refs = _per_record(reference, n, "reference") if reference is not None else [None] * n
    out: Rewards = []
    for hyp, hws, ref in zip(completions, words, refs):
        if not hws:
            out.append(None)
            continue
        expected, found = hotword_hits(hyp, hws, ref)
        recall = found / expected if expected else 1.0
        said = sum(count_phrase(hyp, w) for w in hws)
        backed = sum(min(count_phrase(hyp, w), count_phrase(ref, w) if ref is not None else count_phrase(hyp, w)) for w in hws)
        precision = backed / said if said else 1.0
        if mode == "recall":
            out.append(recall)
        elif mode == "precision":
            out.append(precision)
        elif mode == "f1":
            out.append(0.0 if recall + precision == 0 else 2 * recall * precision / (recall + precision))
        else:
            raise ValueError(f"hotword mode must be recall, precision or f1, not {mode!r}")
    return out


def _repetition_loop(words: list[str], min_repeats: int, max_ngram: int) -> bool:
    """True when some n-gram (n <= max_ngram) repeats `min_repeats` times back to back."""
    for n in range(1, max_ngram + 1):
        for start in range(0, len(words) - n * min_repeats + 1):
            gram = words[start : start + n]
            if all(words[start + k * n : start + (k + 1) * n] == gram for k in range(1, min_repeats)):
                return True
    return False


def hallucination(
    completions: list[str],
    reference=None,
    no_speech=None,
    min_repeats: int = 4,
    max_ngram: int = 4,
    length_ratio: float = 2.0,
    length_slack: int = 4,
    **_,
) -> Rewards:
    """A penalty: −1 for a hallucinated transcript, 0 otherwise.

    Hallucinated means any of: a repetition loop (an n-gram of up to `max_ngram` words repeated
    `min_repeats` times in a row), output longer than `length_ratio` × the reference plus
    `length_slack` words, or any output at all on a clip with no speech (`no_speech` true or an
    empty reference).
    """
    n = len(completions)
    refs = _per_record(reference, n, "reference") if reference is not None else [None] * n
    silent = _per_record(no_speech, n, "no_speech") if no_speech is not None else [False] * n
    norm = TextNormalization()
    out: Rewards = []
    for hyp, ref, quiet in zip(completions, refs, silent):
        words = _norm_words(hyp, norm)
        ref_words = _norm_words(ref, norm) if ref is not None else None
        no_speech_clip = bool(quiet) or (ref_words is not None and not ref_words)
        bad = (
            (no_speech_clip and bool(words))
            or _repetition_loop(words, min_repeats, max_ngram)
            or (ref_words is not None and len(words) > length_ratio * len(ref_words) + length_slack)
        )
        out.append(-1.0 if bad else 0.0)
    return out


# language code -> the Unicode script its transcripts are written in
_SCRIPTS = {
    "zh": "CJK", "yue": "CJK", "ja": "JAPANESE", "ko": "HANGUL", "ru": "CYRILLIC", "uk": "CYRILLIC", "bg": "CYRILLIC",
    "mk": "CYRILLIC", "sr": "CYRILLIC", "ar": "ARABIC", "fa": "ARABIC", "ur": "ARABIC", "he": "HEBREW", "hi": "DEVANAGARI",
    "mr": "DEVANAGARI", "ne": "DEVANAGARI", "th": "THAI", "el": "GREEK", "ka": "GEORGIAN", "hy": "ARMENIAN",
    "bn": "BENGALI", "ta": "TAMIL", "te": "TELUGU",
}


def script_of(char: str) -> str | None:
    """The script of a letter, from its Unicode name; None for digits, punctuation, spaces."""
    if not char.isalpha():
        return None
    name = unicodedata.name(char, "")
    if name.startswith("CJK") or "IDEOGRAPH" in name:
        return "CJK"
    if name.startswith(("HIRAGANA", "KATAKANA")):
        return "JAPANESE"
    for script in ("LATIN", "CYRILLIC", "ARABIC", "HEBREW", "DEVANAGARI", "THAI", "GREEK", "GEORGIAN", "ARMENIAN",
                   "BENGALI", "TAMIL", "TELUGU", "HANGUL"):
        if name.startswith(script):
            return script
    return "OTHER"


def language(completions: list[str], language=None, threshold: float = 0.8, **_) -> Rewards:
    """1 when at least `threshold` of the transcript's letters are in the script of the record's
    language (Latin for languages not listed), else 0. Japanese accepts kana and kanji. None for
    records without a language; 1 for an empty transcript (nothing in a wrong language)."""
    langs = _per_record(language, len(completions), "language") if language is not None else [None] * len(completions)
    out: Rewards = []
    for hyp, lang in zip(completions, langs):
        if not lang:
            out.append(None)
            continue
        expected = _SCRIPTS.get(str(lang).lower().split("-")[0], "LATIN")
        allowed = {"JAPANESE", "CJK"} if expected == "JAPANESE" else {expected}
        scripts = [s for s in map(script_of, hyp) if s is not None]
        if not scripts:
            out.append(1.0)
            continue
        share = sum(s in allowed for s in scripts) / len(scripts)
        out.append(1.0 if share >= threshold else 0.0)
    return out


def length(completions: list[str], reference=None, **_) -> Rewards:
    """−|words(hyp) − words(ref)| / max(words(ref), 1), floored at −1: discourages both truncated
    and padded transcripts (and offsets the short-hypothesis bias of pure accuracy rewards)."""
    refs = _per_record(reference, len(completions), "reference")
    norm = TextNormalization()
    out: Rewards = []
    for hyp, ref in zip(completions, refs):
        n_ref = len(_norm_words(ref, norm))
        diff = abs(len(_norm_words(hyp, norm)) - n_ref) / max(n_ref, 1)
        out.append(-min(1.0, diff))
    return out


REWARDS = {"wer": wer, "cer": cer, "hotword": hotword, "hallucination": hallucination, "language": language, "length": length}
