"""Batches by audio length (`data.batch_seconds`), for the families whose cost grows with the
clip (those without a fixed input window: an audio LLM's audio tokens grow with it): a micro-batch is
clips of similar length, as many as fit `count x longest <= batch_seconds` (a batch is padded to
its longest clip, so that is what it costs). A clip longer than the budget is a batch alone.

The batches are cut once, from the clips' lengths sorted (ties by index, so every rank cuts the
same), and grouped `world_size` at a time: the micro-batches the ranks take for one step lie next
to each other in length, so no rank waits on a much longer one. Each epoch shuffles the groups
(seeded by the seed and the epoch) and every group keeps its clips, so an epoch always has the
same number of steps and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import torch

Plan = list[list[list[int]]]  # groups of world_size micro-batches, each a list of record indices


def duration_plan(durations: list[float], seconds: float, world_size: int = 1) -> Plan:
    """Micro-batches of similar length within `seconds` (count x longest), grouped by world_size;
    the last group is filled with the first micro-batches again when it is short."""
    order = sorted(range(len(durations)), key=lambda i: (durations[i], i))
    micro: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # sorted ascending: the clip joining is the batch's longest
        if current and (len(current) + 1) * durations[index] > seconds:
            micro.append(current)
            current = []
        current.append(index)
    if current:
        micro.append(current)
    groups = [micro[start : start + world_size] for start in range(0, len(micro), world_size)]
    if len(groups[-1]) < world_size:
        groups[-1] = groups[-1] + (micro * world_size)[: world_size - len(groups[-1])]
    return groups


def epoch_batches(plan: Plan, seed: int, rank: int, epoch: int) -> list[list[int]]:
    """This rank's micro-batches for an epoch: the plan's groups in a seeded order, its own of each."""
    generator = torch.Generator().manual_seed(seed + epoch)
    return [plan[g][rank] for g in torch.randperm(len(plan), generator=generator).tolist()]
