"""`audiorl submit|status|logs|list|delete` and plain kubectl against a Kubernetes API emulator on
127.0.0.1, with a simulated Training Operator moving jobs through their conditions."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml

from audiorl.config import validate_config
from audiorl.errors import ClusterError
from audiorl.k8s.client import Cluster
from audiorl.k8s.render import render
from tests.k8s_emulator import Emulator, SimulatedOperator

BASE = {"model": {"name_or_path": "/models/whisper-small"}, "data": {"train": "/data/pairs.jsonl"},
        "job": {"nodes": 2, "namespace": "speech", "secret_env": [{"name": "HF_TOKEN", "secret": "hub", "key": "token"}]}}


@pytest.fixture
def api(tmp_path):
    with Emulator(tmp_path, namespace="speech") as server:
        yield server


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "whisper-dpo.yaml"
    path.write_text(yaml.safe_dump(BASE))
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


def _rendered(name="whisper-dpo", **job):
    cfg = validate_config({**BASE, "job": {**BASE["job"], **job}})
    return render(cfg, name=name, run_id="r1")


def test_submit_creates_the_objects_and_refuses_to_clobber_a_running_job(api):
    cluster = Cluster("speech", kubeconfig=str(api.kubeconfig))
    rendered = _rendered()
    messages = []
    cluster.submit(rendered, server_dry_run=True, log=messages.append)
    assert api.objects("pytorchjobs") == {} and api.objects("configmaps") == {}  # a dry run stores nothing
    assert "dry run" in messages[-1]

    cluster.submit(rendered, log=messages.append)
    job = api.objects("pytorchjobs")[("speech", "whisper-dpo")]
    cm = api.objects("configmaps")[("speech", "whisper-dpo-config")]
    assert job["spec"] == rendered.job["spec"]
    assert cm["data"] == rendered.config_map["data"]
    assert cm["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]  # collected with the job
    assert cluster.status("whisper-dpo").phase == "Pending"

    with pytest.raises(ClusterError, match=r"already exists.*Pending.*--replace"):
        cluster.submit(rendered)
    uid = job["metadata"]["uid"]
    cluster.submit(rendered, replace=True, log=messages.append)
    assert api.objects("pytorchjobs")[("speech", "whisper-dpo")]["metadata"]["uid"] != uid
    assert any("replacing" in m for m in messages)

    # a finished job of the same name is replaced without being asked
    SimulatedOperator(api, "speech", "whisper-dpo", step_s=0.01).start().join()
    assert cluster.status("whisper-dpo").phase == "Succeeded"
    cluster.submit(rendered)
    assert cluster.status("whisper-dpo").phase == "Pending"


def test_wait_reports_each_phase_until_success(api):
    cluster = Cluster("speech", kubeconfig=str(api.kubeconfig))
    cluster.submit(_rendered(), log=lambda m: None)
    operator = SimulatedOperator(api, "speech", "whisper-dpo", restart=True).start()
    seen = []
    state = cluster.wait("whisper-dpo", timeout_s=30, on_change=lambda s: seen.append(s.phase))
    operator.join()
    assert state.phase == "Succeeded" and state.finished and state.completion_time
    phases = [p for i, p in enumerate(seen) if i == 0 or seen[i - 1] != p]
    if phases[0] == "Pending":  # the operator may have moved before the watch began
        phases = phases[1:]
    assert phases == ["Created", "Running", "Restarting", "Running", "Succeeded"]
    assert state.replicas == {"Master": {"active": 0, "succeeded": 1, "failed": 0}, "Worker": {"active": 0, "succeeded": 1, "failed": 0}}


def test_wait_times_out_with_the_phase_it_was_in(api):
    cluster = Cluster("speech", kubeconfig=str(api.kubeconfig))
    cluster.submit(_rendered(), log=lambda m: None)
    start = time.monotonic()
    with pytest.raises(ClusterError, match="still Pending after 2 s"):
        cluster.wait("whisper-dpo", timeout_s=2)
    assert time.monotonic() - start < 10


def test_cli_submit_follow_streams_the_master_log_and_fails_on_a_failed_replica(api, config_file):
    log = "step 1 loss 0.69\nstep 2 loss 0.41\n"
    operator = SimulatedOperator(api, "speech", "whisper-dpo", outcome="Failed", log=log, step_s=0.5).start()
    result = _cli(api, "submit", str(config_file), "--follow", "--timeout", "60")
    operator.join()
    assert result.returncode == 5, result.stderr
    assert "step 1 loss 0.69\nstep 2 loss 0.41" in result.stdout
    assert "Failed" in result.stdout
    assert "failed replicas: 1 Worker" in result.stderr

    status = _cli(api, "status", "whisper-dpo", "-n", "speech")
    assert status.returncode == 0, status.stderr
    assert "whisper-dpo: Failed (PyTorchJobFailed)" in status.stdout and "failed replicas: 1 Worker" in status.stdout
    for phase in ("Created", "Running", "Failed"):
        assert phase in status.stdout

    logs = _cli(api, "logs", "whisper-dpo", "-n", "speech")
    assert logs.stdout == log


def test_cli_list_delete_and_errors(api, config_file):
    assert "no AudioRL jobs" in _cli(api, "list", "-n", "speech").stdout
    assert _cli(api, "submit", str(config_file), "--set", "job.name=first").returncode == 0
    assert _cli(api, "submit", str(config_file), "--set", "job.name=second").returncode == 0
    listing = _cli(api, "list", "-n", "speech").stdout.splitlines()
    assert [line.split(":")[0] for line in listing] == ["first", "second"]

    again = _cli(api, "submit", str(config_file), "--set", "job.name=first")
    assert again.returncode == 7 and "already exists" in again.stderr and "Traceback" not in again.stderr

    deleted = _cli(api, "delete", "first", "-n", "speech")
    assert deleted.returncode == 0, deleted.stderr
    assert ("speech", "first") not in api.objects("pytorchjobs")
    assert ("speech", "first-config") not in api.objects("configmaps")

    missing = _cli(api, "status", "nope", "-n", "speech")
    assert missing.returncode == 7 and "no PyTorchJob 'nope' in namespace 'speech'" in missing.stderr

    unreachable = subprocess.run(
        [sys.executable, "-m", "audiorl_cli.main", "list", "--kubeconfig", str(config_file.parent / "absent")],
        capture_output=True, text=True, env={**os.environ, "KUBERNETES_SERVICE_HOST": ""}, timeout=60,
    )
    assert unreachable.returncode == 7 and "no kubeconfig" in unreachable.stderr and "--local" in unreachable.stderr


def test_kubectl_apply_get_wait_delete_the_rendered_yaml(api, config_file, tmp_path):
    manifest = tmp_path / "job.yaml"
    rendered = _cli(api, "render", str(config_file), "--output", str(manifest))
    assert rendered.returncode == 0, rendered.stderr
    env = {**os.environ, "KUBECONFIG": str(api.kubeconfig)}

    def kubectl(*args):
        return subprocess.run(["kubectl", *args], capture_output=True, text=True, env=env, timeout=60)

    # the emulator serves no OpenAPI schema, so client-side validation is off here
    applied = kubectl("apply", "--validate=false", "-f", str(manifest))
    assert applied.returncode == 0, applied.stderr
    assert "pytorchjob.kubeflow.org/whisper-dpo created" in applied.stdout
    got = kubectl("get", "pytorchjob", "whisper-dpo", "-n", "speech", "-o", "jsonpath={.spec.pytorchReplicaSpecs.Worker.replicas}")
    assert got.stdout == "1"
    SimulatedOperator(api, "speech", "whisper-dpo", step_s=0.3).start()
    waited = kubectl("wait", "--for=condition=Succeeded", "pytorchjob/whisper-dpo", "-n", "speech", "--timeout=30s")
    assert waited.returncode == 0, waited.stderr
    assert "condition met" in waited.stdout
    deleted = kubectl("delete", "-f", str(manifest))
    assert deleted.returncode == 0, deleted.stderr
    assert api.objects("pytorchjobs") == {} and api.objects("pods") == {}


@pytest.mark.skipif(not os.environ.get("AUDIORL_E2E_KUBECONFIG"), reason="set AUDIORL_E2E_KUBECONFIG to test against a real cluster")
def test_real_cluster_server_side_dry_run():
    """Opt-in: a real API server with the Kubeflow Training Operator's CRDs checks the rendered
    job against its schema (server-side dry run: nothing is created)."""
    namespace = os.environ.get("AUDIORL_E2E_NAMESPACE", "default")
    cluster = Cluster(namespace, kubeconfig=os.environ["AUDIORL_E2E_KUBECONFIG"])
    rendered = _rendered(name="audiorl-e2e-dry-run", namespace=namespace)
    cluster.submit(rendered, server_dry_run=True, log=lambda m: None)
    assert cluster.get("audiorl-e2e-dry-run") is None


def test_a_trainjob_is_submitted_to_its_own_api(api, config_file):
    cfg = validate_config(BASE)
    rendered = render(cfg, name="v2-job", run_id="r1", api="trainjob")
    cluster = Cluster("speech", kubeconfig=str(api.kubeconfig), kind="TrainJob")
    cluster.submit(rendered, log=lambda m: None)
    stored = api.objects("trainjobs")[("speech", "v2-job")]
    assert stored["spec"]["trainer"]["numNodes"] == 2 and api.objects("pytorchjobs") == {}
    refused = _cli(api, "submit", str(config_file), "--api", "trainjob", "--follow")
    assert refused.returncode == 2 and "--follow" in refused.stderr
