"""The local backend runs a rendered PyTorchJob or TrainJob here: its pods as local torchrun
processes with the environment the Training Operator (or Trainer v2's torch runtime) would inject,
training for real."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from safetensors.torch import load_file

import audiorl
from tests.conftest import write_config


def _job_config(tmp_path, tiny_whisper, speech_dir, **job):
    return write_config(
        tmp_path / "local-ddp.yaml",
        {
            "model": {"name_or_path": str(tiny_whisper)},
            "data": {"train": str(speech_dir / "pairs.jsonl"), "max_audio_seconds": 5},
            "objective": {"loss_type": ["sigmoid"], "beta": 0.5},
            "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-3,
                      "logging_steps": 1, "save_steps": None, "resume": "never", "eval_before_training": False},
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment_name": "local-job",
                         "system_metrics_interval_s": 0.5},
            "job": {"gpus_per_node": 0, "requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "4Gi"}, "shm_size": "1Gi", **job},
        },
    )


def _submit_local(config, *extra, timeout=600):
    env = {**os.environ, "HF_TOKEN": "local-only-value"}
    return subprocess.run([sys.executable, "-m", "audiorl_cli.main", "submit", str(config), "--local", *extra],
                          capture_output=True, text=True, env=env, timeout=timeout)


# the pods each kind's controller makes, by the names it gives them
_PODS = {"pytorchjob": ("local-ddp-master-0", "local-ddp-worker-0"), "trainjob": ("local-ddp-node-0-0", "local-ddp-node-0-1")}


@pytest.mark.parametrize("api", sorted(_PODS))
def test_a_two_node_job_trains_here_as_two_torchrun_processes(tmp_path, tiny_whisper, speech_dir, api):
    config = _job_config(tmp_path, tiny_whisper, speech_dir, nodes=2, api=api,
                         secret_env=[{"name": "HF_TOKEN", "secret": "hub", "key": "token"},
                                     {"name": "AWS_SECRET_ACCESS_KEY", "secret": "s3", "key": "key", "optional": True}])
    result = _submit_local(config)
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-2000:]
    assert "2 pod(s)" in out and all(f"[{pod}]" in out for pod in _PODS[api])
    # a Secret reference missing here is reported by name, one present is used, and no value is printed
    assert "AWS_SECRET_ACCESS_KEY (Secret s3/key) is not set here" in out
    assert "HF_TOKEN (Secret" not in out and "local-only-value" not in out
    assert "local-ddp: Succeeded" in out
    weights = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert weights

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("local-job").experiment_id])
    # the run's fingerprint counts the global batch: the world was two processes, not one
    from audiorl.config import load_config

    cfg = load_config(config)
    assert run.data.tags["audiorl.config_fingerprint"] == cfg.fingerprint(world_size=2) != cfg.fingerprint(world_size=1)
    steps = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in steps] == [1, 2]
    # submit made the run before the pods started; both nodes logged their system metrics into it
    assert run.data.tags["audiorl.job_name"] == "local-ddp" and run.data.tags["mlflow.runName"] == "local-ddp"
    assert run.data.tags["audiorl.code_version"].startswith(audiorl.__version__)
    for node in ("node-0", "node-1"):
        assert f"system/{node}/cpu_utilization_percentage" in run.data.metrics, sorted(run.data.metrics)
    assert f"run {run.info.run_id}" in result.stderr or run.info.run_id in result.stderr


def test_a_failing_pod_fails_the_local_job(tmp_path, tiny_whisper, speech_dir):
    config = _job_config(tmp_path, tiny_whisper, speech_dir, nodes=2)
    result = _submit_local(config, "--set", f"data.train={tmp_path / 'missing.jsonl'}", timeout=300)
    assert result.returncode == 5
    assert "missing.jsonl" in result.stdout
    assert "local-ddp: Failed" in result.stdout
    # the CLI reports it as it reports a cluster's job: the phase, the pod and its exit code
    assert re.search(r"job local-ddp Failed: pod local-ddp-(master|worker)-0 exited with \d+", result.stderr), result.stderr[-2000:]
