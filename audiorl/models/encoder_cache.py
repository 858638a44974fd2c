"""Encoder states computed once per clip and reused while the encoder does not change.

With `model.freeze_encoder` the audio encoder's output for a clip is the same at every step, for
the policy and the reference, in evaluation and in rollouts. A pretrained Whisper pads every clip
to 30 s, so its encoder is most of the cost of a step: computing it once per clip for the whole
run takes that cost out of every later visit.

A clip's entry is keyed by the encoder's weights (their names, dtypes and bytes) and by the bytes
of the clip's input features, so a changed clip, a different encoder or a different feature
setting never hits a stale entry, while models that share an encoder (a base and what it became
with its encoder frozen) share the entries. Entries live in memory up to a size bound (least
recently used go first) and, with a directory, on disk as well, where other runs and processes
(pair building, other ranks, `audiorl promote`) find them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from audiorl.models.base import AudioContext, save_whole
from audiorl.safe_load import CheckpointError, load_pt


class EncoderCache:
    """`context_type` is the family's AudioContext, which turns one clip's state into a row and
    rows back into a context (`row`, `from_rows`)."""

    def __init__(self, model_key: str, context_type: type[AudioContext], *, max_bytes: int = 4 * 2**30,
                 directory: str | Path | None = None):
        self.model_key = model_key
        self.context_type = context_type
        self.max_bytes = max_bytes
        self.directory = Path(directory) if directory else None
        if self.directory:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.unreadable = 0  # cache files that did not load as a tensor (replaced)

    def key(self, features: dict[str, torch.Tensor], row: int) -> str:
        digest = hashlib.blake2b(self.model_key.encode(), digest_size=16)
        for name in sorted(features):
            value = features[name][row].detach().cpu().contiguous()
            digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
            digest.update(value.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def encode(self, features: dict[str, torch.Tensor], compute: Callable[[dict[str, torch.Tensor]], AudioContext],
               device: torch.device) -> AudioContext:
        """The context for `features`: cached rows as they are, the others computed in one batch
        by `compute` and kept."""
        rows = next(iter(features.values())).shape[0]
        keys = [self.key(features, row) for row in range(rows)]
        states: list[torch.Tensor | None] = [self._get(key) for key in keys]
        missing = [row for row, state in enumerate(states) if state is None]
        self.hits += rows - len(missing)
        self.misses += len(missing)
        if len(missing) == rows:
            computed = compute(features)
            for row in range(rows):
                self._put(keys[row], computed.row(row))
            return computed
        if missing:
            index = torch.tensor(missing)
            computed = compute({name: value.index_select(0, index.to(value.device)) for name, value in features.items()})
            for position, row in enumerate(missing):
                states[row] = computed.row(position)
                self._put(keys[row], states[row])
        return self.context_type.from_rows(states, device)  # type: ignore[arg-type]

    # -- storage ---------------------------------------------------------------------------------

    def _get(self, key: str) -> torch.Tensor | None:
        state = self._memory.get(key)
        if state is not None:
            self._memory.move_to_end(key)
            return state
        if self.directory is not None:
            path = self.directory / f"{key}.pt"
            if path.is_file():
                try:
                    state = load_pt(path)
                except CheckpointError:
                    state = None
                if isinstance(state, torch.Tensor):
                    self._remember(key, state)
                    return state
                # not a cache entry this code wrote: computed again, and written over
                self.unreadable += 1
                path.unlink(missing_ok=True)
        return None

    def _put(self, key: str, state: torch.Tensor) -> None:
        state = state.detach().to("cpu", copy=True)
        self._remember(key, state)
        if self.directory is not None:
            path = self.directory / f"{key}.pt"
            if not path.exists():
                save_whole(state, path)

    def _remember(self, key: str, state: torch.Tensor) -> None:
        size = state.numel() * state.element_size()
        if key in self._memory or size > self.max_bytes:
            return
        self._memory[key] = state
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._memory.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()
