"""The reference model of DPO-style objectives, three ways:

- `FrozenReference`: a frozen copy of the starting weights (eval mode, no gradients);
- `AdapterDisabledReference`: with LoRA, the same network with the adapter switched off, so no
  second copy is held in memory;
- `PrecomputedReference`: one pass before training, cached on disk and keyed by model and data;
  training then runs the policy alone.

The audio encoder runs once per clip for the reference too; when the policy's encoder does not
train, its output equals the reference's and is reused as is.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from audiorl.models.base import (
    AudioContext,
    ModelAdapter,
    SequenceLogps,
    model_source,
    save_whole,
)
from audiorl.progress import console, progress_bar
from audiorl.safe_load import CheckpointError, load_pt


class Reference(ABC):
    def logps(self, batch: dict[str, Any], policy_context: AudioContext, targets: list[list[int]], index: torch.Tensor,
              summarize=None) -> torch.Tensor:
        """Reference log-probs of `targets` (N,), without gradients: summed, or `summarize(scored)`
        (LD-DPO's weighted sums)."""
        scored = self.score(batch, policy_context, targets, index)
        return summarize(scored) if summarize is not None else scored.sum

    @abstractmethod
    def score(self, batch: dict[str, Any], policy_context: AudioContext, targets: list[list[int]], index: torch.Tensor) -> SequenceLogps:
        """Per-token reference log-probs of `targets`, without gradients."""


class FrozenReference(Reference):
    def __init__(self, adapter: ModelAdapter):
        self.adapter = adapter
        self.module = copy.deepcopy(adapter.model).eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def score(self, batch, policy_context, targets, index):
        context = policy_context
        if self.adapter.encoder_trainable:
            context = self.adapter.encode(batch["features"], model=self.module)
        return self.adapter.sequence_logps(context, targets, index, model=self.module)


class AdapterDisabledReference(Reference):
    def __init__(self, adapter: ModelAdapter):
        if not adapter.uses_lora:
            raise ValueError("AdapterDisabledReference needs a LoRA model")
        self.adapter = adapter

    @torch.no_grad()
    def score(self, batch, policy_context, targets, index):
        module = self.adapter.model
        # asked before disabling: peft turns requires_grad off on the adapter while it is disabled
        reencode = self.adapter.encoder_trainable
        was_training = module.training
        module.eval()
        try:
            with self.adapter.disabled_adapter():
                context = policy_context
                if reencode:
                    context = self.adapter.encode(batch["features"])
                return self.adapter.sequence_logps(context, targets, index)
        finally:
            module.train(was_training)


class PrecomputedReference(Reference):
    def __init__(self, chosen: torch.Tensor, rejected: torch.Tensor):
        self.chosen = chosen
        self.rejected = rejected

    def logps(self, batch, policy_context, targets, index, summarize=None):
        # summarized before training, by the same function (precompute_reference's `summarize`)
        rows = batch["index"]
        return torch.cat([self.chosen[rows], self.rejected[rows]])

    def score(self, batch, policy_context, targets, index):
        raise NotImplementedError("precomputed reference log-probs are sums per pair, not per token")


def reference_cache_key(adapter: ModelAdapter, data_fingerprint: str) -> str:
    """Keyed by what changes the numbers: the model source and its weights' files, the prompt
    settings and dtype, and the data."""
    cfg = adapter.config
    parts: dict[str, Any] = {
        "model": model_source(adapter),
        "language": cfg.language,
        "task": cfg.task,
        "data": data_fingerprint,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def precompute_reference(
    adapter: ModelAdapter,
    dataset,
    collate_fn,
    *,
    batch_size: int,
    cache_dir: str | Path,
    key: str,
    num_workers: int = 0,
    summarize=None,
) -> PrecomputedReference:
    """Score every pair once with the starting weights (adapter off under LoRA) and cache it.
    `summarize(scored, n)` turns the batch's scores (chosen rows then rejected) into one
    log-prob per completion (default: the sum; LD-DPO's weighted sum goes in the key too)."""
    path = Path(cache_dir) / f"reference-logps-{key}.pt"
    if path.exists():
        try:
            cached = load_pt(path)
        except CheckpointError as exc:
            console.print(f"[yellow]warning: {exc}; computing the reference log-probs again[/]")
            cached = None
        if isinstance(cached, dict) and all(isinstance(cached.get(k), torch.Tensor) for k in ("chosen", "rejected")) \
                and cached["chosen"].shape[0] == len(dataset):
            console.print(f"reference log-probs: reusing {path}")
            return PrecomputedReference(cached["chosen"], cached["rejected"])
    chosen = torch.zeros(len(dataset), dtype=torch.float32)
    rejected = torch.zeros(len(dataset), dtype=torch.float32)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn, num_workers=num_workers)
    module = adapter.model
    was_training = module.training
    module.eval()
    disabled = adapter.disabled_adapter() if adapter.uses_lora else contextlib.nullcontext()
    try:
        with disabled, progress_bar("reference log-probs", total=len(dataset)) as advance:
            for batch in loader:
                n = len(batch["chosen_ids"])
                context = adapter.encode(batch["features"])
                index = torch.arange(n).repeat(2)
                scored = adapter.sequence_logps(context, batch["chosen_ids"] + batch["rejected_ids"], index)
                sums = (summarize(scored, n) if summarize is not None else scored.sum).float().cpu()
                chosen[batch["index"]] = sums[:n]
                rejected[batch["index"]] = sums[n:]
                advance(n)
    finally:
        module.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_whole({"chosen": chosen, "rejected": rejected}, path)
    return PrecomputedReference(chosen, rejected)

