"""Speech data as speech teams keep it: NeMo ASR manifests and Lhotse cuts that point into long
recordings (only each segment is decoded), and Hugging Face datasets saved with either decoding
mode, all read by content (or a named `data.format`) into the same records, preference fields
kept, every bad row named by file and line."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from audiorl.audio import AudioLimits, resample
from audiorl.data.builders import check_manifest
from audiorl.data.records import detect_format, read_records
from audiorl.errors import DataError
from tests.conftest import SENTENCES

LIMITS = AudioLimits(max_seconds=30)
GAP_S = 0.7


@pytest.fixture(scope="module")
def session(speech_dir, tmp_path_factory):
    """One long recording of several utterances with silence between them, as a meeting or a
    broadcast is kept, and where each utterance lies in it (start, seconds, text)."""
    root = tmp_path_factory.mktemp("long")
    pieces, spans, at = [], [], 0.0
    rate = None
    for i, sentence in enumerate(SENTENCES[:3]):
        clip, rate = sf.read(speech_dir / "clips" / f"en-us-{i}.wav", dtype="float32")
        gap = np.zeros(int(GAP_S * rate), dtype=np.float32)
        pieces += [gap, clip]
        at += GAP_S
        spans.append((round(at, 6), round(len(clip) / rate, 6), sentence))
        at += len(clip) / rate
    pieces.append(np.zeros(int(GAP_S * rate), dtype=np.float32))
    sf.write(root / "session.wav", np.concatenate(pieces), rate)
    return root, spans, rate


def _segment(root, start, seconds, rate):
    whole, _ = sf.read(root / "session.wav", dtype="float32")
    return whole[round(start * rate) : round(start * rate) + round(seconds * rate)]


def _nemo(root, spans, name="nemo.jsonl", **extra):
    rows = [{"audio_filepath": "session.wav", "offset": start, "duration": seconds, "text": text, "lang": "en",
             "speaker_id": f"spk{i}", "taskname": "asr", "source_lang": "en", "target_lang": "en", "pnc": "no", **extra}
            for i, (start, seconds, text) in enumerate(spans)]
    path = root / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_nemo_manifest_reads_only_each_segment_of_a_long_recording(session):
    root, spans, rate = session
    path = _nemo(root, spans)
    assert detect_format(path) == "nemo"
    records = read_records(path, "transcript")
    assert [r.text for r in records] == [text for _, _, text in spans]
    assert records[1].source == f"{path}:2" and records[1].language == "en"
    assert records[1].extra["speaker_id"] == "spk1" and records[1].extra["taskname"] == "asr" and records[1].extra["pnc"] == "no"
    for record, (start, seconds, _) in zip(records, spans):
        assert record.duration() == pytest.approx(seconds)
        wave = record.load(LIMITS)
        # the segment, resampled from the recording's rate: the same samples a whole decode would cut out
        expected = resample(_segment(root, start, seconds, rate), rate, 16000)
        np.testing.assert_allclose(wave, expected, atol=1e-6)
    # the same manifest named explicitly, and gzipped
    gz = root / "nemo.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert [r.text for r in read_records(gz, "transcript", "nemo")] == [text for _, _, text in spans]


def test_preference_and_unpaired_fields_ride_along_in_nemo_rows(session):
    root, spans, _ = session
    pairs = read_records(_nemo(root, spans, "nemo-pairs.jsonl", chosen="the right words", rejected="the wrong words"), "preference")
    assert {(r.chosen, r.rejected) for r in pairs} == {("the right words", "the wrong words")} and pairs[0].offset == spans[0][0]
    unpaired = read_records(_nemo(root, spans, "nemo-kto.jsonl", completion="some words", label=False), "unpaired")
    assert [r.label for r in unpaired] == [False] * 3
    with pytest.raises(DataError, match=r"nemo\.jsonl:1: missing required key 'chosen'"):
        read_records(_nemo(root, spans), "preference")


@pytest.mark.parametrize("row, message", [
    ({"audio_filepath": "session.wav", "text": "x"}, r"bad\.jsonl:2: missing required key 'duration'"),
    ({"audio_filepath": "session.wav", "duration": "long", "text": "x"}, r"bad\.jsonl:2: 'duration' must be a non-negative number"),
    ({"audio_filepath": "session.wav", "duration": 1.0, "offset": -2, "text": "x"}, r"bad\.jsonl:2: 'offset' must be a non-negative"),
    ({"audio_filepath": "session.wav", "duration": 0, "text": "x"}, r"bad\.jsonl:2: 'duration' is 0"),
])
def test_bad_nemo_rows_are_named_by_line(session, row, message):
    root, spans, _ = session
    good = {"audio_filepath": "session.wav", "offset": spans[0][0], "duration": spans[0][1], "text": "x"}
    (root / "bad.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message):
        read_records(root / "bad.jsonl", "transcript")


def test_a_segment_past_the_end_of_its_recording_is_named(session):
    root, spans, _ = session
    length = sf.info(root / "session.wav").duration
    row = {"audio_filepath": "session.wav", "offset": length - 0.5, "duration": 2.0, "text": "x"}
    (root / "past.jsonl").write_text(json.dumps(row) + "\n")
    (record,) = read_records(root / "past.jsonl", "transcript")
    with pytest.raises(DataError, match=r"past\.jsonl:1: the segment .* lies past the end of the .* recording"):
        record.load(LIMITS)
    # check reports it by line, with every other problem of the file
    (root / "past.jsonl").write_text(json.dumps(row) + "\n" + '{"audio_filepath": 3}\n' + "{oops\n")
    report = check_manifest(root / "past.jsonl", "transcript", LIMITS)
    assert report.records == 3 and len(report.problems) == 3
    assert [p.split(": ")[0].rsplit(":", 1)[1] for p in report.problems] == ["1", "2", "3"]


def _cuts(root, spans, *, preference=False):
    from lhotse import CutSet, MonoCut, Recording, SupervisionSegment

    recording = Recording.from_file(root / "session.wav", recording_id="session")
    custom = {"chosen": "right", "rejected": "wrong"} if preference else None
    sups = [SupervisionSegment(id=f"utt{i}", recording_id="session", start=start, duration=seconds, text=text, language="English",
                               speaker=f"spk{i}", custom=custom) for i, (start, seconds, text) in enumerate(spans)]
    # cut 1 holds the first utterance; cut 2 starts at the second and holds two supervisions
    first = MonoCut(id="c1", start=0.0, duration=spans[0][0] + spans[0][1], channel=0, recording=recording, supervisions=[sups[0]])
    offset = spans[1][0]
    later = [s.with_offset(-offset) for s in sups[1:]]
    second = MonoCut(id="c2", start=offset, duration=recording.duration - offset, channel=0, recording=recording, supervisions=later)
    path = root / ("cuts-pref.jsonl.gz" if preference else "cuts.jsonl.gz")
    CutSet.from_cuts([first, second]).to_file(path)
    return path


def test_lhotse_cuts_give_one_record_per_supervision_and_only_its_segment(session):
    root, spans, rate = session
    path = _cuts(root, spans)
    assert detect_format(path) == "lhotse"
    records = read_records(path, "transcript")
    assert [r.text for r in records] == [text for _, _, text in spans]
    assert records[0].source == f"{path}:1 (cut c1)" and records[2].source == f"{path}:2 (cut c2), supervision utt2"
    assert records[1].language == "English" and records[1].extra["speaker_id"] == "spk1"
    for record, (start, seconds, _) in zip(records, spans):
        assert record.offset == pytest.approx(start) and record.seconds == pytest.approx(seconds)
        np.testing.assert_allclose(record.load(LIMITS), resample(_segment(root, start, seconds, rate), rate, 16000), atol=1e-6)
    pairs = read_records(_cuts(root, spans, preference=True), "preference")
    assert len(pairs) == 3 and {(r.chosen, r.rejected) for r in pairs} == {("right", "wrong")}
    with pytest.raises(DataError, match=r"cuts\.jsonl\.gz:1 \(cut c1\): missing required key 'chosen'"):
        read_records(path, "preference")


def test_lhotse_recording_manifests_and_unknown_rows_are_refused_clearly(session):
    from lhotse import Recording, RecordingSet

    root, _, _ = session
    recordings = root / "recordings.jsonl.gz"
    RecordingSet.from_recordings([Recording.from_file(root / "session.wav")]).to_file(recordings)
    with pytest.raises(DataError, match="a Lhotse recording or supervision manifest; give a cut manifest"):
        read_records(recordings, "transcript")
    (root / "odd.jsonl").write_text('{"wav": "a.wav", "words": "x"}\n')
    with pytest.raises(DataError, match=r"odd\.jsonl:1: cannot tell the manifest's format .*data\.format"):
        read_records(root / "odd.jsonl", "transcript")
    with pytest.raises(DataError, match=r"odd\.jsonl:1: missing required key 'audio_filepath'"):
        read_records(root / "odd.jsonl", "transcript", "nemo")


@pytest.mark.parametrize("decode", [True, False])
def test_hf_datasets_saved_with_either_audio_decoding_mode(tmp_path, speech_dir, decode):
    import datasets

    rows = [json.loads(line) for line in (speech_dir / "pairs.jsonl").read_text().splitlines()][:3]
    ds = datasets.Dataset.from_dict({"audio": [str(speech_dir / r["audio"]) for r in rows], "chosen": [r["chosen"] for r in rows],
                                     "rejected": [r["rejected"] for r in rows], "speaker_id": ["a", "b", "c"]})
    ds = ds.cast_column("audio", datasets.Audio(sampling_rate=16000, decode=decode))
    ds.save_to_disk(str(tmp_path / "ds"))
    assert detect_format(tmp_path / "ds") == "hf"
    records = read_records(tmp_path / "ds", "preference")
    assert [r.chosen for r in records] == [r["chosen"] for r in rows] and records[2].extra["speaker_id"] == "c"
    from_jsonl = read_records(speech_dir / "pairs.jsonl", "preference")
    for record, same in zip(records, from_jsonl):
        np.testing.assert_allclose(record.load(LIMITS), same.load(LIMITS), atol=1e-6)
    report = check_manifest(tmp_path / "ds", "preference", LIMITS)
    assert report.records == 3 and report.problems == []


def test_the_data_commands_take_every_format(session, tmp_path, tiny_whisper):
    root, spans, _ = session
    nemo, cuts = _nemo(root, spans), _cuts(root, spans)
    for path in (nemo, cuts):
        checked = subprocess.run([sys.executable, "-m", "audiorl_cli.main", "data", "check", str(path)], capture_output=True, text=True,
                                 timeout=120)
        assert checked.returncode == 0, checked.stderr
        assert "3 records" in checked.stdout or "2 records" in checked.stdout  # rows: 3 NeMo lines, 2 cuts
        assert "no problems found" in checked.stdout
    # pairs built from a NeMo manifest point at the same segments
    out = tmp_path / "pairs.jsonl"
    made = subprocess.run([sys.executable, "-m", "audiorl_cli.main", "data", "pairs", "-m", str(tiny_whisper), "-d", str(nemo), "-o", str(out),
                           "--num-samples", "2", "--max-new-tokens", "8", "--policy", "reference-worst"],
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    pairs = read_records(out, "preference")
    assert len(pairs) == 3
    for pair, (start, seconds, text) in zip(pairs, spans):
        assert pair.chosen == text and pair.offset == pytest.approx(start) and pair.seconds == pytest.approx(seconds)


def test_a_run_trains_on_nemo_and_lhotse_sources_together(session, tmp_path, tiny_whisper):
    import audiorl
    from audiorl.config import RunConfig
    from audiorl.errors import ConfigError

    root, spans, _ = session
    nemo, cuts = _nemo(root, spans), _cuts(root, spans)
    cfg = RunConfig.model_validate({
        "model": {"name_or_path": str(tiny_whisper)},
        "data": {"train": [str(nemo), str(cuts)], "eval": {"nemo": str(nemo)}, "max_audio_seconds": 5},
        "objective": {"name": "sft"},
        "train": {"output_dir": str(tmp_path / "run"), "per_device_train_batch_size": 3, "learning_rate": 1e-3, "max_steps": 2,
                  "logging_steps": 1, "save_steps": None, "resume": "never", "num_threads": 1},
        "tracking": {"enabled": False},
    })
    outcome = audiorl.train(cfg)
    assert (outcome.final_model_dir / "model.safetensors").exists()
    # the step-0 evaluation scored every segment of the NeMo set: WER's denominator is all their words
    before, words = outcome.eval_before, sum(len(t.split()) for _, _, t in spans)
    errors = before["eval/substitutions"] + before["eval/deletions"] + before["eval/insertions"]
    assert before["eval/wer"] * words == pytest.approx(errors)
    # a format named in the config is the one used: the cuts are no NeMo manifest, and that is said by line
    named = cfg.model_copy(update={"data": cfg.data.model_copy(update={"format": "nemo", "train": str(cuts)})})
    with pytest.raises((DataError, ConfigError), match=r"cuts\.jsonl\.gz:1: missing required key 'audio_filepath'"):
        audiorl.train(named)
