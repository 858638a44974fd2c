"""A run config -> the Kubernetes objects that run it: a ConfigMap holding the config and a
Kubeflow PyTorchJob (`kubeflow.org/v1`) whose pods run `torchrun` on it, or a Kubeflow Trainer
v2.3 TrainJob (`trainer.kubeflow.org/v1alpha1`). Pure functions from config to plain dicts: no
cluster, no torch, nothing written.

The Training Operator (and Trainer v2's torch runtime alike) injects `PET_NNODES`, `PET_NODE_RANK`,
`PET_MASTER_ADDR`, `PET_MASTER_PORT` and `PET_NPROC_PER_NODE` into every pod, and torchrun reads them, so the
container's command carries no rendezvous flags at all. The config is mounted from the ConfigMap
and named by `$(AUDIORL_CONFIG)`, which Kubernetes expands from the container's environment.
"""

from __future__ import annotations

import copy
import math
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from audiorl import __version__
from audiorl.config import RunConfig, is_secret_key, load_config, parse_quantity
from audiorl.errors import ConfigError
from audiorl.secrets import find_secrets, secret_shape

PYTORCHJOB_API = "kubeflow.org/v1"
TRAINJOB_API = "trainer.kubeflow.org/v1alpha1"
CONTAINER_NAME = "pytorch"  # the operator's default container name; it looks for this one
TRAINJOB_CONTAINER_NAME = "node"  # the trainer container of a torch runtime
TRAINJOB_NODE_JOB = "node"  # the runtime's replicated job that runs the trainer
RUNTIME_PATCH_MANAGER = "audiorl.dev/render"
# the pod fields Trainer v2.3 lets a runtime patch set
RUNTIME_PATCH_POD_FIELDS = ("affinity", "imagePullSecrets", "initContainers", "nodeSelector", "schedulingGates", "securityContext",
                            "serviceAccountName", "terminationGracePeriodSeconds", "tolerations", "volumes")
APIS = {"pytorchjob": "PyTorchJob", "trainjob": "TrainJob"}
MASTER_PORT = 23456  # the operator's default `pytorchjob-port`
CONFIG_DIR = "/etc/audiorl"
CONFIG_FILE = "config.yaml"
WORKDIR = "/workspace"
RUN_AS = 1000  # the worker image's user (Dockerfile)
# The worker image's ENTRYPOINT is exactly this (a test checks the Dockerfile), so
# `docker run IMAGE train CONFIG` and a pod run the same thing.
ENTRYPOINT = ["torchrun", "--module", "audiorl_cli.main"]
TRAIN_ARGS = ["train", "$(AUDIORL_CONFIG)"]

LABEL_RUN_ID = "audiorl.dev/run-id"
LABEL_CONFIG_HASH = "audiorl.dev/config-hash"
LABEL_MANAGED = {"app.kubernetes.io/name": "audiorl", "app.kubernetes.io/managed-by": "audiorl"}
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

# DNS-1035 labels: the operator builds service names (`NAME-master-0`, `NAME-worker-12`) from the
# job name, so it must start with a letter and leave room for the suffix within 63 characters.
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_JOB_NAME = 48
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


class _ManifestDumper(yaml.SafeDumper):
    """Plain YAML that kubectl and people read alike: no anchors, multi-line strings as blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ManifestDumper.add_representer(str, _str)


def dump_yaml(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_ManifestDumper, sort_keys=False)


@dataclass
class Rendered:
    """The objects to create, in creation order, and what a person should know about them."""

    name: str
    namespace: str
    objects: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)

    def to_yaml(self) -> str:
        return dump_yaml(self.objects)

    @property
    def job(self) -> dict[str, Any]:
        return self.objects[-1]

    @property
    def config_map(self) -> dict[str, Any]:
        return self.objects[0]

    @property
    def api(self) -> str:
        """`pytorchjob` or `trainjob`: the workload rendered."""
        return next(api for api, kind in APIS.items() if kind == self.job["kind"])


def default_job_name(stem: str) -> str:
    """A job name from a config file's name: lower case, other characters to '-'."""
    name = re.sub(r"[^a-z0-9-]+", "-", stem.lower()).strip("-")
    name = re.sub(r"^[^a-z]+", "", name)[:MAX_JOB_NAME].rstrip("-")
    return name or "audiorl"


def check_name(name: str, what: str, *, pattern: re.Pattern[str] = _DNS1035, max_len: int = MAX_JOB_NAME) -> str:
    if len(name) > max_len or not pattern.match(name):
        first = "a letter" if pattern is _DNS1035 else "a letter or digit"
        raise ConfigError(
            f"{what} {name!r} is not a valid Kubernetes name: use at most {max_len} lower-case letters, digits "
            f"and '-', starting with {first} and ending with a letter or digit"
        )
    return name


def _check_labels(labels: dict[str, str], where: str) -> None:
    for key, value in labels.items():
        if len(value) > 63 or not _LABEL_VALUE.match(value):
            raise ConfigError(f"{where}: label {key}={value!r} is not a valid label value (at most 63 letters, digits, '-', '_', '.')")


def job_labels(cfg: RunConfig, run_id: str) -> dict[str, str]:
    labels = {
        **cfg.job.labels,
        **LABEL_MANAGED,
        "app.kubernetes.io/version": __version__,
        LABEL_RUN_ID: run_id,
        LABEL_CONFIG_HASH: cfg.fingerprint(),
    }
    if cfg.job.kueue_queue:
        labels[KUEUE_QUEUE_LABEL] = cfg.job.kueue_queue
    _check_labels(labels, "job.labels")
    return labels


def container_env(cfg: RunConfig, name: str, run_id: str, extra: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The container's environment: AudioRL's and the runtime's defaults, the user's plain values
    (which win), then variables read from Secrets by reference. Never a secret's value."""
    job = cfg.job
    cpu = parse_quantity(job.requests.cpu) if job.requests.cpu else None
    threads = max(1, math.floor(cpu / job.processes_per_node)) if cpu else 1
    env: dict[str, str] = {
        "AUDIORL_CONFIG": f"{CONFIG_DIR}/{CONFIG_FILE}",
        "AUDIORL_JOB_NAME": name,
        "AUDIORL_RUN_ID": run_id,
        "AUDIORL_NO_PROGRESS": "1",
        "PYTHONUNBUFFERED": "1",
        # `torchrun --module` would put the working directory first on the path: a stray module
        # there must not shadow a package or be taken for a plug-in (AUDIORL_LOCAL_PLUGINS allows one)
        "PYTHONSAFEPATH": "1",
        # one BLAS/OpenMP pool per process, sized to the CPUs the pod asked for
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if job.gpus_per_node:
        env.update({"NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"})
    env.update(extra or {})
    env.update(job.env)
    taken = set(env)
    clashes = sorted(s.name for s in job.secret_env if s.name in taken)
    if clashes:
        raise ConfigError(f"job.secret_env: {clashes} also set as plain values (job.env or AudioRL's defaults); keep one")
    items: list[dict[str, Any]] = [{"name": key, "value": value} for key, value in env.items()]
    for ref in job.secret_env:
        secret_ref: dict[str, Any] = {"name": ref.secret, "key": ref.key}
        if ref.optional:
            secret_ref["optional"] = True
        items.append({"name": ref.name, "valueFrom": {"secretKeyRef": secret_ref}})
    return items


def _resources(cfg: RunConfig) -> dict[str, Any]:
    job = cfg.job
    requests = {k: v for k, v in job.requests.model_dump().items() if v is not None}
    limits = {k: v for k, v in job.limits.model_dump().items() if v is not None}
    if job.gpus_per_node:
        # extended resources: requests must equal limits
        requests[job.gpu_resource] = limits[job.gpu_resource] = str(job.gpus_per_node)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _volumes(cfg: RunConfig, config_map: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_map}},
        # /dev/shm: the container runtime's default 64 MB breaks DataLoader workers and NCCL
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": cfg.job.shm_size}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    for vol in cfg.job.volumes:
        check_name(vol.name, "job.volumes name", pattern=_DNS1123, max_len=63)
        claim: dict[str, Any] = {"claimName": vol.claim}
        if vol.read_only:
            claim["readOnly"] = True
        volumes.append({"name": vol.name, "persistentVolumeClaim": claim})
        mount: dict[str, Any] = {"name": vol.name, "mountPath": vol.mount_path}
        if vol.read_only:
            mount["readOnly"] = True
        if vol.sub_path:
            mount["subPath"] = vol.sub_path
        mounts.append(mount)
    return volumes, mounts


def pod_spec(cfg: RunConfig, name: str, run_id: str, *, container_name: str = CONTAINER_NAME,
             extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    job = cfg.job
    volumes, mounts = _volumes(cfg, f"{name}-config")
    container: dict[str, Any] = {
        "name": container_name,
        "image": job.image,
        "imagePullPolicy": job.image_pull_policy,
        "command": list(ENTRYPOINT),
        "args": list(TRAIN_ARGS),
        "workingDir": WORKDIR,
        "env": container_env(cfg, name, run_id, extra_env),
        "ports": [{"name": "pytorchjob-port", "containerPort": MASTER_PORT, "protocol": "TCP"}],
        "resources": _resources(cfg),
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
        },
    }
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": job.termination_grace_period_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if job.service_account:
        spec["serviceAccountName"] = job.service_account
    if job.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": secret} for secret in job.image_pull_secrets]
    if job.node_selector:
        spec["nodeSelector"] = dict(job.node_selector)
    if job.tolerations:
        spec["tolerations"] = [dict(t) for t in job.tolerations]
    if job.affinity:
        spec["affinity"] = dict(job.affinity)
    if job.priority_class:
        spec["priorityClassName"] = job.priority_class
    if job.volcano is not None:
        spec["schedulerName"] = "volcano"
    return spec


def _config_map(cfg: RunConfig, name: str, namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-config", "namespace": namespace, "labels": dict(labels)},
        "data": {CONFIG_FILE: cfg.to_yaml()},
    }


def _metadata(cfg: RunConfig, name: str, namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if cfg.job.annotations:
        meta["annotations"] = dict(cfg.job.annotations)
    return meta


def _pytorch_job(cfg: RunConfig, name: str, namespace: str, labels: dict[str, str], run_id: str, extra_env: dict[str, str]) -> dict[str, Any]:
    job = cfg.job
    template = {"metadata": {"labels": dict(labels)}, "spec": pod_spec(cfg, name, run_id, extra_env=extra_env)}

    def replica(count: int) -> dict[str, Any]:
        return {"replicas": count, "restartPolicy": job.restart_policy, "template": copy.deepcopy(template)}

    run_policy: dict[str, Any] = {"cleanPodPolicy": job.clean_pod_policy}
    if job.ttl_seconds_after_finished is not None:
        run_policy["ttlSecondsAfterFinished"] = job.ttl_seconds_after_finished
    if job.backoff_limit is not None:
        run_policy["backoffLimit"] = job.backoff_limit
    if job.active_deadline_seconds is not None:
        run_policy["activeDeadlineSeconds"] = job.active_deadline_seconds
    if job.volcano is not None:
        # gang scheduling: every replica is placed, or none is
        scheduling: dict[str, Any] = {"minAvailable": job.nodes}
        if job.volcano.queue:
            scheduling["queue"] = job.volcano.queue
        if job.priority_class:
            scheduling["priorityClass"] = job.priority_class
        run_policy["schedulingPolicy"] = scheduling

    spec: dict[str, Any] = {"runPolicy": run_policy, "nprocPerNode": str(job.processes_per_node)}
    if job.elastic is not None:
        # elastic jobs are all Workers; the operator points the c10d rendezvous at worker-0
        spec["elasticPolicy"] = {
            "minReplicas": job.elastic.min_nodes,
            "maxReplicas": job.elastic.max_nodes,
            "rdzvBackend": job.elastic.rdzv_backend,
            "maxRestarts": job.elastic.max_restarts,
        }
        spec["pytorchReplicaSpecs"] = {"Worker": replica(job.nodes)}
    else:
        spec["pytorchReplicaSpecs"] = {"Master": replica(1)}
        if job.nodes > 1:
            spec["pytorchReplicaSpecs"]["Worker"] = replica(job.nodes - 1)
    return {"apiVersion": PYTORCHJOB_API, "kind": "PyTorchJob", "metadata": _metadata(cfg, name, namespace, labels), "spec": spec}


# What a TrainJob cannot carry: Training Operator v1 settings with no Trainer v2 field. Each is
# refused when the config sets it, naming the key and where the setting lives instead.
_V1_ONLY = {
    "elastic": "Kubeflow Trainer v2 has no elastic policy; render a PyTorchJob (job.api: pytorchjob)",
    "volcano": "gang scheduling belongs to the training runtime (its podGroupPolicy); drop job.volcano or use job.api: pytorchjob",
    "priority_class": "a runtime patch cannot set priorityClassName: set it in the training runtime, or with Kueue label the job "
                      "kueue.x-k8s.io/priority-class (job.labels)",
    "restart_policy": "restarts belong to the training runtime (the JobSet's failurePolicy)",
    "clean_pod_policy": "Trainer v2 has no cleanPodPolicy: the JobSet's pods go when the TrainJob finishes",
    "backoff_limit": "restarts belong to the training runtime (the JobSet's failurePolicy.maxRestarts)",
    "ttl_seconds_after_finished": "Trainer v2 has no TTL field on the TrainJob: set it in the training runtime's JobSet template",
}


def _v1_only_settings(cfg: RunConfig, *, differing: bool) -> list[str]:
    """The v1-only job keys the config sets: to other values than their defaults (`differing`),
    or to their defaults (a written-out config, such as `audiorl config show` prints)."""
    job, fields = cfg.job, type(cfg.job).model_fields
    out = []
    for key in _V1_ONLY:
        value = getattr(job, key)
        if key in job.model_fields_set and value is not None and (value != fields[key].get_default(call_default_factory=True)) == differing:
            out.append(key)
    return out


def _train_job(cfg: RunConfig, name: str, namespace: str, labels: dict[str, str], run_id: str, runtime: str,
               extra_env: dict[str, str]) -> dict[str, Any]:
    """Kubeflow Trainer v2.3. The trainer (image, command, args, env, nodes, processes, resources)
    goes in its own fields; everything else a pod needs (volumes, mounts, security, service
    account, scheduling) in one runtime patch under AudioRL's manager name, merged by the
    controller onto the runtime's `node` pods."""
    job = cfg.job
    refused = _v1_only_settings(cfg, differing=True)
    if refused:
        raise ConfigError("; ".join(f"job.{key} is a PyTorchJob setting that a TrainJob cannot carry: {_V1_ONLY[key]}" for key in refused))
    pod = pod_spec(cfg, name, run_id, container_name=TRAINJOB_CONTAINER_NAME, extra_env=extra_env)
    container = pod.pop("containers")[0]
    trainer: dict[str, Any] = {
        "image": container["image"],
        "command": container["command"],
        "args": container["args"],
        "env": container["env"],
        "numNodes": job.nodes,
        "numProcPerNode": job.processes_per_node,
    }
    if container["resources"]:
        trainer["resourcesPerNode"] = container["resources"]
    patch_container = {
        "name": TRAINJOB_CONTAINER_NAME,
        "volumeMounts": container["volumeMounts"],
        "securityContext": container["securityContext"],
    }
    pod_patch = {key: value for key, value in pod.items() if key in RUNTIME_PATCH_POD_FIELDS}
    pod_patch["containers"] = [patch_container]
    pod_template = {"metadata": {"labels": dict(labels)}, "spec": pod_patch}
    replicated = {"name": TRAINJOB_NODE_JOB, "template": {"spec": {"template": pod_template}}}
    spec: dict[str, Any] = {
        "runtimeRef": {"name": runtime, "apiGroup": "trainer.kubeflow.org", "kind": job.runtime_kind},
        "trainer": trainer,
        "runtimePatches": [
            {"manager": RUNTIME_PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [replicated]}}}}
        ],
    }
    if job.kueue_queue:
        spec["suspend"] = True  # Kueue resumes it once admitted
    if job.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = job.active_deadline_seconds
    return {"apiVersion": TRAINJOB_API, "kind": "TrainJob", "metadata": _metadata(cfg, name, namespace, labels), "spec": spec}


def _under(path: str, mounts: list[str]) -> bool:
    p = PurePosixPath(path)
    return p.is_absolute() and any(p == PurePosixPath(m) or PurePosixPath(m) in p.parents for m in mounts)


def _local_store(uri: str | None) -> str | None:
    """The filesystem path of an MLflow store that lives in the pod (None for a server)."""
    if not uri:
        return WORKDIR + "/mlruns"  # the embedded default, relative to the working directory
    for scheme in ("sqlite:///", "file://"):
        if uri.startswith(scheme):
            return uri[len(scheme):]
    return None if "://" in uri or uri.startswith("databricks") else uri


def _warnings(cfg: RunConfig, api: str) -> list[str]:
    notes = []
    if api == "trainjob":
        notes += [f"job.{key} has no effect on a TrainJob: {_V1_ONLY[key]}" for key in _v1_only_settings(cfg, differing=False)]
    mounts = [v.mount_path for v in cfg.job.volumes if not v.read_only]
    if not _under(cfg.train.output_dir, mounts):
        notes.append(
            f"train.output_dir {cfg.train.output_dir!r} is not on a writable job.volumes mount: checkpoints and the "
            "final model are lost when the pod goes, and a restarted pod cannot resume"
        )
    from_secret = any(s.name == "MLFLOW_TRACKING_URI" for s in cfg.job.secret_env)
    store = _local_store(cfg.tracking.tracking_uri or cfg.job.env.get("MLFLOW_TRACKING_URI"))
    if cfg.tracking.enabled and not from_secret and store is not None and not _under(store, mounts):
        notes.append(
            "tracking: MLflow would log to a store inside the pod, lost when it goes; set tracking.tracking_uri to "
            "an MLflow server (k8s/mlflow has one) or to a store on a writable volume"
        )
    return notes


def render(cfg: RunConfig, *, name: str | None = None, run_id: str, api: str | None = None, runtime: str | None = None,
           extra_env: dict[str, str] | None = None) -> Rendered:
    """The objects that run `cfg` on a cluster. `name` is the job name when the config sets none;
    `api` and `runtime` override `job.api` and `job.runtime`; `extra_env` adds plain variables to
    the container (`audiorl submit` passes the MLflow run)."""
    job = cfg.job
    api = api or job.api
    runtime = runtime or job.runtime
    if not (job.name or name):
        raise ConfigError("the job has no name: set job.name")
    name = check_name(job.name or name or "", "job.name" if job.name else "job name")
    check_name(job.namespace, "job.namespace", pattern=_DNS1123, max_len=63)
    for key, value in (extra_env or {}).items():
        if is_secret_key(key) or secret_shape(value):
            raise ConfigError(f"{key} looks like a secret; only Secret references may carry secrets")
    if not re.match(r"^[a-z0-9]{1,40}$", run_id):
        raise ConfigError(f"run id {run_id!r}: use 1-40 lower-case letters and digits")
    if cfg.tracking.tracking_uri and secret_shape(cfg.tracking.tracking_uri):
        raise ConfigError(
            "tracking.tracking_uri carries a credential (a password, a token as the user, or one in the query), which would be "
            "stored in the job's ConfigMap: drop it from the URI and pass MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD "
            "(or MLFLOW_TRACKING_TOKEN) under job.secret_env"
        )
    # the whole config goes into the ConfigMap, and job.env, labels and annotations into the job:
    # a value the job needs cannot be redacted there, so a secret anywhere is refused
    leaks = find_secrets(cfg.to_dict(), skip=frozenset({"job.secret_env"}))
    if leaks:
        named = "; ".join(f"{path} ({why})" for path, why in leaks)
        raise ConfigError(
            f"{named}: the job would carry it in plain text (its ConfigMap or pod spec); put it in a Kubernetes Secret and "
            "reference it under job.secret_env (reward or plug-in settings can read it from that variable), or remove it"
        )
    labels = job_labels(cfg, run_id)
    namespace = job.namespace
    if api == "pytorchjob":
        workload = _pytorch_job(cfg, name, namespace, labels, run_id, extra_env or {})
    elif api == "trainjob":
        check_name(runtime, "job.runtime", pattern=_DNS1123, max_len=253)
        workload = _train_job(cfg, name, namespace, labels, run_id, runtime, extra_env or {})
    else:
        raise ConfigError(f"api {api!r}: use pytorchjob (Kubeflow Training Operator v1) or trainjob (Kubeflow Trainer v2)")
    return Rendered(name, namespace, [_config_map(cfg, name, namespace, labels), workload], _warnings(cfg, api))


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def render_file(path: str | Any, overrides: list[str] | None = None, *, run_id: str | None = None, api: str | None = None,
                runtime: str | None = None) -> Rendered:
    """Load a run file (with `--set` overrides) and render it; the job is named after the file
    unless `job.name` says otherwise."""

    cfg = load_config(path, overrides or [])
    return render(cfg, name=default_job_name(Path(path).stem), run_id=run_id or new_run_id(), api=api, runtime=runtime)
