"""`model.family` -> adapter class. New families register here and nowhere else."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from audiorl.config import ModelConfig
from audiorl.errors import ConfigError, ModelError
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


def check_model_source(name_or_path: str) -> None:
    """Fail at once, naming the path, for a local model folder that is not there: a path-like
    name (absolute, `./`, `../`, `~`, or a folder that exists in part), or any name when the hub
    is off (`HF_HUB_OFFLINE`), rather than after a hub lookup that cannot succeed."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_dir():
            check_model_files(path, name_or_path)
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    looks_local = name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1 or path.parent.name and path.parent.exists()
    if looks_local or offline:
        why = "the hub is off (HF_HUB_OFFLINE)" if offline and not looks_local else "it names a local folder"
        raise ModelError(f"{name_or_path}: model folder not found ({why}); check the path, or import the model first "
                         "(audiorl model import)")


# what holds a tokenizer's vocabulary, in the layouts save_pretrained writes (fast and slow tokenizers)
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt", "spiece.model", "tiktoken.model", "qwen.tiktoken")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_files(path: Path, name: str) -> None:
    """A local model folder holds what loading it needs, each file named when it does not: a
    config.json, a tokenizer vocabulary, and weights whose safetensors headers read and cover
    their files (a truncated or garbage file is refused here, not in a traceback from the loader).
    Only the headers are read: the check costs milliseconds on a multi-GB model."""
    redo = "write it again with save_pretrained (or audiorl model import)"
    if not (path / "config.json").is_file():
        raise ModelError(f"{name}: a folder without config.json; point at a folder written by save_pretrained "
                         "(or audiorl model import)")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelError(f"{name}: no tokenizer files (none of {', '.join(_TOKENIZER_FILES)}); save the processor or tokenizer "
                         "beside the weights (processor.save_pretrained on the same folder)")
    present = [f for f in _WEIGHT_FILES if (path / f).is_file()]
    if not present:
        raise ModelError(f"{name}: no weights (none of {', '.join(_WEIGHT_FILES)}); {redo}")
    shards = [path / "model.safetensors"] if "model.safetensors" in present else []
    if "model.safetensors.index.json" in present:
        index = path / "model.safetensors.index.json"
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"{index}: not a readable safetensors index ({type(exc).__name__}: {exc}); {redo}") from None
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise ModelError(f"{index}: names shard(s) that are not in the folder: {', '.join(missing[:5])}; copy them or {redo}")
        shards += [path / n for n in names]
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"{shard}: not a complete safetensors file ({exc}); the copy may be truncated: copy it again or {redo}") from None


def encoder_cache_settings(directory: str | Path | None) -> dict[str, object]:
    """Model settings that keep a decoding model's encoder states in `directory` (none without a
    folder): decoding and sampling train nothing, so the encoder is frozen anyway, and a
    frozen-encoder run on the same clips and encoder weights finds the states there."""
    return {"freeze_encoder": True, "encoder_cache_dir": str(directory)} if directory else {}


def require_encoder_cache(adapter: ModelAdapter, directory: str | Path | None, what: str) -> None:
    """A folder of encoder states asked of a family that keeps none is refused, not ignored."""
    if directory and adapter.encoder_cache is None:
        raise ConfigError(f"{what}: a {adapter.family} model, whose family has no encoder cache; leave out the encoder cache folder")


def load_adapter(config: ModelConfig, device: torch.device | str = "cpu") -> ModelAdapter:
    """Load the model named by `config` through its family's adapter."""
    check_model_source(config.name_or_path)
    return adapter_class(config.family).from_pretrained(config, device=device)
