"""Records and manifests.

Three record kinds share one type:
- preference records `{audio, chosen, rejected, prompt?, language?}` for DPO/MPO, CPO, ORPO;
- unpaired records `{audio, completion, label, language?}` for KTO: one transcript of the clip,
  `label` true when it is desirable, false when not;
- transcript records `{audio, text, language?}` for SFT, GRPO, MWER and evaluation (a preference
  manifest can be evaluated too: its `chosen` transcript is the reference).

Sources, told apart by their content or named by `format`:
- `audiorl`: JSONL manifests as above (audio paths relative to the manifest's folder; optional
  `offset` and `duration`, in seconds, take a segment of a longer recording);
- `nemo`: NeMo ASR manifests, JSONL with `audio_filepath`, `duration`, `text` and optionally
  `offset`, `lang`, `speaker_id` (and Canary's `taskname`, `source_lang`, `target_lang`, `pnc`,
  kept for rewards); only the segment is decoded;
- `lhotse`: Lhotse cut manifests (`.jsonl` or `.jsonl.gz`, read through `lhotse`, an optional
  extra), one record per supervision of each cut;
- `hf`: Hugging Face datasets saved with `save_to_disk`, their `Audio` column decoded or not;
- `webdataset`: tar shards (`train-000000.tar`, or `train-{000000..000099}.tar` for a range),
  a sample per key: its audio member (`KEY.wav`, `.flac`, `.mp3`, `.ogg`) and its fields in
  `KEY.json` (or its transcript in `KEY.txt`); only the tar headers and the small text members are
  read up front (or the shard's index, `SHARD.index.json` from `write_shard_index`, when it has
  one), the audio is read from its place in the shard when it is used.
Any JSONL may be gzipped (`.gz`). Each record remembers where it came from (`file:line`,
`file:line (cut ID)`, `dataset[row]` or `shard.tar:KEY`), so every later error can point at it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from audiorl import storage
from audiorl.audio import AudioLimits, check_complete, duration_seconds, load_audio
from audiorl.config import DataFormat, TextNormalization
from audiorl.errors import DataError
from audiorl.progress import console, progress_bar
from audiorl.text import transform

if TYPE_CHECKING:
    from audiorl.models.base import ModelAdapter

Kind = Literal["preference", "transcript", "unpaired"]
Format = DataFormat
FORMATS = tuple(f for f in get_args(DataFormat) if f != "auto")


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
    offset: float = 0.0  # seconds into the recording where the clip starts
    seconds: float | None = None  # the clip's length, when it is a segment of a longer recording

    @property
    def reference(self) -> str:
        """The transcript a hypothesis is scored against."""
        ref = self.text if self.text is not None else self.chosen
        if ref is None:
            raise DataError(f"{self.source}: record has neither 'text' nor 'chosen' to score against")
        return ref

    @property
    def segment(self) -> bool:
        return bool(self.offset) or self.seconds is not None

    def duration(self) -> float:
        if self.seconds is not None:
            return self.seconds
        return max(0.0, duration_seconds(self.audio, self.sampling_rate) - self.offset)

    def load(self, limits: AudioLimits) -> np.ndarray:
        return load_audio(self.audio, limits, source_rate=self.sampling_rate, where=self.source, offset=self.offset, seconds=self.seconds)

    def audio_fields(self) -> dict[str, Any]:
        """What locates the clip in a manifest row besides `audio`: the segment, when it is one."""
        out: dict[str, Any] = {}
        if self.offset:
            out["offset"] = self.offset
        if self.seconds is not None:
            out["duration"] = self.seconds
        return out


_OPTIONAL_TEXT = ("prompt", "language")
_KNOWN = {"audio", "text", "chosen", "rejected", "completion", "label", "offset", "duration", *_OPTIONAL_TEXT}


def _seconds(row: dict[str, Any], key: str, where: str, *, required: bool = False) -> float | None:
    value = row.get(key)
    if value is None:
        if required:
            raise DataError(f"{where}: missing required key {key!r} (seconds)")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
        raise DataError(f"{where}: {key!r} must be a non-negative number of seconds, got {value!r}")
    return float(value)


def formatting_only(records: list[Record]) -> list[str]:
    """The preference records whose chosen and rejected differ only in case, punctuation or
    spacing (the same words under the default scoring normaliser: a WER of 0 between them). Such a
    pair teaches formatting, which may be the point (punctuated, cased output), but never words."""
    pairs = [r for r in records if r.chosen is not None and r.rejected is not None and r.chosen != r.rejected]
    if not pairs:
        return []
    words = transform(TextNormalization(), "word")
    same = []
    for record in pairs:
        chosen, rejected = words([record.chosen, record.rejected])
        if chosen == rejected:
            same.append(record.source)
    return same


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


def record_from_row(row: Any, where: str, kind: Kind, base_dir: str | Path | None) -> Record:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(row).__name__}")
    if "audio" not in row or row["audio"] in (None, ""):
        raise DataError(f"{where}: missing required key 'audio' (a path relative to the manifest)")
    audio = row["audio"]
    sampling_rate = None
    if isinstance(audio, str):
        audio = storage.join(base_dir, audio) if base_dir is not None else audio
    elif isinstance(audio, dict):  # a Hugging Face Audio column
        if audio.get("bytes"):
            audio = audio["bytes"]
        elif audio.get("array") is not None:
            sampling_rate = audio.get("sampling_rate")
            audio = np.asarray(audio["array"], dtype=np.float32)
        elif audio.get("path"):
            audio = storage.join(base_dir, audio["path"]) if base_dir is not None else audio["path"]
        else:
            raise DataError(f"{where}: 'audio' holds neither bytes, an array nor a path")
    else:
        raise DataError(f"{where}: 'audio' must be a path string, got {type(audio).__name__}")
    record = Record(audio=audio, source=where, sampling_rate=sampling_rate, offset=_seconds(row, "offset", where) or 0.0,
                    seconds=_seconds(row, "duration", where))
    if record.seconds == 0:
        raise DataError(f"{where}: 'duration' is 0: the segment holds no audio")
    if kind == "preference":
        record.chosen = _text_field(row, "chosen", where, required=True)
        record.rejected = _text_field(row, "rejected", where, required=True)
        if record.chosen == record.rejected:
            raise DataError(f"{where}: 'chosen' and 'rejected' are the same transcript ({record.chosen[:40]!r}): the pair "
                            "teaches nothing; drop it")
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


def _open_text(path: str):
    """A manifest for reading (local or remote), gzipped (`.gz`) or not."""
    try:
        return storage.open_text(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot open manifest ({exc.strerror})") from None


def _json_rows(path: str) -> Iterator[tuple[str, Any]]:
    """(`file:line`, parsed row, or the DataError that says why the line is not one) for every
    non-empty line of a JSONL manifest."""
    with _open_text(path) as handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    yield where, json.loads(line)
                except (json.JSONDecodeError, RecursionError) as exc:
                    why = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
                    yield where, DataError(f"{where}: not valid JSON ({why})")
        except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as exc:
            raise DataError(f"{path}: not a UTF-8 JSONL manifest ({exc})") from None


def _audiorl_row(row: Any, where: str, kind: Kind, base_dir: str) -> list[Record]:
    return [record_from_row(row, where, kind, base_dir)]


# NeMo's keys -> AudioRL's; the rest (speaker_id, taskname, source_lang, target_lang, pnc, and
# chosen/rejected/completion/label for preference and unpaired rows) are kept as they are
_NEMO_KEYS = {"audio_filepath": "audio", "lang": "language"}


def _nemo_row(row: Any, where: str, kind: Kind, base_dir: str) -> list[Record]:
    """A NeMo ASR manifest row: `audio_filepath` (relative paths against the manifest's folder),
    `duration` (required, as NeMo has it), `offset` into a longer recording, `text`, `lang`."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(row).__name__}")
    if "audio_filepath" not in row:
        raise DataError(f"{where}: missing required key 'audio_filepath' (a NeMo manifest row)")
    _seconds(row, "duration", where, required=True)
    return [record_from_row({_NEMO_KEYS.get(k, k): v for k, v in row.items()}, where, kind, base_dir)]


def _lhotse_row(row: Any, where: str, kind: Kind, base_dir: str) -> list[Record]:
    """A Lhotse cut, through `lhotse`: one record per supervision, the segment of the recording
    it covers (the cut's start plus the supervision's), its text and language, and its `custom`
    fields (`chosen`, `rejected`, `completion`, `label`, `hotwords`, ...) as a row's."""
    try:
        from lhotse.serialization import deserialize_item
    except ImportError:
        raise DataError(f"{where}: a Lhotse manifest needs the lhotse package: pip install 'audiorl[lhotse]'") from None
    try:
        cut = deserialize_item(row)
    except Exception as exc:  # noqa: BLE001 - lhotse raises what its parsers raise
        raise DataError(f"{where}: not a Lhotse cut ({type(exc).__name__}: {exc})") from None
    if not hasattr(cut, "supervisions") or not hasattr(cut, "recording"):
        raise DataError(f"{where}: a Lhotse {type(cut).__name__}, not a cut: give a CutSet (lhotse cut simple ...)")
    label = f"{where} (cut {cut.id})"
    if not cut.supervisions:
        raise DataError(f"{label}: the cut has no supervision, so no transcript")
    if cut.recording is None or len(cut.recording.sources) != 1 or cut.recording.sources[0].type not in ("file", "url"):
        raise DataError(f"{label}: only cuts of one recording file (a path or a URL) are supported")
    audio = storage.join(base_dir, cut.recording.sources[0].source)
    records = []
    for sup in cut.supervisions:
        at = label if len(cut.supervisions) == 1 else f"{label}, supervision {sup.id}"
        start = max(0.0, sup.start)
        fields = {**(sup.custom or {}), "audio": str(audio), "offset": round(cut.start + start, 6),
                  "duration": round(min(sup.end, cut.duration) - start, 6)}
        if sup.text is not None:
            fields["text"] = sup.text
        if sup.language:
            fields["language"] = sup.language
        if sup.speaker:
            fields["speaker_id"] = sup.speaker
        records.append(record_from_row(fields, at, kind, None))
    return records


_ROW_READERS = {"audiorl": _audiorl_row, "nemo": _nemo_row, "lhotse": _lhotse_row}


_SHARD_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_AUDIO_MEMBERS = ("wav", "flac", "mp3", "ogg")
_TEXT_MEMBERS = ("json", "txt")  # read up front (and kept in a shard index), as bytes


def shard_paths(path: str) -> list[str]:
    """The shards a WebDataset location names: `train-{000000..000099}.tar` is a range (zero
    padding kept; several ranges multiply), anything else one shard."""
    found = _SHARD_RANGE.search(path)
    if found is None:
        return [path]
    first, last = found[1], found[2]
    if int(last) < int(first):
        raise DataError(f"{path}: the shard range {found[0]} runs backwards")
    width = len(first) if first.startswith("0") or len(first) == len(last) else 0
    head, tail = path[: found.start()], path[found.end():]
    return [shard for n in range(int(first), int(last) + 1) for shard in shard_paths(f"{head}{n:0{width}d}{tail}")]


def is_webdataset(path: str | Path) -> bool:
    text = str(path)
    return text.endswith(".tar") and (_SHARD_RANGE.search(text) is not None or not storage.is_dir(text))


INDEX_SUFFIX = ".index.json"  # a shard's index, next to it: `train-000000.tar.index.json`
_INDEX_VERSION = 1


def shard_index_path(shard: str) -> str:
    return f"{shard}{INDEX_SUFFIX}"


def _scan_shard(shard: str) -> dict[str, dict[str, Any]]:
    """key -> {"audio": (member, offset, size), "json"/"txt": bytes, "other": [extensions]} for
    a tar shard, reading its headers and its small text members only."""
    samples: dict[str, dict[str, Any]] = {}
    try:
        with storage.open_binary(shard, missing="tar shard not found") as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, dot, extension = base.partition(".")
                key = f"{folder}/{stem}" if folder else stem
                entry = samples.setdefault(key, {})
                extension = extension.lower()
                if extension in _TEXT_MEMBERS:
                    entry[extension] = tar.extractfile(member).read()
                elif extension in _AUDIO_MEMBERS and "audio" not in entry:
                    entry["audio"] = (member.name, member.offset_data, member.size)
                else:
                    entry.setdefault("other", []).append(extension or "(none)")
            # tar ends at a block of zeros, and tarfile stops reading there: anything but zeros
            # after it (the end marker's padding) is a header damaged into zeros, with samples behind it
            handle.seek(tar.offset)
            while chunk := handle.read(1 << 16):
                if chunk.count(0) != len(chunk):
                    raise DataError(f"{shard}: the tar ends at byte {tar.offset} of {handle.seek(0, io.SEEK_END)} (a header of zeros "
                                    f"there, data after it): a damaged shard; write it again")
    except (tarfile.TarError, EOFError) as exc:
        raise DataError(f"{shard}: not a readable tar shard ({exc})") from None
    return samples


def write_shard_index(shard: str, stats: storage.Stats | None = None) -> tuple[str, int]:
    """Scan a shard once and write its index next to it (`SHARD.index.json`: each sample's audio
    byte range and its text members, and the shard's size and version); (the index, its samples).
    A run then reads that one small file instead of the shard's headers: for a remote shard the
    scan otherwise fetches the whole shard (read-ahead covers the audio between the headers)."""
    version = (stats or storage.Stats()).of(shard, mtime=False)
    samples = _scan_shard(shard)
    body = {key: {k: (v.decode("utf-8", "surrogateescape") if k in _TEXT_MEMBERS else v) for k, v in entry.items()} for key, entry in samples.items()}
    index = shard_index_path(shard)
    storage.write_text(index, json.dumps({"audiorl_shard_index": _INDEX_VERSION, "shard": version, "samples": body}))
    return index, len(samples)


def _read_shard_index(shard: str, index: str, stats: storage.Stats) -> dict[str, dict[str, Any]]:
    rebuild = f"rebuild it with `audiorl data index {shard}`, or delete it"
    try:
        with storage.open_text(index) as handle:
            data = json.load(handle)
        if data.get("audiorl_shard_index") != _INDEX_VERSION:
            raise ValueError(f"not a version-{_INDEX_VERSION} shard index")
        samples = {key: {k: (tuple(v) if k == "audio" else v.encode("utf-8", "surrogateescape") if k in _TEXT_MEMBERS else v)
                         for k, v in entry.items()} for key, entry in data["samples"].items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeError) as exc:
        raise DataError(f"{index}: not a readable shard index ({type(exc).__name__}: {exc}); {rebuild}") from None
    now = stats.of(shard, mtime=False)
    if now is None:
        raise DataError(f"{shard}: tar shard not found (its index {index} is there)")
    if data.get("shard") != now:
        raise DataError(f"{index}: written for another version of {shard} (size|version {data.get('shard')}, now {now}); {rebuild}")
    return samples


def _shard_samples(shard: str, stats: storage.Stats) -> tuple[dict[str, dict[str, Any]], bool]:
    """A shard's samples (as `_scan_shard` gives them), from its index when it has one; and
    whether they came from the index."""
    index = shard_index_path(shard)
    if stats.of(index, mtime=False) is not None:
        return _read_shard_index(shard, index, stats), True
    return _scan_shard(shard), False


def _webdataset_record(shard: str, key: str, entry: dict[str, Any], kind: Kind) -> Record:
    where = f"{shard}:{key}"
    if "audio" not in entry:
        found = ", ".join(sorted(set(entry.get("other", [])) | {e for e in _TEXT_MEMBERS if e in entry})) or "nothing"
        raise DataError(f"{where}: the sample has no audio member ({key}.wav, .flac, .mp3 or .ogg; found: {found})")
    row: dict[str, Any] = {}
    try:
        if "json" in entry:
            row = json.loads(entry["json"].decode("utf-8"))
        elif "txt" in entry:
            row = {"text": entry["txt"].decode("utf-8").strip()}
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DataError(f"{where}: {key}.json is not UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: {key}.json must hold an object of the record's fields, got {type(row).__name__}")
    if "txt" in entry and "text" not in row and "json" in entry:
        row["text"] = entry["txt"].decode("utf-8", "replace").strip()
    name, offset, size = entry["audio"]
    return record_from_row({**row, "audio": storage.member_location(shard, name, offset, size)}, where, kind, None)


def iter_webdataset(path: str | Path | list[str], kind: Kind) -> Iterator[tuple[str, list[Record] | DataError]]:
    """(`shard:KEY`, the sample's record, or the DataError that says what is wrong with it) for
    every sample of every shard `path` names (or of the shards listed)."""
    stats = storage.Stats()  # one listing per folder for the index checks, not one request per shard
    scanned: list[str] = []
    for shard in path if isinstance(path, list) else shard_paths(str(path)):
        try:
            samples, indexed = _shard_samples(shard, stats)
            if not indexed and storage.is_url(shard):
                scanned.append(shard)
        except DataError as exc:
            yield shard, exc
            continue
        for key, entry in samples.items():
            try:
                yield f"{shard}:{key}", [_webdataset_record(shard, key, entry, kind)]
            except DataError as exc:
                yield f"{shard}:{key}", exc
    if scanned:
        console.print(f"[yellow]{len(scanned)} remote shard(s) without an index ({scanned[0]}, ...) were scanned, which reads each whole; "
                      f"`audiorl data index` writes indexes that later reads take instead[/]")


def iter_manifest(path: str | Path, kind: Kind, format: str) -> Iterator[tuple[str, list[Record] | DataError]]:
    """(`file:line`, the records of that line, or the DataError that says what is wrong with it)
    for every row of a JSONL manifest in `format` (audiorl, nemo or lhotse), or every sample of
    WebDataset shards."""
    if format == "webdataset":
        yield from iter_webdataset(path, kind)
        return
    parse = _ROW_READERS[format]
    for where, row in _json_rows(path):
        if isinstance(row, DataError):
            yield where, row
            continue
        try:
            yield where, parse(row, where, kind, storage.parent(path))
        except DataError as exc:
            yield where, exc


def read_jsonl(path: str | Path | list[str], kind: Kind, format: str = "audiorl") -> list[Record]:
    records: list[Record] = []
    for _, got in iter_manifest(path, kind, format):
        if isinstance(got, DataError):
            raise got
        records += got
    if not records:
        raise DataError(f"{path}: {'the shards hold no samples' if format == 'webdataset' else 'manifest has no records'}")
    return records


def read_hf_dataset(path: str | Path, kind: Kind) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))  # a remote folder through fsspec, as datasets reads one
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{path}: not a dataset written by save_to_disk ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{path}: holds splits {list(ds)}; point at one split's folder, e.g. {storage.join(path, next(iter(ds)))}")
    if "audio" not in ds.column_names:
        raise DataError(f"{path}: dataset has no 'audio' column (columns: {ds.column_names})")
    if isinstance(ds.features["audio"], datasets.Audio):
        # decode ourselves (soundfile) rather than through the datasets decoder (torchcodec since
        # datasets 4): a column saved with Audio() or Audio(decode=False) reads the same
        ds = ds.cast_column("audio", datasets.Audio(decode=False))
    return [record_from_row(row, f"{path}[{i}]", kind, path) for i, row in enumerate(ds)]


def detect_format(path: str | Path) -> str:
    """`hf` for a folder, else by the first row's keys: `audio_filepath` is NeMo's, a cut's
    `recording`/`supervisions` Lhotse's, `audio` AudioRL's; `.tar` shards are WebDataset's."""
    if is_webdataset(path):
        return "webdataset"
    if storage.is_dir(path):
        return "hf"
    for where, row in _json_rows(path):
        if isinstance(row, DataError):
            raise row
        if not isinstance(row, dict):
            raise DataError(f"{where}: a record must be a JSON object, got {type(row).__name__}")
        keys = set(row)
        if "audio_filepath" in keys:
            return "nemo"
        if {"supervisions", "recording"} & keys or row.get("type") in ("MonoCut", "MultiCut", "MixedCut"):
            return "lhotse"
        if "audio" in keys:
            return "audiorl"
        if {"sources", "sampling_rate", "num_samples"} <= keys or "recording_id" in keys:
            raise DataError(f"{where}: a Lhotse recording or supervision manifest; give a cut manifest (lhotse cut simple ...)")
        raise DataError(f"{where}: cannot tell the manifest's format from its keys {sorted(keys)[:8]}: AudioRL rows have 'audio', "
                        f"NeMo rows 'audio_filepath', Lhotse cuts 'supervisions'; or set data.format to one of {list(FORMATS)}")
    raise DataError(f"{path}: manifest has no records")


def read_records(path: str | Path | list[str], kind: Kind, format: Format = "auto") -> list[Record]:
    """Read a manifest or saved dataset of any supported format (`auto`: told by its content),
    from a local path or any fsspec URL (`s3://bucket/train.jsonl`); a list is WebDataset shards."""
    if isinstance(path, list):
        return read_jsonl(path, kind, "webdataset")
    path = storage.location(path)
    if format == "webdataset" or (format == "auto" and is_webdataset(path)):
        return read_jsonl(str(path), kind, "webdataset")  # each shard is looked for when it is read
    if not storage.exists(path):
        raise DataError(f"{path}: manifest or dataset not found")
    if format == "auto":
        format = detect_format(path)  # type: ignore[assignment]
    if format not in FORMATS:
        raise DataError(f"{path}: unknown format {format!r}; use auto or one of {list(FORMATS)}")
    if (format == "hf") != storage.is_dir(path):
        raise DataError(f"{path}: format {format!r} reads a {'folder written by save_to_disk' if format == 'hf' else 'manifest file'}")
    return read_hf_dataset(path, kind) if format == "hf" else read_jsonl(path, kind, format)


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
                check_record(record, limits)
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


def _has_speech_text(record: Record) -> bool:
    texts = [record.text, record.chosen, record.rejected, record.completion]
    return any(t and t.strip() for t in texts)


def check_record(record: Record, limits: AudioLimits) -> np.ndarray:
    """Decode a record's clip as training will and check what decoding alone lets through (a
    truncated WAV, digital silence with a transcript); the waveform, or a DataError naming it."""
    wave = record.load(limits)
    if isinstance(record.audio, (str, bytes)):
        check_complete(record.audio, record.source)
    if not np.any(wave) and _has_speech_text(record):
        raise DataError(f"{record.source}: the clip is digital silence (all zeros) but has a transcript; "
                        "fix the audio, or mark it no_speech with an empty text")
    return wave


def duplicates(records: list[Record]) -> list[tuple[str, str]]:
    """(record, the earlier record it repeats) for records with the same clip (and segment) and
    the same transcripts as one before them."""
    first: dict[tuple, str] = {}
    out = []
    for record in records:
        audio = record.audio if isinstance(record.audio, str) else hashlib.sha256(
            record.audio if isinstance(record.audio, bytes) else np.ascontiguousarray(record.audio).tobytes()).hexdigest()
        key = (audio, record.offset, record.seconds, record.text, record.chosen, record.rejected, record.completion, record.label)
        if key in first:
            out.append((record.source, first[key]))
        else:
            first[key] = record.source
    return out


# characters per token no tokenizer goes beyond: a longer transcript is refused before tokenising
_MAX_CHARS_PER_TOKEN = 16


def transcript_length_check(adapter: ModelAdapter, max_tokens: int, kind: Kind):
    """A `text_check` for `validate_records`: every transcript of a record fits in `max_tokens`
    of the model's tokens."""

    def check(record: Record) -> None:
        texts = {"preference": [record.chosen, record.rejected], "unpaired": [record.completion]}.get(kind) or [record.reference]
        for text in texts:
            if len(text) > max_tokens * _MAX_CHARS_PER_TOKEN:
                raise DataError(f"{record.source}: transcript {text[:30]!r}... is {len(text)} characters, far over the limit of "
                                f"{max_tokens} tokens (data.max_target_tokens / the model's maximum)")
        for text, ids in zip(texts, adapter.target_ids(texts)):
            if len(ids) > max_tokens:
                raise DataError(
                    f"{record.source}: transcript {text[:30]!r}... is {len(ids)} tokens, over the limit of "
                    f"{max_tokens} (data.max_target_tokens / the model's maximum)"
                )

    return check


def text_check_for(adapter: ModelAdapter, max_tokens: int | None, kind: Kind):
    """The transcript check of `load_records`: every transcript fits the model (and `max_tokens`)."""
    return transcript_length_check(adapter, min(max_tokens or adapter.max_target_tokens, adapter.max_target_tokens), kind)


def load_records(
    path: str | Path | list[str], adapter: ModelAdapter, limits: AudioLimits, kind: Kind, *, on_bad: Literal["error", "skip"],
    max_tokens: int | None, label: str, format: Format = "auto", check: bool = True,
) -> tuple[list[Record], list[Rejected]]:
    """Read a manifest (or saved dataset) and check every record for this model: the clip
    decodes within `limits`, the transcripts fit the model (and `max_tokens`). Bad records stop
    here, named by file and line, or (`on_bad="skip"`) come back apart, counted on the console.
    Without `check` the rows are only read (streaming checks each record when it is used)."""
    records = read_records(path, kind, format)
    if check:
        good, bad = validate_records(records, limits, on_bad=on_bad, text_check=text_check_for(adapter, max_tokens, kind),
                                     description=f"checking {label}")
    else:
        good, bad = records, []
    if bad:
        console.print(f"[yellow]{label}: skipped {len(bad)} of {len(records)} records (data.on_bad_record=skip)[/]")
    formatting = formatting_only(good)
    if formatting:
        console.print(f"[yellow]{label}: warning: {len(formatting)} pair(s) whose chosen and rejected differ only in case, punctuation "
                      f"or spacing, kept (they teach formatting, not words): {', '.join(formatting[:3])}"
                      f"{' ...' if len(formatting) > 3 else ''}[/]")
    repeated = duplicates(good)
    if repeated:
        shown = ", ".join(f"{where} repeats {earlier}" for where, earlier in repeated[:3])
        console.print(f"[yellow]{label}: warning: {len(repeated)} duplicate record(s), kept (they weigh double): {shown}"
                      f"{' ...' if len(repeated) > 3 else ''}[/]")
    return good, bad


def fingerprint(records: list[Record], *, mtime: bool = True) -> str:
    """A hash of the records' content: transcripts, and audio by path, size and mtime (or bytes).
    Without `mtime`, files copied again to the same paths keep the hash (what a resumed run
    compares: a re-synced data volume is the same data)."""
    digest = hashlib.sha256()
    stats = storage.Stats()
    for record in records:
        content = [record.text, record.chosen, record.rejected, record.prompt, record.language, record.extra]
        if record.completion is not None:  # unpaired records (the other kinds keep the fingerprints they had)
            content += [record.completion, record.label]
        if record.segment:  # likewise for segments of longer recordings
            content += [record.offset, record.seconds]
        digest.update(json.dumps(content, default=str).encode())
        if isinstance(record.audio, str):
            stat = stats.of(record.audio, mtime=mtime)
            digest.update(f"{record.audio}|{stat}".encode() if stat is not None else record.audio.encode())
        elif isinstance(record.audio, bytes):
            digest.update(hashlib.sha256(record.audio).digest())
        else:
            digest.update(np.ascontiguousarray(record.audio).tobytes())
    return digest.hexdigest()[:16]
