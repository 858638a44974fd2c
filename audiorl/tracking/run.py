"""The run lifecycle: the `Tracker` that owns one training run in MLflow.

With nothing configured, runs go to an embedded SQLite store under ./mlruns (no server needed);
`MLFLOW_TRACKING_URI` or `tracking.tracking_uri` points elsewhere. Only the process that owns
logging (rank 0 under torchrun) logs params and metrics; the others get a tracker that does
nothing. Params are the flattened config with secret-looking keys and URI passwords removed.

A run can span a job: `audiorl submit` creates it and passes `MLFLOW_RUN_ID` to every pod, and a
restarted run finds its id again in `OUTPUT_DIR/mlflow-run.json`. A step already in the run is
never logged twice. When the server cannot be reached, training goes on: a warning is printed
once, what could not be sent is kept in `OUTPUT_DIR/mlflow-unsent.jsonl` (and files under
`OUTPUT_DIR/mlflow-unsent/`), sending is retried every `RETRY_S` seconds, and
`audiorl tracking sync OUTPUT_DIR` sends whatever is left.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from audiorl.config import RunConfig, TrackingConfig, flatten, redact_tree, redact_value
from audiorl.errors import TrainingError
from audiorl.progress import console
from audiorl.tracking.outbox import RUN_FILE, Outbox, replay
from audiorl.tracking.store import experiment_id, fail_fast, is_connection_error, resolve_tracking_uri, run_tags

RETRY_S = 30.0


def create_job_run(cfg: RunConfig, job_name: str) -> tuple[str, str]:
    """Create the MLflow run a job will log into, before the job exists: (run id, tracking URI)."""
    from mlflow.tracking import MlflowClient

    fail_fast()
    uri = resolve_tracking_uri(cfg.tracking)
    client = MlflowClient(uri)
    run = client.create_run(
        experiment_id(client, cfg.tracking, uri),
        run_name=cfg.tracking.run_name or job_name,
        tags={**run_tags(cfg, job_name=job_name), "audiorl.config_fingerprint": cfg.fingerprint()},
    )
    return run.info.run_id, uri


class Tracker:
    """The owner of one MLflow run, which keeps training going through a tracking outage."""

    def __init__(self, config: TrackingConfig, *, active: bool = True):
        self.config = config
        self.active = active and config.enabled
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.tracking_uri: str | None = None
        self._client = None
        self._logged_steps: dict[str, int] = {}
        self._spill: Path | None = None
        self._outbox = Outbox()
        self._offline_since: float | None = None
        self._last_try = 0.0
        self._warned = False
        self._monitor = None
        self._attached = False

    # -- the run ---------------------------------------------------------------------------

    def start(
        self,
        run_config: RunConfig | None = None,
        *,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        spill_dir: str | Path | None = None,
        resume: bool = False,
    ) -> str | None:
        """Create the run, or attach to `$MLFLOW_RUN_ID`, or (with `resume`) to the run recorded in
        `spill_dir` by an earlier attempt of the same training."""
        if not self.active:
            return None
        from mlflow.tracking import MlflowClient

        fail_fast()
        self.tracking_uri = resolve_tracking_uri(self.config)
        self._spill = Path(spill_dir) if spill_dir else None
        client = MlflowClient(self.tracking_uri)
        # tags are shown to anyone who can read the experiment: secrets in them (by name or shape) are redacted
        all_tags = {k: str(v) for k, v in redact_tree({**self.config.tags, **(tags or {})}).items()}
        existing = os.environ.get("MLFLOW_RUN_ID") or (self._recorded_run() if resume else None)
        try:
            self._open(client, existing, run_name, all_tags)
        except Exception as exc:  # noqa: BLE001
            if not is_connection_error(exc):
                raise
            raise TrainingError(
                f"MLflow at {redact_value(self.tracking_uri)} cannot be reached before training ({type(exc).__name__}): start the "
                "server, fix tracking.tracking_uri / MLFLOW_TRACKING_URI, or set tracking.enabled=false"
            ) from None
        self._client = client
        if self._spill is not None:
            self._spill.mkdir(parents=True, exist_ok=True)
            self._outbox = self._reopen_outbox()
            record = {"run_id": self.run_id, "tracking_uri": str(redact_value(self.tracking_uri)), "experiment_id": self.experiment_id}
            (self._spill / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if existing and all_tags:
            self.set_tags(all_tags)
        if run_config is not None:
            self.log_params(flatten(run_config.to_dict()))
        return self.run_id

    def _open(self, client, existing: str | None, run_name: str | None, all_tags: dict[str, str]) -> None:
        if existing:
            run = client.get_run(existing)
            client.update_run(existing, status="RUNNING")
            self.experiment_id = run.info.experiment_id
            # what an earlier attempt already logged stays, once
            for key in run.data.metrics:
                history = client.get_metric_history(existing, key)
                self._logged_steps[key] = max((m.step for m in history), default=-1)
        else:
            self.experiment_id = experiment_id(client, self.config, self.tracking_uri)
            run = client.create_run(self.experiment_id, run_name=run_name or self.config.run_name, tags=all_tags)
        self.run_id = run.info.run_id

    def _reopen_outbox(self) -> Outbox:
        """What an earlier attempt of this run could not send is sent with this one; what another
        run left unsent is not this run's to send (or to overwrite)."""
        outbox = Outbox(self._spill)
        if outbox and self._recorded_run() != self.run_id:
            raise TrainingError(
                f"{outbox.path} holds {len(outbox)} item(s) that run {self._recorded_run()} never sent to MLflow: send them "
                f"with `audiorl tracking sync {self._spill}` (or delete the file to drop them), or give this run another "
                "train.output_dir"
            )
        return outbox

    def _recorded_run(self) -> str | None:
        path = self._spill / RUN_FILE if self._spill else None
        if path is None or not path.exists():
            return None
        return json.loads(path.read_text()).get("run_id")

    def start_system_metrics(self, node_id: str, interval_s: float = 10.0) -> None:
        """CPU, memory, disk, network (psutil) and GPU (pynvml, where present) of this node,
        logged into the run under `node_id`. One process per node calls this."""
        if not self.run_id:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # its start and stop notices would interleave with the progress bar
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s, node_id=node_id, tracking_uri=self.tracking_uri)
        self._monitor.start()

    def attach(self, run_id: str, tracking_uri: str) -> None:
        """Log into a run another process owns (system metrics of a non-zero rank's node)."""
        from mlflow.tracking import MlflowClient

        fail_fast()
        self.run_id, self.tracking_uri = run_id, tracking_uri
        self._client = MlflowClient(tracking_uri)
        self._attached = True  # the owner ends the run, not this process

    def end(self, status: str = "FINISHED") -> None:
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception:  # noqa: BLE001 - a monitor that cannot flush must not fail the run
                pass
        if not self._client or not self.active or self._attached:
            return
        self._flush(force=True)
        item = {"kind": "terminate", "status": status}
        self._send(lambda c: replay(c, self.run_id, item, self._spill), item)
        if self._outbox:
            where = self._outbox.path or "memory only"
            console.print(f"[yellow]MLflow: {len(self._outbox)} item(s) not sent; they are in {where}"
                          + (f"; send them later with: audiorl tracking sync {self._spill}" if self._spill else "") + "[/]")

    # -- sending, or keeping for later --------------------------------------------------------

    def _send(self, call, spill: dict[str, Any] | None) -> bool:
        """Run `call(client)`; if the server is away, keep `spill` for later and say so once."""
        if self._offline_since is not None and time.monotonic() - self._last_try < RETRY_S:
            self._keep(spill)
            return False
        if self._outbox and not self._flush():
            self._keep(spill)
            return False
        self._last_try = time.monotonic()
        try:
            call(self._client)
        except Exception as exc:  # noqa: BLE001 - sorted by is_connection_error below
            if not is_connection_error(exc):
                raise
            self._went_offline(exc)
            self._keep(spill)
            return False
        if self._offline_since is not None:
            console.print(f"[green]MLflow at {redact_value(self.tracking_uri)} is back; sending resumed[/]")
            self._offline_since = None
        return True

    def _went_offline(self, exc: BaseException) -> None:
        self._offline_since = self._offline_since or time.monotonic()
        if not self._warned:
            self._warned = True
            where = f" and kept in {self._outbox.path}" if self._outbox.path else ""
            console.print(
                f"[yellow]warning: MLflow at {redact_value(self.tracking_uri)} cannot be reached ({type(exc).__name__}); "
                f"training goes on, and what cannot be sent is retried every {RETRY_S:.0f} s{where}[/]"
            )

    def _keep(self, spill: dict[str, Any] | None) -> None:
        if spill is not None:
            self._outbox.keep(spill)

    def _flush(self, force: bool = False) -> bool:
        """Send what was kept, oldest first, unless the server was found away a moment ago."""
        if not self._outbox:
            return True
        if not force and self._offline_since is not None and time.monotonic() - self._last_try < RETRY_S:
            return False
        self._last_try = time.monotonic()
        try:
            self._outbox.send_all(lambda item: replay(self._client, self.run_id, item, self._spill))
        except Exception as exc:  # noqa: BLE001
            if not is_connection_error(exc):
                raise
            self._went_offline(exc)
        return not self._outbox

    # -- what gets logged ---------------------------------------------------------------------

    def log_params(self, params: dict[str, Any]) -> None:
        if not self._client:
            return
        item = {"kind": "params", "params": {k: str(redact_value(v))[:6000] for k, v in params.items()}}
        self._send(lambda client: replay(client, self.run_id, item), item)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self._client or not metrics:
            return
        fresh = {k: float(v) for k, v in metrics.items() if step > self._logged_steps.get(k, -1)}
        if not fresh:
            return
        now = int(time.time() * 1000)
        item = {"kind": "metrics", "step": step, "timestamp": now, "metrics": fresh}
        self._send(lambda c: replay(c, self.run_id, item, self._spill), item)

    def set_tags(self, tags: dict[str, str]) -> None:
        if not self._client or not tags:
            return
        item = {"kind": "tags", "tags": {k: str(v) for k, v in redact_tree(tags).items()}}
        self._send(lambda c: replay(c, self.run_id, item, self._spill), item)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        if not self._client:
            return
        item = {"kind": "artifacts", "path": str(Path(directory).resolve()), "artifact_path": artifact_path}
        self._send(lambda c: replay(c, self.run_id, item, self._spill), item)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self._client:
            return
        path = Path(path)
        item = {"kind": "artifact", "path": str(path.resolve()), "artifact_path": artifact_path}

        def keep() -> dict[str, Any]:
            copy = self._outbox.keep_copy(path.name, lambda dest: shutil.copyfile(path, dest))
            return {**item, "path": copy or item["path"]}

        if not self._send(lambda c: replay(c, self.run_id, item, self._spill), None):
            self._keep(keep())

    def log_dict(self, data: Any, artifact_file: str) -> None:
        if not self._client:
            return
        item = {"kind": "dict", "artifact_file": artifact_file, "data": data}
        self._send(lambda c: replay(c, self.run_id, item, self._spill), item)

    def log_figure(self, figure, artifact_file: str) -> None:
        if not self._client:
            return

        def keep() -> dict[str, Any]:
            copy = self._outbox.keep_copy(Path(artifact_file).name, lambda dest: figure.savefig(dest, dpi=120, bbox_inches="tight"))
            return {"kind": "artifact", "path": copy, "artifact_path": str(Path(artifact_file).parent) if "/" in artifact_file else None}

        if not self._send(lambda c: c.log_figure(self.run_id, figure, artifact_file), None):
            kept = keep()
            if kept["path"]:
                self._keep(kept)

    def register_model(self, model_dir: str | Path, model_config, *, name: str | None, tags: dict[str, str], max_new_tokens: int = 128) -> str | None:
        """Log the final model into the run and, with a `name`, register a new version (alias
        challenger). If the server is away, the request is kept and `audiorl tracking sync`
        completes it."""
        if not self._client:
            return None
        item = {"kind": "register", "path": str(Path(model_dir).resolve()), "model": model_config.model_dump(mode="json"),
                "name": name, "tags": tags, "max_new_tokens": max_new_tokens, "tracking_uri": self.tracking_uri}
        version: list[str] = []
        self._send(lambda c: version.append(replay(c, self.run_id, item, self._spill)), item)
        return version[0] if version else None

    @property
    def offline(self) -> bool:
        return self._offline_since is not None or bool(self._outbox)

    def where(self) -> str:
        """A sentence telling a person where to look."""
        if not self.run_id:
            return "MLflow tracking is off"
        uri = self.tracking_uri or ""
        ui = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else redact_value(uri)
        text = f"MLflow run {self.run_id} in experiment '{self.config.experiment_name}' ({redact_value(uri)}); view it with: {ui}"
        if self._outbox and self._spill is not None:
            text += f"; {len(self._outbox)} item(s) not sent yet: audiorl tracking sync {self._spill}"
        return text
