"""Rendering a run config into Kubernetes objects: every variant validates against the core
schemas (strict) and the Kubeflow PyTorchJob models, and the facts a cluster depends on hold."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audiorl.config import load_config, validate_config
from audiorl.errors import ConfigError
from audiorl.k8s.local import expand, operator_env, pod_commands, trainer_env
from audiorl.k8s.render import ENTRYPOINT, LABEL_CONFIG_HASH, LABEL_RUN_ID, RUN_AS, WORKDIR, default_job_name, render, render_file

K8S_VERSION = "1.32.0"
REPO = Path(__file__).resolve().parents[1]

BASE = {"model": {"name_or_path": "/models/whisper-small"}, "data": {"train": "/data/pairs.jsonl"}}
VOLUMES = [
    {"name": "data", "claim": "speech-data", "mount_path": "/data", "read_only": True},
    {"name": "checkpoints", "claim": "audiorl-checkpoints", "mount_path": "/checkpoints"},
    {"name": "models", "claim": "model-cache", "mount_path": "/models", "sub_path": "hub"},
]
SECRETS = [
    {"name": "MLFLOW_TRACKING_PASSWORD", "secret": "mlflow-auth", "key": "password"},
    {"name": "AWS_SECRET_ACCESS_KEY", "secret": "s3", "key": "secret-key"},
    {"name": "HF_TOKEN", "secret": "hub", "key": "token", "optional": True},
]
VARIANTS = {
    "single-gpu": {},
    "multi-node": {"job": {"nodes": 4, "gpus_per_node": 8}},
    "cpu": {"job": {"gpus_per_node": 0, "requests": {"cpu": "4", "memory": "8Gi"}, "limits": {"memory": "8Gi"}, "shm_size": "1Gi"}},
    "fsdp": {"train": {"distributed": {"strategy": "fsdp"}}, "job": {"nodes": 2, "gpus_per_node": 8}},
    "elastic": {"job": {"nodes": 2, "elastic": {"min_nodes": 1, "max_nodes": 4, "max_restarts": 5}}},
    "kueue": {"job": {"nodes": 2, "kueue_queue": "team-speech", "priority_class": "high"}},
    "volcano": {"job": {"nodes": 3, "volcano": {"queue": "research"}, "priority_class": "high"}},
    "volumes-and-secrets": {
        "train": {"output_dir": "/checkpoints/run1"},
        "tracking": {"tracking_uri": "https://mlflow.example.com"},
        "job": {
            "volumes": VOLUMES, "secret_env": SECRETS, "env": {"NCCL_SOCKET_IFNAME": "eth0"}, "service_account": "audiorl",
            "image_pull_secrets": ["registry"], "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a", "b"]}]}]}}},
            "active_deadline_seconds": 86400, "annotations": {"team": "speech"}, "labels": {"cost-center": "asr"},
        },
    },
}


def _merge(base, extra):
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _render(extra=None, **kwargs):
    cfg = validate_config(_merge(BASE, extra or {}))
    return cfg, render(cfg, name="whisper-dpo", run_id="run42", **kwargs)


def _validate_pod_templates(job):
    for kind, replica in job["spec"]["pytorchReplicaSpecs"].items():
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{kind.lower()}"}, "template": replica["template"]}
        kubernetes_validate.validate(template, K8S_VERSION, strict=True)


def _dropped_keys(given, kept, path=""):
    """Keys present in what we rendered but lost by the kubeflow-training models."""
    if isinstance(given, dict):
        kept = kept or {}
        out = []
        for key, value in given.items():
            if key not in kept:
                out.append(f"{path}.{key}")
            else:
                out += _dropped_keys(value, kept[key], f"{path}.{key}")
        return out
    if isinstance(given, list):
        return [d for i, (a, b) in enumerate(zip(given, kept or [])) for d in _dropped_keys(a, b, f"{path}[{i}]")]
    return []


def _through_kubeflow_models(job):
    """The job as the kubeflow-training models read it back (they drop keys they don't know)."""
    from kubeflow.training import ApiClient

    class _Response:  # the generated deserializer reads JSON from `.data`
        data = json.dumps(job)

    client = ApiClient()
    return client.sanitize_for_serialization(client.deserialize(_Response, "KubeflowOrgV1PyTorchJob"))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_validates_strictly(variant):
    _, rendered = _render(VARIANTS[variant])
    kubernetes_validate.validate(rendered.config_map, K8S_VERSION, strict=True)
    job = rendered.job
    _validate_pod_templates(job)
    kept = _through_kubeflow_models(job)
    assert _dropped_keys(job, kept) == []


def test_the_kubeflow_check_catches_a_misspelled_key():
    # the dropped-key comparison is what makes the model check strict
    _, rendered = _render()
    job = copy.deepcopy(rendered.job)
    job["spec"]["runPolicy"]["ttlSecondsAfterFinish"] = 5
    assert _dropped_keys(job, _through_kubeflow_models(job)) == [".spec.runPolicy.ttlSecondsAfterFinish"]
    bad = copy.deepcopy(rendered.job)
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate_pod_templates(bad)
    # the same for a TrainJob, through the kubeflow-trainer-api models: a key Trainer v2.3 does
    # not have (numProcPerNode is spelt so), and a pod field a runtime patch may not set
    _, v2 = _render(api="trainjob")
    job = copy.deepcopy(v2.job)
    job["spec"]["trainer"]["numProcsPerNode"] = 2
    (patch,) = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    patch["template"]["spec"]["template"]["spec"]["priorityClassName"] = "high"
    assert _dropped_keys(job, _through_trainer_models(job)) == [
        ".spec.trainer.numProcsPerNode",
        ".spec.runtimePatches[0].trainingRuntimeSpec.template.spec.replicatedJobs[0].template.spec.template.spec.priorityClassName",
    ]


def test_replicas_rendezvous_and_gang_scheduling():
    _, single = _render()
    assert list(single.job["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    _, multi = _render(VARIANTS["multi-node"])
    specs = multi.job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 3
    assert multi.job["spec"]["nprocPerNode"] == "8"
    container = specs["Worker"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8" == container["resources"]["requests"]["nvidia.com/gpu"]
    # 8 CPUs shared by 8 processes: one thread each
    assert {e["name"]: e.get("value") for e in container["env"]}["OMP_NUM_THREADS"] == "1"

    _, elastic = _render(VARIANTS["elastic"])
    assert list(elastic.job["spec"]["pytorchReplicaSpecs"]) == ["Worker"]
    assert elastic.job["spec"]["elasticPolicy"] == {"minReplicas": 1, "maxReplicas": 4, "rdzvBackend": "c10d", "maxRestarts": 5}

    _, volcano = _render(VARIANTS["volcano"])
    assert volcano.job["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 3, "queue": "research", "priorityClass": "high"}
    for spec in volcano.job["spec"]["pytorchReplicaSpecs"].values():
        assert spec["template"]["spec"]["schedulerName"] == "volcano"

    _, kueue = _render(VARIANTS["kueue"])
    assert kueue.job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-speech"
    assert "schedulingPolicy" not in kueue.job["spec"]["runPolicy"]
    with pytest.raises(ConfigError, match="choose one"):
        validate_config(_merge(BASE, {"job": {"kueue_queue": "q", "volcano": {}}}))


def test_pods_are_locked_down_and_run_torchrun_on_the_mounted_config():
    _, rendered = _render(VARIANTS["volumes-and-secrets"])
    pod = rendered.job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["command"][0] == "torchrun" and "$(AUDIORL_CONFIG)" in container["args"]
    env = {e["name"]: e for e in container["env"]}
    config_path = env["AUDIORL_CONFIG"]["value"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_mount = next(m for path, m in mounts.items() if config_path.startswith(path + "/"))
    assert volumes[config_mount["name"]]["configMap"]["name"] == rendered.config_map["metadata"]["name"]
    assert config_path.rsplit("/", 1)[1] in rendered.config_map["data"]
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "speech-data", "readOnly": True}
    assert mounts["/models"]["subPath"] == "hub"
    assert env["NCCL_SOCKET_IFNAME"]["value"] == "eth0"
    assert pod["terminationGracePeriodSeconds"] > 25  # above train.preemption_grace_s
    assert rendered.warnings == []


def test_secrets_are_only_ever_references(tmp_path):
    cfg, rendered = _render(VARIANTS["volumes-and-secrets"])
    text = rendered.to_yaml()
    env = {e["name"]: e for e in rendered.job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]}
    for ref in SECRETS:
        assert "value" not in env[ref["name"]]
        assert env[ref["name"]]["valueFrom"]["secretKeyRef"]["name"] == ref["secret"]
    # values the user might try to inline are refused, naming the key and the fix
    with pytest.raises(ConfigError, match=r"job\.env.*HF_TOKEN.*secret_env"):
        validate_config(_merge(BASE, {"job": {"env": {"HF_TOKEN": "hf_abcdef"}}}))
    with pytest.raises(ConfigError, match=r"job\.env.*secret_env"):
        validate_config(_merge(BASE, {"job": {"env": {"MLFLOW_TRACKING_URI": "https://bob:hunter2@mlflow"}}}))
    leaky = validate_config(_merge(BASE, {"tracking": {"tracking_uri": "postgresql://bob:hunter2@db/mlflow"}}))
    with pytest.raises(ConfigError, match="password"):
        render(leaky, name="x", run_id="r1")
    assert "hunter2" not in text
    with pytest.raises(ConfigError, match="also set as plain"):
        job = {"env": {"NCCL_DEBUG": "INFO"}, "secret_env": [{"name": "NCCL_DEBUG", "secret": "s", "key": "k"}]}
        render(validate_config(_merge(BASE, {"job": job})), name="x", run_id="r1")


def test_names_and_labels(tmp_path):
    cfg, rendered = _render()
    for obj in rendered.objects:
        assert obj["metadata"]["labels"][LABEL_RUN_ID] == "run42"
    # the config hash follows what training computes, not where the job runs
    changed = validate_config(_merge(BASE, {"train": {"learning_rate": 1e-5}}))
    moved = validate_config(_merge(BASE, {"job": {"nodes": 2, "namespace": "speech"}}))
    def label(c):
        return render(c, name="x", run_id="r").job["metadata"]["labels"][LABEL_CONFIG_HASH]

    assert label(changed) != label(cfg) == label(moved)
    with pytest.raises(ConfigError, match="not a valid Kubernetes name"):
        render(validate_config(_merge(BASE, {"job": {"name": "Whisper_DPO"}})), name="x", run_id="r")
    with pytest.raises(ConfigError, match="not a valid Kubernetes name"):
        render(validate_config(_merge(BASE, {"job": {"name": "a" * 60}})), name="x", run_id="r")
    with pytest.raises(ConfigError, match="job.namespace"):
        render(validate_config(_merge(BASE, {"job": {"namespace": "Speech Team"}})), name="x", run_id="r")
    assert default_job_name("Whisper_Small-DPO.v2") == "whisper-small-dpo-v2"
    assert default_job_name("2024_run") == "run"
    path = tmp_path / "My_Run.yaml"
    path.write_text(yaml.safe_dump(BASE))
    first, second = render_file(path, ["job.namespace=speech"]), render_file(path, ["job.namespace=speech"])
    assert first.name == "my-run" and first.namespace == "speech"
    # each render without --run-id is a new run
    assert first.job["metadata"]["labels"][LABEL_RUN_ID] != second.job["metadata"]["labels"][LABEL_RUN_ID]


def test_warnings_about_what_a_pod_would_lose():
    ckpt = [{"name": "ckpt", "claim": "c", "mount_path": "/ckpt"}]
    data = [{"name": "data", "claim": "d", "mount_path": "/data", "read_only": True}]
    cases = [
        # train.output_dir, tracking_uri, volumes -> which warnings
        ("runs/x", None, [], ["output_dir", "tracking"]),
        ("/ckpt/x", "sqlite:////ckpt/mlflow.db", ckpt, []),
        ("/ckpt/x", "sqlite:////tmp/mlflow.db", ckpt, ["tracking"]),
        ("/ckpt/x", "http://mlflow.audiorl.svc:5000", ckpt, []),
        ("/data/x", "http://mlflow:5000", data, ["output_dir"]),  # read-only volumes don't count
    ]
    for output_dir, uri, volumes, expected in cases:
        _, rendered = _render({"train": {"output_dir": output_dir}, "tracking": {"tracking_uri": uri}, "job": {"volumes": volumes}})
        found = [w.split(":")[0].split(" ")[0].replace("train.", "") for w in rendered.warnings]
        assert found == expected, (output_dir, uri, rendered.warnings)


def test_the_configmap_holds_the_same_config(tmp_path):
    cfg, rendered = _render(VARIANTS["volumes-and-secrets"])
    path = tmp_path / "config.yaml"
    path.write_text(rendered.config_map["data"]["config.yaml"])
    assert load_config(path) == cfg
    # and the YAML a person reads (and kubectl applies) has no anchors or aliases
    text = rendered.to_yaml()
    assert "&id" not in text and "*id" not in text
    assert list(yaml.safe_load_all(text)) == rendered.objects


# --- Kubeflow Trainer v2.3: TrainJob ------------------------------------------------------------

RUNTIME = yaml.safe_load((REPO / "k8s" / "trainer" / "runtime.yaml").read_text())
# a runtime with nothing but the trainer container (the kind a cluster may already have): the
# patch alone must give the pod everything AudioRL needs
BARE_RUNTIME = {"spec": {"template": {"spec": {"replicatedJobs": [{"name": "node", "template": {"spec": {"template": {"spec": {
    "containers": [{"name": "node", "image": "pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime"}]}}}}}]}}}}
# what a TrainJob refuses, and the variant key that sets it
V1_ONLY = {"elastic": "job.elastic", "volcano": "job.volcano"}


def _trainjob_variant(variant):
    extra = copy.deepcopy(VARIANTS[variant])
    extra.get("job", {}).pop("priority_class", None)  # a runtime patch cannot set it (refused below)
    return extra


def _through_trainer_models(obj, model="TrainerV1alpha1TrainJob"):
    """The object as the kubeflow-trainer-api models read it back (they drop keys they don't know)."""
    from kubeflow_trainer_api import models

    return getattr(models, model).from_dict(obj).to_dict()


def _merge_by(base, patch, key):
    """Strategic merge of two lists of objects keyed by `key` (containers, volumes, env)."""
    out = [copy.deepcopy(item) for item in base]
    for item in patch:
        same = next((o for o in out if o[key] == item[key]), None)
        if same is None:
            out.append(copy.deepcopy(item))
        else:
            same.update(_strategic(same, item))
    return out


_LIST_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name", "volumeMounts": "mountPath",
              "imagePullSecrets": "name", "tolerations": "key"}


def _strategic(base, patch):
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if key in _LIST_KEYS and isinstance(value, list):
            out[key] = _merge_by(out.get(key, []), value, _LIST_KEYS[key])
        elif isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("resources",):
            out[key] = _strategic(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _node_pod(job, runtime):
    """The `node` pod template the Trainer controller builds: the runtime's, with the runtime patch
    merged in (strategic merge, as v2.3 does), the trainer's fields on the `node` container and the
    torch plugin's PET_* variables."""
    (base,) = [j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"] if j["name"] == "node"]
    pod = copy.deepcopy(base["template"]["spec"]["template"])
    (patch,) = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert patch["name"] == "node"
    pod = _strategic(pod, patch["template"]["spec"]["template"])
    trainer = job["spec"]["trainer"]
    (node,) = [c for c in pod["spec"]["containers"] if c["name"] == "node"]
    node.update({k: trainer[k] for k in ("image", "command", "args") if k in trainer})
    if "resourcesPerNode" in trainer:
        node["resources"] = trainer["resourcesPerNode"]
    pet = [{"name": "PET_NNODES", "value": str(trainer["numNodes"])}, {"name": "PET_NPROC_PER_NODE", "value": str(trainer["numProcPerNode"])},
           {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
           {"name": "PET_MASTER_ADDR", "value": "whisper-dpo-node-0-0.whisper-dpo"}, {"name": "PET_MASTER_PORT", "value": "29500"}]
    node["env"] = _merge_by(_merge_by(node.get("env", []), trainer.get("env", []), "name"), pet, "name")
    node.setdefault("ports", []).append({"containerPort": 29500})
    return pod


@pytest.mark.parametrize("variant", sorted(set(VARIANTS) - set(V1_ONLY)))
def test_every_trainjob_variant_validates_strictly(variant):
    _, rendered = _render(_trainjob_variant(variant), api="trainjob")
    job = rendered.job
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert _dropped_keys(job, _through_trainer_models(job)) == []
    patch = job["spec"]["runtimePatches"]
    assert [p["manager"] for p in patch] == ["audiorl.dev/render"]
    for runtime in (RUNTIME, BARE_RUNTIME):
        pod = _node_pod(job, runtime)
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "node"}, "template": pod},
                                     K8S_VERSION, strict=True)
        # the patch alone carries what AudioRL needs, whatever the runtime holds
        (node,) = pod["spec"]["containers"]
        assert {"/etc/audiorl", "/dev/shm"} <= {m["mountPath"] for m in node["volumeMounts"]}
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True and node["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert pod["metadata"]["labels"]["audiorl.dev/run-id"] == "run42"
    trainer = job["spec"]["trainer"]
    assert trainer["command"] == ENTRYPOINT and trainer["args"] == ["train", "$(AUDIORL_CONFIG)"]
    assert all("value" not in e for e in trainer["env"] if e["name"] in {s["name"] for s in SECRETS})


def test_the_trainjob_carries_nodes_processes_resources_queue_and_runtime():
    _, multi = _render(VARIANTS["multi-node"], api="trainjob")
    trainer = multi.job["spec"]["trainer"]
    assert trainer["numNodes"] == 4 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8" == trainer["resourcesPerNode"]["requests"]["nvidia.com/gpu"]
    assert multi.job["spec"]["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime"}
    assert "suspend" not in multi.job["spec"]
    # job.api and job.runtime in the config choose the same thing as the flags
    _, chosen = _render({"job": {"api": "trainjob", "runtime": "audiorl-torch", "runtime_kind": "TrainingRuntime"}})
    assert chosen.job["kind"] == "TrainJob" and chosen.api == "trainjob"
    assert chosen.job["spec"]["runtimeRef"]["name"] == "audiorl-torch" and chosen.job["spec"]["runtimeRef"]["kind"] == "TrainingRuntime"
    _, flag = _render({"job": {"api": "trainjob"}}, api="pytorchjob")
    assert flag.job["kind"] == "PyTorchJob"
    shown = subprocess.run([sys.executable, "-m", "audiorl_cli.main", "config", "show", str(REPO / "examples" / "cluster-whisper-dpo.yaml"),
                            "--set", "job.api=trainjob", "--json"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert {k: json.loads(shown.stdout)["job"][k] for k in ("api", "runtime", "runtime_kind")} == {
        "api": "trainjob", "runtime": "torch-distributed", "runtime_kind": "ClusterTrainingRuntime"}
    # Kueue holds the TrainJob suspended until it admits it
    _, queued = _render(_trainjob_variant("kueue"), api="trainjob")
    assert queued.job["spec"]["suspend"] is True and queued.job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-speech"
    with pytest.raises(ConfigError, match="job.runtime"):
        _render({"job": {"runtime": "Not A Name"}}, api="trainjob")


@pytest.mark.parametrize("extra, key", [
    (VARIANTS["elastic"], "job.elastic"),
    (VARIANTS["volcano"], "job.volcano"),
    ({"job": {"priority_class": "high"}}, "job.priority_class"),
    ({"job": {"restart_policy": "Never"}}, "job.restart_policy"),
    ({"job": {"clean_pod_policy": "All"}}, "job.clean_pod_policy"),
    ({"job": {"backoff_limit": 0}}, "job.backoff_limit"),
    ({"job": {"ttl_seconds_after_finished": 60}}, "job.ttl_seconds_after_finished"),
])
def test_a_trainjob_refuses_what_only_a_pytorchjob_can_carry(extra, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        _render(extra, api="trainjob")
    _render(extra)  # the PyTorchJob takes it


def test_a_written_out_config_renders_a_trainjob_with_a_warning(tmp_path):
    # `audiorl config show` writes every key, v1 defaults included: those are harmless, and said
    cfg = validate_config(BASE)
    path = tmp_path / "full.yaml"
    path.write_text(cfg.to_yaml())
    rendered = render_file(path, api="trainjob", run_id="r1")
    assert rendered.job["kind"] == "TrainJob"
    assert any("job.backoff_limit has no effect on a TrainJob" in w for w in rendered.warnings)


def test_the_shipped_runtime_validates_and_runs_what_render_renders():
    out = subprocess.run(["kubectl", "kustomize", str(REPO / "k8s" / "trainer")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (runtime,) = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    assert runtime["kind"] == "ClusterTrainingRuntime" and "namespace" not in runtime["metadata"]  # cluster-wide
    assert _dropped_keys(runtime, _through_trainer_models(runtime, "TrainerV1alpha1ClusterTrainingRuntime")) == []
    (node_job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert node_job["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    template = node_job["template"]["spec"]["template"]
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "node"}, "template": template},
                                 K8S_VERSION, strict=True)
    (node,) = template["spec"]["containers"]
    cfg = validate_config(BASE)
    assert node["name"] == "node" and node["command"] == ENTRYPOINT and node["image"] == cfg.job.image
    assert node["workingDir"] == WORKDIR and template["spec"]["securityContext"]["runAsUser"] == RUN_AS
    assert template["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert node["securityContext"]["capabilities"]["drop"] == ["ALL"] and node["securityContext"]["allowPrivilegeEscalation"] is False
    assert {e["name"]: e["value"] for e in node["env"]}["OMP_NUM_THREADS"] == "1"
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in template["spec"]["volumes"])


def test_operator_environment_and_expansion():
    _, rendered = _render(VARIANTS["multi-node"])
    job = rendered.job
    master = operator_env(job, "Master", 0, master_addr="m", master_port=23456)
    worker2 = operator_env(job, "Worker", 2, master_addr="m", master_port=23456)
    assert master["RANK"] == master["PET_NODE_RANK"] == "0"
    assert worker2["RANK"] == worker2["PET_NODE_RANK"] == "3"  # Worker i is pod i + 1
    assert master["WORLD_SIZE"] == "32" and master["PET_NNODES"] == "4" and master["PET_NPROC_PER_NODE"] == "8"
    _, elastic = _render(VARIANTS["elastic"])
    env = operator_env(elastic.job, "Worker", 0, master_addr="w0", master_port=29400)
    assert env["PET_NNODES"] == "1:4" and env["PET_RDZV_BACKEND"] == "c10d" and env["PET_RDZV_ENDPOINT"] == "w0:29400"
    assert env["PET_NODE_RANK"] == "0" and env["PET_MAX_RESTARTS"] == "5"
    assert expand("$(A)/x/$(B)/$$(A)", {"A": "1"}) == "1/x/$(B)/$(A)"


def test_the_trainer_runtime_environment_for_local_runs():
    # Trainer v2's torch runtime sets torchrun's PET_* only: the node rank is the pod's Job
    # completion index, and RANK/WORLD_SIZE are left to torchrun (unlike the v1 operator)
    _, rendered = _render(VARIANTS["multi-node"], api="trainjob")
    node2 = trainer_env(rendered.job, 2, master_addr="m", master_port=29500)
    assert node2["PET_NODE_RANK"] == node2["JOB_COMPLETION_INDEX"] == "2"
    assert node2["PET_NNODES"] == "4" and node2["PET_NPROC_PER_NODE"] == "8" and node2["PET_MASTER_ADDR"] == "m"
    assert "RANK" not in node2 and "WORLD_SIZE" not in node2
    pods, _ = pod_commands(rendered, Path("/tmp/config.yaml"), master_port=29500, base_env={})
    assert [name for name, _, _ in pods] == [f"whisper-dpo-node-0-{i}" for i in range(4)]
    argv, env = pods[3][1], pods[3][2]
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"] and argv[-2:] == ["train", "/tmp/config.yaml"]
    assert env["PET_NODE_RANK"] == "3" and env["AUDIORL_RUN_ID"] == "run42"


settings_ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def _job_sections(draw):
    gpus = draw(st.integers(0, 8))
    nodes = draw(st.integers(1, 6))
    job = {
        "nodes": nodes,
        "gpus_per_node": gpus,
        "restart_policy": draw(st.sampled_from(["OnFailure", "Never", "ExitCode", "Always"])),
        "clean_pod_policy": draw(st.sampled_from(["Running", "All", "None"])),
        "requests": {"cpu": draw(st.sampled_from(["500m", "2", "16", "96"])), "memory": draw(st.sampled_from(["4Gi", "64Gi"]))},
        "limits": {"memory": "128Gi"},
        "shm_size": draw(st.sampled_from(["64Mi", "1Gi", "32Gi"])),
        "ttl_seconds_after_finished": draw(st.one_of(st.none(), st.integers(0, 10**6))),
        "backoff_limit": draw(st.one_of(st.none(), st.integers(0, 10))),
        "volumes": draw(st.lists(st.sampled_from(VOLUMES), unique_by=lambda v: v["name"], max_size=3)),
        "secret_env": draw(st.lists(st.sampled_from(SECRETS), unique_by=lambda v: v["name"], max_size=3)),
        "node_selector": draw(st.dictionaries(st.sampled_from(["pool", "gpu"]), st.sampled_from(["a", "h100"]), max_size=2)),
    }
    if gpus == 0 or draw(st.booleans()):
        job["procs_per_node"] = draw(st.integers(1, 4))
    scheduler = draw(st.sampled_from(["none", "kueue", "volcano", "elastic"]))
    if scheduler == "kueue":
        job["kueue_queue"] = "q"
    elif scheduler == "volcano":
        job["volcano"] = {"queue": draw(st.one_of(st.none(), st.just("research")))}
    elif scheduler == "elastic":
        job["elastic"] = {"min_nodes": draw(st.integers(1, nodes)), "max_nodes": nodes + draw(st.integers(0, 3))}
    return job


@settings_
@given(job=_job_sections(), strategy=st.sampled_from(["ddp", "fsdp"]))
def test_property_any_job_section_renders_valid_objects(job, strategy):
    cfg = validate_config(_merge(BASE, {"job": job, "train": {"distributed": {"strategy": strategy}}}))
    rendered = render(cfg, name="prop", run_id="r1")
    kubernetes_validate.validate(rendered.config_map, K8S_VERSION, strict=True)
    _validate_pod_templates(rendered.job)
    assert _dropped_keys(rendered.job, _through_kubeflow_models(rendered.job)) == []
    specs = rendered.job["spec"]["pytorchReplicaSpecs"]
    assert sum(s["replicas"] for s in specs.values()) == job["nodes"]
    procs = job.get("procs_per_node") or max(job["gpus_per_node"], 1)
    assert rendered.job["spec"]["nprocPerNode"] == str(procs)
    for spec in specs.values():
        container = spec["template"]["spec"]["containers"][0]
        gpu = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        assert gpu == (str(job["gpus_per_node"]) if job["gpus_per_node"] else None)
        assert all("value" not in e for e in container["env"] if e["name"] in {s["name"] for s in SECRETS})


def test_render_never_imports_torch_or_the_kubernetes_client(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE))
    code = (
        "import sys; from audiorl_cli.main import app\n"
        "try:\n    app(['render', sys.argv[1]])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'mlflow', 'kubernetes') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "kind: PyTorchJob" in result.stdout


def test_the_promotion_gate_and_scoring_import_no_torch():
    # `audiorl promote` decides on WERs with the same scoring as evaluation, without torch
    code = (
        "import sys\n"
        "from audiorl.tracking.promotion import decide\n"
        "from audiorl.scoring import score\n"
        "wer = score(['turn on the lights'], ['turn on the light']).wer\n"
        "decision = decide({'hard': 0.5}, {'hard': wer}, ['hard'], margin=0.0, tolerance=0.0)\n"
        "assert decision.promote and wer == 0.25, (decision, wer)\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_job_state_reads_the_operators_conditions():
    from audiorl.k8s.status import job_state

    def obj(*conditions, **status):
        return {"metadata": {"name": "j"}, "status": {"conditions": [
            {"type": t, "status": s, "reason": f"{t}Reason", "message": f"{t} message"} for t, s in conditions], **status}}

    assert job_state({"metadata": {"name": "j"}}).phase == "Pending"
    assert job_state(obj(("Created", "True"))).phase == "Created"
    running = job_state(obj(("Created", "True"), ("Running", "True"), replicaStatuses={"Master": {"active": 1}, "Worker": {"active": 3}}))
    assert running.phase == "Running" and not running.finished and running.replicas["Worker"]["active"] == 3
    # Kueue suspends a job until it is admitted
    assert job_state(obj(("Created", "True"), ("Suspended", "True"))).phase == "Suspended"
    restarting = job_state(obj(("Created", "True"), ("Running", "False"), ("Restarting", "True")))
    assert restarting.phase == "Restarting"
    failed = job_state(obj(("Created", "True"), ("Running", "False"), ("Failed", "True"),
                           replicaStatuses={"Master": {"active": 1}, "Worker": {"failed": 2, "active": 1}}))
    assert failed.phase == "Failed" and failed.finished and failed.failed_replicas == {"Worker": 2}
    assert "Worker" in failed.summary() and "Failed message" in failed.summary()
    # a terminal condition wins even when a later, stale condition is still true
    assert job_state(obj(("Succeeded", "True"), ("Running", "True"))).phase == "Succeeded"
    # Kubeflow Trainer v2 says Complete
    assert job_state(obj(("Complete", "True"))).phase == "Succeeded"


def test_job_state_reads_a_trainjobs_conditions_and_child_jobs():
    from audiorl.k8s.status import job_state

    def trainjob(*conditions, active=0, succeeded=0, failed=0):
        status = {"conditions": [{"type": t, "status": s, "reason": r, "message": f"{t} {r}", "lastTransitionTime": "2026-12-03T10:00:00Z"}
                                 for t, s, r in conditions]}
        if active or succeeded or failed:
            status["jobsStatus"] = [{"name": "node", "active": active, "ready": active, "succeeded": succeeded, "failed": failed,
                                     "suspended": 0}]
        return {"kind": "TrainJob", "metadata": {"name": "t"}, "status": status}

    assert job_state({"kind": "TrainJob", "metadata": {"name": "t"}}).phase == "Pending"
    held = job_state(trainjob(("Suspended", "True", "Suspended")))
    assert held.phase == "Suspended" and not held.finished and held.kind == "TrainJob"
    # admitted: Suspended turns false (Resumed); Running once the node Job is active
    assert job_state(trainjob(("Suspended", "False", "Resumed"))).phase == "Created"
    running = job_state(trainjob(("Suspended", "False", "Resumed"), active=1))
    assert running.phase == "Running" and running.replicas == {"node": {"active": 1, "succeeded": 0, "failed": 0}}
    done = job_state(trainjob(("Complete", "True", "AllJobsCompleted"), succeeded=1))
    assert done.phase == "Succeeded" and done.finished and done.completion_time == "2026-12-03T10:00:00Z"
    failed = job_state(trainjob(("Failed", "True", "DeadlineExceeded"), failed=1))
    assert failed.phase == "Failed" and failed.reason == "DeadlineExceeded" and failed.failed_replicas == {"node": 1}
