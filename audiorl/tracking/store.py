"""Where MLflow is and what every run carries: the tracking URI (an embedded SQLite store under
./mlruns unless configured), the experiment, the code version, the run tags, and which errors
mean that the server is away.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from audiorl import __version__
from audiorl.config import RunConfig, TrackingConfig, redact_value
from audiorl.methods import method_for

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


def is_server(uri: str) -> bool:
    """A tracking URI that every machine of a job can reach (not a file or SQLite store)."""
    return uri.startswith(("http://", "https://", "databricks"))


def default_artifact_location(uri: str) -> str | None:
    """For the embedded store, keep artifacts beside the database rather than in the cwd."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "artifacts").resolve().as_uri()
    return None


def fail_fast() -> None:
    # MLflow's defaults retry a dead server for minutes; training should notice in seconds
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def code_version() -> str:
    """AudioRL's version, plus the git commit when running from a checkout (or
    $AUDIORL_CODE_VERSION, which an image build can set)."""
    if os.environ.get("AUDIORL_CODE_VERSION"):
        return os.environ["AUDIORL_CODE_VERSION"]
    here = Path(__file__).resolve().parents[1]  # the package: a change anywhere in it makes the checkout dirty
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
    objective = method_for(cfg.objective).tag(cfg.objective)
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


def experiment_id(client, config: TrackingConfig, uri: str) -> str:
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or config.experiment_name
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=default_artifact_location(uri))


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
