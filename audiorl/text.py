"""Text normalisation before WER/CER, shared by evaluation and rewards (jiwer transforms)."""

from __future__ import annotations

from typing import Any

import jiwer

from audiorl.config import TextNormalization


def transform(normalization: TextNormalization, unit: str) -> jiwer.Compose:
    """A jiwer transform to lists of words (`unit="word"`) or characters (`unit="char"`)."""
    steps: list[Any] = []
    if normalization.lowercase:
        steps.append(jiwer.ToLowerCase())
    if normalization.remove_punctuation:
        steps.append(jiwer.RemovePunctuation())
    steps += [jiwer.RemoveMultipleSpaces(), jiwer.Strip()]
    steps.append(jiwer.ReduceToListOfListOfWords() if unit == "word" else jiwer.ReduceToListOfListOfChars())
    return jiwer.Compose(steps)
