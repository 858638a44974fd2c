"""WebDataset tar shards as training and evaluation data: a sample per key (its audio member and
its fields in KEY.json or its transcript in KEY.txt), shard ranges, only the headers read up
front, every bad sample named by shard and key."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from audiorl.audio import AudioLimits
from audiorl.data.builders import check_manifest
from audiorl.data.records import detect_format, read_records
from audiorl.errors import DataError

LIMITS = AudioLimits(max_seconds=30)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root: Path, speech_dir: Path, per_shard: int = 4) -> list[dict]:
    """The speech corpus's pairs as shards train-000000.tar, ...: `per_shard` samples each, every
    third one with its transcript in KEY.txt beside its KEY.json of the pair."""
    rows = [json.loads(line) for line in (speech_dir / "pairs.jsonl").read_text().splitlines()]
    root.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(rows), per_shard):
        with tarfile.open(root / f"train-{start // per_shard:06d}.tar", "w") as tar:
            for i, row in enumerate(rows[start : start + per_shard], start=start):
                key = f"utt{i:04d}"
                _add(tar, f"{key}.wav", (speech_dir / row["audio"]).read_bytes())
                _add(tar, f"{key}.json", json.dumps({"chosen": row["chosen"], "rejected": row["rejected"], "speaker_id": f"s{i}"}).encode())
                if i % 3 == 0:
                    _add(tar, f"{key}.txt", row["chosen"].encode())
    return rows


def test_shards_read_as_the_manifest_of_the_same_clips(tmp_path, speech_dir):
    rows = write_shards(tmp_path / "shards", speech_dir)
    pattern = str(tmp_path / "shards" / "train-{000000..000002}.tar")
    assert detect_format(pattern) == "webdataset"
    records = read_records(pattern, "preference")
    local = read_records(speech_dir / "pairs.jsonl", "preference")
    assert [(r.chosen, r.rejected) for r in records] == [(r["chosen"], r["rejected"]) for r in rows]
    assert records[5].source == f"{tmp_path / 'shards' / 'train-000001.tar'}:utt0005" and records[5].extra["speaker_id"] == "s5"
    for shard_record, manifest_record in zip(records, local):
        assert shard_record.duration() == pytest.approx(manifest_record.duration())
        np.testing.assert_array_equal(shard_record.load(LIMITS), manifest_record.load(LIMITS))
    # KEY.txt alone is a transcript record; one shard is a location too
    transcripts = read_records(str(tmp_path / "shards" / "train-000000.tar"), "transcript")
    assert transcripts[0].text == rows[0]["chosen"]
    report = check_manifest(pattern, "preference", LIMITS)
    assert report.records == len(rows) and report.problems == []


def test_bad_samples_and_shards_are_named_by_shard_and_key(tmp_path, speech_dir):
    write_shards(tmp_path / "shards", speech_dir, per_shard=6)
    bad = tmp_path / "shards" / "train-000002.tar"
    with tarfile.open(bad, "w") as tar:
        _add(tar, "lonely.json", b'{"chosen": "a", "rejected": "b"}')  # no audio
        _add(tar, "broken.wav", (speech_dir / "clips" / "en-us-0.wav").read_bytes())
        _add(tar, "broken.json", b"{not json")
        _add(tar, "empty.wav", (speech_dir / "clips" / "en-us-1.wav").read_bytes())
        _add(tar, "empty.json", b'{"chosen": "", "rejected": "b"}')
    whole = (tmp_path / "shards" / "train-000001.tar").read_bytes()
    (tmp_path / "shards" / "train-000003.tar").write_bytes(whole[:700])  # a copy cut short
    report = check_manifest(str(tmp_path / "shards" / "train-{000000..000004}.tar"), "preference", LIMITS)
    problems = "\n".join(report.problems)
    assert f"{bad}:lonely: the sample has no audio member (lonely.wav, .flac, .mp3 or .ogg; found: json)" in problems
    assert f"{bad}:broken: broken.json is not UTF-8 JSON" in problems
    assert f"{bad}:empty: 'chosen' is empty" in problems
    assert "train-000003.tar: not a readable tar shard (unexpected end of data)" in problems
    assert "train-000004.tar: tar shard not found" in problems
    with pytest.raises(DataError, match=r"train-000002.tar:lonely: the sample has no audio member"):
        read_records(str(tmp_path / "shards" / "train-{000000..000002}.tar"), "preference")


def test_a_run_trains_on_shards_with_streaming_and_the_cli_checks_them(tmp_path, tiny_whisper, speech_dir):
    import audiorl
    from tests.test_training import final_weights, make_config

    write_shards(tmp_path / "shards", speech_dir)
    pattern = str(tmp_path / "shards" / "train-{000000..000002}.tar")
    shards = make_config(tmp_path / "a", tiny_whisper, speech_dir, data={"train": pattern, "streaming": True}, train={"save_steps": None})
    manifest = make_config(tmp_path / "b", tiny_whisper, speech_dir, train={"save_steps": None})
    a, b = final_weights(audiorl.train(shards)), final_weights(audiorl.train(manifest))
    for name in b:
        np.testing.assert_array_equal(a[name].numpy(), b[name].numpy(), err_msg=name)
    checked = subprocess.run([sys.executable, "-m", "audiorl_cli.main", "data", "check", pattern, "--kind", "preference"],
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert "12 records" in checked.stdout and "no problems found" in checked.stdout
