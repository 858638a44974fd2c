"""What `audiorl submit` does before anything reaches a cluster: load the run file, create the
MLflow run the job will log into, and render the objects with that run passed to every pod
(`MLFLOW_RUN_ID`, `MLFLOW_TRACKING_URI`, `MLFLOW_EXPERIMENT_NAME`). The run id is also the
job's `audiorl.dev/run-id` label, so a job and its run find each other.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from audiorl.config import load_config
from audiorl.k8s.render import Rendered, default_job_name, new_run_id, render
from audiorl.tracking import create_job_run, is_connection_error, is_server, resolve_tracking_uri


def prepare(path: str | Path, overrides: list[str] | None = None, *, api: str | None = None, runtime: str | None = None,
            run_id: str | None = None, local: bool = False, create_run: bool = True,
            log: Callable[[str], None] = print) -> tuple[Rendered, str | None]:
    """The rendered objects and the MLflow run id created for them (None when no run was made:
    tracking off, a store only the pods can see, or a server this machine cannot reach)."""
    cfg = load_config(path, overrides or [])
    name = cfg.job.name or default_job_name(Path(path).stem)
    env: dict[str, str] = {}
    mlflow_run = None
    if cfg.tracking.enabled and create_run:
        uri = resolve_tracking_uri(cfg.tracking) if (local or cfg.tracking.tracking_uri) else None
        if uri and (local or is_server(uri)):
            try:
                mlflow_run, uri = create_job_run(cfg, name)
            except Exception as exc:  # noqa: BLE001 - only an unreachable server is tolerated
                if not is_connection_error(exc):
                    raise
                log(f"warning: cannot reach MLflow at {uri} from here ({type(exc).__name__}); the job creates its own run")
            else:
                env = {"MLFLOW_RUN_ID": mlflow_run, "MLFLOW_TRACKING_URI": uri,
                       "MLFLOW_EXPERIMENT_NAME": cfg.tracking.experiment_name}
                log(f"MLflow run {mlflow_run} in experiment '{cfg.tracking.experiment_name}' ({uri})")
    rendered = render(cfg, name=name, run_id=run_id or mlflow_run or new_run_id(), api=api, runtime=runtime, extra_env=env)
    return rendered, mlflow_run
