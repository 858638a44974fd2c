"""Run a rendered PyTorchJob or TrainJob on this machine: one local `torchrun` per pod (a
PyTorchJob's Master, then Workers; a TrainJob's nodes 0..n-1), each with the environment its
container declares plus what the Training Operator (v1) or Trainer v2's torch runtime would
inject, and the run config from the ConfigMap. A way to try a job before a cluster sees it.

What differs from a cluster, and is said when it runs: no image (this Python environment runs
the command), the working directory is the current one instead of the pod's, Secret references
are read from this environment's variables of the same name, and the threads per process are
capped to this machine's cores.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from audiorl.errors import ClusterError
from audiorl.k8s.render import CONFIG_FILE, Rendered
from audiorl.k8s.status import JobState


def operator_env(job: dict[str, Any], replica_type: str, index: int, *, master_addr: str, master_port: int) -> dict[str, str]:
    """The variables the Kubeflow Training Operator (v1) sets in a PyTorchJob's pod. `RANK` is the
    pod's index (Master 0, Worker i is i + 1 when there is a Master), not a process rank:
    torchrun sets each process's own RANK from `PET_NODE_RANK`."""
    spec = job["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    nodes = sum(int(r.get("replicas", 1)) for r in replicas.values())
    nproc = spec.get("nprocPerNode")
    offset = 1 if "Master" in replicas else 0
    node_rank = 0 if replica_type == "Master" else index + offset
    env = {
        "PYTHONUNBUFFERED": "1",
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "PET_MASTER_ADDR": master_addr,
        "PET_MASTER_PORT": str(master_port),
        "WORLD_SIZE": str(nodes * int(nproc) if nproc and str(nproc).isdigit() else nodes),
        "RANK": str(node_rank),
        "PET_NODE_RANK": str(node_rank),
        "PET_NNODES": str(nodes),
    }
    if nproc:
        env["PET_NPROC_PER_NODE"] = str(nproc)
    elastic = spec.get("elasticPolicy")
    if elastic:
        env["PET_NNODES"] = f"{elastic.get('minReplicas', nodes)}:{elastic.get('maxReplicas', nodes)}"
        env["PET_RDZV_BACKEND"] = elastic.get("rdzvBackend", "c10d")
        env["PET_RDZV_ENDPOINT"] = f"{master_addr}:{master_port}"
        env["PET_RDZV_ID"] = job["metadata"]["name"]
        if "maxRestarts" in elastic:
            env["PET_MAX_RESTARTS"] = str(elastic["maxRestarts"])
    return env


def trainer_env(job: dict[str, Any], index: int, *, master_addr: str, master_port: int) -> dict[str, str]:
    """The variables Kubeflow Trainer v2's torch runtime sets in node `index` of a TrainJob: only
    torchrun's `PET_*` (no RANK or WORLD_SIZE, which torchrun sets per process). On a cluster
    `PET_NODE_RANK` is the pod's Job completion index, the master is node 0's pod
    (`NAME-node-0-0.NAME`) on port 29500, and these win over the trainer's own `env`."""
    trainer = job["spec"].get("trainer") or {}
    env = {
        "PET_NNODES": str(trainer.get("numNodes", 1)),
        "PET_NPROC_PER_NODE": str(trainer.get("numProcPerNode", "auto")),
        "PET_NODE_RANK": str(index),
        "PET_MASTER_ADDR": master_addr,
        "PET_MASTER_PORT": str(master_port),
        "JOB_COMPLETION_INDEX": str(index),
    }
    return env


def _pods(job: dict[str, Any]) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(replica type, index, container) for every pod of a PyTorchJob or TrainJob; a TrainJob's
    container is its trainer (image, command, args, env)."""
    if job.get("kind") == "PyTorchJob":
        replicas = job["spec"]["pytorchReplicaSpecs"]
        for replica_type in ("Master", "Worker"):
            if replica_type in replicas:
                container = replicas[replica_type]["template"]["spec"]["containers"][0]
                for index in range(int(replicas[replica_type].get("replicas", 1))):
                    yield replica_type, index, container
    elif job.get("kind") == "TrainJob":
        trainer = job["spec"].get("trainer") or {}
        if not trainer.get("command"):
            raise ClusterError("the TrainJob has no trainer command: the local backend runs the trainer AudioRL renders")
        for index in range(int(trainer.get("numNodes", 1))):
            yield "Node", index, trainer
    else:
        raise ClusterError(f"the local backend runs PyTorchJobs and TrainJobs, not {job.get('kind')!r}")


def _injected_env(job: dict[str, Any], replica_type: str, index: int, *, master_port: int) -> dict[str, str]:
    if job["kind"] == "TrainJob":
        return trainer_env(job, index, master_addr="127.0.0.1", master_port=master_port)
    return operator_env(job, replica_type, index, master_addr="127.0.0.1", master_port=master_port)


def _processes_per_pod(job: dict[str, Any]) -> int:
    nproc = job["spec"].get("nprocPerNode") if job["kind"] == "PyTorchJob" else (job["spec"].get("trainer") or {}).get("numProcPerNode")
    return int(nproc) if str(nproc).isdigit() else 1


_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion in command and args: defined variables are replaced,
    undefined ones are left as written, `$$` is a literal `$`."""
    return _REF.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pod_commands(
    rendered: Rendered, config_path: Path, *, master_port: int, base_env: dict[str, str] | None = None
) -> tuple[list[tuple[str, list[str], dict[str, str]]], list[str]]:
    """(pod name, argv, env) for every pod of the job, and notes on what differs from a cluster."""
    job = rendered.job
    pods_of_job = list(_pods(job))
    base = dict(os.environ if base_env is None else base_env)
    notes: list[str] = []
    pods = []
    total_procs = len(pods_of_job) * _processes_per_pod(job)
    threads = max(1, (os.cpu_count() or 1) // total_procs)
    for replica_type, index, container in pods_of_job:
        env = dict(base)
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = expand(item["value"], env)
                continue
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref and item["name"] not in base:
                note = f"{item['name']} (Secret {ref['name']}/{ref['key']}) is not set here; the pods run without it"
                if note not in notes:
                    notes.append(note)
        env["AUDIORL_CONFIG"] = str(config_path)
        if int(env.get("OMP_NUM_THREADS", "1")) > threads:
            env["OMP_NUM_THREADS"] = str(threads)
        env.update(_injected_env(job, replica_type, index, master_port=master_port))
        argv = [expand(part, env) for part in container["command"] + container.get("args", [])]
        if argv[0] == "torchrun":  # the same program, from this Python environment
            argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
        # pod names as the operators make them: NAME-master-0, NAME-worker-0; NAME-node-0-0 (JobSet)
        suffix = f"node-0-{index}" if replica_type == "Node" else f"{replica_type.lower()}-{index}"
        pods.append((f"{rendered.name}-{suffix}", argv, env))
    notes.append(f"OMP_NUM_THREADS capped at {threads} for {total_procs} processes on {os.cpu_count()} cores")
    return pods, notes


class LocalJobs:
    """The local backend, driven the way `Cluster` is (`submit`, `logs`, `wait`, `status`): a
    job's pods run here as torchrun processes, their output prefixed with the pod's name; the
    first pod that fails, or the deadline, stops the others. The job lives in this process
    (`attached`): the caller streams its output and waits for it, and `close` stops what is left.
    """

    attached = True

    def __init__(self, *, timeout_s: float | None = None):
        self.timeout_s = timeout_s
        self._jobs: dict[str, _LocalJob] = {}

    def submit(self, rendered: Rendered, *, replace: bool = False, server_dry_run: bool = False,
               log: Callable[[str], None] = print) -> None:
        if server_dry_run:
            raise ClusterError("--server-dry-run asks a cluster's API server to check the objects; there is none with --local")
        if rendered.name in self._jobs and not self._jobs[rendered.name].done.is_set():
            if not replace:
                raise ClusterError(f"local job {rendered.name} is still running; pass --replace to stop it and start again")
            self._jobs[rendered.name].stop()
        self._jobs[rendered.name] = _LocalJob(rendered, log, self.timeout_s)

    def _job(self, name: str) -> _LocalJob:
        if name not in self._jobs:
            raise ClusterError(f"no local job {name!r} was submitted in this process")
        return self._jobs[name]

    def logs(self, name: str, *, follow: bool = False, wait_s: float = 300) -> Iterator[str]:
        """The pods' output so far; with `follow`, until every pod has exited."""
        job = self._job(name)
        while True:
            try:
                line = job.lines.get(timeout=0.2 if follow else 0)
            except queue.Empty:
                if not follow or (job.done.is_set() and job.lines.empty() and job.streams_closed()):
                    return
                continue
            yield line

    def status(self, name: str) -> JobState:
        return self._job(name).state()

    def wait(self, name: str, *, timeout_s: float | None = None, on_change: Callable[[JobState], None] | None = None) -> JobState:
        job = self._job(name)
        if on_change is not None:
            on_change(job.state())
        if not job.done.wait(timeout_s):
            job.stop(reason="Timeout", message=f"still running after {timeout_s:g} s")
            job.done.wait()
        state = job.state()
        if on_change is not None:
            on_change(state)
        return state

    def close(self) -> None:
        for job in self._jobs.values():
            job.stop()


class _LocalJob:
    def __init__(self, rendered: Rendered, log: Callable[[str], None], timeout_s: float | None):
        self.name = rendered.name
        self.lines: queue.Queue[str] = queue.Queue()
        self.done = threading.Event()
        self.outcome: tuple[str, str, str] | None = None  # (phase, reason, message)
        self._ending = threading.Lock()  # the watcher and the caller may both end the job
        self._folder = tempfile.TemporaryDirectory(prefix=f"audiorl-{rendered.name}-")
        config_path = Path(self._folder.name) / CONFIG_FILE
        config_path.write_text(rendered.config_map["data"][CONFIG_FILE])
        pods, notes = pod_commands(rendered, config_path, master_port=_free_port())
        log(f"running {rendered.name} locally: {len(pods)} pod(s) as local torchrun processes in {os.getcwd()}")
        for note in notes:
            log(f"  note: {note}")
        self.processes: list[tuple[str, subprocess.Popen[str]]] = []
        self._pumps: list[threading.Thread] = []
        for name, argv, env in pods:
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
            self.processes.append((name, proc))
            pump = threading.Thread(target=self._pump, args=(name, proc.stdout), daemon=True)
            pump.start()
            self._pumps.append(pump)
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        threading.Thread(target=self._watch, daemon=True).start()

    def _pump(self, name: str, stream: Any) -> None:
        for line in stream:
            self.lines.put(f"[{name}] {line.rstrip()}")

    def streams_closed(self) -> bool:
        return not any(pump.is_alive() for pump in self._pumps)

    def _watch(self) -> None:
        """The first pod to fail fails the job and stops the others; every pod succeeding
        succeeds it."""
        while not self.done.is_set():
            codes = [(name, proc.poll()) for name, proc in self.processes]
            failed = next(((name, code) for name, code in codes if code not in (None, 0)), None)
            if failed:
                self.stop(reason="PodFailed", message=f"pod {failed[0]} exited with {failed[1]}")
            elif all(code == 0 for _, code in codes):
                self._finish(("Succeeded", "", ""))
            elif self._deadline is not None and time.monotonic() > self._deadline:
                self.stop(reason="Timeout", message="the deadline (--timeout) passed")
            else:
                time.sleep(0.2)

    def stop(self, *, reason: str = "Stopped", message: str = "stopped before it finished") -> None:
        """Stop every pod still running (SIGTERM, then SIGKILL after 30 s); the job fails."""
        for _, proc in self.processes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc in self.processes:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._finish(("Failed", reason, message))

    def _finish(self, outcome: tuple[str, str, str]) -> None:
        with self._ending:
            if self.outcome is None:
                self.outcome = outcome
            for pump in self._pumps:
                pump.join(timeout=5)
            self._folder.cleanup()
            self.done.set()

    def state(self) -> JobState:
        phase, reason, message = self.outcome or ("Running", "", "")
        counts = {"active": 0, "succeeded": 0, "failed": 0}
        for _, proc in self.processes:
            code = proc.poll()
            counts["active" if code is None else "succeeded" if code == 0 else "failed"] += 1
        return JobState(name=self.name, phase=phase, reason=reason, message=message, replicas={"Pod": counts})
