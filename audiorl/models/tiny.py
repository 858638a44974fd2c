"""Helpers for building tiny models offline (tests, examples, the quickstart, benchmarks)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path


def train_byte_bpe(texts: list[str], vocab_size: int, special_tokens: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE trained on `texts` (each with a leading space, as speech transcripts are
    tokenised); returns (vocab, merges) for a transformers tokenizer class. `special_tokens` take
    the first ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=special_tokens,
        show_progress=False,
    )
    bpe.train_from_iterator([" " + t.strip() for t in texts] + [t.strip() for t in texts], trainer=trainer)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bpe.json"
        bpe.save(str(path))
        spec = json.loads(path.read_text())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    return spec["vocab"], merges
