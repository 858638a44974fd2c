"""Audio decoding and checks: soundfile to decode, soxr to resample, mono, sanity checks.

Every error names where the clip came from (file, manifest line) so that a bad record in a
100k-line manifest can be found and fixed.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from audiorl import storage
from audiorl.errors import DataError


@dataclass(frozen=True)
class AudioLimits:
    sampling_rate: int = 16000
    max_seconds: float = 30.0
    min_samples: int = 1
    min_seconds: float = 0.0  # data.min_audio_seconds
    max_source: str = "data.max_audio_seconds"  # what set max_seconds, for the error


def limits_for(sampling_rate: int, max_seconds: float, window_seconds: float | None, *, min_seconds: float = 0.0) -> AudioLimits:
    """The limits for a model: `max_seconds`, or the model's input window when that is shorter
    (a longer clip would be cut off at the window without a word: refused instead)."""
    if window_seconds is not None and window_seconds < max_seconds:
        return AudioLimits(sampling_rate=sampling_rate, max_seconds=window_seconds, min_seconds=min_seconds,
                           max_source=f"the model's {window_seconds:g} s input window (data.max_audio_seconds={max_seconds:g})")
    return AudioLimits(sampling_rate=sampling_rate, max_seconds=max_seconds, min_seconds=min_seconds)


def to_mono(samples: np.ndarray) -> np.ndarray:
    """(frames,) or (frames, channels) -> (frames,), averaging the channels."""
    if samples.ndim == 1:
        return samples
    if samples.ndim == 2:
        return samples.mean(axis=1)
    raise ValueError(f"expected 1 or 2 dimensions, got shape {samples.shape}")


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    if source_rate == target_rate:
        return samples
    return soxr.resample(samples, source_rate, target_rate, quality="HQ")


def check_waveform(samples: np.ndarray, sampling_rate: int, limits: AudioLimits, where: str) -> np.ndarray:
    """Reject empty, non-finite and over-long clips; return float32 mono at the original rate."""
    if samples.size < limits.min_samples:
        raise DataError(f"{where}: audio is empty (0 samples); remove the record or fix the file")
    if not np.isfinite(samples).all():
        bad = int((~np.isfinite(samples)).sum())
        raise DataError(f"{where}: audio contains {bad} NaN/inf samples; re-export the file")
    seconds = samples.shape[0] / float(sampling_rate)
    if seconds > limits.max_seconds:
        raise DataError(
            f"{where}: clip is {seconds:.1f} s long, over the {limits.max_seconds:g} s limit ({limits.max_source}); "
            "split it or raise the limit"
        )
    if seconds < limits.min_seconds:
        raise DataError(f"{where}: clip is {seconds * 1000:.0f} ms long, under data.min_audio_seconds={limits.min_seconds:g}; "
                        "remove it or lower the limit")
    return samples.astype(np.float32, copy=False)


# a segment may end this far past the recording's end (rounded durations in manifests) and is read to the end
SEGMENT_END_SLACK_S = 0.05


def decode(source: str | Path | bytes, where: str | None = None, *, offset: float = 0.0,
           seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode WAV/FLAC/OGG/MP3 (anything libsndfile reads) to float32 mono and its sampling rate;
    with `offset`/`seconds`, only that segment (the file is seeked, not decoded whole)."""
    label = where or (str(source) if not isinstance(source, bytes) else "<audio bytes>")
    remote = storage.is_url(source)
    if not isinstance(source, bytes) and not remote and not Path(source).is_file():
        what = "a directory, not an audio file" if Path(source).is_dir() else "audio file not found"
        raise DataError(f"{label}: {what} ({source})")
    try:
        # a remote clip is read through a seekable file: a segment fetches its byte ranges only
        if remote:
            handle = storage.open_binary(source, label, missing="audio file not found")
        else:
            handle = io.BytesIO(source) if isinstance(source, bytes) else source
        with contextlib.closing(handle) if remote else contextlib.nullcontext(), sf.SoundFile(handle) as f:
            rate, total = int(f.samplerate), f.frames
            start = round(offset * rate)
            frames = total - start if seconds is None else round(seconds * rate)
            if offset or seconds is not None:
                end = start + frames
                if start >= total or end > total + SEGMENT_END_SLACK_S * rate:
                    raise DataError(f"{label}: the segment {offset:g}-{end / rate:g} s lies past the end of the {total / rate:.2f} s "
                                    "recording; fix its offset/duration")
                f.seek(start)
            wanted = min(frames, total - start)
            samples = f.read(wanted, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise DataError(f"{label}: cannot decode audio ({exc}); supported: WAV, FLAC, OGG/Vorbis, MP3") from None
    return to_mono(samples), rate


def check_complete(source: str | Path | bytes, where: str) -> None:
    """Refuse a WAV file whose header promises more audio than the file holds (a truncated copy
    or download): libsndfile reads what is there without a word. Run once per clip before
    training (`validate_records`), not on every load."""
    promised = _wav_data_bytes(source)
    if promised is not None and promised[0] > promised[1] + 1024:
        raise DataError(f"{where}: truncated: its WAV header promises {promised[0]} bytes of audio, the file holds {promised[1]}; "
                        "re-export or re-download it")


def _wav_data_bytes(source: str | Path | bytes) -> tuple[int, int] | None:
    """(bytes the WAV header's data chunk promises, bytes the file holds after it), or None for
    anything but a RIFF/WAVE file (or a streamed one, whose header leaves the size open)."""
    try:
        if isinstance(source, bytes):
            head, size = source[:65536], len(source)
        elif storage.is_url(source):
            with storage.open_binary(source) as f:
                head, size = f.read(65536), int(f.size)
        else:
            with open(source, "rb") as f:
                head, size = f.read(65536), os.fstat(f.fileno()).st_size
    except (OSError, DataError):
        return None
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    at = 12
    while at + 8 <= len(head):
        chunk, length = head[at : at + 4], int.from_bytes(head[at + 4 : at + 8], "little")
        if chunk == b"data":
            if length in (0, 0xFFFFFFFF):
                return None
            return length, size - (at + 8)
        at += 8 + length + (length & 1)
    return None


def header(source: str | Path | bytes) -> tuple[int, int] | None:
    """(sampling rate, frames) of a clip from its header (no decoding; a remote clip fetches its
    first bytes only); None when it cannot be read."""
    try:
        if storage.is_url(source):
            with storage.open_binary(source) as f, sf.SoundFile(f) as clip:
                return int(clip.samplerate), int(clip.frames)
        info = sf.info(io.BytesIO(source) if isinstance(source, bytes) else source)
        return int(info.samplerate), int(info.frames)
    except (sf.LibsndfileError, RuntimeError, OSError, TypeError, DataError):
        return None


def duration_seconds(source: str | Path | bytes | np.ndarray, source_rate: int | None = None) -> float:
    """Length of a clip from its header (no decoding); 0.0 when it cannot be read."""
    if isinstance(source, np.ndarray):
        return source.shape[0] / float(source_rate or 1)
    found = header(source)
    return found[1] / float(found[0]) if found else 0.0


def load_audio(
    source: str | Path | bytes | np.ndarray,
    limits: AudioLimits,
    *,
    source_rate: int | None = None,
    where: str | None = None,
    offset: float = 0.0,
    seconds: float | None = None,
) -> np.ndarray:
    """Decode (or take) a clip, or the segment `offset`..`offset + seconds` of a longer recording,
    check it, down-mix to mono and resample to `limits.sampling_rate`."""
    label = where or (str(source) if isinstance(source, (str, Path)) else "<audio>")
    if isinstance(source, np.ndarray):
        if source_rate is None:
            raise DataError(f"{label}: an in-memory waveform needs its sampling rate")
        samples, rate = to_mono(np.asarray(source, dtype=np.float32)), int(source_rate)
        if offset or seconds is not None:
            start = round(offset * rate)
            samples = samples[start : None if seconds is None else start + round(seconds * rate)]
    else:
        samples, rate = decode(source, where=label, offset=offset, seconds=seconds)
    samples = check_waveform(samples, rate, limits, label)
    return resample(samples, rate, limits.sampling_rate).astype(np.float32, copy=False)
