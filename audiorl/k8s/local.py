"""Run a rendered PyTorchJob on this machine: one local `torchrun` per pod (Master, then
Workers), each with the environment its container declares plus what the Training Operator
would inject, and the run config from the ConfigMap. A way to try a job before a cluster sees it.

What differs from a cluster, and is said when it runs: no image (this Python environment runs
the command), the working directory is the current one instead of the pod's, Secret references
are read from this environment's variables of the same name, and the threads per process are
capped to this machine's cores.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from audiorl.errors import ClusterError
from audiorl.k8s.render import CONFIG_FILE, Rendered


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
    if job.get("kind") != "PyTorchJob":
        raise ClusterError("the local backend runs PyTorchJobs; render without --api trainjob")
    base = dict(os.environ if base_env is None else base_env)
    notes: list[str] = []
    pods = []
    replicas = job["spec"]["pytorchReplicaSpecs"]
    total_procs = sum(int(r.get("replicas", 1)) for r in replicas.values()) * int(job["spec"].get("nprocPerNode") or 1)
    threads = max(1, (os.cpu_count() or 1) // total_procs)
    for replica_type in ("Master", "Worker"):
        if replica_type not in replicas:
            continue
        spec = replicas[replica_type]
        container = spec["template"]["spec"]["containers"][0]
        for index in range(int(spec.get("replicas", 1))):
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
            env.update(operator_env(job, replica_type, index, master_addr="127.0.0.1", master_port=master_port))
            argv = [expand(part, env) for part in container["command"] + container.get("args", [])]
            if argv[0] == "torchrun":  # the same program, from this Python environment
                argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
            pods.append((f"{rendered.name}-{replica_type.lower()}-{index}", argv, env))
    notes.append(f"OMP_NUM_THREADS capped at {threads} for {total_procs} processes on {os.cpu_count()} cores")
    return pods, notes


def run_local(rendered: Rendered, *, log: Callable[[str], None] = print, timeout_s: float | None = None) -> int:
    """Run every pod of the job here, their output prefixed with the pod's name; the first pod
    that fails stops the others. Returns the job's exit code (0 when every pod succeeded)."""
    with tempfile.TemporaryDirectory(prefix=f"audiorl-{rendered.name}-") as tmp:
        config_path = Path(tmp) / CONFIG_FILE
        config_path.write_text(rendered.config_map["data"][CONFIG_FILE])
        pods, notes = pod_commands(rendered, config_path, master_port=_free_port())
        log(f"running {rendered.name} locally: {len(pods)} pod(s) as local torchrun processes in {os.getcwd()}")
        for note in notes:
            log(f"  note: {note}")
        processes: list[tuple[str, subprocess.Popen[str]]] = []
        lock = threading.Lock()

        def pump(name: str, stream: Any) -> None:
            for line in stream:
                with lock:
                    log(f"[{name}] {line.rstrip()}")

        threads = []
        try:
            for name, argv, env in pods:
                proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
                processes.append((name, proc))
                t = threading.Thread(target=pump, args=(name, proc.stdout), daemon=True)
                t.start()
                threads.append(t)
            failed = _wait_all(processes, timeout_s)
        except KeyboardInterrupt:
            failed = ("interrupted", 130)
        finally:
            for _, proc in processes:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            for _, proc in processes:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            for t in threads:
                t.join(timeout=5)
        if failed:
            name, code = failed
            log(f"{rendered.name}: Failed ({name} exited with {code})")
            return code or 1
        log(f"{rendered.name}: Succeeded")
        return 0


def _wait_all(processes: list[tuple[str, subprocess.Popen[str]]], timeout_s: float | None) -> tuple[str, int] | None:
    import time

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        running = False
        for name, proc in processes:
            code = proc.poll()
            if code is None:
                running = True
            elif code != 0:
                return name, code
        if not running:
            return None
        if deadline is not None and time.monotonic() > deadline:
            return "timeout", 124
        time.sleep(0.2)
