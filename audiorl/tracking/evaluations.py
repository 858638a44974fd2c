"""Evaluation runs: `audiorl eval --log` as one MLflow run with a nested run per test set."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from audiorl.config import TrackingConfig, redact_value
from audiorl.plots import wer_chart
from audiorl.tracking.store import code_version, experiment_id, fail_fast, resolve_tracking_uri


def log_evaluation(results: dict[str, Any], *, model: str, experiment: str, baseline: dict[str, Any] | None = None,
                   baseline_model: str | None = None, run_name: str | None = None, tracking_uri: str | None = None) -> str:
    """One MLflow run for an evaluation, with a nested run per test set: WER, CER, substitutions,
    deletions, insertions, sentence error rate, and the utterances as a table (worst first). The
    parent run gets the WER chart (baseline vs model when a baseline was evaluated)."""
    from mlflow.tracking import MlflowClient

    fail_fast()
    uri = tracking_uri or resolve_tracking_uri(TrackingConfig())
    client = MlflowClient(uri)
    exp_id = experiment_id(client, TrackingConfig(experiment_name=experiment), uri)
    tags = {"audiorl.kind": "evaluation", "audiorl.model": str(redact_value(model)), "audiorl.code_version": code_version()}
    if baseline_model:
        tags["audiorl.baseline_model"] = str(redact_value(baseline_model))
    parent = client.create_run(exp_id, run_name=run_name or f"eval {Path(model).name}", tags=tags)
    pid = parent.info.run_id
    for name, result in results.items():
        child = client.create_run(exp_id, run_name=name,
                                  tags={"mlflow.parentRunId": pid, "audiorl.test_set": name, "audiorl.decoding": result.decoding})
        cid = child.info.run_id
        metrics = {**result.metrics(), "num_utterances": result.num_utterances}
        if baseline and name in baseline:
            metrics.update({f"baseline/{k}": v for k, v in baseline[name].metrics().items()})
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        client.log_batch(cid, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        client.log_batch(pid, metrics=[Metric(f"{name}/{k}", float(v), now, 0) for k, v in result.metrics().items()])
        worst = sorted(result.utterances, key=lambda u: (-u.wer, u.source))
        table = {
            "source": [u.source for u in worst],
            "wer": [u.wer for u in worst],
            "errors": [u.errors for u in worst],
            "reference": [u.reference for u in worst],
            "hypothesis": [u.hypothesis for u in worst],
        }
        client.log_table(cid, data=table, artifact_file="utterances.json")
        client.set_terminated(cid)
    chart: dict[str, dict[str, float]] = {}
    for name, result in results.items():
        chart[name] = {"baseline": baseline[name].wer, "model": result.wer} if baseline and name in baseline else {"model": result.wer}
    client.log_figure(pid, wer_chart(chart, title="WER per test set"), "wer_per_test_set.png")
    client.set_terminated(pid)
    return pid
