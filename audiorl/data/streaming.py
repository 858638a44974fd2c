"""Training without the up-front pass (`data.streaming: true`).

Today's default decodes every clip once before the first step, so that every bad record is named
before any compute is spent: right for thousands of clips, hours for a 10,000-hour corpus. With
streaming only the manifest is read up front (rows, not audio); each record is checked when
training reads it, exactly as the up-front pass would check it (`check_record`, the transcript
length). A bad record's place in its batch goes to the next good record of the training data, so
batches keep their size and every rank's order stays the one an uninterrupted run draws. Bad
records are counted by reason, written to `skipped_records.jsonl` and logged to MLflow as they
are met, and the run stops once they pass `data.max_bad_fraction` of the training records.
Under several ranks every rank hears of every rank's bad records at each step, so all count the
same and stop at the same step; rank 0 writes and logs them.

WebDataset shards under several ranks are dealt out (`own_shards`): each rank reads the headers
and the audio of its own shards only, never the others', and draws its batches from its own
samples (`rank_batches`: a seeded order, a weighted mixture's draws or batches by length, over
its own records), so no rank fetches the whole corpus.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from audiorl.audio import AudioLimits
from audiorl.data.batching import Plan, epoch_batches
from audiorl.data.collate import RecordDataset
from audiorl.data.mixture import Source, mixture_order
from audiorl.data.records import Record, check_record
from audiorl.errors import DataError
from audiorl.secrets import redact


class CheckedDataset(RecordDataset):
    """Records checked as they are read: an item is the record asked for or, when that one is bad,
    the next good one after it (its own index, so what is keyed by index stays right), with the bad
    records met on the way (`rejected`: (source, reason) pairs)."""

    def __init__(self, records: list[Record], limits: AudioLimits, text_check: Callable[[Record], None] | None = None):
        super().__init__(records, limits)
        self.text_check = text_check

    def __getitem__(self, index: int) -> dict[str, Any]:
        rejected: list[tuple[str, str]] = []
        for offset in range(len(self.records)):
            at = (index + offset) % len(self.records)
            record = self.records[at]
            try:
                wave = check_record(record, self.limits)
                if self.text_check is not None:
                    self.text_check(record)
            except DataError as exc:
                rejected.append((record.source, str(exc)))
                continue
            return {"index": at, "record": record, "waveform": wave, "rejected": rejected}
        raise DataError(f"no usable training records: all {len(self.records)} are bad (the first: {rejected[0][1]})")


class CollateWithRejections:
    """The method's collator, with the batch's bad records carried beside it (`rejected`) from the
    DataLoader's workers to the training process, where `BadRecords` reads them."""

    def __init__(self, collate: Callable[[list[dict[str, Any]]], dict[str, Any]]):
        self.collate = collate

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        rejected = [pair for item in items for pair in item.pop("rejected", [])]
        batch = self.collate(items)
        batch["rejected"] = rejected
        return batch


_NUMBERS = re.compile(r"\d+(\.\d+)?")


def reason_kind(reason: str) -> str:
    """What kind of bad record a message names, as a metric name: the message without where it
    was found, without what it quotes in parentheses or after a semicolon, numbers as n
    (`audio_file_not_found`, `clip_is_n_s_long_over_the_n_s_limit`)."""
    text = reason.split(": ", 1)[1] if ": " in reason else reason
    text = re.split(r" \(|;|: ", text, maxsplit=1)[0]
    text = _NUMBERS.sub("n", text.lower())
    return re.sub(r"[^a-z0-9]+", "_", text).strip("_")[:60] or "other"


def streamed_rows(path: Path) -> list[dict[str, Any]]:
    """The lines of a skipped-records file that streaming wrote (`"streamed": true`), parsed."""
    if not path.is_file():
        return []
    rows = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return [row for row in rows if row.get("streamed")]


def own_shards(shards: list, rank: int, world_size: int, label: str = "train data") -> list:
    """The shards rank `rank` reads: every `world_size`-th of the list, from its rank on."""
    if len(shards) < world_size:
        raise DataError(f"{label}: {len(shards)} WebDataset shard(s) for {world_size} ranks: with data.streaming each rank reads "
                        f"shards of its own, so give at least {world_size} (write the corpus as more, smaller shards), or turn "
                        f"data.streaming off")
    return shards[rank::world_size]


def rank_batches(sources: list[Source], batch_size: int, seed: int, rank: int, epoch: int, *, length: int | None = None,
                 plan: Plan | None = None) -> list[list[int]]:
    """A rank's micro-batches for an epoch over its own records (`sources`: where each source's
    records lie among them, and its weight). By length when `plan` is given (`duration_plan` of
    its own records, in the epoch's seeded order); otherwise its records in an order seeded by the
    seed, the epoch and the rank (a weighted mixture's draws when the sources have weights), cut
    into batches of `batch_size`. `length` is how many batches (the most any rank has, so that
    every rank takes as many steps; None: its own number): a rank with fewer begins its order
    again to fill them, as it fills a short last batch."""
    if plan is not None:
        own = epoch_batches(plan, seed, 0, epoch)
        length = length or len(own)
        return (own * math.ceil(length / len(own)))[:length]
    total = sum(s.count for s in sources)
    if any(s.weight is not None for s in sources):
        order = mixture_order(sources, seed, epoch, rank=rank)
    else:
        order = np.random.default_rng([seed, epoch, rank]).permutation(total).tolist()
    size = (length or math.ceil(total / batch_size)) * batch_size
    order = (order * math.ceil(size / total))[:size]
    return [order[start : start + batch_size] for start in range(0, size, batch_size)]


class BadRecords:
    """The training process's account of the bad records streaming meets: each counted once (by
    source), appended to `path` as it is met, logged (`data/bad_records`, and per kind
    `data/bad_records/KIND`), and the run stopped once there are more than `max_fraction` of
    `total`. A resumed run starts from the ones its earlier attempt wrote. Under several ranks,
    `gather` (every rank's list from each rank, a collective: every rank calls it at every batch)
    joins what the ranks met, and the main rank alone writes them."""

    def __init__(self, total: int, max_fraction: float, path: Path, *, log: Callable[[dict[str, float], int], None],
                 warn: Callable[[str], None], rank: int = 0, resume: bool = False,
                 gather: Callable[[list[tuple[str, str]]], list[list[tuple[str, str]]]] | None = None):
        self.total, self.max_fraction, self.path = total, max_fraction, path
        self.log, self.warn, self.rank, self.gather = log, warn, rank, gather
        self.seen: dict[str, str] = {}
        self.kinds: Counter[str] = Counter()
        if resume:
            for row in streamed_rows(path):
                if row["source"] not in self.seen:
                    self._count(row["source"], row["reason"])

    def _count(self, source: str, reason: str) -> str:
        self.seen[source] = reason
        kind = reason_kind(reason)
        self.kinds[kind] += 1
        return kind

    def __call__(self, batch: dict[str, Any], step: int) -> None:
        mine = [(s, r) for s, r in batch.pop("rejected", []) if s not in self.seen]
        met = [(rank, s, r) for rank, part in enumerate(self.gather(mine)) for s, r in part] if self.gather else \
            [(self.rank, s, r) for s, r in mine]
        if not met:
            return
        metrics: dict[str, float] = {}
        writes = self.gather is None or self.rank == 0
        with self.path.open("a", encoding="utf-8") if writes else contextlib.nullcontext() as out:
            for rank, source, reason in met:
                if source in self.seen:
                    continue
                kind = self._count(source, reason)
                if out is not None:
                    out.write(json.dumps({"source": redact(source), "reason": redact(reason), "streamed": True, "rank": rank}) + "\n")
                self.warn(f"[yellow]skipped a bad record: {reason}[/]")
                metrics[f"data/bad_records/{kind}"] = self.kinds[kind]
        metrics["data/bad_records"] = len(self.seen)
        self.log(metrics, step)
        if len(self.seen) > self.max_fraction * self.total:
            allowed = "none allowed (data.on_bad_record=error)" if self.max_fraction == 0 else \
                f"over data.max_bad_fraction={self.max_fraction:g}"
            first = next(iter(self.seen.values()))
            raise DataError(f"{len(self.seen)} of {self.total} training records are bad ({len(self.seen) / self.total:.1%}), {allowed}; "
                            f"the first: {first}. They are listed in {self.path}; fix them (audiorl data check finds every one), or "
                            "raise data.max_bad_fraction")
