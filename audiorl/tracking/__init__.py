"""MLflow: where a run's params, metrics, evaluations and models land. Four parts:

- `store`: where MLflow is (the URI, an embedded SQLite store by default), the experiment, the
  run tags and which errors mean the server is away;
- `run`: the run lifecycle, the `Tracker` that owns one training run (create or attach, rank-0
  logging, no step twice, system metrics per node);
- `outbox`: what could not be sent during an outage, kept on disk and sent later through one
  code path (`audiorl tracking sync`);
- `evaluations`: evaluation runs (`audiorl eval --log`);

plus `model_versions` (final models as MLflow models, registration) and `promotion` (the
champion/challenger gate). Nothing here imports torch or MLflow until it is used.
"""

from __future__ import annotations

from audiorl.tracking.evaluations import log_evaluation
from audiorl.tracking.outbox import Outbox, replay, sync
from audiorl.tracking.run import RETRY_S, Tracker, create_job_run
from audiorl.tracking.store import DEFAULT_STORE, code_version, is_connection_error, is_server, resolve_tracking_uri, run_tags

__all__ = ["DEFAULT_STORE", "RETRY_S", "Outbox", "Tracker", "code_version", "create_job_run", "is_connection_error", "is_server",
           "log_evaluation", "replay", "resolve_tracking_uri", "run_tags", "sync"]
