"""Model families behind one adapter contract (see `base.py`)."""

from audiorl.models.base import AudioContext, Generation, ModelAdapter, SequenceLogps
from audiorl.models.registry import adapter_class, families, load_adapter

__all__ = ["AudioContext", "Generation", "ModelAdapter", "SequenceLogps", "adapter_class", "families", "load_adapter"]
