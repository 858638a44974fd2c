"""The outbox: what a run could not send to MLflow while the server was away, kept in order
and sent later, oldest first, through one code path (`replay`) whether the tracker retries it
during training or `audiorl tracking sync OUTPUT_DIR` sends it afterwards.

Items live in memory and in `OUTPUT_DIR/mlflow-unsent.jsonl`, artifact copies under
`OUTPUT_DIR/mlflow-unsent/`; they belong to the run recorded in `OUTPUT_DIR/mlflow-run.json`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from audiorl.config import ModelConfig
from audiorl.errors import AudioRLError
from audiorl.lazy import on_first_use
from audiorl.tracking.store import fail_fast

RUN_FILE = "mlflow-run.json"
UNSENT_FILE = "mlflow-unsent.jsonl"
UNSENT_DIR = "mlflow-unsent"

# imports MLflow's model flavors (seconds): only a registration needs it
model_versions: Any = on_first_use("audiorl.tracking.model_versions")


class Outbox:
    """Items not sent yet, oldest first; with a `folder`, also on disk, so that they outlive the process."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder
        self.items: list[dict[str, Any]] = []
        self._copies = 0
        if folder is not None and (folder / UNSENT_FILE).exists():
            self.items = [json.loads(line) for line in (folder / UNSENT_FILE).read_text().splitlines() if line.strip()]
            copies = folder / UNSENT_DIR
            self._copies = max((int(p.name) for p in copies.iterdir() if p.name.isdigit()), default=0) if copies.is_dir() else 0

    def __len__(self) -> int:
        return len(self.items)

    @property
    def path(self) -> Path | None:
        return self.folder / UNSENT_FILE if self.folder is not None else None

    def keep(self, item: dict[str, Any]) -> None:
        self.items.append(item)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            with (self.folder / UNSENT_FILE).open("a") as f:
                f.write(json.dumps(item) + "\n")

    def keep_copy(self, name: str, write: Callable[[Path], Any]) -> str | None:
        """A copy of an artifact that could not be sent (`write(destination)`); its path, or None
        without a folder."""
        if self.folder is None:
            return None
        self._copies += 1
        place = self.folder / UNSENT_DIR / f"{self._copies:05d}"
        place.mkdir(parents=True, exist_ok=True)
        write(place / name)
        return str(place / name)

    def send_all(self, send: Callable[[dict[str, Any]], Any]) -> int:
        """Send the items oldest first; the first that fails stops the sending (its exception
        goes to the caller) and stays, with everything after it. Returns how many were sent."""
        sent = 0
        try:
            for item in self.items:
                send(item)
                sent += 1
        finally:
            self.items = self.items[sent:]
            self._rewrite()
        return sent

    def _rewrite(self) -> None:
        """The file holds what is left; with nothing left, it and the kept copies go."""
        if self.folder is None:
            return
        path = self.folder / UNSENT_FILE
        if self.items:
            path.write_text("".join(json.dumps(item) + "\n" for item in self.items))
        elif path.exists():
            path.unlink()
            shutil.rmtree(self.folder / UNSENT_DIR, ignore_errors=True)


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
        return model_versions.register(run_id, client.tracking_uri, item["path"], ModelConfig(**item["model"]), name=item["name"],
                        tags=item["tags"], max_new_tokens=item["max_new_tokens"])
    else:
        raise ValueError(f"unknown kept item {kind!r}")


def sync(output_dir: str | Path, tracking_uri: str | None = None) -> tuple[str, int]:
    """Send what a run could not send (`OUTPUT_DIR/mlflow-unsent.jsonl`) to the run it belongs to,
    on the server it was recorded with (or `tracking_uri`). Returns (run id, items sent); what
    still fails stays in the file."""
    from mlflow.tracking import MlflowClient

    folder = Path(output_dir)
    record_path = folder / RUN_FILE
    if not record_path.exists():
        raise AudioRLError(f"{record_path}: not found; give the train.output_dir of a run that used MLflow")
    record = json.loads(record_path.read_text())
    outbox = Outbox(folder)
    if not outbox:
        return record["run_id"], 0
    uri = tracking_uri or record["tracking_uri"]
    if "***" in uri:
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        if not uri:
            raise AudioRLError(f"{record_path}: the run's tracking URI carries a password, which is not stored; pass it with --tracking-uri")
    fail_fast()
    client = MlflowClient(uri)
    return record["run_id"], outbox.send_all(lambda item: replay(client, record["run_id"], item, folder))
