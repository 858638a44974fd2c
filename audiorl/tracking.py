"""MLflow: where a run's params, metrics, evaluations and final model land.

With nothing configured, runs go to an embedded SQLite store under ./mlruns (no server needed);
`MLFLOW_TRACKING_URI` or `tracking.tracking_uri` points elsewhere. Only the process that owns
logging (rank 0 under torchrun) talks to MLflow; the others get a tracker that does nothing.
Params are the flattened config with secret-looking keys and URI passwords removed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from audiorl.config import RunConfig, TrackingConfig, flatten, redact_value

DEFAULT_STORE = Path("mlruns")


def resolve_tracking_uri(config: TrackingConfig) -> str:
    if config.tracking_uri:
        return config.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    store = DEFAULT_STORE.resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def _default_artifact_location(uri: str) -> str | None:
    """For the embedded store, keep artifacts beside the database rather than in the cwd."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "artifacts").resolve().as_uri()
    return None


class Tracker:
    """A thin owner of one MLflow run."""

    def __init__(self, config: TrackingConfig, *, active: bool = True):
        self.config = config
        self.active = active and config.enabled
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.tracking_uri: str | None = None
        self._client = None

    def start(self, run_config: RunConfig | None = None, *, run_name: str | None = None, tags: dict[str, str] | None = None) -> str | None:
        if not self.active:
            return None
        import mlflow
        from mlflow.tracking import MlflowClient

        self.tracking_uri = resolve_tracking_uri(self.config)
        mlflow.set_tracking_uri(self.tracking_uri)
        client = MlflowClient(self.tracking_uri)
        experiment = client.get_experiment_by_name(self.config.experiment_name)
        if experiment is None:
            self.experiment_id = client.create_experiment(
                self.config.experiment_name, artifact_location=_default_artifact_location(self.tracking_uri)
            )
        else:
            self.experiment_id = experiment.experiment_id
        all_tags = {**self.config.tags, **(tags or {})}
        existing = os.environ.get("MLFLOW_RUN_ID")
        if existing:
            run = client.get_run(existing)
            client.update_run(existing, status="RUNNING")
        else:
            run = client.create_run(
                self.experiment_id, run_name=run_name or self.config.run_name, tags=all_tags
            )
        self.run_id = run.info.run_id
        self._client = client
        if existing and all_tags:
            for key, value in all_tags.items():
                client.set_tag(self.run_id, key, value)
        if run_config is not None:
            self.log_params(flatten(run_config.to_dict()))
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        if not self._client:
            return
        from mlflow.entities import Param

        safe = [Param(k, str(redact_value(v))[:6000]) for k, v in params.items()]
        existing = self._client.get_run(self.run_id).data.params
        fresh = [p for p in safe if p.key not in existing]
        for start in range(0, len(fresh), 100):
            self._client.log_batch(self.run_id, params=fresh[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self._client or not metrics:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: dict[str, str]) -> None:
        if not self._client:
            return
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, str(value))

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        if self._client:
            self._client.log_artifacts(self.run_id, str(directory), artifact_path)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._client:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        if self._client:
            self._client.log_dict(self.run_id, data, artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        if self._client:
            self._client.set_terminated(self.run_id, status=status)

    def where(self) -> str:
        """A sentence telling a person where to look."""
        if not self.run_id:
            return "MLflow tracking is off"
        ui = f"mlflow ui --backend-store-uri {self.tracking_uri}" if self.tracking_uri and self.tracking_uri.startswith("sqlite") else self.tracking_uri
        return f"MLflow run {self.run_id} in experiment '{self.config.experiment_name}' ({redact_value(self.tracking_uri)}); view it with: {ui}"
