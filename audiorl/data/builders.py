"""Dataset builders that run a model: preference pairs from sampled N-best lists, hard-case
(reward-shaping) sets, a record-by-record manifest check, and WebDataset shard indexes.

Pairs follow the correctness recipe of the MPO paper's data pipeline mapped to ASR: sample N
hypotheses, rank them against the reference, keep pairs with a clear margin. The DropoutNTP
option builds the rejected side the other way: keep the first part of the reference and let the
model continue it with the audio masked (silence) or noised, which yields the fluent but unfounded
text a recognizer hallucinates.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from audiorl import storage
from audiorl.audio import AudioLimits, header
from audiorl.config import TextNormalization
from audiorl.data.records import (
    Format,
    Kind,
    Record,
    check_record,
    detect_format,
    is_webdataset,
    iter_manifest,
    read_records,
    shard_paths,
    write_shard_index,
)
from audiorl.errors import DataError
from audiorl.models.base import ModelAdapter
from audiorl.progress import progress_bar
from audiorl.rewards.asr import error_rate, hallucination, hotword
from audiorl.rollout import SamplingSettings, sample

PairPolicy = Literal["best-worst", "reference-worst", "all"]


@dataclass
class BuildSummary:
    clips: int = 0
    kept: int = 0
    rows: int = 0
    reasons: Counter = field(default_factory=Counter)

    def lines(self) -> list[str]:
        out = [f"{self.clips} clips read, {self.kept} yielded rows, {self.rows} rows written"]
        out += [f"  {count:6d}  {reason}" for reason, count in self.reasons.most_common()]
        return out


def _audio_fields(record: Record, out_dir: Path) -> dict[str, Any]:
    """Where the clip is, as the new manifest should hold it: its path relative to the new
    manifest when possible, and the segment (`offset`, `duration`) of a longer recording."""
    if not isinstance(record.audio, str):
        raise DataError(f"{record.source}: builders need audio stored as files (got in-memory audio)")
    if storage.is_url(record.audio):
        return {"audio": record.audio, **record.audio_fields()}  # remote clips stay where they are
    try:
        path = str(Path(record.audio).resolve().relative_to(out_dir.resolve()))
    except ValueError:
        path = str(Path(record.audio).resolve())
    return {"audio": path, **record.audio_fields()}


def _batches(records: list[Record], size: int):
    for start in range(0, len(records), size):
        yield records[start : start + size]


def write_jsonl(rows: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def _scores(reference: str, hypotheses: list[str], normalization: TextNormalization) -> list[float]:
    return [error_rate(reference, h, normalization, "word") for h in hypotheses]


def build_pairs(
    adapter: ModelAdapter,
    records: list[Record],
    limits: AudioLimits,
    out_path: str | Path,
    *,
    num_samples: int = 8,
    sampling: SamplingSettings | None = None,
    policy: PairPolicy = "best-worst",
    min_wer_margin: float = 0.1,
    max_pairs_per_clip: int = 4,
    dropout_ntp: Literal["mask", "noise"] | None = None,
    start_ratio: float = 0.5,
    batch_size: int = 8,
    normalization: TextNormalization | None = None,
    seed: int = 0,
    output_format: Literal["pairs", "unpaired"] = "pairs",
    good_wer: float = 0.1,
    bad_wer: float = 0.3,
) -> BuildSummary:
    """Sample hypotheses per clip, rank them by WER against the reference, write preference rows:
    pairs `{audio, chosen, rejected}`, or (`output_format="unpaired"`, for KTO) one row per
    transcript `{audio, completion, label}`, desirable at WER <= `good_wer`, undesirable at WER >=
    `bad_wer` (what lies between is left out and counted)."""
    if output_format == "unpaired" and dropout_ntp:
        raise DataError("unpaired rows come from sampled hypotheses; DropoutNTP builds pairs only")
    if output_format == "unpaired" and not 0 <= good_wer < bad_wer:
        raise DataError(f"the good WER ({good_wer}) must be at least 0 and below the bad WER ({bad_wer})")
    norm = normalization or TextNormalization()
    settings = dataclasses.replace(sampling or SamplingSettings(), num_generations=num_samples)  # the caller's stays as it was
    out_dir = Path(out_path).parent
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    summary = BuildSummary()
    adapter.model.eval()
    with progress_bar("building pairs", total=len(records)) as advance:
        for chunk in _batches(records, batch_size):
            waves = [r.load(limits) for r in chunk]
            with torch.no_grad():
                context = adapter.encode(adapter.features(waves))
                rollout = None if dropout_ntp else sample(adapter, context, settings, generator=generator)
            for i, record in enumerate(chunk):
                summary.clips += 1
                if not record.reference.strip():
                    made = "no speech in the clip (an empty transcript cannot be chosen)"
                elif dropout_ntp:
                    made = _dropout_ntp_pair(adapter, record, waves[i], dropout_ntp, start_ratio, settings, rng, norm)
                else:
                    hyps = rollout.texts[i * num_samples : (i + 1) * num_samples]
                    if output_format == "unpaired":
                        made = _label_hypotheses(record, hyps, policy, good_wer, bad_wer, max_pairs_per_clip, norm)
                    else:
                        made = _rank_pairs(record, hyps, policy, min_wer_margin, max_pairs_per_clip, norm)
                if isinstance(made, str):
                    summary.reasons[made] += 1
                elif output_format == "unpaired":
                    summary.kept += 1
                    for completion, label, wer in made:
                        rows.append({**_audio_fields(record, out_dir), "completion": completion, "label": label, "wer": round(wer, 4),
                                     **({"language": record.language} if record.language else {}), "source": record.source})
                        summary.reasons["desirable rows" if label else "undesirable rows"] += 1
                else:
                    summary.kept += 1
                    for chosen, rejected, c_wer, r_wer in made:
                        rows.append(
                            {
                                **_audio_fields(record, out_dir),
                                "chosen": chosen,
                                "rejected": rejected,
                                "chosen_wer": round(c_wer, 4),
                                "rejected_wer": round(r_wer, 4),
                                **({"language": record.language} if record.language else {}),
                                "source": record.source,
                            }
                        )
            advance(len(chunk))
    summary.rows = len(rows)
    summary.reasons["clips with pairs"] = summary.kept
    write_jsonl(rows, out_path)
    return summary


def _rank_pairs(record, hyps, policy, margin, max_pairs, norm):
    reference = record.reference
    # an empty sample cannot be a record (manifests refuse empty transcripts): it takes no part
    distinct = [h for h in dict.fromkeys(h.strip() for h in hyps) if h]
    if not distinct:
        return "every sample empty"
    scored = sorted(zip(_scores(reference, distinct, norm), distinct))
    if policy == "reference-worst":
        worst_wer, worst = scored[-1]
        if worst_wer < margin:
            return "every sample within the margin of the reference (nothing to reject)"
        return [(reference, worst, 0.0, worst_wer)]
    if len(distinct) < 2:
        return "all samples identical"
    if policy == "best-worst":
        (best_wer, best), (worst_wer, worst) = scored[0], scored[-1]
        if worst_wer - best_wer < margin:
            return "best and worst samples closer than the margin"
        return [(best, worst, best_wer, worst_wer)]
    pairs = [(a, b) for a, b in combinations(scored, 2) if b[0] - a[0] >= margin]
    if not pairs:
        return "no two samples differ by the margin"
    pairs.sort(key=lambda p: p[1][0] - p[0][0], reverse=True)
    return [(a[1], b[1], a[0], b[0]) for a, b in pairs[:max_pairs]]


def _label_hypotheses(record, hyps, policy, good, bad, max_rows, norm):
    """KTO's unpaired rows for one clip: (transcript, desirable?, WER). `policy` picks which
    transcripts are judged, as for pairs: the best and the worst sample (best-worst), the reference
    and the worst sample (reference-worst), or every distinct sample (all, at most `max_rows` of
    each label)."""
    distinct = [h for h in dict.fromkeys(h.strip() for h in hyps) if h]
    if not distinct:
        return "every sample empty"
    scored = sorted(zip(_scores(record.reference, distinct, norm), distinct))
    if policy == "reference-worst":
        candidates = [(0.0, record.reference), scored[-1]]
    elif policy == "best-worst":
        candidates = [scored[0], scored[-1]] if len(scored) > 1 else scored
    else:
        candidates = scored
    good_rows = [(text, True, wer) for wer, text in candidates if wer <= good][:max_rows if policy == "all" else 1]
    bad_rows = [(text, False, wer) for wer, text in reversed(candidates) if wer >= bad][:max_rows if policy == "all" else 1]
    if not good_rows and not bad_rows:
        return "no transcript at or below the good WER or at or above the bad WER"
    return good_rows + bad_rows


def _dropout_ntp_pair(adapter, record, wave, how, start_ratio, settings, rng, norm):
    reference = record.reference
    target = adapter.target_ids([reference])[0][:-1]
    keep = max(1, int(len(target) * start_ratio))
    if len(target) < 2:
        return "reference too short to continue"
    if how == "mask":
        degraded = np.zeros_like(wave)
    else:
        scale = float(np.sqrt(np.mean(wave**2))) or 0.01
        degraded = (rng.standard_normal(wave.shape) * scale).astype(np.float32)
    with torch.no_grad():
        context = adapter.encode(adapter.features([degraded]))
        out = adapter.generate(
            context, max_new_tokens=settings.max_new_tokens, do_sample=True, temperature=settings.temperature,
            top_p=settings.top_p, top_k=settings.top_k, prefix=target[:keep],
        )
    rejected = adapter.decode([target[:keep] + out.token_ids[0]])[0]
    r_wer = error_rate(reference, rejected, norm, "word")
    if r_wer == 0.0:
        return "continuation without audio reproduced the reference"
    return [(reference, rejected, 0.0, r_wer)]


def find_hard_cases(
    adapter: ModelAdapter,
    records: list[Record],
    limits: AudioLimits,
    out_path: str | Path,
    *,
    wer_threshold: float = 0.3,
    num_samples: int = 4,
    disagreement_threshold: float = 0.3,
    easy_fraction: float = 0.1,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    normalization: TextNormalization | None = None,
    seed: int = 0,
) -> BuildSummary:
    """Keep the clips the model fails on, with why, plus `easy_fraction` of the rest.

    A clip is hard when its greedy WER is at least `wer_threshold`, when its sampled hypotheses
    disagree (mean pairwise WER at least `disagreement_threshold`), when a hotword is missed, or
    when the greedy transcript is a hallucination (loops, far too long, speech on silence).
    Rows keep the columns the rewards read (text, language, hotwords, no_speech).
    """
    norm = normalization or TextNormalization()
    settings = SamplingSettings(num_generations=num_samples, max_new_tokens=max_new_tokens)
    generator = torch.Generator().manual_seed(seed)
    pick = random.Random(seed)
    out_dir = Path(out_path).parent
    hard, easy = [], []
    summary = BuildSummary()
    adapter.model.eval()
    with progress_bar("finding hard cases", total=len(records)) as advance:
        for chunk in _batches(records, batch_size):
            with torch.no_grad():
                context = adapter.encode(adapter.features([r.load(limits) for r in chunk]))
                greedy = adapter.generate(context, max_new_tokens=max_new_tokens).texts
                rollout = sample(adapter, context, settings, generator=generator)
            for i, record in enumerate(chunk):
                summary.clips += 1
                reference = record.reference
                g_wer = error_rate(reference, greedy[i], norm, "word")
                hyps = rollout.texts[i * num_samples : (i + 1) * num_samples]
                pairwise = [error_rate(a, b, norm, "word") for a, b in combinations(hyps, 2)]
                disagreement = float(np.mean(pairwise)) if pairwise else 0.0
                reasons = []
                if g_wer >= wer_threshold:
                    reasons.append("high_wer")
                if disagreement >= disagreement_threshold:
                    reasons.append("hypotheses_disagree")
                hotwords = record.extra.get("hotwords")
                if hotwords and hotword([greedy[i]], hotwords=[hotwords], reference=[reference])[0] < 1.0:
                    reasons.append("missed_hotword")
                if hallucination([greedy[i]], reference=[reference], no_speech=[record.extra.get("no_speech", False)])[0] < 0:
                    reasons.append("hallucination")
                row = {
                    **_audio_fields(record, out_dir),
                    "text": reference,
                    **({"language": record.language} if record.language else {}),
                    **{k: v for k, v in record.extra.items() if k in ("hotwords", "no_speech")},
                    "greedy": greedy[i],
                    "greedy_wer": round(g_wer, 4),
                    "disagreement": round(disagreement, 4),
                    "hard_reasons": reasons,
                    "source": record.source,
                }
                (hard if reasons else easy).append(row)
                for reason in reasons:
                    summary.reasons[reason] += 1
            advance(len(chunk))
    keep_easy = pick.sample(easy, k=int(round(len(easy) * easy_fraction)))
    summary.reasons["easy clips kept against forgetting"] = len(keep_easy)
    summary.reasons["easy clips dropped"] = len(easy) - len(keep_easy)
    summary.kept = len(hard)
    rows = hard + keep_easy
    summary.rows = len(rows)
    write_jsonl(rows, out_path)
    return summary


@dataclass
class CheckReport:
    records: int = 0
    problems: list[str] = field(default_factory=list)
    rates: Counter = field(default_factory=Counter)
    seconds: float = 0.0


def check_manifest(path: str | Path, kind: Kind, limits: AudioLimits, format: Format = "auto") -> CheckReport:
    """Every problem of every record, by line: JSON, keys, types, empty text, hotwords, audio
    (readable, complete, not empty, finite, not too short or long, not silence under a
    transcript: `check_record`, as training checks it). Also counts native sampling rates. Any
    format `read_records` takes; a saved dataset's rows are named by index."""
    path = storage.location(path)
    report = CheckReport()
    if format == "auto" and is_webdataset(path):
        format = "webdataset"
    if format != "webdataset" and not storage.exists(path):  # shards are looked for one by one
        raise DataError(f"{path}: manifest or dataset not found")
    format = detect_format(path) if format == "auto" else format
    if format == "hf":
        rows = [(record.source, [record]) for record in read_records(path, kind, "hf")]
    else:
        rows = list(iter_manifest(path, kind, format))
    with progress_bar("checking records", total=len(rows)) as advance:
        for _, got in rows:
            advance()
            report.records += 1
            if isinstance(got, DataError):
                report.problems.append(str(got))
                continue
            for record in got:
                try:
                    wave = check_record(record, limits)
                    report.seconds += len(wave) / limits.sampling_rate
                    found = header(record.audio) if isinstance(record.audio, str) else None
                    if found:
                        report.rates[found[0]] += 1
                except DataError as exc:
                    report.problems.append(str(exc))
    if report.records == 0:
        report.problems.append(f"{path}: manifest has no records")
    return report


def index_shards(locations: list[str]) -> list[tuple[str, str, int]]:
    """Write the index of every shard the locations name (`train-{000000..000099}.tar` is a
    range), next to each shard: (shard, its index, its samples) per shard."""
    shards = [shard for location in locations for shard in shard_paths(str(location))]
    for shard in shards:
        if not str(shard).endswith(".tar"):
            raise DataError(f"{shard}: not a tar shard (a WebDataset shard's name ends in .tar)")
    done: list[tuple[str, str, int]] = []
    stats = storage.Stats()
    with progress_bar("indexing shards", total=len(shards)) as advance:
        for shard in shards:
            index, samples = write_shard_index(str(shard), stats)
            done.append((str(shard), index, samples))
            advance()
    return done
