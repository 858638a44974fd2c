"""`model.family` -> adapter class. New families register here and nowhere else."""

from __future__ import annotations

import torch

from audiorl.config import ModelConfig
from audiorl.errors import ConfigError
from audiorl.models.base import ModelAdapter


def _whisper() -> type[ModelAdapter]:
    from audiorl.models.whisper import WhisperAdapter

    return WhisperAdapter


def _qwen2_audio() -> type[ModelAdapter]:
    from audiorl.models.qwen2_audio import Qwen2AudioAdapter

    return Qwen2AudioAdapter


def _qwen3_asr() -> type[ModelAdapter]:
    from audiorl.models.qwen3_asr import Qwen3ASRAdapter

    return Qwen3ASRAdapter


def _step_audio2() -> type[ModelAdapter]:
    from audiorl.models.step_audio2 import StepAudio2Adapter

    return StepAudio2Adapter


_FAMILIES = {
    "whisper": _whisper,
    "qwen2_audio": _qwen2_audio,
    "qwen3_asr": _qwen3_asr,
    "step_audio2": _step_audio2,
}


# config.json `model_type` -> family, so that a saved model names its own family
_MODEL_TYPES = {"whisper": "whisper", "qwen2_audio": "qwen2_audio", "qwen3_asr": "qwen3_asr", "step_audio_2": "step_audio2"}


def detect_family(name_or_path: str) -> str | None:
    """The family of a local model directory, from its config.json; None if it cannot tell."""
    import json
    from pathlib import Path

    config = Path(name_or_path) / "config.json"
    if not config.is_file():
        return None
    try:
        return _MODEL_TYPES.get(json.loads(config.read_text()).get("model_type"))
    except (OSError, ValueError):
        return None


def families() -> list[str]:
    """Built-in families and those installed packages register as entry points."""
    from audiorl.plugins import FAMILY_GROUP, entry_point_names

    return sorted(set(_FAMILIES) | set(entry_point_names(FAMILY_GROUP)))


def adapter_class(family: str) -> type[ModelAdapter]:
    """A built-in family, a `package.module:Class`, or an `audiorl.model_families` entry point."""
    from audiorl.plugins import FAMILY_GROUP, resolve

    if family in _FAMILIES:
        return _FAMILIES[family]()
    cls = resolve(family, FAMILY_GROUP, "model.family")
    if cls is None:
        raise ConfigError(
            f"model.family={family!r} is not supported; choose one of {families()} or name your own adapter as package.module:Class"
        )
    if not (isinstance(cls, type) and issubclass(cls, ModelAdapter)):
        raise ConfigError(f"model.family={family!r}: {cls!r} is not a subclass of audiorl.models.ModelAdapter")
    return cls


def load_adapter(config: ModelConfig, device: torch.device | str = "cpu") -> ModelAdapter:
    """Load the model named by `config` through its family's adapter."""
    return adapter_class(config.family).from_pretrained(config, device=device)
