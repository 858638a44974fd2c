"""AudioRL: preference tuning and reinforcement learning for speech recognition and audio LLMs.

    import audiorl
    cfg = audiorl.load_config("examples/tiny-local-dpo.yaml", ["train.max_steps=50"])
    outcome = audiorl.train(cfg)
    print(audiorl.evaluate(outcome.final_model_dir, "data/test.jsonl").wer)

Attributes are imported on first use, so `import audiorl` does not pull in torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_config": ("audiorl.config", "load_config"),
    "RunConfig": ("audiorl.config", "RunConfig"),
    "train": ("audiorl.run", "train"),
    "evaluate": ("audiorl.api", "evaluate"),
    "load_adapter": ("audiorl.models.registry", "load_adapter"),
    "AudioRLError": ("audiorl.errors", "AudioRLError"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'audiorl' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
