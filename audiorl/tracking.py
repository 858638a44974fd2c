"""MLflow: where a run's params, metrics, evaluations and models land.

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
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from audiorl import __version__
from audiorl.config import RunConfig, TrackingConfig, flatten, redact_value

DEFAULT_STORE = Path("mlruns")
RUN_FILE = "mlflow-run.json"
UNSENT_FILE = "mlflow-unsent.jsonl"
UNSENT_DIR = "mlflow-unsent"
RETRY_S = 30.0


def resolve_tracking_uri(config: TrackingConfig) -> str:
    if config.tracking_uri:
        return config.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    store = DEFAULT_STORE.resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def is_server(uri: str) -> bool:
    """A tracking URI that every machine of a job can reach (not a file or SQLite store)."""
    return uri.startswith(("http://", "https://", "databricks"))


def _default_artifact_location(uri: str) -> str | None:
    """For the embedded store, keep artifacts beside the database rather than in the cwd."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "artifacts").resolve().as_uri()
    return None


def _fail_fast() -> None:
    # MLflow's defaults retry a dead server for minutes; training should notice in seconds
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def code_version() -> str:
    """AudioRL's version, plus the git commit when running from a checkout (or
    $AUDIORL_CODE_VERSION, which an image build can set)."""
    if os.environ.get("AUDIORL_CODE_VERSION"):
        return os.environ["AUDIORL_CODE_VERSION"]
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        if sha.returncode == 0 and sha.stdout.strip():
            dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "."], capture_output=True, text=True, timeout=5)
            return f"{__version__}+g{sha.stdout.strip()}" + (".dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def run_tags(cfg: RunConfig, *, job_name: str | None = None) -> dict[str, str]:
    """The tags every AudioRL run carries (the data fingerprint is added once the data is read)."""
    objective = cfg.objective.name if cfg.objective.name == "sft" else f"{cfg.objective.name}:{'+'.join(cfg.objective.loss_type)}"
    tags = {
        "audiorl.base_model": str(redact_value(cfg.model.name_or_path)),
        "audiorl.family": cfg.model.family,
        "audiorl.objective": objective,
        "audiorl.code_version": code_version(),
    }
    job_name = job_name or os.environ.get("AUDIORL_JOB_NAME")
    if job_name:
        tags["audiorl.job_name"] = job_name
    return {**cfg.tracking.tags, **tags}


def _experiment_id(client, config: TrackingConfig, uri: str) -> str:
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or config.experiment_name
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=_default_artifact_location(uri))


def create_job_run(cfg: RunConfig, job_name: str) -> tuple[str, str]:
    """Create the MLflow run a job will log into, before the job exists: (run id, tracking URI)."""
    from mlflow.tracking import MlflowClient

    _fail_fast()
    uri = resolve_tracking_uri(cfg.tracking)
    client = MlflowClient(uri)
    run = client.create_run(
        _experiment_id(client, cfg.tracking, uri),
        run_name=cfg.tracking.run_name or job_name,
        tags={**run_tags(cfg, job_name=job_name), "audiorl.config_fingerprint": cfg.fingerprint()},
    )
    return run.info.run_id, uri


def is_connection_error(exc: BaseException) -> bool:
    """Errors that mean 'the server is not there right now', as opposed to a bad request."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, (requests.exceptions.RequestException, ConnectionError, TimeoutError, OSError)):
        return True
    if isinstance(exc, MlflowException):
        text = str(exc)
        return "API request" in text and ("failed with exception" in text or "Max retries" in text or "Connection" in text)
    return False


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
        self._pending: list[dict[str, Any]] = []
        self._offline_since: float | None = None
        self._last_try = 0.0
        self._warned = False
        self._monitor = None
        self._kept_files = 0
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

        _fail_fast()
        self.tracking_uri = resolve_tracking_uri(self.config)
        self._spill = Path(spill_dir) if spill_dir else None
        client = MlflowClient(self.tracking_uri)
        all_tags = {**self.config.tags, **(tags or {})}
        existing = os.environ.get("MLFLOW_RUN_ID") or (self._recorded_run() if resume else None)
        try:
            self._open(client, existing, run_name, all_tags)
        except Exception as exc:  # noqa: BLE001
            if not is_connection_error(exc):
                raise
            from audiorl.errors import TrainingError

            raise TrainingError(
                f"MLflow at {redact_value(self.tracking_uri)} cannot be reached before training ({type(exc).__name__}): start the "
                "server, fix tracking.tracking_uri / MLFLOW_TRACKING_URI, or set tracking.enabled=false"
            ) from None
        self._client = client
        if self._spill is not None:
            self._spill.mkdir(parents=True, exist_ok=True)
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
            self.experiment_id = _experiment_id(client, self.config, self.tracking_uri)
            run = client.create_run(self.experiment_id, run_name=run_name or self.config.run_name, tags=all_tags)
        self.run_id = run.info.run_id

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
        import logging

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # its start and stop notices would interleave with the progress bar
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s, node_id=node_id, tracking_uri=self.tracking_uri)
        self._monitor.start()

    def attach(self, run_id: str, tracking_uri: str) -> None:
        """Log into a run another process owns (system metrics of a non-zero rank's node)."""
        from mlflow.tracking import MlflowClient

        _fail_fast()
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
        if self._pending:
            from audiorl.progress import console

            where = self._spill / UNSENT_FILE if self._spill else "memory only"
            console.print(f"[yellow]MLflow: {len(self._pending)} item(s) not sent; they are in {where}"
                          + (f"; send them later with: audiorl tracking sync {self._spill}" if self._spill else "") + "[/]")

    # -- sending, or keeping for later --------------------------------------------------------

    def _send(self, call, spill: dict[str, Any] | None) -> bool:
        """Run `call(client)`; if the server is away, keep `spill` for later and say so once."""
        if self._offline_since is not None and time.monotonic() - self._last_try < RETRY_S:
            self._keep(spill)
            return False
        if self._pending and not self._flush():
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
            from audiorl.progress import console

            console.print(f"[green]MLflow at {redact_value(self.tracking_uri)} is back; sending resumed[/]")
            self._offline_since = None
        return True

    def _went_offline(self, exc: BaseException) -> None:
        from audiorl.progress import console

        self._offline_since = self._offline_since or time.monotonic()
        if not self._warned:
            self._warned = True
            where = f" and kept in {self._spill / UNSENT_FILE}" if self._spill else ""
            console.print(
                f"[yellow]warning: MLflow at {redact_value(self.tracking_uri)} cannot be reached ({type(exc).__name__}); "
                f"training goes on, and what cannot be sent is retried every {RETRY_S:.0f} s{where}[/]"
            )

    def _keep(self, spill: dict[str, Any] | None) -> None:
        if spill is None:
            return
        self._pending.append(spill)
        if self._spill is not None:
            with (self._spill / UNSENT_FILE).open("a") as f:
                f.write(json.dumps(spill) + "\n")

    def _flush(self, force: bool = False) -> bool:
        """Send what was kept, oldest first; rewrite the file with what is still unsent."""
        if not self._pending:
            return True
        if not force and self._offline_since is not None and time.monotonic() - self._last_try < RETRY_S:
            return False
        self._last_try = time.monotonic()
        sent = 0
        try:
            for item in self._pending:
                replay(self._client, self.run_id, item, self._spill)
                sent += 1
        except Exception as exc:  # noqa: BLE001
            if not is_connection_error(exc):
                raise
            self._went_offline(exc)
        self._pending = self._pending[sent:]
        if self._spill is not None:
            _keep_unsent(self._spill, self._pending)
        return not self._pending

    def _spill_file(self, name: str, write) -> str | None:
        """Keep a copy of an artifact that could not be sent; returns its path (None: no spill dir)."""
        if self._spill is None:
            return None
        self._kept_files += 1
        folder = self._spill / UNSENT_DIR / f"{self._kept_files:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        write(folder / name)
        return str(folder / name)

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
        item = {"kind": "tags", "tags": {k: str(redact_value(v)) for k, v in tags.items()}}
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
            copy = self._spill_file(path.name, lambda dest: shutil.copyfile(path, dest))
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
            copy = self._spill_file(Path(artifact_file).name, lambda dest: figure.savefig(dest, dpi=120, bbox_inches="tight"))
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
        return self._offline_since is not None or bool(self._pending)

    def where(self) -> str:
        """A sentence telling a person where to look."""
        if not self.run_id:
            return "MLflow tracking is off"
        uri = self.tracking_uri or ""
        ui = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else redact_value(uri)
        text = f"MLflow run {self.run_id} in experiment '{self.config.experiment_name}' ({redact_value(uri)}); view it with: {ui}"
        if self._pending and self._spill is not None:
            text += f"; {len(self._pending)} item(s) not sent yet: audiorl tracking sync {self._spill}"
        return text


def _keep_unsent(folder: Path, items: list[dict[str, Any]]) -> None:
    """Rewrite `folder`'s unsent-items file with `items`; with none left, remove it and the kept artifacts."""
    path = folder / UNSENT_FILE
    if items:
        path.write_text("".join(json.dumps(item) + "\n" for item in items))
    elif path.exists():
        path.unlink()
        shutil.rmtree(folder / UNSENT_DIR, ignore_errors=True)


def replay(client, run_id: str, item: dict[str, Any], spill: Path | None = None):
    """Send one kept item (the same code sends it the first time)."""
    from mlflow.entities import Metric, Param

    kind = item["kind"]
    if kind == "metrics":
        batch = [Metric(k, v, item["timestamp"], item["step"]) for k, v in item["metrics"].items()]
        client.log_batch(run_id, metrics=batch)
    elif kind == "params":
        existing = client.get_run(run_id).data.params
        fresh = [Param(k, v) for k, v in item["params"].items() if k not in existing]
        for start in range(0, len(fresh), 100):
            client.log_batch(run_id, params=fresh[start : start + 100])
    elif kind == "tags":
        for key, value in item["tags"].items():
            client.set_tag(run_id, key, value)
    elif kind == "dict":
        client.log_dict(run_id, item["data"], item["artifact_file"])
    elif kind == "artifact":
        client.log_artifact(run_id, item["path"], item.get("artifact_path"))
    elif kind == "artifacts":
        client.log_artifacts(run_id, item["path"], item.get("artifact_path"))
    elif kind == "terminate":
        client.set_terminated(run_id, status=item["status"])
    elif kind == "register":
        from audiorl.config import ModelConfig
        from audiorl.model_versions import register

        return register(run_id, client.tracking_uri, item["path"], ModelConfig(**item["model"]), name=item["name"],
                        tags=item["tags"], max_new_tokens=item["max_new_tokens"])
    else:
        raise ValueError(f"unknown kept item {kind!r}")


def sync(output_dir: str | Path, tracking_uri: str | None = None) -> tuple[str, int]:
    """Send what a run could not send (`OUTPUT_DIR/mlflow-unsent.jsonl`) to the run it belongs to,
    on the server it was recorded with (or `tracking_uri`). Returns (run id, items sent); what
    still fails stays in the file."""
    from mlflow.tracking import MlflowClient

    from audiorl.errors import AudioRLError

    folder = Path(output_dir)
    record_path, unsent = folder / RUN_FILE, folder / UNSENT_FILE
    if not record_path.exists():
        raise AudioRLError(f"{record_path}: not found; give the train.output_dir of a run that used MLflow")
    record = json.loads(record_path.read_text())
    if not unsent.exists():
        return record["run_id"], 0
    uri = tracking_uri or record["tracking_uri"]
    if "***" in uri:
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        if not uri:
            raise AudioRLError(f"{record_path}: the run's tracking URI carries a password, which is not stored; pass it with --tracking-uri")
    _fail_fast()
    client = MlflowClient(uri)
    items = [json.loads(line) for line in unsent.read_text().splitlines() if line.strip()]
    sent = 0
    try:
        for item in items:
            replay(client, record["run_id"], item, folder)
            sent += 1
    finally:
        _keep_unsent(folder, items[sent:])
    return record["run_id"], sent


def log_evaluation(results: dict[str, Any], *, model: str, experiment: str, baseline: dict[str, Any] | None = None,
                   baseline_model: str | None = None, run_name: str | None = None, tracking_uri: str | None = None) -> str:
    """One MLflow run for an evaluation, with a nested run per test set: WER, CER, substitutions,
    deletions, insertions, sentence error rate, and the utterances as a table (worst first). The
    parent run gets the WER chart (baseline vs model when a baseline was evaluated)."""
    from mlflow.tracking import MlflowClient

    from audiorl.plots import wer_chart

    _fail_fast()
    uri = tracking_uri or resolve_tracking_uri(TrackingConfig())
    client = MlflowClient(uri)
    experiment_id = _experiment_id(client, TrackingConfig(experiment_name=experiment), uri)
    tags = {"audiorl.kind": "evaluation", "audiorl.model": str(redact_value(model)), "audiorl.code_version": code_version()}
    if baseline_model:
        tags["audiorl.baseline_model"] = str(redact_value(baseline_model))
    parent = client.create_run(experiment_id, run_name=run_name or f"eval {Path(model).name}", tags=tags)
    pid = parent.info.run_id
    for name, result in results.items():
        child = client.create_run(experiment_id, run_name=name,
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
