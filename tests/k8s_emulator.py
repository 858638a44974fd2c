"""A small Kubernetes API server for tests: enough of the real API for the official Python client
and a real `kubectl` to create, read, patch, list, watch and delete ConfigMaps, Pods,
PyTorchJobs and TrainJobs on 127.0.0.1, plus a simulated Training Operator (PyTorchJob) and a
simulated Kubeflow Trainer v2 with Kueue and JobSet (TrainJob) that move a job through its
conditions, make its pods and serve its lead pod's log.

It keeps what the clients rely on: 201 on create and 409 on a name taken, `dryRun=All` stores
nothing, uids, resourceVersions and creation timestamps, label and field selectors, JSON merge
patches (the `/status` subresource too), watches that resume from a resourceVersion and honour
`timeoutSeconds`, and the initial-events bookmark that streaming lists (`kubectl wait`) wait for.
It does not enforce CRD schemas or RBAC and serves no OpenAPI document (so `kubectl apply` runs
with `--validate=false` against it): the manifest tests validate schemas instead.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

# (group, version, plural) -> (kind, namespaced, subresources)
RESOURCES = {
    ("", "v1", "namespaces"): ("Namespace", False, ()),
    ("", "v1", "configmaps"): ("ConfigMap", True, ()),
    ("", "v1", "pods"): ("Pod", True, ("log", "status")),
    ("kubeflow.org", "v1", "pytorchjobs"): ("PyTorchJob", True, ("status",)),
    ("trainer.kubeflow.org", "v1alpha1", "trainjobs"): ("TrainJob", True, ("status",)),
}
_VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (strategic merge patches are applied the same way here)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _matches_labels(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _matches_fields(obj: dict[str, Any], selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        negate = "!=" in term
        key, value = term.replace("!=", "=").replace("==", "=").split("=", 1)
        node: Any = obj
        for part in key.strip().split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if (str(node) == value.strip()) == negate:
            return False
    return True


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def body(self) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


class Store:
    def __init__(self) -> None:
        self.objects: dict[tuple, dict[str, Any]] = {}
        self.events: list[tuple[int, tuple, str, dict[str, Any]]] = []
        self.revision = 1
        self.changed = threading.Condition()
        self.logs: dict[tuple[str, str], str] = {}
        self.requests: list[tuple[str, str]] = []

    def _record(self, res: tuple, kind: str, obj: dict[str, Any]) -> None:
        self.events.append((self.revision, res, kind, copy.deepcopy(obj)))
        self.changed.notify_all()

    def _bump(self, obj: dict[str, Any]) -> None:
        self.revision += 1
        obj["metadata"]["resourceVersion"] = str(self.revision)

    def create(self, res: tuple, namespace: str | None, body: dict[str, Any], dry_run: bool) -> dict[str, Any]:
        kind = RESOURCES[res][0]
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        name = meta.get("name")
        if not name:
            raise ApiError(422, "Invalid", f"{kind}: metadata.name: Required value")
        if body.get("kind") not in (None, kind):
            raise ApiError(400, "BadRequest", f"the body's kind {body.get('kind')!r} does not match {kind}")
        if namespace:
            if meta.get("namespace") not in (None, namespace):
                raise ApiError(400, "BadRequest", "the namespace of the object does not match the namespace of the request")
            meta["namespace"] = namespace
        key = (res, namespace, name)
        with self.changed:
            if key in self.objects:
                raise ApiError(409, "AlreadyExists", f'{res[2]}.{res[0] or "core"} "{name}" already exists')
            obj.setdefault("apiVersion", f"{res[0]}/{res[1]}" if res[0] else res[1])
            obj.setdefault("kind", kind)
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
            if dry_run:
                meta["resourceVersion"] = str(self.revision)
                return obj
            self._bump(obj)
            self.objects[key] = obj
            self._record(res, "ADDED", obj)
            return copy.deepcopy(obj)

    def get(self, res: tuple, namespace: str | None, name: str) -> dict[str, Any]:
        with self.changed:
            obj = self.objects.get((res, namespace, name))
            if obj is None:
                raise ApiError(404, "NotFound", f'{res[2]}.{res[0] or "core"} "{name}" not found')
            return copy.deepcopy(obj)

    def list(self, res: tuple, namespace: str | None, labels: str = "", fields: str = "") -> tuple[list[dict[str, Any]], int]:
        with self.changed:
            items = [
                copy.deepcopy(obj)
                for (r, ns, _), obj in sorted(self.objects.items(), key=lambda kv: kv[0][1:])
                if r == res and (namespace is None or ns == namespace)
                and _matches_labels(obj["metadata"].get("labels") or {}, labels) and _matches_fields(obj, fields)
            ]
            return items, self.revision

    def update(self, res: tuple, namespace: str | None, name: str, new: dict[str, Any], *, subresource: str | None, dry_run: bool) -> dict[str, Any]:
        with self.changed:
            key = (res, namespace, name)
            old = self.objects.get(key)
            if old is None:
                raise ApiError(404, "NotFound", f'{res[2]}.{res[0] or "core"} "{name}" not found')
            expected = (new.get("metadata") or {}).get("resourceVersion")
            if expected and expected != old["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {res[2]} "{name}": the object has been modified')
            if subresource == "status":
                obj = copy.deepcopy(old)
                obj["status"] = copy.deepcopy(new.get("status"))
            else:
                obj = copy.deepcopy(new)
                obj.setdefault("metadata", {})
                for field in ("uid", "creationTimestamp", "namespace", "name"):
                    obj["metadata"][field] = old["metadata"].get(field)
                if "status" in old and RESOURCES[res][2] and "status" in RESOURCES[res][2]:
                    obj["status"] = old["status"]  # the main resource cannot change the status
                obj["metadata"]["generation"] = old["metadata"].get("generation", 1) + (obj.get("spec") != old.get("spec"))
            obj.setdefault("apiVersion", old["apiVersion"])
            obj.setdefault("kind", old["kind"])
            if dry_run:
                return obj
            self._bump(obj)
            self.objects[key] = obj
            self._record(res, "MODIFIED", obj)
            return copy.deepcopy(obj)

    def patch(self, res: tuple, namespace: str | None, name: str, patch: dict[str, Any], *, subresource: str | None, dry_run: bool) -> dict[str, Any]:
        current = self.get(res, namespace, name)
        patched = merge_patch(current, patch)
        patched["metadata"].pop("resourceVersion", None)
        if subresource == "status":
            return self.update(res, namespace, name, patched, subresource="status", dry_run=dry_run)
        return self.update(res, namespace, name, patched, subresource=None, dry_run=dry_run)

    def delete(self, res: tuple, namespace: str | None, name: str, dry_run: bool) -> dict[str, Any]:
        with self.changed:
            key = (res, namespace, name)
            obj = self.objects.get(key)
            if obj is None:
                raise ApiError(404, "NotFound", f'{res[2]}.{res[0] or "core"} "{name}" not found')
            if dry_run:
                return copy.deepcopy(obj)
            del self.objects[key]
            self._bump(obj)
            self._record(res, "DELETED", obj)
            # owner references: dependents go with their owner (background propagation)
            uid = obj["metadata"]["uid"]
            dependents = [k for k, o in self.objects.items() if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences") or [])]
        for dep in dependents:
            self.delete(dep[0], dep[1], dep[2], dry_run=False)
        return copy.deepcopy(obj)


def _discovery(group: str, version: str) -> dict[str, Any]:
    resources = []
    for (g, v, plural), (kind, namespaced, subs) in RESOURCES.items():
        if (g, v) != (group, version):
            continue
        resources.append({"name": plural, "singularName": kind.lower(), "namespaced": namespaced, "kind": kind, "verbs": _VERBS})
        for sub in subs:
            resources.append({"name": f"{plural}/{sub}", "singularName": "", "namespaced": namespaced, "kind": kind,
                              "verbs": ["get", "patch", "update"]})
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{group}/{version}" if group else version, "resources": resources}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    # -- responses --------------------------------------------------------------------------

    def _send(self, code: int, body: Any, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except ValueError:
            import yaml

            return yaml.safe_load(raw)

    # -- routing ----------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = [p for p in url.path.split("/") if p]
        store = self.server.store
        store.requests.append((method, self.path))
        try:
            body = self._body() if method in ("POST", "PUT", "PATCH", "DELETE") else None
            if method == "GET" and self._discovery(parts):
                return
            res, namespace, name, sub = self._resource(parts)
            dry = query.get("dryRun") == "All"
            if method == "GET" and name is None:
                if (query.get("watch") or "").lower() in ("true", "1"):
                    return self._watch(res, namespace, query)
                items, revision = store.list(res, namespace, query.get("labelSelector", ""), query.get("fieldSelector", ""))
                kind = RESOURCES[res][0]
                return self._send(200, {"kind": f"{kind}List", "apiVersion": f"{res[0]}/{res[1]}" if res[0] else res[1],
                                        "metadata": {"resourceVersion": str(revision)}, "items": items})
            if method == "GET" and sub == "log":
                store.get(res, namespace, name)
                return self._send(200, store.logs.get((namespace, name), "").encode(), "text/plain")
            if method == "GET":
                return self._send(200, store.get(res, namespace, name))
            if method == "POST" and name is None:
                return self._send(201, store.create(res, namespace, body, dry))
            if method == "PUT" and name:
                return self._send(200, store.update(res, namespace, name, body, subresource=sub, dry_run=dry))
            if method == "PATCH" and name:
                if "json-patch" in (self.headers.get("Content-Type") or ""):
                    raise ApiError(415, "UnsupportedMediaType", "JSON patches are not supported by this emulator")
                if "apply-patch" in (self.headers.get("Content-Type") or ""):
                    raise ApiError(415, "UnsupportedMediaType", "server-side apply is not supported by this emulator")
                return self._send(200, store.patch(res, namespace, name, body, subresource=sub, dry_run=dry))
            if method == "DELETE" and name:
                return self._send(200, store.delete(res, namespace, name, dry or (body or {}).get("dryRun") == ["All"]))
            raise ApiError(405, "MethodNotAllowed", f"{method} {url.path} is not supported")
        except ApiError as exc:
            self._send(exc.code, exc.body())

    def _discovery(self, parts: list[str]) -> bool:
        if parts == ["version"]:
            self._send(200, {"major": "1", "minor": "32", "gitVersion": "v1.32.0-audiorl-emulator", "platform": "linux/amd64"})
        elif parts == ["api"]:
            self._send(200, {"kind": "APIVersions", "versions": ["v1"],
                             "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})
        elif parts == ["api", "v1"]:
            self._send(200, _discovery("", "v1"))
        elif parts == ["apis"]:
            groups = sorted({(g, v) for g, v, _ in RESOURCES if g})
            self._send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                 "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v}} for g, v in groups]})
        elif len(parts) == 3 and parts[0] == "apis" and any((g, v) == (parts[1], parts[2]) for g, v, _ in RESOURCES):
            self._send(200, _discovery(parts[1], parts[2]))
        else:
            return False
        return True

    def _resource(self, parts: list[str]) -> tuple[tuple, str | None, str | None, str | None]:
        if parts[:1] == ["api"] and len(parts) >= 3:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 4:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({'/'.join(parts)})")
        namespace = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        res = (group, version, rest[0])
        if res not in RESOURCES:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if sub is not None and sub not in RESOURCES[res][2]:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return res, namespace, name, sub

    def _watch(self, res: tuple, namespace: str | None, query: dict[str, str]) -> None:
        store = self.server.store
        labels, fields = query.get("labelSelector", ""), query.get("fieldSelector", "")
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def emit(event: dict[str, Any]) -> None:
            data = json.dumps(event).encode() + b"\n"
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def visible(obj: dict[str, Any]) -> bool:
            ns = obj["metadata"].get("namespace")
            return ((namespace is None or ns == namespace) and _matches_labels(obj["metadata"].get("labels") or {}, labels)
                    and _matches_fields(obj, fields))

        try:
            since = query.get("resourceVersion")
            initial = query.get("sendInitialEvents") == "true" or not since or since == "0"
            if initial:
                items, revision = store.list(res, namespace, labels, fields)
                for obj in items:
                    emit({"type": "ADDED", "object": obj})
                if query.get("sendInitialEvents") == "true":
                    kind = RESOURCES[res][0]
                    emit({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": f"{res[0]}/{res[1]}" if res[0] else res[1],
                          "metadata": {"resourceVersion": str(revision), "annotations": {"k8s.io/initial-events-end": "true"}}}})
                since = revision
            cursor = int(since)
            while time.monotonic() < deadline and not self.server.closing:
                with store.changed:
                    pending = [e for e in store.events if e[0] > cursor and e[1] == res]
                    if not pending:
                        store.changed.wait(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
                        continue
                for revision, _, kind, obj in pending:
                    cursor = max(cursor, revision)
                    if visible(obj):
                        emit({"type": kind, "object": obj})
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    store: Store
    closing: bool = False


class Emulator:
    """`with Emulator() as api:` serves on 127.0.0.1 with a kubeconfig at `api.kubeconfig`."""

    def __init__(self, directory: Path, namespace: str = "default"):
        self.store = Store()
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.store = self.store
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.kubeconfig = Path(directory) / "kubeconfig"
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester", "namespace": namespace}}],
            "users": [{"name": "tester", "user": {}}],
        }))
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> Emulator:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.closing = True
        with self.store.changed:
            self.store.changed.notify_all()
        self.server.shutdown()
        self.server.server_close()

    def objects(self, plural: str) -> dict[tuple[str | None, str], dict[str, Any]]:
        return {(ns, name): obj for (res, ns, name), obj in self.store.objects.items() if res[2] == plural}


PYTORCHJOBS = ("kubeflow.org", "v1", "pytorchjobs")
PODS = ("", "v1", "pods")


class SimulatedOperator:
    """Plays the Training Operator for one job: makes its pods with the operator's labels, then
    moves the job through conditions with pauses between them (so watchers see each one).
    `outcome` is Succeeded or Failed; a failed run reports a failed Worker (or Master)."""

    def __init__(self, api: Emulator, namespace: str, name: str, *, outcome: str = "Succeeded", log: str = "", step_s: float = 0.3,
                 restart: bool = False):
        self.api, self.namespace, self.name = api, namespace, name
        self.outcome, self.log, self.step_s, self.restart = outcome, log, step_s, restart
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def start(self) -> SimulatedOperator:
        self.thread.start()
        return self

    def join(self, timeout: float = 30) -> None:
        self.thread.join(timeout)
        if self.error:
            raise self.error

    def _condition(self, conditions: list[dict[str, Any]], kind: str, reason: str, message: str) -> list[dict[str, Any]]:
        out = [dict(c, status="False") if c["type"] == "Running" and kind in ("Succeeded", "Failed", "Restarting") else c for c in conditions]
        out.append({"type": kind, "status": "True", "reason": reason, "message": message, "lastTransitionTime": _now(), "lastUpdateTime": _now()})
        return out

    def _appeared(self, resource: tuple, timeout_s: float = 20) -> dict[str, Any]:
        """The job, once it has been created (as a controller's informer would see it)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.api.store.get(resource, self.namespace, self.name)
            except ApiError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no {RESOURCES[resource][0]} {self.name} appeared") from None
                time.sleep(0.05)

    def _run(self) -> None:
        try:
            store = self.api.store
            job = self._appeared(PYTORCHJOBS)
            specs = job["spec"]["pytorchReplicaSpecs"]
            counts = {kind: spec.get("replicas", 1) for kind, spec in specs.items()}
            for kind, n in counts.items():
                for i in range(n):
                    pod = {
                        "metadata": {
                            "name": f"{self.name}-{kind.lower()}-{i}",
                            "labels": {
                                **(specs[kind]["template"].get("metadata", {}).get("labels") or {}),
                                "training.kubeflow.org/job-name": self.name,
                                "training.kubeflow.org/replica-type": kind.lower(),
                                "training.kubeflow.org/replica-index": str(i),
                            },
                            "ownerReferences": [{"apiVersion": job["apiVersion"], "kind": "PyTorchJob", "name": self.name,
                                                 "uid": job["metadata"]["uid"], "controller": True}],
                        },
                        "spec": specs[kind]["template"]["spec"],
                    }
                    store.create(PODS, self.namespace, pod, dry_run=False)
            first = "master" if "Master" in specs else "worker"
            store.logs[(self.namespace, f"{self.name}-{first}-0")] = self.log
            conditions: list[dict[str, Any]] = []

            def post(kind: str, reason: str, message: str, replicas: dict[str, dict[str, int]], **extra: Any) -> None:
                nonlocal conditions
                conditions = self._condition(conditions, kind, reason, message)
                current = store.get(PYTORCHJOBS, self.namespace, self.name)
                status = {**(current.get("status") or {}), "conditions": conditions, "replicaStatuses": replicas, **extra}
                # the operator writes the whole status (an update, not a merge patch)
                store.update(PYTORCHJOBS, self.namespace, self.name, {"status": status}, subresource="status", dry_run=False)
                time.sleep(self.step_s)

            post("Created", "PyTorchJobCreated", f"PyTorchJob {self.name} is created.", {k: {} for k in counts})
            post("Running", "PyTorchJobRunning", f"PyTorchJob {self.namespace}/{self.name} is running.",
                 {k: {"active": n} for k, n in counts.items()}, startTime=_now())
            if self.restart:
                post("Restarting", "PyTorchJobRestarting", "a replica restarted", {k: {"active": n} for k, n in counts.items()})
                post("Running", "PyTorchJobRunning", "running again", {k: {"active": n} for k, n in counts.items()})
            if self.outcome == "Succeeded":
                post("Succeeded", "PyTorchJobSucceeded", f"PyTorchJob {self.namespace}/{self.name} successfully completed.",
                     {k: {"succeeded": n} for k, n in counts.items()}, completionTime=_now())
            else:
                culprit = "Worker" if "Worker" in counts else "Master"
                replicas = {k: ({"failed": 1, "active": n - 1} if k == culprit else {"active": n}) for k, n in counts.items()}
                post("Failed", "PyTorchJobFailed", f"PyTorchJob {self.namespace}/{self.name} has failed because 1 {culprit} replica(s) failed.",
                     replicas, completionTime=_now())
        except BaseException as exc:  # surfaced by join()
            self.error = exc


TRAINJOBS = ("trainer.kubeflow.org", "v1alpha1", "trainjobs")


class SimulatedTrainer(SimulatedOperator):
    """Plays Kubeflow Trainer v2 (and Kueue, and JobSet) for one TrainJob: while `spec.suspend`
    is true it reports `Suspended` and then admits the job as Kueue would (suspend -> false,
    `Suspended` false with reason `Resumed`); it makes one pod per node with the labels JobSet
    puts on them, owned by the TrainJob, counts the `node` child Job under `jobsStatus`, and ends
    with `Complete` or `Failed`."""

    def _condition(self, conditions: list[dict[str, Any]], kind: str, reason: str, message: str) -> list[dict[str, Any]]:
        # conditions are a map keyed by type: a new one replaces the old
        out = [c for c in conditions if c["type"] != kind]
        status = "False" if reason == "Resumed" else "True"
        out.append({"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": _now()})
        return out

    def _run(self) -> None:
        try:
            store = self.api.store
            job = self._appeared(TRAINJOBS)
            conditions: list[dict[str, Any]] = []

            def post(kind: str | None, reason: str = "", message: str = "", active: int = 0, succeeded: int = 0, failed: int = 0) -> None:
                nonlocal conditions
                if kind:
                    conditions = self._condition(conditions, kind, reason, message)
                status = {"conditions": conditions,
                          "jobsStatus": [{"name": "node", "active": active, "ready": active, "succeeded": succeeded, "failed": failed,
                                          "suspended": 0}]}
                store.update(TRAINJOBS, self.namespace, self.name, {"status": status}, subresource="status", dry_run=False)
                time.sleep(self.step_s)

            if job["spec"].get("suspend"):
                post("Suspended", "Suspended", "TrainJob is suspended")
                store.patch(TRAINJOBS, self.namespace, self.name, {"spec": {"suspend": False}}, subresource=None, dry_run=False)
                post("Suspended", "Resumed", "TrainJob is resumed")
            nodes = int(job["spec"]["trainer"].get("numNodes", 1))
            patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
            template = patch["template"]["spec"]["template"]
            for i in range(nodes):
                pod = {
                    "metadata": {
                        "name": f"{self.name}-node-0-{i}-{uuid.uuid4().hex[:5]}",
                        "labels": {
                            **(template.get("metadata", {}).get("labels") or {}),
                            "jobset.sigs.k8s.io/jobset-name": self.name,
                            "jobset.sigs.k8s.io/replicatedjob-name": "node",
                            "jobset.sigs.k8s.io/job-index": "0",
                            "batch.kubernetes.io/job-completion-index": str(i),
                        },
                        "ownerReferences": [{"apiVersion": job["apiVersion"], "kind": "TrainJob", "name": self.name,
                                             "uid": job["metadata"]["uid"], "controller": True}],
                    },
                    "spec": template["spec"],
                }
                created = store.create(PODS, self.namespace, pod, dry_run=False)
                if i == 0:
                    store.logs[(self.namespace, created["metadata"]["name"])] = self.log
            post(None, active=1)
            if self.restart:
                post(None, active=1)
            if self.outcome == "Succeeded":
                post("Complete", "AllJobsCompleted", "jobset completed successfully", succeeded=1)
            else:
                post("Failed", "FailedJobs", "jobset failed due to one or more job failures", failed=1)
        except BaseException as exc:  # surfaced by join()
            self.error = exc
