"""Process-wide runtime helpers that the run script, the trainer and the model registry share:
which device to use and how to seed every random number generator. Nothing here knows a model
family, a method or the training loop."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from audiorl.errors import TrainingError


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when there is one, else the CPU), `cpu`, `cuda` or `cuda:N`, checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainingError(f"train.device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"train.device={name!r} but CUDA is not available on this machine; use cpu or auto")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(on: bool) -> None:
    """Turn torch's deterministic kernels on or off for this process.

    On CPU the op that needs it is the gradient of an indexed lookup (a decoder's learned positions,
    any `weight[ids]`): with more than one thread its accumulation order varies from run to run.
    Where torch has no deterministic kernel for an op it warns and runs the usual one. On CUDA,
    cuBLAS is deterministic only with a fixed workspace, which this sets when it is not set already
    (it must be, before the first cuBLAS call)."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
