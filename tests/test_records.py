import json

import numpy as np
import pytest
import soundfile as sf

from audiorl.audio import AudioLimits
from audiorl.data.records import read_records, validate_records
from audiorl.errors import DataError


def test_jsonl_paths_are_relative_to_the_manifest(speech_dir):
    records = read_records(speech_dir / "pairs.jsonl", "preference")
    assert records[0].audio == str(speech_dir / "clips" / "en-us-0.wav")
    assert records[0].chosen == "turn on the kitchen lights"
    assert records[0].source == f"{speech_dir / 'pairs.jsonl'}:1"


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", r"m\.jsonl:2: not valid JSON"),
        ('{"audio": "a.wav", "chosen": "x"}', r"m\.jsonl:2: missing required key 'rejected'"),
        ('{"audio": "a.wav", "chosen": "  ", "rejected": "y"}', r"m\.jsonl:2: 'chosen' is empty"),
        ('{"audio": "a.wav", "chosen": 3, "rejected": "y"}', r"m\.jsonl:2: 'chosen' must be a string, got int"),
        ('["a.wav"]', r"m\.jsonl:2: a record must be a JSON object"),
        ('{"chosen": "x", "rejected": "y"}', r"m\.jsonl:2: missing required key 'audio'"),
    ],
)
def test_bad_rows_name_line_and_key(tmp_path, line, message):
    good = '{"audio": "a.wav", "chosen": "x", "rejected": "y"}'
    (tmp_path / "m.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        read_records(tmp_path / "m.jsonl", "preference")


def test_transcript_records_fall_back_to_chosen(speech_dir):
    records = read_records(speech_dir / "pairs.jsonl", "transcript")
    assert records[3].reference == records[3].chosen


def test_hf_dataset_saved_to_disk(tmp_path, speech_dir):
    import datasets

    rows = [json.loads(line) for line in (speech_dir / "pairs.jsonl").read_text().splitlines()][:3]
    ds = datasets.Dataset.from_dict(
        {
            "audio": [str(speech_dir / r["audio"]) for r in rows],
            "chosen": [r["chosen"] for r in rows],
            "rejected": [r["rejected"] for r in rows],
        }
    ).cast_column("audio", datasets.Audio())
    ds.save_to_disk(str(tmp_path / "ds"))
    records = read_records(tmp_path / "ds", "preference")
    assert [r.chosen for r in records] == [r["chosen"] for r in rows]
    assert records[1].source == f"{tmp_path / 'ds'}[1]"
    good, bad = validate_records(records, AudioLimits())
    assert len(good) == 3 and not bad
    # the decoded audio equals what the JSONL path gives for the same file
    from_jsonl = read_records(speech_dir / "pairs.jsonl", "preference")[0].load(AudioLimits())
    np.testing.assert_allclose(records[0].load(AudioLimits()), from_jsonl, atol=1e-6)


def test_hf_dataset_dict_asks_for_a_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"audio": ["x.wav"], "text": ["hi"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="point at one split"):
        read_records(tmp_path / "dd", "transcript")


def test_missing_manifest(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_records(tmp_path / "nope.jsonl", "preference")


def test_in_memory_arrays_from_a_dataset(tmp_path):
    import datasets

    tone = (0.1 * np.sin(np.arange(8000) / 5)).astype(np.float32)
    sf.write(tmp_path / "t.wav", tone, 8000)
    ds = datasets.Dataset.from_dict({"audio": [{"array": tone, "sampling_rate": 8000}], "text": ["a tone"]})
    ds.save_to_disk(str(tmp_path / "arr"))
    (record,) = read_records(tmp_path / "arr", "transcript")
    assert record.load(AudioLimits()).shape[0] == pytest.approx(16000, abs=2)
