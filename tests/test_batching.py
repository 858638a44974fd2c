"""Batches by audio length (`data.batch_seconds`): clips of similar length per batch within the
padded-seconds budget, the same cut on every rank and epoch, and less padding than batches of a
fixed count; a model with a fixed input window keeps batches by count and says so."""

from __future__ import annotations

import random

import pytest

import audiorl
from audiorl.config import RunConfig
from audiorl.data.batching import duration_plan, epoch_batches
from audiorl.data.records import read_records


def _durations(n: int, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [round(rng.uniform(0.5, 12.0), 2) for _ in range(n)]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_a_plan_packs_similar_lengths_within_the_budget_and_covers_every_clip(world_size):
    durations = _durations(301)
    plan = duration_plan(durations, 20.0, world_size)
    micro = [batch for group in plan for batch in group]
    assert all(len(group) == world_size for group in plan)
    for batch in micro:
        assert len(batch) == 1 or len(batch) * max(durations[i] for i in batch) <= 20.0
    assert set().union(*map(set, micro)) == set(range(len(durations)))
    # only the last group repeats clips (to fill its ranks), and no clip is in two batches before it
    seen = [i for group in plan[:-1] for batch in group for i in batch]
    assert len(seen) == len(set(seen))
    # a group's batches are neighbours in length: one rank's longest clip is no longer than the next one's shortest
    for group in plan[:-1]:
        for a, b in zip(group, group[1:]):
            assert max(durations[i] for i in a) <= min(durations[i] for i in b)


def test_every_epoch_has_the_same_steps_in_a_seeded_order_shared_by_the_ranks():
    plan = duration_plan(_durations(200), 15.0, world_size=2)
    first, second = epoch_batches(plan, 7, 0, 0), epoch_batches(plan, 7, 1, 0)
    assert len(first) == len(second) == len(plan) == len(epoch_batches(plan, 7, 0, 1))
    assert epoch_batches(plan, 7, 0, 0) == first  # the same for a resumed run
    assert epoch_batches(plan, 7, 0, 1) != first  # reshuffled each epoch
    # both ranks take their batch of the same group at every step
    assert all(any(group[0] is a and group[1] is b for group in plan) for a, b in zip(first, second))


def test_batches_by_length_pad_less_than_batches_of_a_fixed_count():
    """The same clips and the same number of batches: padded seconds (count x longest, what a
    batch costs) summed over batches, against batches of the same mean size in shuffled order."""
    durations = _durations(400, seed=1)
    micro = [batch for group in duration_plan(durations, 24.0) for batch in group]
    size = round(len(durations) / len(micro))
    shuffled = random.Random(0).sample(range(len(durations)), len(durations))
    by_count = [shuffled[i : i + size] for i in range(0, len(shuffled), size)]

    def padded(batches):
        return sum(len(b) * max(durations[i] for i in b) for b in batches)

    assert padded(micro) < 0.75 * padded(by_count)


def _config(tmp_path, model, speech_dir, family, **data):
    return RunConfig.model_validate({
        "model": {"family": family, "name_or_path": str(model)},
        "data": {"train": str(speech_dir / "transcripts.jsonl"), "max_audio_seconds": 5, **data},
        "objective": {"name": "sft"},
        "train": {"output_dir": str(tmp_path / family), "per_device_train_batch_size": 4, "learning_rate": 1e-3,
                  "num_train_epochs": 1, "max_steps": None, "logging_steps": 1, "save_steps": None, "resume": "never", "num_threads": 1,
                  "eval_before_training": False},
        "tracking": {"enabled": False},
    })


def test_a_run_batches_by_length_where_the_cost_grows_with_it_and_not_under_a_fixed_window(tmp_path, tiny_models, speech_dir, capfd):
    records = read_records(speech_dir / "transcripts.jsonl", "transcript")
    budget = 2.5 * max(r.duration() for r in records)  # two clips of the longest length, more of the shorter
    plan = duration_plan([r.duration() for r in records], budget)
    assert len(plan) != 3  # what 12 clips in batches of 4 would give
    outcome = audiorl.train(_config(tmp_path, tiny_models["qwen3_asr"], speech_dir, "qwen3_asr", batch_seconds=budget))
    assert outcome.result.global_step == len(plan)  # one epoch: a step per batch of the plan
    assert "batches by length" in capfd.readouterr().err
    # Whisper pads every clip to its window: the option changes nothing there, and that is said
    outcome = audiorl.train(_config(tmp_path, tiny_models["whisper"], speech_dir, "whisper", batch_seconds=budget))
    assert outcome.result.global_step == 3
    assert "pads every clip to its 5 s input window" in " ".join(capfd.readouterr().err.split())


def test_batches_by_length_do_not_go_with_a_weighted_mixture(tmp_path, speech_dir):
    from audiorl.errors import ConfigError

    with pytest.raises((ConfigError, ValueError), match="batch_seconds: batches by length do not go with a weighted mixture"):
        RunConfig.model_validate({"model": {"name_or_path": "m"}, "data": {
            "train": [{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl", "weight": 2}], "batch_seconds": 10}})
