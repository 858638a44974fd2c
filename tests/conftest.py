"""Shared fixtures: real speech from espeak-ng and a tiny Whisper saved and loaded back through
`from_pretrained`. Nothing here touches the network."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("AUDIORL_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SENTENCES = [
    "turn on the kitchen lights",
    "set a timer for ten minutes",
    "call my sister after lunch",
    "the meeting starts at nine",
    "open the garage door please",
    "the blue car is parked outside",
]
REJECTED = [
    "turn on the kitchen nights",
    "set a timer for minutes",
    "call my sister sister after lunch",
    "the meeting starts at nine today",
    "open the garage floor please",
    "the blue car is outside",
]
VOICES = ["en-us", "en-gb"]


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    """Each test logs to its own SQLite store, never to ./mlruns."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.fixture(scope="session")
def speech_dir(tmp_path_factory) -> Path:
    """Real speech: every sentence in two voices, plus preference and transcript manifests."""
    from audiorl.data.speech import speak

    root = tmp_path_factory.mktemp("speech")
    pairs, transcripts = [], []
    for voice in VOICES:
        for i, (sentence, rejected) in enumerate(zip(SENTENCES, REJECTED)):
            name = f"clips/{voice}-{i}.wav"
            speak(sentence, root / name, voice=voice)
            pairs.append({"audio": name, "chosen": sentence, "rejected": rejected})
            transcripts.append({"audio": name, "text": sentence})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (root / "transcripts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in transcripts))
    return root


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory) -> Path:
    from audiorl.models.whisper import build_tiny_whisper

    return build_tiny_whisper(tmp_path_factory.mktemp("tiny-whisper"), SENTENCES + REJECTED, vocab_size=400, seed=0)


@pytest.fixture
def model_config(tiny_whisper):
    from audiorl.config import ModelConfig

    return ModelConfig(family="whisper", name_or_path=str(tiny_whisper), language="en")


@pytest.fixture
def adapter(model_config):
    from audiorl.models.registry import load_adapter

    return load_adapter(model_config)


def write_config(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_whisper) -> dict[str, Path]:
    """One tiny model per family, each saved and loaded back through its real loader."""
    from audiorl.models.qwen2_audio import build_tiny_qwen2_audio
    from audiorl.models.qwen3_asr import build_tiny_qwen3_asr
    from audiorl.models.step_audio2 import build_tiny_step_audio2

    texts = SENTENCES + REJECTED
    return {
        "whisper": tiny_whisper,
        "qwen2_audio": build_tiny_qwen2_audio(tmp_path_factory.mktemp("qwen2-audio"), texts),
        "qwen3_asr": build_tiny_qwen3_asr(tmp_path_factory.mktemp("qwen3-asr"), texts),
        "step_audio2": build_tiny_step_audio2(tmp_path_factory.mktemp("step-audio2"), texts),
    }
