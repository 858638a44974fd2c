"""Text normalisation before WER/CER, shared by evaluation and rewards (jiwer transforms)."""

from __future__ import annotations

import functools
from typing import Any

import jiwer

from audiorl.config import TextNormalization


class _Whisper(jiwer.AbstractTransform):
    """Whisper's text normalisers (the `whisper-normalizer` package): "at seven thirty" becomes
    "at 730", "Mr." becomes "mister", "colour" becomes "color", fillers go."""

    def __init__(self, kind: str):
        if kind == "whisper_english":
            from whisper_normalizer.english import EnglishTextNormalizer

            self.normalize = EnglishTextNormalizer()
        else:
            from whisper_normalizer.basic import BasicTextNormalizer

            self.normalize = BasicTextNormalizer()

    def process_string(self, s: str) -> str:
        return self.normalize(s)


@functools.cache
def _whisper(kind: str) -> _Whisper:
    return _Whisper(kind)  # building the English one reads its spelling table: once per process


def transform(normalization: TextNormalization, unit: str) -> jiwer.Compose:
    """A jiwer transform to lists of words (`unit="word"`) or characters (`unit="char"`)."""
    steps: list[Any] = []
    if normalization.normalizer != "plain":
        steps.append(_whisper(normalization.normalizer))
    if normalization.lowercase:
        steps.append(jiwer.ToLowerCase())
    if normalization.remove_punctuation:
        steps.append(jiwer.RemovePunctuation())
    steps += [jiwer.RemoveMultipleSpaces(), jiwer.Strip()]
    steps.append(jiwer.ReduceToListOfListOfWords() if unit == "word" else jiwer.ReduceToListOfListOfChars())
    return jiwer.Compose(steps)
