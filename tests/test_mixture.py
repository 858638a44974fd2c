"""Weighted training mixtures (`data.train: [{path, weight}, ...]`): draws in proportion to the
weights with the seed, every record of a source before any repeats, per-source counts in the logs
and MLflow, and a resumed run that draws what the uninterrupted one drew."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import audiorl
from audiorl.config import RunConfig, validate_config
from audiorl.data.mixture import Source, draws_per_source, mixture_order, source_names

BIG, SMALL = Source("hard", 0, 100), Source("replay", 100, 10)


def _weighted(*weights):
    return [Source(s.name, s.start, s.count, w) for s, w in zip((BIG, SMALL), weights)]


def test_draws_follow_the_weights_not_the_sizes():
    sources = _weighted(1.0, 3.0)
    shares = [draws_per_source(sources, mixture_order(sources, seed=7, epoch=e))["replay"] / 110 for e in range(30)]
    assert sum(shares) / len(shares) == pytest.approx(0.75, abs=0.02)  # 3 / (1 + 3), though replay is a tenth of the records
    # equal weights: half and half, so the big source is seen only in part each epoch
    even = _weighted(1.0, 1.0)
    assert sum(draws_per_source(even, mixture_order(even, seed=7, epoch=e))["hard"] for e in range(30)) / (30 * 110) == pytest.approx(0.5, abs=0.02)


def test_a_source_is_used_up_before_any_record_repeats():
    sources = _weighted(1.0, 3.0)
    order = mixture_order(sources, seed=3, epoch=0)
    assert len(order) == 110 and all(0 <= i < 110 for i in order)
    replay = [i for i in order if i >= 100]
    for cycle in range(len(replay) // 10):  # each run of 10 replay draws holds all 10 clips once
        assert sorted(replay[cycle * 10 : (cycle + 1) * 10]) == list(range(100, 110))
    hard = [i for i in order if i < 100]
    assert len(hard) == len(set(hard))


def test_the_order_depends_on_the_seed_and_epoch_only():
    sources = _weighted(2.0, 1.0)
    assert mixture_order(sources, seed=1, epoch=4) == mixture_order(list(sources), seed=1, epoch=4)
    assert mixture_order(sources, seed=1, epoch=4) != mixture_order(sources, seed=1, epoch=5)
    assert mixture_order(sources, seed=1, epoch=4) != mixture_order(sources, seed=2, epoch=4)


def test_config_sources_names_and_weights():
    cfg = validate_config({"model": {"name_or_path": "m"}, "data": {"train": ["a/hard.jsonl", {"path": "b/replay.jsonl.gz", "weight": 0.5}]}})
    assert cfg.data.train_sources() == ["a/hard.jsonl", "b/replay.jsonl.gz"] and cfg.data.train_weights() == [1.0, 0.5]
    plain = validate_config({"model": {"name_or_path": "m"}, "data": {"train": ["a.jsonl", "b.jsonl"]}})
    assert plain.data.train_weights() is None  # no weight given: concatenated, each record once an epoch
    assert source_names(["x/hard.jsonl", "y/hard.jsonl", "z/ds"]) == ["0-hard", "1-hard", "ds"]
    from audiorl.errors import ConfigError

    for bad in ([{"path": "a.jsonl", "weight": 0}], ["a.jsonl", {"path": "a.jsonl", "weight": 2}]):
        with pytest.raises(ConfigError, match="data.train"):
            validate_config({"model": {"name_or_path": "m"}, "data": {"train": bad}})


def _mixture_config(tmp_path, tiny_whisper, speech_dir) -> RunConfig:
    rows = [json.loads(line) for line in (speech_dir / "pairs.jsonl").read_text().splitlines()]
    replay = tmp_path / "replay.jsonl"
    replay.write_text("".join(json.dumps({**r, "audio": str(speech_dir / r["audio"])}) + "\n" for r in rows[:2]))
    return RunConfig.model_validate({
        "model": {"name_or_path": str(tiny_whisper)},
        "data": {"train": [str(speech_dir / "pairs.jsonl"), {"path": str(replay), "weight": 3.0}], "max_audio_seconds": 5},
        "objective": {"loss_type": ["sigmoid"], "beta": 0.1},
        "train": {"output_dir": str(tmp_path / "run"), "per_device_train_batch_size": 4, "learning_rate": 1e-3, "max_steps": 6,
                  "logging_steps": 1, "save_steps": 3, "save_total_limit": None, "resume": "never", "num_threads": 1, "seed": 5},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment_name": "mixture"},
    })


def test_a_mixture_trains_logs_its_sources_and_resumes_to_the_same_weights(tmp_path, tiny_whisper, speech_dir, capsys):
    cfg = _mixture_config(tmp_path, tiny_whisper, speech_dir)
    outcome = audiorl.train(cfg)
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "train source replay: 2 records, weight 3 (75% of draws" in out and "train source pairs:" in out
    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(outcome.run_id)
    metrics = run.data.metrics
    total = metrics["data/source/pairs/records"] + metrics["data/source/replay/records"]
    assert metrics["data/source/replay/records"] == 2 and metrics["data/source/replay/share"] == 0.75
    assert metrics["data/source/pairs/draws_per_epoch"] + metrics["data/source/replay/draws_per_epoch"] == total
    assert metrics["data/source/replay/draws_per_epoch"] > metrics["data/source/replay/records"]  # the small source repeats
    straight = load_file(str(outcome.final_model_dir / "model.safetensors"))

    run_dir = Path(cfg.train.output_dir)
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-6")
    shutil.rmtree(run_dir / "final")
    cfg.train.resume = "auto"
    resumed_outcome = audiorl.train(cfg)
    assert resumed_outcome.result.resumed_from.endswith("checkpoint-3")
    resumed = load_file(str(resumed_outcome.final_model_dir / "model.safetensors"))
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)
    # another weight is another run: the checkpoint is refused rather than continued on other data
    other = cfg.model_copy(deep=True)
    other.data.train[1].weight = 1.0
    with pytest.raises(Exception, match="(?i)config"):
        audiorl.train(other)
    # and the trainer did draw by weight: the same sources concatenated (no weights) train otherwise
    plain = cfg.model_copy(deep=True)
    plain.data.train = [str(p if isinstance(p, str) else p.path) for p in cfg.data.train]
    plain.train.output_dir, plain.train.resume, plain.tracking.enabled = str(tmp_path / "plain"), "never", False
    concatenated = load_file(str(audiorl.train(plain).final_model_dir / "model.safetensors"))
    assert any(not torch.equal(concatenated[name], straight[name]) for name in straight)
