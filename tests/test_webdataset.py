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


def _records(location, kind="preference"):
    return [(r.source, r.audio, r.chosen, r.rejected, r.extra) for r in read_records(location, kind)]


def test_an_indexed_shard_is_read_from_its_index_and_a_stale_index_is_named(tmp_path, speech_dir):
    """`audiorl data index` writes SHARD.index.json beside each shard; the records read through
    the indexes are the scan's, the shards' headers are not read again, and an index that no
    longer fits its shard (another size) or is damaged is an error that says how to rebuild it."""
    write_shards(tmp_path / "shards", speech_dir)
    with tarfile.open(tmp_path / "shards" / "train-000003.tar", "w") as tar:  # a bad sample: its error is the same either way
        _add(tar, "odd.wav", (speech_dir / "clips" / "en-us-0.wav").read_bytes())
        _add(tar, "odd.json", b'{"chosen": "caf\xe9"}')
    pattern = str(tmp_path / "shards" / "train-{000000..000002}.tar")
    scanned = _records(pattern)
    with pytest.raises(DataError) as scan_error:
        read_records(str(tmp_path / "shards" / "train-000003.tar"), "preference")
    out = subprocess.run([sys.executable, "-m", "audiorl_cli.main", "data", "index", pattern, str(tmp_path / "shards" / "train-000003.tar")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    said = " ".join(out.stdout.split())
    assert "4 shard(s) indexed, 13 samples" in said and f"{tmp_path / 'shards' / 'train-000001.tar'}: 4 samples ->" in said
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.index.json")) == [f"train-00000{i}.tar.index.json" for i in range(4)]
    assert _records(pattern) == scanned
    with pytest.raises(DataError) as index_error:
        read_records(str(tmp_path / "shards" / "train-000003.tar"), "preference")
    assert str(index_error.value) == str(scan_error.value)
    # the headers are not read once indexed: blank the first one (the size stays) and the records stay the same
    first = tmp_path / "shards" / "train-000000.tar"
    data = bytearray(first.read_bytes())
    data[:512] = bytes(512)
    first.write_bytes(bytes(data))
    assert _records(pattern) == scanned
    (tmp_path / "shards" / "train-000000.tar.index.json").unlink()
    with pytest.raises(DataError, match=r"train-000000.tar: the tar ends at byte 0 of \d+ \(a header of zeros there, data after it\)"):
        read_records(pattern, "preference")  # the scan meets the blanked header: named, not read as an empty shard
    # a shard written again (another size): its index is stale, and the error says how to rebuild it
    write_shards(tmp_path / "shards", speech_dir, per_shard=5)
    with pytest.raises(DataError, match=r"train-000001.tar.index.json: written for another version of .*train-000001.tar .*"
                                        r"rebuild it with `audiorl data index .*train-000001.tar`, or delete it"):
        read_records(pattern, "preference")
    (tmp_path / "shards" / "train-000001.tar.index.json").write_text('{"audiorl_shard_index": 1, "samples": [')
    with pytest.raises(DataError, match=r"train-000001.tar.index.json: not a readable shard index \(JSONDecodeError"):
        read_records(pattern, "preference")
