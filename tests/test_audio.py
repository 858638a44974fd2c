import numpy as np
import pytest
import soundfile as sf

from audiorl.audio import AudioLimits, load_audio
from audiorl.data.records import read_records, validate_records
from audiorl.errors import DataError


def test_espeak_clip_is_resampled_to_16k_mono(speech_dir):
    path = speech_dir / "clips" / "en-us-0.wav"
    raw, rate = sf.read(path)
    assert rate == 22050
    samples = load_audio(str(path), AudioLimits(sampling_rate=16000))
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) - len(raw) * 16000 / 22050) <= 2
    assert np.abs(samples).max() > 0.05  # it is speech, not silence


def test_stereo_is_averaged_to_mono(tmp_path):
    left = np.full(1600, 0.5, dtype=np.float32)
    right = np.full(1600, -0.1, dtype=np.float32)
    sf.write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    samples = load_audio(str(tmp_path / "stereo.wav"), AudioLimits())
    np.testing.assert_allclose(samples, 0.2, atol=1e-6)


@pytest.mark.parametrize("fmt,subtype", [("FLAC", "PCM_16"), ("OGG", "VORBIS")])
def test_flac_and_ogg_decode(tmp_path, fmt, subtype):
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000).astype(np.float32)
    path = tmp_path / f"tone.{fmt.lower()}"
    sf.write(path, tone, 8000, format=fmt, subtype=subtype)
    samples = load_audio(str(path), AudioLimits(sampling_rate=16000))
    assert abs(len(samples) - 16000) <= 16
    assert 0.2 < np.abs(samples).max() < 0.4


def _manifest(tmp_path, clips):
    lines = []
    for name, data in clips.items():
        sf.write(tmp_path / name, data, 16000, subtype="FLOAT")
        lines.append(f'{{"audio": "{name}", "chosen": "a b", "rejected": "a c"}}\n')
    (tmp_path / "m.jsonl").write_text("".join(lines))
    return tmp_path / "m.jsonl"


def test_bad_clips_are_reported_with_their_manifest_line(tmp_path):
    nan = np.zeros(1600, dtype=np.float32)
    nan[10] = np.nan
    manifest = _manifest(
        tmp_path,
        {
            "ok.wav": np.full(1600, 0.1, dtype=np.float32),
            "empty.wav": np.zeros(0, dtype=np.float32),
            "nan.wav": nan,
            "long.wav": np.full(16000 * 3, 0.1, dtype=np.float32),
        },
    )
    records = read_records(manifest, "preference")
    limits = AudioLimits(max_seconds=2.0)
    with pytest.raises(DataError) as err:
        validate_records(records, limits, on_bad="error")
    message = str(err.value)
    assert "3 bad record(s)" in message
    assert f"{manifest}:2: audio is empty" in message
    assert f"{manifest}:3: audio contains 1 NaN/inf" in message
    assert f"{manifest}:4: clip is 3.0 s long" in message
    good, bad = validate_records(records, limits, on_bad="skip")
    assert [r.source for r in good] == [f"{manifest}:1"]
    assert len(bad) == 3


def test_missing_audio_file_names_the_line(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"audio": "nope.wav", "text": "hello"}\n')
    records = read_records(tmp_path / "m.jsonl", "transcript")
    with pytest.raises(DataError, match=r"m\.jsonl:1: audio file not found"):
        validate_records(records, AudioLimits())
