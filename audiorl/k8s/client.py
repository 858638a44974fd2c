"""The cluster side of `audiorl submit|status|logs|list|delete`, through the official
`kubernetes` client (a kubeconfig, or the pod's service account when run inside a cluster).

The client is imported when a `Cluster` is made, never at module import: `audiorl render` and
`audiorl --help` must not pay for it.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from audiorl.errors import ClusterError
from audiorl.k8s.render import APIS, CONTAINER_NAME, LABEL_MANAGED, TRAINJOB_CONTAINER_NAME, TRAINJOB_NODE_JOB, Rendered
from audiorl.k8s.status import JobState, job_state


@dataclass(frozen=True)
class Workload:
    """A job kind as the cluster serves it, and how to find the pod whose log tells its story."""

    group: str
    version: str
    plural: str
    container: str
    #: what the lead pod is called, and label selectors for it, tried in turn (`{name}` is the job's name)
    lead: str
    lead_selectors: tuple[str, ...]


WORKLOADS = {
    # the Training Operator labels each pod with its job, replica type and index
    "PyTorchJob": Workload("kubeflow.org", "v1", "pytorchjobs", CONTAINER_NAME, "master", tuple(
        f"training.kubeflow.org/job-name={{name}},training.kubeflow.org/replica-type={kind},training.kubeflow.org/replica-index=0"
        for kind in ("master", "worker"))),
    # Trainer v2 runs a JobSet named after the TrainJob; node 0 is completion index 0 of its `node` job
    "TrainJob": Workload("trainer.kubeflow.org", "v1alpha1", "trainjobs", TRAINJOB_CONTAINER_NAME, "node-0", (
        f"jobset.sigs.k8s.io/jobset-name={{name}},jobset.sigs.k8s.io/replicatedjob-name={TRAINJOB_NODE_JOB},"
        "batch.kubernetes.io/job-completion-index=0",)),
}


def _api_client(kubeconfig: str | None, context: str | None):
    from kubernetes import client, config

    path = kubeconfig or os.environ.get("KUBECONFIG")
    paths = [p for p in (path or os.path.expanduser("~/.kube/config")).split(os.pathsep) if p]
    if any(os.path.exists(p) for p in paths):
        try:
            return config.new_client_from_config(config_file=path, context=context)
        except config.ConfigException as exc:
            raise ClusterError(f"kubeconfig {path or paths[0]}: {exc}") from None
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        return client.ApiClient(configuration)
    raise ClusterError(
        f"no kubeconfig at {os.pathsep.join(paths)} and not inside a cluster: pass --kubeconfig, set KUBECONFIG, "
        "or use --local to run the job on this machine"
    )


class Cluster:
    """One namespace of one cluster, and the AudioRL jobs in it. The cluster backend; the local
    one (`audiorl.k8s.local.LocalJobs`) answers `submit`, `logs`, `wait` and `status` the same way."""

    #: the jobs run on the cluster, not in this process: nobody has to wait for them
    attached = False

    def __init__(self, namespace: str, *, kubeconfig: str | None = None, context: str | None = None, kind: str = "PyTorchJob"):
        from kubernetes import client

        self.namespace = namespace
        self.api = _api_client(kubeconfig, context)
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        if kind not in WORKLOADS:
            raise ClusterError(f"unknown job kind {kind!r}: use one of {sorted(WORKLOADS)}")
        self.kind = kind
        self.workload = WORKLOADS[kind]
        self.group, self.version, self.plural = self.workload.group, self.workload.version, self.workload.plural

    def for_kind(self, kind: str) -> Cluster:
        """A client for another job kind on the same connection."""
        other = copy.copy(self)
        other.kind, other.workload = kind, WORKLOADS[kind]
        other.group, other.version, other.plural = other.workload.group, other.workload.version, other.workload.plural
        return other

    def close(self) -> None:
        """Nothing to stop: the jobs belong to the cluster."""

    # -- plumbing ---------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            reason = _reason(exc)
            if exc.status == 404:
                error: ClusterError = _NotFound(
                    f"{what}: 404 {reason} (is the {self.kind} CRD installed, and does namespace {self.namespace!r} exist?)"
                )
            else:
                hint = " (k8s/base/rbac.yaml has the Role `audiorl submit` needs)" if exc.status == 403 else ""
                error = ClusterError(f"{what}: {exc.status} {reason}{hint}")
            error.status = exc.status
            raise error from None
        except HTTPError as exc:
            raise ClusterError(f"{what}: cannot reach the Kubernetes API at {self.api.configuration.host} ({exc})") from None

    def _custom(self, verb: str, *args: Any, **kwargs: Any) -> Any:
        fn = getattr(self.custom, f"{verb}_namespaced_custom_object")
        return fn(self.group, self.version, self.namespace, self.plural, *args, **kwargs)

    # -- reading ----------------------------------------------------------------------------

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return self._call(f"get {self.kind} {self.namespace}/{name}", self._custom, "get", name)
        except _NotFound:
            return None

    def status(self, name: str) -> JobState:
        obj = self.get(name)
        if obj is None:
            raise ClusterError(f"no {self.kind} {name!r} in namespace {self.namespace!r} (audiorl list shows the jobs there)")
        return job_state(obj)

    def list(self) -> list[JobState]:
        selector = ",".join(f"{k}={v}" for k, v in LABEL_MANAGED.items())
        found = self._call(f"list {self.kind}s in {self.namespace}", self._custom, "list", label_selector=selector)
        return [job_state(obj) for obj in found.get("items", [])]

    # -- writing ----------------------------------------------------------------------------

    def submit(
        self, rendered: Rendered, *, replace: bool = False, server_dry_run: bool = False, log: Callable[[str], None] = print
    ) -> JobState | None:
        """Create the ConfigMap and the job. A job of the same name that is still going is only
        replaced when asked; a finished one is replaced (its pods and logs go with it)."""
        if rendered.namespace != self.namespace:
            raise ClusterError(f"the job renders into namespace {rendered.namespace!r} but the client is set to {self.namespace!r}")
        name = rendered.name
        dry = {"dry_run": "All"} if server_dry_run else {}
        existing = self.get(name)
        if existing is not None:
            state = job_state(existing)
            if not state.finished and not replace:
                raise ClusterError(
                    f"{self.kind} {name!r} already exists in namespace {self.namespace!r} and is {state.phase}: "
                    "pass --replace to delete it and submit again, or set job.name to run beside it"
                )
            if server_dry_run:
                # the server would answer 409 to a second create, so only the ConfigMap is checked
                log(f"(dry run) would replace the existing {self.kind} {name} ({state.phase}); "
                    f"the server checks the new {self.kind} only once the name is free")
            else:
                log(f"replacing the existing {self.kind} {name} ({state.phase})")
                self.delete(name, wait_s=120)

        cm = rendered.config_map
        cm_name = cm["metadata"]["name"]
        try:
            self._call(f"create ConfigMap {cm_name}", self.core.create_namespaced_config_map, self.namespace, cm, **dry)
        except ClusterError as exc:
            if getattr(exc, "status", None) != 409:
                raise
            self._call(f"replace ConfigMap {cm_name}", self.core.replace_namespaced_config_map, cm_name, self.namespace, cm, **dry)
        if not (server_dry_run and existing is not None):
            created = self._call(f"create {self.kind} {name}", self._custom, "create", rendered.job, **dry)
        if server_dry_run:
            log(f"server-side dry run passed: ConfigMap {cm_name} and {self.kind} {name} in {self.namespace}")
            return None
        # the ConfigMap goes when the job goes (ttlSecondsAfterFinished, delete)
        owner = {
            "apiVersion": rendered.job["apiVersion"],
            "kind": self.kind,
            "name": name,
            "uid": (created or {}).get("metadata", {}).get("uid", ""),
            "controller": False,
            "blockOwnerDeletion": False,
        }
        if owner["uid"]:
            self._call(
                f"patch ConfigMap {cm_name}",
                self.core.patch_namespaced_config_map,
                cm_name,
                self.namespace,
                {"metadata": {"ownerReferences": [owner]}},
            )
        log(f"created ConfigMap {cm_name} and {self.kind} {name} in namespace {self.namespace}")
        return job_state(created or {"metadata": {"name": name}})

    def delete(self, name: str, *, wait_s: float = 0) -> None:
        try:
            self._call(f"delete {self.kind} {name}", self._custom, "delete", name, propagation_policy="Background")
        except _NotFound:
            raise ClusterError(f"no {self.kind} {name!r} in namespace {self.namespace!r}") from None
        try:
            self._call(f"delete ConfigMap {name}-config", self.core.delete_namespaced_config_map, f"{name}-config", self.namespace)
        except _NotFound:
            pass  # already collected through its owner reference
        deadline = time.monotonic() + wait_s
        while wait_s and self.get(name) is not None:
            if time.monotonic() > deadline:
                raise ClusterError(f"{self.kind} {name!r} still exists {wait_s:.0f} s after deletion (finalizers?)")
            time.sleep(0.5)

    # -- following --------------------------------------------------------------------------

    def wait(self, name: str, *, timeout_s: float | None = None, on_change: Callable[[JobState], None] | None = None) -> JobState:
        """Watch the job until it succeeds or fails; report every change of phase or replica counts."""
        from kubernetes import watch

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        obj = self.get(name)
        if obj is None:
            raise ClusterError(f"no {self.kind} {name!r} in namespace {self.namespace!r} (audiorl list shows the jobs there)")
        last: tuple | None = None

        def seen(obj: dict[str, Any]) -> JobState:
            nonlocal last
            state = job_state(obj)
            key = (state.phase, str(state.replicas))
            if key != last:
                last = key
                if on_change:
                    on_change(state)
            return state

        state = seen(obj)
        version = obj["metadata"].get("resourceVersion")
        while not state.finished:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise ClusterError(f"{self.kind} {name!r} is still {state.phase} after {timeout_s:.0f} s")
            # one watch from the version already seen, so no change in between is missed
            stream = watch.Watch().stream(
                self.custom.list_namespaced_custom_object,
                self.group, self.version, self.namespace, self.plural,
                field_selector=f"metadata.name={name}",
                resource_version=version,
                timeout_seconds=max(1, int(min(remaining or 60, 60))),
            )
            started, events = time.monotonic(), 0
            try:
                for event in stream:
                    events += 1
                    if event["type"] == "DELETED":
                        raise ClusterError(f"{self.kind} {name!r} was deleted while waiting for it")
                    if event["type"] not in ("ADDED", "MODIFIED"):
                        continue
                    version = event["object"]["metadata"].get("resourceVersion", version)
                    state = seen(event["object"])
                    if state.finished:
                        break
                if not events and time.monotonic() - started < 1:
                    time.sleep(1)  # a server that ends watches at once must not be hammered
            except ClusterError:
                raise
            except Exception as exc:  # a broken or expired watch: read the job afresh and watch again
                from kubernetes.client.exceptions import ApiException

                if not isinstance(exc, (ApiException, OSError)) and "urllib3" not in type(exc).__module__:
                    raise
                time.sleep(1)
                obj = self.get(name)
                if obj is None:
                    raise ClusterError(f"{self.kind} {name!r} was deleted while waiting for it") from None
                version = obj["metadata"].get("resourceVersion")
                state = seen(obj)
        return state

    def lead_pod(self, name: str) -> str | None:
        """The pod whose logs tell the story: Master 0 (Worker 0 of an elastic job) of a
        PyTorchJob, node 0 of a TrainJob."""
        for selector in self.workload.lead_selectors:
            pods = self._call(f"list pods of {name}", self.core.list_namespaced_pod, self.namespace,
                              label_selector=selector.format(name=name))
            if pods.items:
                return pods.items[0].metadata.name
        return None

    def logs(self, name: str, *, follow: bool = False, wait_s: float = 300) -> Iterator[str]:
        """The lead pod's log lines; with follow, until the container ends."""
        deadline = time.monotonic() + wait_s
        pod = self.lead_pod(name)
        while pod is None:
            if not follow or time.monotonic() > deadline:
                raise ClusterError(f"{self.kind} {name!r} has no {self.workload.lead} pod yet (audiorl status {name} says why)")
            time.sleep(1)
            pod = self.lead_pod(name)
        while True:
            try:
                response = self._call(
                    f"logs of pod {pod}",
                    self.core.read_namespaced_pod_log,
                    pod,
                    self.namespace,
                    container=self.workload.container,
                    follow=follow,
                    _preload_content=False,
                )
                break
            except ClusterError as exc:
                # 400 while the container is still being created
                if not follow or getattr(exc, "status", None) != 400 or time.monotonic() > deadline:
                    raise
                time.sleep(1)
        buffer = b""
        for chunk in response.stream(4096, decode_content=True):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                yield line.decode("utf-8", "replace")
        if buffer:
            yield buffer.decode("utf-8", "replace")


def kind_of(api: str) -> str:
    """`pytorchjob` / `trainjob` -> the kind the cluster serves."""
    if api not in APIS:
        raise ClusterError(f"api {api!r}: use one of {sorted(APIS)}")
    return APIS[api]


def clusters(namespace: str, *, kubeconfig: str | None = None, context: str | None = None, api: str | None = None) -> list[Cluster]:
    """One client per job kind asked for: the one `api` names, or both (PyTorchJob first)."""
    kinds = [kind_of(api)] if api else list(WORKLOADS)
    first = Cluster(namespace, kubeconfig=kubeconfig, context=context, kind=kinds[0])
    return [first] + [first.for_kind(kind) for kind in kinds[1:]]


def find_job(namespace: str, name: str, *, kubeconfig: str | None = None, context: str | None = None,
             api: str | None = None) -> Cluster:
    """The client for the kind that holds job `name` (with `api`, that kind, job or not)."""
    found = clusters(namespace, kubeconfig=kubeconfig, context=context, api=api)
    if api:
        return found[0]
    for cluster in found:
        if cluster.get(name) is not None:
            return cluster
    raise ClusterError(f"no PyTorchJob or TrainJob {name!r} in namespace {namespace!r} (audiorl list shows the jobs there)")


def list_jobs(namespace: str, *, kubeconfig: str | None = None, context: str | None = None, api: str | None = None) -> list[JobState]:
    """The AudioRL jobs of the kinds asked for; without `api`, a kind whose CRD the cluster does
    not serve is left out (a cluster with only one of the two operators)."""
    states: list[JobState] = []
    served = 0
    for cluster in clusters(namespace, kubeconfig=kubeconfig, context=context, api=api):
        try:
            states += cluster.list()
            served += 1
        except _NotFound:
            if api:
                raise
    if not served:
        raise ClusterError(f"the cluster serves neither PyTorchJobs nor TrainJobs in namespace {namespace!r} (is a Kubeflow operator installed?)")
    return states


class _NotFound(ClusterError):
    """A 404: callers that expect one (get, delete) catch it; anywhere else it explains itself."""


def _reason(exc: Any) -> str:
    try:
        body = json.loads(exc.body)
        return body.get("message") or body.get("reason") or exc.reason
    except (TypeError, ValueError):
        return str(exc.reason)
