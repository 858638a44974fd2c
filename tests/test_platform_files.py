"""The files a cluster uses besides rendered jobs: the worker image's Dockerfile, the kustomize
bases under k8s/, the committed example job, and the package list the image installs."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import tomllib
import yaml

from audiorl.config import is_secret_key
from audiorl.k8s.render import ENTRYPOINT, RUN_AS, WORKDIR, render_file

REPO = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.32.0"


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_the_worker_image_runs_what_render_renders_as_a_non_root_user():
    steps = _instructions(REPO / "Dockerfile")
    args = dict(item.split("=", 1) for op, item in steps if op == "ARG" and "=" in item)
    (base,) = [rest for op, rest in steps if op == "FROM"]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert base.startswith("pytorch/pytorch:") and "cuda" in base  # a CUDA build of torch for GPU workers
    assert json.loads([rest for op, rest in steps if op == "ENTRYPOINT"][-1]) == ENTRYPOINT
    user = [rest for op, rest in steps if op == "USER"][-1]
    assert user.split(":")[0] == str(RUN_AS) != "0"
    assert [rest for op, rest in steps if op == "WORKDIR"][-1] == WORKDIR
    env = {}
    for op, rest in steps:
        if op == "ENV":
            env.update(dict(part.split("=", 1) for part in shlex.split(rest)))
    assert env["HF_HOME"].startswith("/cache") and env["NCCL_DEBUG"] and env["PYTHONUNBUFFERED"] == "1"
    # no credentials baked in: no secret-looking ENV or ARG, nothing secret copied in
    baked = [name for op, rest in steps if op in ("ENV", "ARG") for name in re.findall(r"(\w+)=", rest) if is_secret_key(name)]
    assert baked == []
    copied = " ".join(rest for op, rest in steps if op in ("COPY", "ADD"))
    assert not re.search(r"\.env|kubeconfig|credentials|\.netrc|id_rsa", copied)
    assert "pip install torch" not in (REPO / "Dockerfile").read_text()  # the base's CUDA torch stays
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".env", "**/kubeconfig", "mlruns", "runs"} <= set(ignored)


def test_every_package_is_installed():
    """A non-editable install (the image's) only gets the packages pyproject.toml lists."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "audiorl").rglob("__init__.py")}
    assert found - listed == set()


@pytest.fixture(scope="module")
def bases():
    out = subprocess.run(["kubectl", "kustomize", str(REPO / "k8s")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def test_the_kustomize_bases_validate(bases):
    kinds = sorted(obj["kind"] for obj in bases)
    assert kinds.count("Deployment") == 1 and kinds.count("StatefulSet") == 2 and "Role" in kinds and "Namespace" in kinds
    for obj in bases:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "audiorl"
    assert not [o for o in bases if o["kind"] in ("Secret", "ClusterRole", "ClusterRoleBinding")]


def _pod_specs(bases):
    for obj in bases:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]


def test_the_mlflow_stack_runs_locked_down_with_secrets_by_reference(bases):
    services = {o["metadata"]["name"]: o for o in bases if o["kind"] == "Service"}
    for name, pod in _pod_specs(bases):
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in pod.get("initContainers", []) + pod["containers"]:
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], name
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert ":" in container["image"] and not container["image"].endswith(":latest"), container["image"]
            for env in container.get("env", []):
                if is_secret_key(env["name"]) or env["name"].endswith(("_USER", "_PASSWORD", "_KEY", "_ID")):
                    assert "secretKeyRef" in env.get("valueFrom", {}), (name, env["name"])
    (mlflow,) = [pod for name, pod in _pod_specs(bases) if name == "mlflow"]
    args = " ".join(mlflow["containers"][0]["args"])
    assert "--backend-store-uri=postgresql://$(DB_USER):$(DB_PASSWORD)@mlflow-postgres:5432" in args
    assert "--artifacts-destination=s3://" in args and "--serve-artifacts" in args
    env = {e["name"]: e.get("value") for e in mlflow["containers"][0]["env"]}
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://mlflow-minio:9000"
    for host in ("mlflow-postgres", "mlflow-minio"):
        assert host in services


def test_the_submitter_role_is_least_privilege(bases):
    (role,) = [o for o in bases if o["kind"] == "Role"]
    granted = {(group, res): set(rule["verbs"]) for rule in role["rules"] for group in rule["apiGroups"] for res in rule["resources"]}
    assert set(granted) == {("kubeflow.org", "pytorchjobs"), ("kubeflow.org", "pytorchjobs/status"), ("trainer.kubeflow.org", "trainjobs"),
                            ("trainer.kubeflow.org", "trainjobs/status"), ("", "configmaps"), ("", "pods"), ("", "pods/log")}
    assert all("*" not in verbs for verbs in granted.values())
    # both kinds of job get exactly what submit, status, logs, list, delete and kubectl apply use
    assert granted[("kubeflow.org", "pytorchjobs")] == granted[("trainer.kubeflow.org", "trainjobs")] == {
        "create", "get", "list", "watch", "patch", "delete"}
    assert granted[("kubeflow.org", "pytorchjobs/status")] == granted[("trainer.kubeflow.org", "trainjobs/status")] == {"get"}
    assert granted[("", "pods")] == {"get", "list", "watch"} and granted[("", "pods/log")] == {"get"}
    (binding,) = [o for o in bases if o["kind"] == "RoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    worker = next(o for o in bases if o["kind"] == "ServiceAccount" and o["metadata"]["name"] == "audiorl-worker")
    assert worker["automountServiceAccountToken"] is False


def test_the_example_job_is_current_and_uses_what_the_bases_provide(bases):
    example = REPO / "k8s" / "examples" / "whisper-small-mpo.yaml"
    rendered = render_file(REPO / "examples" / "cluster-whisper-dpo.yaml", run_id="example")
    regenerate = "regenerate: audiorl render examples/cluster-whisper-dpo.yaml --run-id example -o " + str(example.relative_to(REPO))
    assert example.read_text() == rendered.to_yaml(), regenerate
    assert rendered.warnings == []
    claims = {o["metadata"]["name"] for o in bases if o["kind"] == "PersistentVolumeClaim"}
    accounts = {o["metadata"]["name"] for o in bases if o["kind"] == "ServiceAccount"}
    for spec in rendered.job["spec"]["pytorchReplicaSpecs"].values():
        pod = spec["template"]["spec"]
        assert {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v} <= claims
        assert pod["serviceAccountName"] in accounts
    assert rendered.namespace == next(o for o in bases if o["kind"] == "Namespace")["metadata"]["name"]


def test_the_example_trainjob_is_current_and_runs_on_the_shipped_runtime(bases):
    example = REPO / "k8s" / "examples" / "whisper-small-mpo-trainjob.yaml"
    rendered = render_file(REPO / "examples" / "cluster-whisper-dpo.yaml", run_id="example", api="trainjob", runtime="audiorl-torch")
    regenerate = ("regenerate: audiorl render examples/cluster-whisper-dpo.yaml --run-id example --api trainjob --runtime audiorl-torch -o "
                  + str(example.relative_to(REPO)))
    assert example.read_text() == rendered.to_yaml(), regenerate
    assert rendered.warnings == []
    runtime = yaml.safe_load((REPO / "k8s" / "trainer" / "runtime.yaml").read_text())
    assert rendered.job["spec"]["runtimeRef"] == {"name": runtime["metadata"]["name"], "apiGroup": "trainer.kubeflow.org",
                                                  "kind": runtime["kind"]}
    (patch,) = rendered.job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = patch["template"]["spec"]["template"]["spec"]
    claims = {o["metadata"]["name"] for o in bases if o["kind"] == "PersistentVolumeClaim"}
    accounts = {o["metadata"]["name"] for o in bases if o["kind"] == "ServiceAccount"}
    assert {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v} <= claims
    assert pod["serviceAccountName"] in accounts
