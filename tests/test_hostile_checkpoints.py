"""A checkpoint folder on a shared volume is data, not code: a tampered or truncated file is a
one-line error naming it, nothing in it runs, and `resume: auto` falls back to the newest
checkpoint that loads, ending on the same weights as an uninterrupted run."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import audiorl
from audiorl.safe_load import CheckpointError
from tests.test_training import make_config


class _Payload:
    """What an attacker writes into a pickle: loading it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_whisper, speech_dir):
    """A run of 6 steps with checkpoints at 3 and 6, and its final weights."""
    root = tmp_path_factory.mktemp("finished")
    cfg = make_config(root, tiny_whisper, speech_dir)
    outcome = audiorl.train(cfg)
    return Path(cfg.train.output_dir), load_file(str(outcome.final_model_dir / "model.safetensors"))


def _copy(finished, tmp_path, tiny_whisper, speech_dir):
    source, straight = finished
    cfg = make_config(tmp_path, tiny_whisper, speech_dir)
    run = Path(cfg.train.output_dir)
    shutil.copytree(source / "checkpoints", run / "checkpoints")
    cfg.train.resume = "auto"
    return cfg, run / "checkpoints", straight


def _assert_same(outcome, straight):
    resumed = load_file(str(outcome.final_model_dir / "model.safetensors"))
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("tamper", ["state.pt", "scheduler.pt", "dcp/.metadata"])
def test_a_pickle_payload_in_a_checkpoint_never_runs_and_resume_falls_back(finished, tmp_path, tiny_whisper, speech_dir, capfd, tamper):
    cfg, checkpoints, straight = _copy(finished, tmp_path, tiny_whisper, speech_dir)
    marker = tmp_path / "payload-ran"
    target = checkpoints / "checkpoint-6" / tamper
    if tamper.endswith(".pt"):
        torch.save({"rng": _Payload(marker), "step": {}}, target)
    else:
        target.write_bytes(pickle.dumps(_Payload(marker)))
    outcome = audiorl.train(cfg)
    assert not marker.exists(), "a checkpoint file ran code"
    err = capfd.readouterr().err
    assert f"{target.parent if tamper.startswith('dcp') else target}" in err and "trying the checkpoint before it" in err
    assert "resuming from checkpoint-3, the newest checkpoint that loads" in err
    assert outcome.result.resumed_from.endswith("checkpoint-3")
    _assert_same(outcome, straight)


def test_truncated_weights_fall_back_and_nothing_loading_is_an_error(finished, tmp_path, tiny_whisper, speech_dir):
    cfg, checkpoints, straight = _copy(finished, tmp_path, tiny_whisper, speech_dir)
    (shard,) = (checkpoints / "checkpoint-6" / "dcp").glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    (checkpoints / "checkpoint-3" / "trainer_state.json").write_text("{not json")
    with pytest.raises(CheckpointError) as caught:
        audiorl.train(cfg)
    message = str(caught.value)
    assert "no checkpoint in" in message and "loads" in message and "train.resume=never" in message
    assert "checkpoint-6/dcp" in message and "checkpoint-3/trainer_state.json" in message
    # resume named outright: no fallback, the one error
    cfg.train.resume = str(checkpoints / "checkpoint-6")
    with pytest.raises(CheckpointError, match=r"checkpoint-6/dcp: the sharded weights do not load"):
        audiorl.train(cfg)


def test_the_cli_says_it_in_one_line(finished, tmp_path, tiny_whisper, speech_dir):
    import subprocess
    import sys

    import yaml

    cfg, checkpoints, _ = _copy(finished, tmp_path, tiny_whisper, speech_dir)
    for checkpoint in checkpoints.iterdir():
        torch.save({"anything": _Payload(tmp_path / "ran")}, checkpoint / "state.pt")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    result = subprocess.run([sys.executable, "-m", "audiorl_cli.main", "train", str(config)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 5 and not (tmp_path / "ran").exists()
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "no checkpoint in" in line and "state.pt" in line and "Traceback" not in result.stderr
