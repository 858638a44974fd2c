"""`audiorl submit|status|logs|list|delete` and plain kubectl against a Kubernetes API emulator on
127.0.0.1, with a simulated Training Operator (PyTorchJob) or Trainer v2 (TrainJob) moving jobs
through their conditions. Every test here runs against both kinds."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import yaml

from audiorl.config import validate_config
from audiorl.errors import ClusterError
from audiorl.k8s.client import Cluster
from audiorl.k8s.render import render
from tests.k8s_emulator import Emulator, SimulatedOperator, SimulatedTrainer

BASE = {"model": {"name_or_path": "/models/whisper-small"}, "data": {"train": "/data/pairs.jsonl"},
        "job": {"nodes": 2, "namespace": "speech", "secret_env": [{"name": "HF_TOKEN", "secret": "hub", "key": "token"}]}}


@dataclass
class Kind:
    """What differs between the two workloads, as their controllers report it."""

    api: str
    kind: str
    plural: str
    controller: type
    failed_reason: str
    failed_replicas: str
    done_condition: str
    workers_path: str  # a jsonpath kubectl reads off the stored job: the worker count


KINDS = {
    "pytorchjob": Kind("pytorchjob", "PyTorchJob", "pytorchjobs", SimulatedOperator, "PyTorchJobFailed", "1 Worker", "Succeeded",
                       "{.spec.pytorchReplicaSpecs.Worker.replicas}"),
    "trainjob": Kind("trainjob", "TrainJob", "trainjobs", SimulatedTrainer, "FailedJobs", "1 node", "Complete",
                     "{.spec.trainer.numNodes}"),
}


@pytest.fixture(params=sorted(KINDS))
def kind(request):
    return KINDS[request.param]


@pytest.fixture
def api(tmp_path):
    with Emulator(tmp_path, namespace="speech") as server:
        yield server


@pytest.fixture
def config_file(tmp_path, kind):
    path = tmp_path / "whisper-dpo.yaml"
    path.write_text(yaml.safe_dump({**BASE, "job": {**BASE["job"], "api": kind.api}}))
    return path


# the operator's commands run on a laptop without a deep-learning stack: each call checks, on its
# way out, that neither torch nor transformers was imported
_OPERATOR_CLI = (
    "import atexit, sys\n"
    "def _heavy():\n"
    "    heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
    "    if heavy:\n"
    "        sys.stderr.write(f'operator command imported {heavy}\\n')\n"
    "atexit.register(_heavy)\n"
    "from audiorl_cli.main import main\n"
    "sys.argv = ['audiorl', *sys.argv[1:]]\n"
    "main()\n"
)


def _cli(api, *args, timeout=60):
    env = {**os.environ, "KUBECONFIG": str(api.kubeconfig)}
    result = subprocess.run([sys.executable, "-c", _OPERATOR_CLI, *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert "operator command imported" not in result.stderr, (args, result.stderr)
    return result


def _rendered(kind, name="whisper-dpo", **job):
    cfg = validate_config({**BASE, "job": {**BASE["job"], "api": kind.api, **job}})
    return render(cfg, name=name, run_id="r1")


def _cluster(api, kind):
    return Cluster("speech", kubeconfig=str(api.kubeconfig), kind=kind.kind)


def test_submit_creates_the_objects_and_refuses_to_clobber_a_running_job(api, kind):
    cluster = _cluster(api, kind)
    rendered = _rendered(kind)
    messages = []
    cluster.submit(rendered, server_dry_run=True, log=messages.append)
    assert api.objects(kind.plural) == {} and api.objects("configmaps") == {}  # a dry run stores nothing
    assert "dry run" in messages[-1]

    cluster.submit(rendered, log=messages.append)
    job = api.objects(kind.plural)[("speech", "whisper-dpo")]
    cm = api.objects("configmaps")[("speech", "whisper-dpo-config")]
    assert job["kind"] == kind.kind and job["spec"] == rendered.job["spec"]
    assert cm["data"] == rendered.config_map["data"]
    assert cm["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]  # collected with the job
    assert cluster.status("whisper-dpo").phase == "Pending"

    with pytest.raises(ClusterError, match=r"already exists.*Pending.*--replace"):
        cluster.submit(rendered)
    uid = job["metadata"]["uid"]
    cluster.submit(rendered, replace=True, log=messages.append)
    assert api.objects(kind.plural)[("speech", "whisper-dpo")]["metadata"]["uid"] != uid
    assert any("replacing" in m for m in messages)

    # a finished job of the same name is replaced without being asked
    kind.controller(api, "speech", "whisper-dpo", step_s=0.01).start().join()
    assert cluster.status("whisper-dpo").phase == "Succeeded"
    cluster.submit(rendered)
    assert cluster.status("whisper-dpo").phase == "Pending"


# the phases each controller moves a job through, as `wait` reports them
_PHASES = {
    "pytorchjob": ["Created", "Running", "Restarting", "Running", "Succeeded"],
    "trainjob": ["Running", "Succeeded"],
}


def test_wait_reports_each_phase_until_success(api, kind):
    cluster = _cluster(api, kind)
    cluster.submit(_rendered(kind), log=lambda m: None)
    operator = kind.controller(api, "speech", "whisper-dpo", restart=True).start()
    seen = []
    state = cluster.wait("whisper-dpo", timeout_s=30, on_change=lambda s: seen.append(s.phase))
    operator.join()
    assert state.phase == "Succeeded" and state.finished and state.completion_time
    phases = [p for i, p in enumerate(seen) if i == 0 or seen[i - 1] != p]
    if phases[0] == "Pending":  # the operator may have moved before the watch began
        phases = phases[1:]
    assert phases == _PHASES[kind.api]
    done = {"active": 0, "succeeded": 1, "failed": 0}
    assert state.replicas == ({"Master": done, "Worker": done} if kind.api == "pytorchjob" else {"node": done})


def test_a_trainjob_kueue_holds_is_suspended_until_admitted(api):
    kind = KINDS["trainjob"]
    cluster = _cluster(api, kind)
    rendered = _rendered(kind, kueue_queue="team-speech")
    assert rendered.job["spec"]["suspend"] is True
    assert rendered.job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-speech"
    cluster.submit(rendered, log=lambda m: None)
    trainer = SimulatedTrainer(api, "speech", "whisper-dpo", step_s=0.4).start()
    seen = []
    state = cluster.wait("whisper-dpo", timeout_s=30, on_change=lambda s: seen.append((s.phase, s.reason)))
    trainer.join()
    phases = [p for i, p in enumerate(seen) if i == 0 or seen[i - 1][0] != p[0]]
    if phases[0][0] == "Pending":
        phases = phases[1:]
    assert phases == [("Suspended", "Suspended"), ("Created", ""), ("Running", ""), ("Succeeded", "AllJobsCompleted")]
    assert state.finished and api.objects("trainjobs")[("speech", "whisper-dpo")]["spec"]["suspend"] is False


def test_wait_times_out_with_the_phase_it_was_in(api, kind):
    cluster = _cluster(api, kind)
    cluster.submit(_rendered(kind), log=lambda m: None)
    start = time.monotonic()
    with pytest.raises(ClusterError, match="still Pending after 2 s"):
        cluster.wait("whisper-dpo", timeout_s=2)
    assert time.monotonic() - start < 10


def test_cli_submit_follow_streams_the_lead_log_and_fails_on_a_failed_replica(api, kind, config_file):
    log = "step 1 loss 0.69\nstep 2 loss 0.41\n"
    operator = kind.controller(api, "speech", "whisper-dpo", outcome="Failed", log=log, step_s=0.5).start()
    result = _cli(api, "submit", str(config_file), "--follow", "--timeout", "60")
    operator.join()
    assert result.returncode == 5, result.stderr
    assert "step 1 loss 0.69\nstep 2 loss 0.41" in result.stdout
    assert "Failed" in result.stdout
    assert f"failed replicas: {kind.failed_replicas}" in result.stderr

    # status, logs and delete find the job's kind by its name; --api names it outright
    for extra in ([], ["--api", kind.api]):
        status = _cli(api, "status", "whisper-dpo", "-n", "speech", *extra)
        assert status.returncode == 0, status.stderr
        assert f"whisper-dpo: Failed ({kind.failed_reason})" in status.stdout and f"failed replicas: {kind.failed_replicas}" in status.stdout
    for phase in ("Failed",) + (("Created", "Running") if kind.api == "pytorchjob" else ()):
        assert phase in status.stdout

    logs = _cli(api, "logs", "whisper-dpo", "-n", "speech")
    assert logs.stdout == log
    other = "trainjob" if kind.api == "pytorchjob" else "pytorchjob"
    wrong = _cli(api, "status", "whisper-dpo", "-n", "speech", "--api", other)
    assert wrong.returncode == 7 and f"no {KINDS[other].kind} 'whisper-dpo'" in wrong.stderr


def test_cli_list_delete_and_errors(api, kind, config_file):
    assert "no AudioRL jobs" in _cli(api, "list", "-n", "speech").stdout
    assert _cli(api, "submit", str(config_file), "--set", "job.name=first").returncode == 0
    assert _cli(api, "submit", str(config_file), "--set", "job.name=second").returncode == 0
    # the flag overrides the config's job.api
    other = "trainjob" if kind.api == "pytorchjob" else "pytorchjob"
    assert _cli(api, "submit", str(config_file), "--set", "job.name=third", "--api", other).returncode == 0
    assert ("speech", "third") in api.objects(KINDS[other].plural)
    listing = _cli(api, "list", "-n", "speech").stdout.splitlines()
    assert sorted((line.split(":")[0], line.rsplit("(", 1)[1].rstrip(")")) for line in listing) == sorted(
        [("first", kind.kind), ("second", kind.kind), ("third", KINDS[other].kind)])
    only = _cli(api, "list", "-n", "speech", "--api", kind.api).stdout.splitlines()
    assert [line.split(":")[0] for line in only] == ["first", "second"]

    again = _cli(api, "submit", str(config_file), "--set", "job.name=first")
    assert again.returncode == 7 and "already exists" in again.stderr and "Traceback" not in again.stderr

    deleted = _cli(api, "delete", "first", "-n", "speech")
    assert deleted.returncode == 0, deleted.stderr
    assert ("speech", "first") not in api.objects(kind.plural)
    assert ("speech", "first-config") not in api.objects("configmaps")

    missing = _cli(api, "status", "nope", "-n", "speech")
    assert missing.returncode == 7 and "no PyTorchJob or TrainJob 'nope' in namespace 'speech'" in missing.stderr

    unreachable = subprocess.run(
        [sys.executable, "-m", "audiorl_cli.main", "list", "--kubeconfig", str(config_file.parent / "absent")],
        capture_output=True, text=True, env={**os.environ, "KUBERNETES_SERVICE_HOST": ""}, timeout=60,
    )
    assert unreachable.returncode == 7 and "no kubeconfig" in unreachable.stderr and "--local" in unreachable.stderr


def test_deleting_a_job_takes_its_pods_and_config(api, kind):
    cluster = _cluster(api, kind)
    cluster.submit(_rendered(kind), log=lambda m: None)
    kind.controller(api, "speech", "whisper-dpo", step_s=0.01).start().join()
    pods = api.objects("pods")
    assert len(pods) == 2 and all(p["metadata"]["labels"]["audiorl.dev/run-id"] == "r1" for p in pods.values())
    cluster.delete("whisper-dpo", wait_s=10)
    assert api.objects(kind.plural) == {} and api.objects("pods") == {} and api.objects("configmaps") == {}


def test_kubectl_apply_get_wait_delete_the_rendered_yaml(api, kind, config_file, tmp_path):
    manifest = tmp_path / "job.yaml"
    rendered = _cli(api, "render", str(config_file), "--output", str(manifest))
    assert rendered.returncode == 0, rendered.stderr
    env = {**os.environ, "KUBECONFIG": str(api.kubeconfig)}

    def kubectl(*args):
        return subprocess.run(["kubectl", *args], capture_output=True, text=True, env=env, timeout=60)

    # the emulator serves no OpenAPI schema, so client-side validation is off here
    applied = kubectl("apply", "--validate=false", "-f", str(manifest))
    assert applied.returncode == 0, applied.stderr
    group = "kubeflow.org" if kind.api == "pytorchjob" else "trainer.kubeflow.org"
    assert f"{kind.api}.{group}/whisper-dpo created" in applied.stdout
    got = kubectl("get", kind.api, "whisper-dpo", "-n", "speech", "-o", f"jsonpath={kind.workers_path}")
    assert got.stdout == ("1" if kind.api == "pytorchjob" else "2")
    kind.controller(api, "speech", "whisper-dpo", step_s=0.3).start()
    waited = kubectl("wait", f"--for=condition={kind.done_condition}", f"{kind.api}/whisper-dpo", "-n", "speech", "--timeout=30s")
    assert waited.returncode == 0, waited.stderr
    assert "condition met" in waited.stdout
    deleted = kubectl("delete", "-f", str(manifest))
    assert deleted.returncode == 0, deleted.stderr
    assert api.objects(kind.plural) == {} and api.objects("pods") == {}


@pytest.mark.skipif(not os.environ.get("AUDIORL_E2E_KUBECONFIG"), reason="set AUDIORL_E2E_KUBECONFIG to test against a real cluster")
def test_real_cluster_server_side_dry_run(kind):
    """Opt-in: a real API server with the Kubeflow operator's CRDs (Training Operator for
    PyTorchJob, Trainer v2 for TrainJob) checks the rendered job against its schema (server-side
    dry run: nothing is created)."""
    namespace = os.environ.get("AUDIORL_E2E_NAMESPACE", "default")
    cluster = Cluster(namespace, kubeconfig=os.environ["AUDIORL_E2E_KUBECONFIG"], kind=kind.kind)
    rendered = _rendered(kind, name="audiorl-e2e-dry-run", namespace=namespace)
    cluster.submit(rendered, server_dry_run=True, log=lambda m: None)
    assert cluster.get("audiorl-e2e-dry-run") is None
