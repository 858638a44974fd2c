"""What a PyTorchJob's (or TrainJob's) status says, read from the object alone (no cluster).

The Training Operator records conditions `Created`, `Running`, `Restarting`, `Succeeded`,
`Suspended` and `Failed`, and per-replica counts under `replicaStatuses`. A job is finished once
`Succeeded` or `Failed` is true; otherwise its phase is the latest condition that is true.

Kubeflow Trainer v2 records only `Suspended` (true while Kueue or the user holds the job, false
with reason `Resumed` after), `Complete` (AudioRL's `Succeeded`) and `Failed`, and the counts of
its child Jobs under `jobsStatus`; a TrainJob in neither state is `Running` once a child Job is
active and `Created` before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TERMINAL = ("Succeeded", "Failed")
_ALIASES = {"Complete": "Succeeded"}


@dataclass
class JobState:
    name: str
    phase: str  # Pending (no condition yet), Created, Running, Restarting, Suspended, Succeeded, Failed
    reason: str = ""
    message: str = ""
    replicas: dict[str, dict[str, int]] = field(default_factory=dict)
    start_time: str | None = None
    completion_time: str | None = None
    conditions: list[dict[str, Any]] = field(default_factory=list)
    kind: str = ""

    @property
    def finished(self) -> bool:
        return self.phase in TERMINAL

    @property
    def failed_replicas(self) -> dict[str, int]:
        return {kind: counts["failed"] for kind, counts in self.replicas.items() if counts.get("failed")}

    def summary(self) -> str:
        parts = [f"{self.name}: {self.phase}"]
        if self.reason:
            parts.append(f"({self.reason})")
        counts = ", ".join(
            f"{kind} " + " ".join(f"{k} {v}" for k, v in c.items() if v) for kind, c in sorted(self.replicas.items()) if any(c.values())
        )
        if counts:
            parts.append(f"[{counts}]")
        if self.message:
            parts.append(f"- {self.message}")
        return " ".join(parts)


def _counts(counts: dict[str, Any]) -> dict[str, int]:
    return {key: int(counts.get(key) or 0) for key in ("active", "succeeded", "failed")}


def job_state(obj: dict[str, Any]) -> JobState:
    status = obj.get("status") or {}
    conditions = list(status.get("conditions") or [])
    true = [c for c in conditions if str(c.get("status")) == "True"]
    terminal = [c for c in true if _ALIASES.get(c.get("type"), c.get("type")) in TERMINAL]
    current = (terminal or true or [None])[-1]
    phase = _ALIASES.get(current["type"], current["type"]) if current else "Pending"
    completion = status.get("completionTime")
    if obj.get("kind") == "TrainJob":
        replicas = {job.get("name", "?"): _counts(job) for job in status.get("jobsStatus") or []}
        if current is None:
            phase = "Running" if any(c["active"] for c in replicas.values()) else "Created" if conditions or replicas else "Pending"
        elif terminal:
            completion = completion or current.get("lastTransitionTime")
    else:
        replicas = {kind: _counts(counts) for kind, counts in (status.get("replicaStatuses") or {}).items()}
    return JobState(
        name=obj.get("metadata", {}).get("name", ""),
        phase=phase,
        reason=(current or {}).get("reason", "") or "",
        message=(current or {}).get("message", "") or "",
        replicas=replicas,
        start_time=status.get("startTime"),
        completion_time=completion,
        conditions=conditions,
        kind=obj.get("kind", ""),
    )
