"""A corpus of bad input, built on the fly, as a careless user or a careful attacker would give it:
every case is a one-line error (or a counted warning) naming the file, record or key, fast, and
never a traceback or silence."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from audiorl.audio import AudioLimits, limits_for
from audiorl.config import load_config, validate_config
from audiorl.data.builders import check_manifest
from audiorl.data.records import load_records, read_records, validate_records
from audiorl.errors import AudioRLError, ConfigError, DataError, ModelError, TrainingError

RATE = 16000


def _tone(seconds: float) -> np.ndarray:
    return (0.1 * np.sin(np.arange(int(seconds * RATE)) / 3)).astype(np.float32)


def _manifest(tmp_path: Path, rows: list[dict], name: str = "m.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _clip(tmp_path: Path, name: str, wave: np.ndarray) -> str:
    sf.write(tmp_path / name, wave, RATE)
    return name


# (case, how to make the bad row's audio, the row, the message the check gives)
def _truncated(tmp_path):
    sf.write(tmp_path / "full.wav", _tone(1.0), RATE)
    data = (tmp_path / "full.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    return "cut.wav"


AUDIO_CASES = {
    "truncated wav": (_truncated, {"text": "some words"}, r"m\.jsonl:2: truncated: its WAV header promises \d+ bytes"),
    "silence with a transcript": (lambda p: _clip(p, "zero.wav", np.zeros(RATE, np.float32)), {"text": "some words"},
                                  r"m\.jsonl:2: the clip is digital silence .* but has a transcript"),
    "10 ms clip": (lambda p: _clip(p, "short.wav", _tone(0.01)), {"text": "hi"}, r"m\.jsonl:2: clip is 10 ms long, under data.min_audio_seconds"),
    "a directory": (lambda p: (p / "adir.wav").mkdir() or "adir.wav", {"text": "hi"}, r"m\.jsonl:2: a directory, not an audio file"),
    "over the window": (lambda p: _clip(p, "long.wav", _tone(7.0)), {"text": "hi"},
                        r"m\.jsonl:2: clip is 7\.0 s long, over the 5 s limit \(the model's 5 s input window"),
}


@pytest.mark.parametrize("case", sorted(AUDIO_CASES))
def test_bad_audio_is_named_by_line(tmp_path, case):
    make, row, message = AUDIO_CASES[case]
    good = _clip(tmp_path, "good.wav", _tone(1.0))
    path = _manifest(tmp_path, [{"audio": good, "text": "fine words"}, {"audio": make(tmp_path), **row}])
    limits = limits_for(RATE, 30.0, 5.0, min_seconds=0.1)  # a model with a 5 s window, as the tiny test Whisper has
    with pytest.raises(DataError, match=message):
        validate_records(read_records(path, "transcript"), limits)
    good_records, bad = validate_records(read_records(path, "transcript"), limits, on_bad="skip")
    assert len(good_records) == 1 and len(bad) == 1 and bad[0].source.endswith("m.jsonl:2")
    # `audiorl data check` reports the same, with the same check
    (problem,) = check_manifest(path, "transcript", limits).problems
    assert re.search(message, problem), problem


def test_a_pair_of_one_transcript_is_refused_and_one_of_formatting_only_is_warned(tmp_path, tiny_whisper, capsys):
    from audiorl.config import ModelConfig
    from audiorl.models import load_adapter

    same = {"audio": "a.wav", "chosen": "Turn on the lights.", "rejected": "Turn on the lights."}
    with pytest.raises(DataError, match=r"m\.jsonl:1: 'chosen' and 'rejected' are the same transcript"):
        read_records(_manifest(tmp_path, [same]), "preference")
    # the same words, other case and punctuation: a pair for punctuated output, kept but counted
    clip = _clip(tmp_path, "a.wav", _tone(1.0))
    rows = [{"audio": clip, "chosen": "Turn on the lights.", "rejected": "turn on the  lights"},
            {"audio": clip, "chosen": "turn on the lights", "rejected": "turn off the lights"}]
    adapter = load_adapter(ModelConfig(name_or_path=str(tiny_whisper)))
    good, _ = load_records(_manifest(tmp_path, rows), adapter, AudioLimits(max_seconds=5), "preference", on_bad="error", max_tokens=None,
                           label="train data")
    out = capsys.readouterr()
    text = " ".join((out.out + out.err).split())
    assert len(good) == 2 and "1 pair(s) whose chosen and rejected differ only in case, punctuation or spacing" in text
    assert "m.jsonl:1" in text and "m.jsonl:2" not in text


@pytest.mark.parametrize("content, message", [
    (b'{"audio": "a.wav", "text": "caf\xe9"}\n', r"m\.jsonl: not a UTF-8 JSONL manifest"),
    (("[" * 100000 + "]" * 100000 + "\n").encode(), r"m\.jsonl:1: not valid JSON \(nested too deeply\)"),
])
def test_undecodable_manifests_are_named(tmp_path, content, message):
    (tmp_path / "m.jsonl").write_bytes(content)
    for read in (lambda: read_records(tmp_path / "m.jsonl", "transcript"),
                 lambda: check_manifest(tmp_path / "m.jsonl", "transcript", AudioLimits())):
        with pytest.raises(DataError, match=message):
            read()


def test_duplicates_are_warned_and_counted_and_huge_transcripts_refused_fast(tmp_path, tiny_whisper, capsys):
    from audiorl.config import ModelConfig
    from audiorl.models import load_adapter

    adapter = load_adapter(ModelConfig(name_or_path=str(tiny_whisper)))
    clip = _clip(tmp_path, "a.wav", _tone(1.0))
    row = {"audio": clip, "text": "turn on the kitchen lights"}
    path = _manifest(tmp_path, [row, {"audio": clip, "text": "another"}, row, row])
    good, _ = load_records(path, adapter, AudioLimits(max_seconds=5), "transcript", on_bad="error", max_tokens=None, label="train data")
    assert len(good) == 4  # kept, but said
    out = capsys.readouterr()
    assert "2 duplicate record(s)" in out.out + out.err and "m.jsonl:3 repeats" in out.out + out.err
    huge = _manifest(tmp_path, [{"audio": clip, "text": "word " * 2_000_000}], "huge.jsonl")
    start = time.monotonic()
    with pytest.raises(DataError, match=r"huge\.jsonl:1: transcript .* characters, far over the limit"):
        load_records(huge, adapter, AudioLimits(max_seconds=5), "transcript", on_bad="error", max_tokens=None, label="train data")
    assert time.monotonic() - start < 20


BASE = {"model": {"name_or_path": "/models/m"}, "data": {"train": "/data/t.jsonl"}}


@pytest.mark.parametrize("extra, message", [
    ({"train": {"learning_rate": ".inf"}}, r"train.learning_rate: Input should be a finite number"),
    ({"objective": {"beta": ".nan"}}, r"beta: Input should be a finite number"),
    ({"job": {"labels": {"team/": "x"}}}, r"labels key 'team/' is not a valid Kubernetes key"),
    ({"job": {"annotations": {"-bad": "x"}}}, r"annotations key '-bad' is not a valid Kubernetes key"),
    ({"job": {"requests": {"memory": "128Gi"}, "limits": {"memory": "64Gi"}}}, r"requests.memory 128Gi is above limits.memory 64Gi"),
    ({"job": {"volumes": [{"name": "a", "claim": "c", "mount_path": "/etc/audiorl"}]}}, r"mount paths \['/etc/audiorl'\] are taken"),
    ({"job": {"volumes": [{"name": "a", "claim": "c", "mount_path": "/d"}, {"name": "b", "claim": "e", "mount_path": "/d"}]}},
     r"mount paths \['/d'\] are taken"),
])
def test_bad_config_values_are_refused_naming_the_key(tmp_path, extra, message):
    text = yaml.safe_dump(BASE) + "\n".join(
        f"{section}:\n" + "\n".join(f"  {k}: {json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items())
        for section, values in extra.items() if section not in BASE)
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_a_run_file_that_is_not_utf8_or_a_folder(tmp_path):
    (tmp_path / "run.yaml").write_bytes(b"model:\n  name_or_path: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: not UTF-8 text"):
        load_config(tmp_path / "run.yaml")
    with pytest.raises(ConfigError, match="a directory, not a YAML run file"):
        load_config(tmp_path)


def test_missing_or_broken_model_folders_fail_at_once(tmp_path):
    from audiorl.config import ModelConfig
    from audiorl.models import load_adapter

    (tmp_path / "models").mkdir()
    start = time.monotonic()
    for name, message in [(str(tmp_path / "models" / "gone"), "model folder not found"), ("./models/gone", "model folder not found"),
                          (str(tmp_path / "models"), "a folder without config.json")]:
        with pytest.raises(ModelError, match=message):
            load_adapter(ModelConfig(name_or_path=name))
    assert time.monotonic() - start < 5  # no hub lookup


def _cut(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# a copy of a good model folder, broken one way each
MODEL_DAMAGE = {
    "truncated weights": (lambda d: _cut(d / "model.safetensors", 0.5), r"model.safetensors: not a complete safetensors file"),
    "weights cut inside the header": (lambda d: _cut(d / "model.safetensors", 0.001), r"model.safetensors: not a complete safetensors file"),
    "garbage weights": (lambda d: (d / "model.safetensors").write_bytes(b"<html>404 Not Found</html>"), r"not a complete safetensors file"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), r": no weights \(none of model.safetensors"),
    "no tokenizer files": (lambda d: [f.unlink() for f in d.glob("tokenizer*")], r": no tokenizer files"),
    "a shard the index names is gone": (lambda d: _index(d, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]),
                                        r"model.safetensors.index.json: names shard\(s\) that are not in the folder: model-00002-of-00002"),
    "an index that is not JSON": (lambda d: _index(d, None), r"model.safetensors.index.json: not a readable safetensors index"),
}


def _index(folder: Path, shards: list[str] | None) -> None:
    """The weights as a sharded checkpoint whose index names `shards` (the first one there), or an unreadable index."""
    index = folder / "model.safetensors.index.json"
    if shards is None:
        (folder / "model.safetensors").unlink()
        index.write_text("{")
        return
    (folder / "model.safetensors").rename(folder / shards[0])
    index.write_text(json.dumps({"weight_map": {f"layer{i}": name for i, name in enumerate(shards)}}))


@pytest.mark.parametrize("case", sorted(MODEL_DAMAGE))
def test_broken_model_files_are_named_before_loading(tmp_path, tiny_whisper, case):
    """Each damage to a saved model is one ModelError naming the file (not a safetensors or
    tokenizer traceback from inside transformers)."""
    from audiorl.config import ModelConfig
    from audiorl.models import load_adapter

    damage, message = MODEL_DAMAGE[case]
    model = tmp_path / "model"
    shutil.copytree(tiny_whisper, model)
    damage(model)
    with pytest.raises(ModelError, match=message):
        load_adapter(ModelConfig(name_or_path=str(model)))


@pytest.mark.parametrize("family", ["whisper", "qwen2_audio"])
def test_a_clip_over_the_models_window_is_refused_in_eval(tmp_path, tiny_models, family):
    """Both families that cut features at a fixed window (5 s in the tiny test models) refuse a
    longer clip in eval, naming the line and the window, instead of scoring the cut-off clip."""
    import audiorl

    manifest = _manifest(tmp_path, [{"audio": _clip(tmp_path, "ok.wav", _tone(1.0)), "text": "hi"},
                                    {"audio": _clip(tmp_path, "long.wav", _tone(7.0)), "text": "hi"}])
    with pytest.raises(DataError, match=r"m\.jsonl:2: clip is 7\.0 s long, over the 5 s limit \(the model's 5 s input window"):
        audiorl.evaluate(tiny_models[family], manifest, max_audio_seconds=30.0)


def test_an_output_dir_that_is_a_file(tmp_path, tiny_whisper, speech_dir):
    import audiorl

    (tmp_path / "out").write_text("not a folder")
    cfg = validate_config({"model": {"name_or_path": str(tiny_whisper)}, "data": {"train": str(speech_dir / "pairs.jsonl")},
                           "train": {"output_dir": str(tmp_path / "out")}, "tracking": {"enabled": False}})
    with pytest.raises(ConfigError, match=r"train.output_dir .*out is a file, not a folder"):
        audiorl.train(cfg)


def test_a_resumed_run_refuses_data_that_changed_under_it(tmp_path, tiny_whisper, speech_dir):
    import audiorl
    from tests.test_training import as_if_killed_after_step_3, make_config

    manifest = tmp_path / "pairs.jsonl"
    rows = [json.loads(line) for line in (speech_dir / "pairs.jsonl").read_text().splitlines()]
    manifest.write_text("".join(json.dumps({**r, "audio": str(speech_dir / r["audio"])}) + "\n" for r in rows))
    cfg = make_config(tmp_path, tiny_whisper, speech_dir, data={"train": str(manifest)})
    audiorl.train(cfg)
    as_if_killed_after_step_3(cfg)
    rows[0]["chosen"] = "a different reference"
    manifest.write_text("".join(json.dumps({**r, "audio": str(speech_dir / r["audio"])}) + "\n" for r in rows))
    with pytest.raises(TrainingError, match="the training data changed since this checkpoint"):
        audiorl.train(cfg)


def test_the_cli_gives_one_line_for_each(tmp_path):
    (tmp_path / "run.yaml").write_bytes(b"model:\n  name_or_path: caf\xe9\n")
    result = subprocess.run([sys.executable, "-m", "audiorl_cli.main", "config", "show", str(tmp_path / "run.yaml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] and issubclass(ConfigError, AudioRLError)
