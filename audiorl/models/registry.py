"""`model.family` -> adapter class. New families register here and nowhere else."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from audiorl.config import ModelConfig
from audiorl.errors import ConfigError
from audiorl.models.base import ModelAdapter
from audiorl.plugins import FAMILY_GROUP, entry_point_names, resolve

# the built-in families, imported (by the same resolver as a plug-in family) only when one is used
_FAMILIES = {
    "whisper": "audiorl.models.whisper:WhisperAdapter",
    "qwen2_audio": "audiorl.models.qwen2_audio:Qwen2AudioAdapter",
    "qwen3_asr": "audiorl.models.qwen3_asr:Qwen3ASRAdapter",
    "step_audio2": "audiorl.models.step_audio2:StepAudio2Adapter",
}


# config.json `model_type` -> family, so that a saved model names its own family
_MODEL_TYPES = {"whisper": "whisper", "qwen2_audio": "qwen2_audio", "qwen3_asr": "qwen3_asr", "step_audio_2": "step_audio2"}


def detect_family(name_or_path: str) -> str | None:
    """The family of a local model directory, from its config.json; None if it cannot tell."""
    config = Path(name_or_path) / "config.json"
    if not config.is_file():
        return None
    try:
        return _MODEL_TYPES.get(json.loads(config.read_text()).get("model_type"))
    except (OSError, ValueError):
        return None


def families() -> list[str]:
    """Built-in families and those installed packages register as entry points."""
    return sorted(set(_FAMILIES) | set(entry_point_names(FAMILY_GROUP)))


def adapter_class(family: str) -> type[ModelAdapter]:
    """A built-in family, a `package.module:Class`, or an `audiorl.model_families` entry point."""
    cls = resolve(_FAMILIES.get(family, family), FAMILY_GROUP, "model.family")
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
