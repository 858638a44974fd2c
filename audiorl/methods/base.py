"""What a training method is, in one place: its section of the run schema, the records it trains
on and the collator that batches them, whether it needs a reference model, the step that turns a
batch into a loss, the tag its runs carry and what its checkpoints hold beyond the model.

One module per method (`sft`, `dpo`, `grpo`), registered in `audiorl.methods.METHODS`. The run
schema's `objective` section is one of the methods' config classes, picked by `objective.name`;
the run script and the tracker look the method up by that name. Nothing else branches on the
objective.

These modules are read by the run schema, which the operator commands (`audiorl render`,
`submit`) import and which must stay quick to start: torch and the model code are named through
`audiorl.lazy`, or imported in `build` (which only a training run calls).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from audiorl.lazy import on_first_use
from audiorl.sections import Section

if TYPE_CHECKING:
    from torch import nn

    from audiorl.config import RunConfig
    from audiorl.models.base import ModelAdapter
    from audiorl.objectives import LossOutput
    from audiorl.reference import Reference

torch_nn: Any = on_first_use("torch.nn")
references: Any = on_first_use("audiorl.reference")


class MethodConfig(Section):
    """The `objective` section of one method; `name` picks the method."""

    name: str


def one_loss_type(value: Any, choices: tuple[str, ...], method: str) -> Any:
    """For the methods that take one `loss_type` string (as TRL's trainers do), where configs
    written for the DPO family's list form are common: a one-item list is that item."""
    if isinstance(value, list) and len(value) == 1:
        return value[0]
    if isinstance(value, list):
        raise ValueError(f"{method} takes one loss_type from {list(choices)}, got {value}")
    return value


class Step:
    """batch -> loss: what the trainer calls, once per micro-batch. It holds the adapter (the
    trainer trains `adapter.model`) and, in `state_dict`, whatever must survive a resume."""

    adapter: ModelAdapter
    #: how many optimizer steps each batch is used for (GRPO's num_iterations)
    batch_repeats: int = 1

    @property
    def model(self) -> nn.Module:
        return self.adapter.model

    def __call__(self, batch: dict[str, Any]) -> LossOutput:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class BuildContext:
    """What a method needs to build its step."""

    run: RunConfig
    adapter: ModelAdapter
    dataset: Any  # the training records as a dataset (for a precomputed reference)
    data_fingerprint: str
    #: under FSDP every rank must make the same model calls in a step (a sharded layer's call is
    #: a collective): sampling then runs to the full length instead of stopping early
    lockstep: bool = False


class Method:
    name: ClassVar[str]
    config: ClassVar[type[MethodConfig]]
    #: the records it trains on: transcripts ({audio, text}), preference pairs ({audio, chosen,
    #: rejected}) or unpaired completions ({audio, completion, label})
    data_kind: ClassVar[Literal["transcript", "preference", "unpaired"]] = "transcript"

    def needs_reference(self, objective: Any) -> bool:
        return False

    def tag(self, objective: Any) -> str:
        """The `audiorl.objective` tag of its runs (and of the models they register)."""
        return self.name

    def prepare_adapter(self, objective: Any, adapter: ModelAdapter) -> None:
        """Add the training-only modules the method trains with (its checkpoints hold them, the
        export leaves them out). Called before training and before a checkpoint is loaded for export."""

    def build(self, ctx: BuildContext) -> tuple[Step, Any]:
        """The step (batch -> loss) and the collator its batches need."""
        raise NotImplementedError


def build_reference(ctx: BuildContext, collate: Any, *, precompute: bool = False, summarize: Any = None, summary_key: str = "") -> Reference:
    """The frozen model the loss compares against: scored once before training and cached
    (`precompute`; `summarize` and `summary_key` as in `precompute_reference`), the same network
    with its LoRA adapter disabled, or a frozen copy."""
    run = ctx.run
    if precompute:
        return references.precompute_reference(
            ctx.adapter,
            ctx.dataset,
            collate,
            batch_size=run.train.per_device_eval_batch_size,
            cache_dir=Path(run.train.output_dir) / "cache",
            key=references.reference_cache_key(ctx.adapter, ctx.data_fingerprint) + summary_key,
            num_workers=run.data.num_workers,
            summarize=summarize,
        )
    if ctx.adapter.uses_lora:
        return references.AdapterDisabledReference(ctx.adapter)
    return references.FrozenReference(ctx.adapter)


def disable_dropout(module: nn.Module) -> None:
    """Preference and RL losses compare log-probs of two forward passes; dropout noise would swamp
    small margins (TRL turns it off too)."""
    for child in module.modules():
        if isinstance(child, torch_nn.Dropout):
            child.p = 0.0
