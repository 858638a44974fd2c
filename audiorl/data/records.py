"""Records and manifests.

Three record kinds share one type:
- preference records `{audio, chosen, rejected, prompt?, language?}` for DPO/MPO, CPO, ORPO;
- unpaired records `{audio, completion, label, language?}` for KTO: one transcript of the clip,
  `label` true when it is desirable, false when not;
- transcript records `{audio, text, language?}` for SFT, GRPO, MWER and evaluation (a preference
  manifest can be evaluated too: its `chosen` transcript is the reference).

Sources: JSONL manifests (audio paths relative to the manifest's folder) and Hugging Face
datasets saved with `save_to_disk`. Each record remembers where it came from (`file:line` or
`dataset[row]`), so every later error can point at it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from audiorl.audio import AudioLimits, duration_seconds, load_audio
from audiorl.errors import DataError
from audiorl.progress import console, progress_bar

if TYPE_CHECKING:
    from audiorl.models.base import ModelAdapter

Kind = Literal["preference", "transcript", "unpaired"]


@dataclass
class Record:
    audio: str | bytes | np.ndarray
    source: str
    text: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    completion: str | None = None  # unpaired records: the transcript `label` judges
    label: bool | None = None
    prompt: str | None = None
    language: str | None = None
    sampling_rate: int | None = None  # only for in-memory arrays
    extra: dict[str, Any] = field(default_factory=dict)  # other columns (hotwords, no_speech, ...) for rewards

    @property
    def reference(self) -> str:
        """The transcript a hypothesis is scored against."""
        ref = self.text if self.text is not None else self.chosen
        if ref is None:
            raise DataError(f"{self.source}: record has neither 'text' nor 'chosen' to score against")
        return ref

    def duration(self) -> float:
        return duration_seconds(self.audio, self.sampling_rate)

    def load(self, limits: AudioLimits) -> np.ndarray:
        return load_audio(self.audio, limits, source_rate=self.sampling_rate, where=self.source)


_OPTIONAL_TEXT = ("prompt", "language")
_KNOWN = {"audio", "text", "chosen", "rejected", "completion", "label", *_OPTIONAL_TEXT}


def _text_field(row: dict[str, Any], key: str, where: str, required: bool) -> str | None:
    value = row.get(key)
    if value is None:
        if required:
            raise DataError(f"{where}: missing required key {key!r}")
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{where}: {key!r} is empty; every record needs a non-empty transcript")
    return value


def record_from_row(row: Any, where: str, kind: Kind, base_dir: Path | None) -> Record:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(row).__name__}")
    if "audio" not in row or row["audio"] in (None, ""):
        raise DataError(f"{where}: missing required key 'audio' (a path relative to the manifest)")
    audio = row["audio"]
    sampling_rate = None
    if isinstance(audio, str):
        path = Path(audio)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        audio = str(path)
    elif isinstance(audio, dict):  # a Hugging Face Audio column
        if audio.get("bytes"):
            audio = audio["bytes"]
        elif audio.get("array") is not None:
            sampling_rate = audio.get("sampling_rate")
            audio = np.asarray(audio["array"], dtype=np.float32)
        elif audio.get("path"):
            path = Path(audio["path"])
            audio = str(path if path.is_absolute() or base_dir is None else base_dir / path)
        else:
            raise DataError(f"{where}: 'audio' holds neither bytes, an array nor a path")
    else:
        raise DataError(f"{where}: 'audio' must be a path string, got {type(audio).__name__}")
    record = Record(audio=audio, source=where, sampling_rate=sampling_rate)
    if kind == "preference":
        record.chosen = _text_field(row, "chosen", where, required=True)
        record.rejected = _text_field(row, "rejected", where, required=True)
    elif kind == "unpaired":
        record.completion = _text_field(row, "completion", where, required=True)
        if not isinstance(row.get("label"), bool):
            raise DataError(f"{where}: 'label' must be true (a desirable completion) or false (an undesirable one), "
                            f"got {row.get('label')!r}")
        record.label = row["label"]
    elif row.get("no_speech") is True:
        # a clip with no speech in it: its reference is the empty transcript
        record.text = _text_field(row, "text", where, required=False) or ""
    else:
        has_text = row.get("text") is not None
        record.text = _text_field(row, "text", where, required=has_text or row.get("chosen") is None)
        if not has_text:
            record.chosen = _text_field(row, "chosen", where, required=True)
    for key in _OPTIONAL_TEXT:
        setattr(record, key, _text_field(row, key, where, required=False))
    hotwords = row.get("hotwords")
    if hotwords is not None and not (isinstance(hotwords, list) and all(isinstance(h, str) and h.strip() for h in hotwords)):
        raise DataError(f"{where}: 'hotwords' must be a list of non-empty strings, got {hotwords!r}")
    record.extra = {k: v for k, v in row.items() if k not in _KNOWN}
    return record


def read_jsonl(path: Path, kind: Kind) -> list[Record]:
    records = []
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot open manifest ({exc.strerror})") from None
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            records.append(record_from_row(row, where, kind, path.parent))
    if not records:
        raise DataError(f"{path}: manifest has no records")
    return records


def read_hf_dataset(path: Path, kind: Kind) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{path}: not a dataset written by save_to_disk ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{path}: holds splits {list(ds)}; point at one split's folder, e.g. {path / next(iter(ds))}")
    if "audio" not in ds.column_names:
        raise DataError(f"{path}: dataset has no 'audio' column (columns: {ds.column_names})")
    if isinstance(ds.features["audio"], datasets.Audio):
        # decode ourselves (soundfile) rather than through the datasets decoder
        ds = ds.cast_column("audio", datasets.Audio(decode=False))
    return [record_from_row(row, f"{path}[{i}]", kind, path) for i, row in enumerate(ds)]


def read_records(path: str | Path, kind: Kind) -> list[Record]:
    """Read a JSONL manifest or a saved Hugging Face dataset."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: manifest or dataset not found")
    if path.is_dir():
        return read_hf_dataset(path, kind)
    return read_jsonl(path, kind)


@dataclass
class Rejected:
    source: str
    reason: str


def validate_records(
    records: list[Record],
    limits: AudioLimits,
    *,
    on_bad: Literal["error", "skip"] = "error",
    text_check=None,
    description: str = "checking audio",
) -> tuple[list[Record], list[Rejected]]:
    """Decode every clip once before training so bad records surface now, with their line numbers.

    `text_check(record)` may raise DataError for transcripts the model cannot take (too long).
    With on_bad="error" the first bad records stop the run; with "skip" they are returned apart.
    """
    good: list[Record] = []
    bad: list[Rejected] = []
    with progress_bar(description, total=len(records)) as advance:
        for record in records:
            try:
                record.load(limits)
                if text_check is not None:
                    text_check(record)
                good.append(record)
            except DataError as exc:
                bad.append(Rejected(record.source, str(exc)))
            advance()
    if bad and on_bad == "error":
        shown = "; ".join(r.reason for r in bad[:3])
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise DataError(
            f"{len(bad)} bad record(s): {shown}{more}. Fix them, or set data.on_bad_record=skip to skip and count them"
        )
    if not good:
        raise DataError("no usable records left after checking the data")
    return good, bad


def transcript_length_check(adapter: ModelAdapter, max_tokens: int, kind: Kind):
    """A `text_check` for `validate_records`: every transcript of a record fits in `max_tokens`
    of the model's tokens."""

    def check(record: Record) -> None:
        texts = {"preference": [record.chosen, record.rejected], "unpaired": [record.completion]}.get(kind) or [record.reference]
        for text, ids in zip(texts, adapter.target_ids(texts)):
            if len(ids) > max_tokens:
                raise DataError(
                    f"{record.source}: transcript {text[:30]!r}... is {len(ids)} tokens, over the limit of "
                    f"{max_tokens} (data.max_target_tokens / the model's maximum)"
                )

    return check


def load_records(
    path: str | Path, adapter: ModelAdapter, limits: AudioLimits, kind: Kind, *, on_bad: Literal["error", "skip"],
    max_tokens: int | None, label: str,
) -> tuple[list[Record], list[Rejected]]:
    """Read a manifest (or saved dataset) and check every record for this model: the clip
    decodes within `limits`, the transcripts fit the model (and `max_tokens`). Bad records stop
    here, named by file and line, or (`on_bad="skip"`) come back apart, counted on the console."""
    records = read_records(path, kind)
    limit = min(max_tokens or adapter.max_target_tokens, adapter.max_target_tokens)
    good, bad = validate_records(
        records, limits, on_bad=on_bad, text_check=transcript_length_check(adapter, limit, kind), description=f"checking {label}"
    )
    if bad:
        console.print(f"[yellow]{label}: skipped {len(bad)} of {len(records)} records (data.on_bad_record=skip)[/]")
    return good, bad


def fingerprint(records: list[Record]) -> str:
    """A hash of the records' content: transcripts, and audio by path, size and mtime (or bytes)."""
    digest = hashlib.sha256()
    for record in records:
        content = [record.text, record.chosen, record.rejected, record.prompt, record.language, record.extra]
        if record.completion is not None:  # unpaired records (the other kinds keep the fingerprints they had)
            content += [record.completion, record.label]
        digest.update(json.dumps(content, default=str).encode())
        if isinstance(record.audio, str):
            try:
                stat = Path(record.audio).stat()
                digest.update(f"{record.audio}|{stat.st_size}|{stat.st_mtime_ns}".encode())
            except OSError:
                digest.update(record.audio.encode())
        elif isinstance(record.audio, bytes):
            digest.update(hashlib.sha256(record.audio).digest())
        else:
            digest.update(np.ascontiguousarray(record.audio).tobytes())
    return digest.hexdigest()[:16]
