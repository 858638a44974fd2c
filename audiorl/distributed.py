"""Running under `torchrun`: the process group from the environment, the rank's device, and the
few collective helpers the trainer needs.

torchrun (and the Kubeflow operator's `PET_*` variables it reads) sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a plain `audiorl train` has none of them and runs as a
single process with no process group at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Strategy:
    """How the processes of a run share the work, and what follows from it: `single` (one
    process), `ddp` (every rank holds the whole model) or `fsdp` (each layer sharded over ranks)."""

    name: str
    dist: Dist = Dist()

    @property
    def sharded(self) -> bool:
        return self.name == "fsdp"

    @property
    def lockstep(self) -> bool:
        """Every rank must make the same model calls in a step (a sharded layer's call is a
        collective): sampling runs to the full length instead of stopping early."""
        return self.sharded

    @property
    def caches_encoder(self) -> bool:
        """A rank whose clips were cached would skip the collective calls the others wait in."""
        return not self.sharded

    @property
    def evaluates_in_loop(self) -> bool:
        """The main rank scores the test sets during training. A sharded model cannot generate on
        one rank alone: under FSDP they are scored before sharding and on the exported model."""
        return self.dist.is_main and not self.sharded

    @property
    def evaluates_export(self) -> bool:
        return self.dist.is_main and self.sharded


def strategy_for(setting: str, info: Dist) -> Strategy:
    """`train.distributed.strategy` under this process layout (`auto` is DDP with several processes)."""
    if not info.enabled:
        return Strategy("single", info)
    return Strategy("ddp" if setting == "auto" else setting, info)


def from_env() -> Dist:
    return Dist(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init(device: torch.device, timeout_s: float = 1800) -> Dist:
    """Join the process group when launched by torchrun: NCCL on GPUs, gloo on CPU."""
    info = from_env()
    if not info.enabled or dist.is_initialized():
        return info
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return info


def rank_device(device: torch.device, info: Dist) -> torch.device:
    """Each rank's own GPU under torchrun; CPU stays CPU."""
    if device.type == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return device


def mean_across_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of floats over all ranks (every rank must pass the same keys)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    tensor /= dist.get_world_size()
    return dict(zip(keys, tensor.tolist()))


def mean_tensor_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """A tensor's mean over all ranks (itself outside a process group); no gradient flows."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / dist.get_world_size()


def gather_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D `values` joined (ranks may hold different counts); itself outside a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    counts = [torch.zeros((), dtype=torch.long, device=values.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor(values.numel(), device=values.device))
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    parts = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(c.item())] for part, c in zip(parts, counts)])


def from_every_rank(value) -> list:
    """Every rank's `value` (any picklable object), in rank order; `[value]` outside a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    box: list = [None] * dist.get_world_size()
    dist.all_gather_object(box, value)
    return box


def broadcast_from_main(value):
    """Rank 0's value on every rank (any picklable object)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def node_rank() -> int:
    """Which node (pod) this process runs on: torchrun's GROUP_RANK, or the operator's PET_NODE_RANK."""
    return int(os.environ.get("GROUP_RANK") or os.environ.get("PET_NODE_RANK") or 0)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
