"""Datasets over records and the collators that turn records into model inputs.

Collation runs in DataLoader workers when `data.num_workers > 0`: decoding, resampling, feature
extraction and tokenisation all happen there, off the training loop.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from audiorl.audio import AudioLimits
from audiorl.data.records import Record
from audiorl.models.base import ModelAdapter


class RecordDataset(Dataset):
    def __init__(self, records: list[Record], limits: AudioLimits):
        self.records = records
        self.limits = limits

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        return {"index": index, "record": record, "waveform": record.load(self.limits)}


def _clips(adapter: ModelAdapter, items: list[dict[str, Any]]) -> dict[str, Any]:
    """What every batch holds: the records' dataset indices and one set of audio features per clip."""
    return {
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        "features": adapter.features([item["waveform"] for item in items]),
    }


class PreferenceCollator:
    """-> {index, features, chosen_ids, rejected_ids}: one set of audio features per pair."""

    def __init__(self, adapter: ModelAdapter):
        self.adapter = adapter

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        records = [item["record"] for item in items]
        return {
            **_clips(self.adapter, items),
            "chosen_ids": self.adapter.target_ids([r.chosen for r in records]),
            "rejected_ids": self.adapter.target_ids([r.rejected for r in records]),
        }


class UnpairedCollator:
    """-> {index, features, completion_ids, desirable}: one transcript per clip and its label."""

    def __init__(self, adapter: ModelAdapter):
        self.adapter = adapter

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        records = [item["record"] for item in items]
        return {
            **_clips(self.adapter, items),
            "completion_ids": self.adapter.target_ids([r.completion for r in records]),
            "desirable": torch.tensor([bool(r.label) for r in records]),
        }


class TranscriptCollator:
    """-> {index, features, target_ids, references, columns}; `columns` holds, per clip, what
    rewards read: reference, language and every other record column (hotwords, no_speech, ...)."""

    def __init__(self, adapter: ModelAdapter):
        self.adapter = adapter

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        records = [item["record"] for item in items]
        references = [r.reference for r in records]
        columns: dict[str, list] = {"reference": references, "language": [r.language for r in records]}
        for key in sorted({k for r in records for k in r.extra}):
            columns[key] = [r.extra.get(key) for r in records]
        return {
            **_clips(self.adapter, items),
            "target_ids": self.adapter.target_ids(references),
            "references": references,
            "columns": columns,
        }
