"""The model adapter contract.

Objectives, the reference model, evaluation and the trainer talk to a model family only through
this surface, so none of them branches on a family. A family implements:

- `from_pretrained` / `save_pretrained` through transformers' own loaders;
- `features`: waveforms -> model inputs, via the family's own processor;
- `encode`: inputs -> an `AudioContext` (the expensive audio encoder runs once per clip);
- `target_ids`: transcripts -> completion token ids (ending with the end-of-text token);
- `sequence_logps`: context + completions -> per-token log-probs of the completion only,
  never of the prompt/prefix tokens the model is conditioned on;
- `generate`: context -> completions (greedy or sampled);
- which parameters train (full, frozen encoder, LoRA).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from audiorl.config import ModelConfig
from audiorl.errors import ConfigError, ModelError


class AudioContext(ABC):
    """Encoded audio for a batch of clips; rows can be repeated to score many targets per clip."""

    @abstractmethod
    def select(self, index: torch.Tensor) -> AudioContext:
        """Rows `index` of this context (index may repeat rows)."""

    @property
    @abstractmethod
    def batch_size(self) -> int: ...

    # Families whose contexts can be cached per clip (see `encoder_cache.py`) implement these two.
    def row(self, index: int) -> torch.Tensor:
        """Clip `index`'s encoder state as one tensor."""
        raise NotImplementedError(f"{type(self).__name__} cannot be cached per clip")

    @classmethod
    def from_rows(cls, rows: list[torch.Tensor], device: torch.device) -> AudioContext:
        """A context from clips' states as `row` returns them."""
        raise NotImplementedError(f"{cls.__name__} cannot be cached per clip")


@dataclass
class SequenceLogps:
    """Log-probabilities of completions given their audio context.

    token_logps: (N, L) log-prob of each completion token, 0 where `mask` is 0.
    mask:        (N, L) 1 for completion tokens (including the final end-of-text), 0 for padding.
    vocab_logps: (N, L, V) the whole next-token distribution at each position, without gradient,
                 for losses that weigh tokens by it (`entropy`, `log_sum_sq_probs`); None where
                 an adapter does not keep it.
    """

    token_logps: torch.Tensor
    mask: torch.Tensor
    vocab_logps: torch.Tensor | None = None
    vocab_rows: torch.Tensor | None = None  # row i's distributions are vocab_logps[vocab_rows[i]] (no copy until asked)

    @property
    def sum(self) -> torch.Tensor:
        return self.token_logps.sum(dim=-1)

    @property
    def num_tokens(self) -> torch.Tensor:
        return self.mask.sum(dim=-1)

    def _vocab(self, what: str) -> torch.Tensor:
        if self.vocab_logps is None:
            raise ValueError(f"{what} needs the next-token distributions, which this adapter's sequence_logps did not keep")
        return self.vocab_logps if self.vocab_rows is None else self.vocab_logps.index_select(0, self.vocab_rows)

    def entropy(self) -> torch.Tensor:
        """(N, L) entropy of the next-token distribution at each completion position (0 on padding)."""
        logps = self._vocab("entropy")
        return -(logps.exp() * logps).sum(-1) * self.mask

    def log_sum_sq_probs(self) -> torch.Tensor:
        """(N, L) log Σ_v p(v)² at each completion position (0 on padding): WPO's alignment term."""
        return torch.logsumexp(2 * self._vocab("log_sum_sq_probs"), dim=-1) * self.mask


def score_tokens(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> SequenceLogps:
    """Token log-probs of `labels` (N, L) under `logits` (N, L, V), computed in float32 at least."""
    logps = torch.log_softmax(logits.float(), dim=-1)
    token_logps = logps.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * mask
    return SequenceLogps(token_logps=token_logps, mask=mask, vocab_logps=logps.detach())


@dataclass
class Generation:
    token_ids: list[list[int]]
    texts: list[str]


class ModelAdapter(ABC):
    """One model family behind the contract above. `model` is the trainable `nn.Module`."""

    family: ClassVar[str]
    #: how a trained model is logged to MLflow: "transformers" (an automatic-speech-recognition
    #: pipeline, for families transformers has one for) or "pyfunc" (AudioRL's own transcriber)
    mlflow_flavor: ClassVar[str] = "pyfunc"

    def __init__(self, model: nn.Module, config: ModelConfig):
        self.model = model
        self.config = config
        self.processor: Any = None  # the family's processor (features, tokenizer); saved beside the model
        self.encoder_cache: Any = None  # an EncoderCache where the family supports one and the config asks

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def from_pretrained(cls, config: ModelConfig, device: torch.device | str = "cpu") -> ModelAdapter: ...

    def save_pretrained(self, directory: str, state_dict: dict | None = None) -> None:
        """Write a directory the family's loader reads (LoRA merged into the weights), with the
        processor; `state_dict` replaces the in-memory weights (those gathered from shards)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        model = copy.deepcopy(self.model).merge_and_unload() if self.uses_lora else self.model
        model.save_pretrained(out, state_dict=state_dict)
        self.processor.save_pretrained(out)

    # -- data --------------------------------------------------------------------------------

    @property
    @abstractmethod
    def sampling_rate(self) -> int: ...

    @property
    @abstractmethod
    def max_target_tokens(self) -> int:
        """The longest completion (in tokens) the model can score after its prefix."""

    @property
    def window_seconds(self) -> float | None:
        """The longest clip the model hears whole (a fixed input window), or None when it has none."""
        return None

    @abstractmethod
    def features(self, waveforms: list[np.ndarray]) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def target_ids(self, texts: list[str]) -> list[list[int]]: ...

    @abstractmethod
    def decode(self, token_ids: list[list[int]]) -> list[str]: ...

    @property
    @abstractmethod
    def stop_token_ids(self) -> list[int]:
        """Tokens that end a completion; `target_ids` appends the first."""

    # -- compute -----------------------------------------------------------------------------

    @abstractmethod
    def encode(self, features: dict[str, torch.Tensor], model: nn.Module | None = None) -> AudioContext: ...

    @abstractmethod
    def sequence_logps(
        self,
        context: AudioContext,
        targets: list[list[int]],
        index: torch.Tensor | None = None,
        model: nn.Module | None = None,
    ) -> SequenceLogps:
        """Score `targets[i]` against clip `index[i]` of `context` (default: row i)."""

    @abstractmethod
    def generate(
        self,
        context: AudioContext,
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        num_return_sequences: int = 1,
        generator: torch.Generator | None = None,
        prefix: list[int] | None = None,
        early_stop: bool = True,
    ) -> Generation:
        """Greedy or sampled completions. `prefix` (token ids, the same for every row) forces the
        start of each completion; the returned ids are those that follow it. With
        `early_stop=False` decoding runs all `max_new_tokens` steps even when every row has
        ended (sharded models need every rank to make the same calls)."""

    # -- parameters --------------------------------------------------------------------------

    @property
    @abstractmethod
    def encoder_trainable(self) -> bool:
        """True when any audio-encoder parameter receives gradients (then the reference must
        encode the audio with its own weights; otherwise it can reuse the policy's context)."""

    def shard_units(self) -> list[nn.Module]:
        """The submodules FSDP shards one by one (the rest is sharded at the root): by default
        every transformer layer, which transformers and AudioRL's own layers build on
        `GradientCheckpointingLayer`. A family with other layers overrides this."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        return [m for m in self.model.modules() if isinstance(m, GradientCheckpointingLayer)]

    @property
    def uses_lora(self) -> bool:
        return getattr(self.model, "peft_config", None) is not None

    def disabled_adapter(self) -> contextlib.AbstractContextManager[Any]:
        """Context in which the model computes as the base model (LoRA adapter off)."""
        if not self.uses_lora:
            raise RuntimeError("disabled_adapter() needs a LoRA model")
        return self.model.disable_adapter()

    def add_ctc_head(self) -> None:
        """Add a training-only CTC head over the audio encoder's output (see `ctc_loss`)."""
        raise ModelError(f"model family {self.family!r} has no auxiliary CTC loss; set objective.ctc_weight to 0")

    def ctc_loss(self, context: AudioContext, targets: list[list[int]]) -> torch.Tensor:
        """CTC loss of the targets on the encoder output, through the head `add_ctc_head` made."""
        raise ModelError(f"model family {self.family!r} has no auxiliary CTC loss; set objective.ctc_weight to 0")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> ModelAdapter:
        self.model.to(device)
        return self


def with_lora(model: nn.Module, config: ModelConfig) -> nn.Module:
    """Wrap `model` with peft LoRA adapters as `config.lora` says; only adapter weights train."""
    from peft import LoraConfig, get_peft_model

    lora = config.lora
    assert lora is not None
    peft_config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules
    )
    try:
        return get_peft_model(model, peft_config)
    except ValueError as exc:
        raise ModelError(f"model.lora.target_modules={lora.target_modules}: {exc}") from None


def apply_trainable_settings(model: nn.Module, config: ModelConfig, encoder: nn.Module, projector: nn.Module | None) -> nn.Module:
    """Freeze encoder/projector, enable gradient checkpointing, wrap with LoRA, as configured."""
    if config.freeze_encoder:
        encoder.requires_grad_(False)
    if config.freeze_projector:
        if projector is None:
            raise ConfigError(f"model.freeze_projector: the {config.family} family has no projector")
        projector.requires_grad_(False)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if config.lora is not None:
        model = with_lora(model, config)
    return model


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_source(adapter: ModelAdapter) -> dict[str, Any]:
    """What identifies the starting weights, for cache keys: family, source, revision, dtype and,
    for a local directory, its files' names, sizes and modification times."""
    cfg = adapter.config
    parts: dict[str, Any] = {"family": adapter.family, "model": cfg.name_or_path, "revision": cfg.revision, "dtype": cfg.dtype}
    local = Path(cfg.name_or_path)
    if local.is_dir():
        parts["model"] = str(local.resolve())  # the same folder however a config spells its path
        parts["files"] = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in local.iterdir() if p.is_file())
    return parts


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state: every tensor's name, dtype, shape and bytes, in name order
    (an entry that is not a plain tensor, such as a module's extra state, by its repr)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if not isinstance(tensor, torch.Tensor) or tensor.is_meta or tensor.is_quantized:
            digest.update(f"{name}|{tensor!r}".encode())
            continue
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def save_whole(obj: Any, path: Path) -> None:
    """`torch.save` to a temporary name, then rename: ranks and processes that write the same
    cache file at once never leave (or read) half of one."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def load_pretrained(model_class, config: ModelConfig, label: str, processor_loader=None):
    """`model_class.from_pretrained` and the processor (AutoProcessor unless given), with an
    error that names the config key and what was expected."""
    if processor_loader is None:
        from transformers import AutoProcessor

        processor_loader = AutoProcessor.from_pretrained
    try:
        model = model_class.from_pretrained(config.name_or_path, revision=config.revision, dtype=DTYPES[config.dtype])
        processor = processor_loader(config.name_or_path, revision=config.revision)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"model.name_or_path={config.name_or_path!r}: cannot load a {label} model ({exc}); expected a directory "
            "written by save_pretrained or a hub id"
        ) from None
    return model, processor
