"""Dataset builders: N-best preference pairs, DropoutNTP, hard cases, manifest checks."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audiorl.api import make_hard_cases, make_pairs
from audiorl.config import TextNormalization
from audiorl.data.builders import _label_hypotheses, _rank_pairs
from audiorl.data.records import Record


def _record(text="turn on the kitchen lights"):
    return Record(audio="x.wav", source="m.jsonl:1", text=text)


def test_pairing_policies_by_hand():
    norm = TextNormalization()
    hyps = ["turn on the kitchen lights", "turn on the kitchen nights", "turn kitchen", "turn on the kitchen lights"]
    # WERs: 0.0, 0.2, 0.6 (duplicates counted once)
    assert _rank_pairs(_record(), hyps, "best-worst", 0.1, 4, norm) == [("turn on the kitchen lights", "turn kitchen", 0.0, 0.6)]
    assert _rank_pairs(_record(), hyps, "reference-worst", 0.1, 4, norm) == [("turn on the kitchen lights", "turn kitchen", 0.0, 0.6)]
    pairs = _rank_pairs(_record(), hyps, "all", 0.3, 4, norm)  # only margins >= 0.3: (0.0, 0.6), (0.2, 0.6)
    assert [(p[2], p[3]) for p in pairs] == [(0.0, 0.6), (0.2, 0.6)]
    assert _rank_pairs(_record(), hyps[:1] * 3, "best-worst", 0.1, 4, norm) == "all samples identical"
    assert _rank_pairs(_record(), hyps[:2], "best-worst", 0.5, 4, norm) == "best and worst samples closer than the margin"


def test_unpaired_labels_by_hand():
    norm = TextNormalization()
    hyps = ["turn on the kitchen lights", "turn on the kitchen nights", "turn kitchen", "turn on the kitchen lights"]
    # WERs 0.0, 0.2, 0.6: at most 0.1 is desirable, at least 0.5 undesirable, 0.2 neither
    assert _label_hypotheses(_record(), hyps, "best-worst", 0.1, 0.5, 4, norm) == [
        ("turn on the kitchen lights", True, 0.0), ("turn kitchen", False, 0.6)]
    assert _label_hypotheses(_record(), hyps[1:3], "reference-worst", 0.1, 0.5, 4, norm) == [
        ("turn on the kitchen lights", True, 0.0), ("turn kitchen", False, 0.6)]
    assert _label_hypotheses(_record(), hyps, "all", 0.25, 0.5, 4, norm) == [
        ("turn on the kitchen lights", True, 0.0), ("turn on the kitchen nights", True, 0.2), ("turn kitchen", False, 0.6)]
    assert _label_hypotheses(_record(), hyps[1:2], "best-worst", 0.1, 0.5, 4, norm) == (
        "no transcript at or below the good WER or at or above the bad WER")


def test_unpaired_rows_from_a_model_are_a_kto_manifest(tmp_path, tiny_whisper, speech_dir):
    from audiorl.data.records import read_records
    from audiorl.errors import DataError

    out = tmp_path / "out" / "unpaired.jsonl"
    summary = make_pairs(tiny_whisper, speech_dir / "transcripts.jsonl", out, num_samples=4, max_new_tokens=8, policy="reference-worst",
                         seed=0, output_format="unpaired", good_wer=0.0, bad_wer=0.5)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary.rows == len(rows) and rows
    assert all((r["wer"] <= 0.0) == r["label"] and (r["label"] or r["wer"] >= 0.5) for r in rows)
    assert summary.reasons["desirable rows"] == sum(r["label"] for r in rows) == 12  # the reference of every clip
    records = read_records(out, "unpaired")
    assert [(r.completion, r.label) for r in records] == [(row["completion"], row["label"]) for row in rows]
    with pytest.raises(DataError, match=r"the good WER \(0.5\) must be at least 0 and below the bad WER \(0.3\)"):
        make_pairs(tiny_whisper, speech_dir / "transcripts.jsonl", out, output_format="unpaired", good_wer=0.5, bad_wer=0.3)


def test_empty_samples_never_become_a_side_of_a_pair():
    # an empty sample has WER 1.0 and would be "chosen" over a worse one, but a record with an
    # empty transcript is refused by training: it must not be written
    norm = TextNormalization()
    pairs = _rank_pairs(_record("a b"), ["", "x y z w", "a b c"], "best-worst", 0.1, 4, norm)
    assert pairs == [("a b c", "x y z w", 0.5, 2.0)]
    assert _rank_pairs(_record("a b"), ["", " "], "reference-worst", 0.1, 4, norm) == "every sample empty"


def test_pairs_from_a_model(tmp_path, tiny_whisper, speech_dir):
    out = tmp_path / "out" / "pairs.jsonl"
    # a random model's samples are all equally wrong, so pair them against the reference
    summary = make_pairs(
        tiny_whisper, speech_dir / "transcripts.jsonl", out, num_samples=4, max_new_tokens=8,
        min_wer_margin=0.1, policy="reference-worst", seed=0,
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary.clips == 12 and summary.rows == len(rows) == 12
    references = {json.loads(line)["text"] for line in (speech_dir / "transcripts.jsonl").read_text().splitlines()}
    assert all(row["chosen"] in references and row["chosen_wer"] == 0.0 for row in rows)
    assert summary.kept + sum(v for k, v in summary.reasons.items() if k != "clips with pairs") == 12
    for row in rows:
        assert row["rejected_wer"] - row["chosen_wer"] >= 0.1 - 1e-9
        assert (out.parent / row["audio"]).resolve().is_file()  # paths work relative to the new manifest
    # the written manifest is a valid preference manifest
    from audiorl.data.records import read_records

    assert len(read_records(out, "preference")) == len(rows)


def test_dropout_ntp_keeps_the_reference_prefix(tmp_path, tiny_whisper, speech_dir):
    out = tmp_path / "ntp.jsonl"
    summary = make_pairs(tiny_whisper, speech_dir / "transcripts.jsonl", out, dropout_ntp="mask", start_ratio=0.5, max_new_tokens=6)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary.clips == 12 and rows
    for row in rows:
        first_word = row["chosen"].split()[0]
        assert row["rejected"].startswith(first_word) and row["rejected"] != row["chosen"]


def test_hard_cases_reasons(tmp_path, tiny_whisper, speech_dir):
    manifest = tmp_path / "m.jsonl"
    sf.write(tmp_path / "silence.wav", np.zeros(16000, dtype=np.float32), 16000)
    rows = [json.loads(line) for line in (speech_dir / "transcripts.jsonl").read_text().splitlines()[:3]]
    for row in rows:
        row["audio"] = str(speech_dir / row["audio"])
    rows[0]["hotwords"] = ["kitchen"]
    rows.append({"audio": "silence.wav", "no_speech": True})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "hard.jsonl"
    summary = make_hard_cases(tiny_whisper, manifest, out, max_new_tokens=6, num_samples=3)
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    by_audio = {Path(r["audio"]).name: r for r in kept}
    # a random model gets everything wrong, says something on silence, misses the hotword
    assert "hallucination" in by_audio["silence.wav"]["hard_reasons"] and by_audio["silence.wav"]["no_speech"] is True
    assert "missed_hotword" in by_audio[Path(rows[0]["audio"]).name]["hard_reasons"]
    assert all("high_wer" in r["hard_reasons"] for r in kept if r["text"])
    assert summary.clips == 4 and summary.rows == 4


def test_check_reports_every_problem_by_line(tmp_path, speech_dir):
    good = str(speech_dir / "clips" / "en-us-0.wav")
    sf.write(tmp_path / "long.wav", np.full(16000 * 3, 0.1, dtype=np.float32), 16000)
    lines = [
        json.dumps({"audio": good, "text": "ok"}),
        "{broken",
        json.dumps({"audio": good, "text": ""}),
        json.dumps({"audio": "long.wav", "text": "too long"}),
        json.dumps({"audio": good, "text": "x", "hotwords": "kitchen"}),
        json.dumps({"audio": "missing.wav", "text": "x"}),
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "audiorl_cli.main", "data", "check", str(manifest), "--max-audio-seconds", "2"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 3
    text = proc.stdout
    for number, needle in [(2, "not valid JSON"), (3, "'text' is empty"), (4, "clip is 3.0 s long"),
                           (5, "'hotwords' must be a list"), (6, "audio file not found")]:
        assert f"m.jsonl:{number}: {needle}" in text, needle
    assert "m.jsonl:1:" not in text
    assert "6 records" in text and "5 problem(s)" in proc.stderr


def test_pairs_command_line(tmp_path, tiny_whisper, speech_dir):
    out = tmp_path / "pairs.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "audiorl_cli.main", "data", "pairs", "-m", str(tiny_whisper), "-d", str(speech_dir / "transcripts.jsonl"),
         "-o", str(out), "--num-samples", "3", "--policy", "reference-worst", "--max-new-tokens", "5"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "12 clips read" in proc.stdout and f"written: {out}" in proc.stdout.replace("\n", "")
    assert len(out.read_text().splitlines()) == 12
    bad = subprocess.run(
        [sys.executable, "-m", "audiorl_cli.main", "data", "pairs", "-m", str(tiny_whisper), "-d", str(speech_dir / "transcripts.jsonl"),
         "-o", str(out), "--policy", "best-of-all"],
        capture_output=True, text=True,
    )
    assert bad.returncode == 2 and "--policy 'best-of-all'" in bad.stderr
    unpaired = tmp_path / "unpaired.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "audiorl_cli.main", "data", "pairs", "-m", str(tiny_whisper), "-d", str(speech_dir / "transcripts.jsonl"),
         "-o", str(unpaired), "--num-samples", "3", "--policy", "reference-worst", "--max-new-tokens", "5", "--format", "unpaired",
         "--good-wer", "0", "--bad-wer", "0.5"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in unpaired.read_text().splitlines()]
    assert {"audio", "completion", "label", "wer"} <= set(rows[0]) and sum(r["label"] for r in rows) == 12


def test_a_clip_without_speech_gives_no_pair(tmp_path, tiny_whisper, speech_dir):
    rows = [json.loads(line) for line in (speech_dir / "transcripts.jsonl").read_text().splitlines()][:3]
    noise = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.01
    sf.write(tmp_path / "noise.wav", noise, 16000)
    manifest = tmp_path / "mixed.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in [
        *({**r, "audio": str(speech_dir / r["audio"])} for r in rows),
        {"audio": "noise.wav", "text": "", "no_speech": True},
    ]))
    out = tmp_path / "pairs.jsonl"
    summary = make_pairs(tiny_whisper, manifest, out, num_samples=4, max_new_tokens=8, policy="reference-worst", seed=0)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary.clips == 4 and len(written) == 3
    assert summary.reasons["no speech in the clip (an empty transcript cannot be chosen)"] == 1
    assert all(row["chosen"] for row in written)
