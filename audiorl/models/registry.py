"""`model.family` -> adapter class. New families register here and nowhere else."""

from __future__ import annotations

import torch

from audiorl.config import ModelConfig
from audiorl.errors import ConfigError
from audiorl.models.base import ModelAdapter


def _whisper() -> type[ModelAdapter]:
    from audiorl.models.whisper import WhisperAdapter

    return WhisperAdapter


_FAMILIES = {
    "whisper": _whisper,
}


def families() -> list[str]:
    return sorted(_FAMILIES)


def adapter_class(family: str) -> type[ModelAdapter]:
    try:
        return _FAMILIES[family]()
    except KeyError:
        raise ConfigError(f"model.family={family!r} is not supported; choose one of {families()}") from None


def load_adapter(config: ModelConfig, device: torch.device | str = "cpu") -> ModelAdapter:
    """Load the model named by `config` through its family's adapter."""
    return adapter_class(config.family).from_pretrained(config, device=device)
