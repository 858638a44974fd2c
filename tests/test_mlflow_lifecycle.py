"""The MLflow lifecycle against a real `mlflow server` on 127.0.0.1: a training run that
registers a challenger which loads back and transcribes, evaluations as nested runs, the
champion/challenger gate, resumed runs that never log a step twice, and a server outage."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
from mlflow.tracking import MlflowClient

import audiorl
from audiorl.errors import ConfigError, DataError
from audiorl.tracking.promotion import decide
from tests.conftest import write_config
from tests.mlflow_server import MlflowServer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    return MlflowClient(server.url)


def _config(tmp_path, model, speech_dir, name, *, family="whisper", objective=None, **train):
    return audiorl.load_config(write_config(tmp_path / f"{name}.yaml", {
        "model": {"family": family, "name_or_path": str(model)},
        "data": {"train": str(speech_dir / ("pairs.jsonl" if not objective else "transcripts.jsonl")),
                 "eval": str(speech_dir / "transcripts.jsonl"), "max_audio_seconds": 5},
        "objective": objective or {"loss_type": ["sigmoid", "sft"], "beta": 0.5},
        "train": {"output_dir": str(tmp_path / name), "max_steps": 2, "learning_rate": 1e-3, "logging_steps": 1,
                  "save_steps": None, "resume": "never", "generation_max_new_tokens": 12, "per_device_eval_batch_size": 12,
                  **train},
        "tracking": {"experiment_name": name, "registered_model_name": name, "system_metrics": False},
    }))


def _clip_bytes(speech_dir, n=3):
    rows = [json.loads(line) for line in (speech_dir / "transcripts.jsonl").read_text().splitlines()[:n]]
    return [(speech_dir / row["audio"]).read_bytes() for row in rows]


def _wav_bytes(seconds: float, rate: int = 16000) -> bytes:
    out = io.BytesIO()
    sf.write(out, (0.1 * np.sin(np.arange(int(seconds * rate)) / 3)).astype(np.float32), rate, format="WAV")
    return out.getvalue()


@pytest.mark.parametrize("family", ["whisper", "qwen2_audio"])
def test_a_training_run_registers_a_challenger_that_transcribes(tmp_path, client, tiny_models, speech_dir, family):
    cfg = _config(tmp_path, tiny_models[family], speech_dir, f"reg-{family.replace('_', '-')}", family=family)
    outcome = audiorl.train(cfg)
    name = cfg.tracking.registered_model_name
    version = client.get_model_version_by_alias(name, "challenger")
    run = client.get_run(outcome.run_id)
    assert version.run_id == outcome.run_id and run.info.status == "FINISHED"
    for tag in ("audiorl.base_model", "audiorl.objective", "audiorl.data_fingerprint"):
        assert version.tags[tag] == run.data.tags[tag], tag
    assert version.tags["audiorl.run_id"] == outcome.run_id
    assert "eval/wer_before_after.png" in {a.path for a in client.list_artifacts(outcome.run_id, "eval")}

    import mlflow

    served_model = mlflow.pyfunc.load_model(f"models:/{name}@challenger")
    served = served_model.predict(_clip_bytes(speech_dir))
    if family == "qwen2_audio":  # AudioRL's own pyfunc (Whisper's transformers pipeline decodes a long clip window by window)
        # a clip longer than the model's input window (5 s here) is refused by name, not transcribed cut off
        with pytest.raises(DataError, match=r"input\[1\]: clip is 7\.0 s long, over the 5 s limit \(the model's 5 s input window"):
            served_model.predict([_wav_bytes(1.0), _wav_bytes(7.0)])
    # the registered model transcribes exactly as the trained model does in AudioRL's own evaluation
    ours = audiorl.evaluate(outcome.final_model_dir, speech_dir / "transcripts.jsonl", max_new_tokens=12, family=family)
    assert [str(s).strip() for s in served] == [u.hypothesis.strip() for u in ours.utterances[:3]]
    # an encoder cache folder for a family that has none is refused by name, not ignored
    from audiorl.tracking.model_versions import load_version

    if family == "qwen2_audio":
        with pytest.raises(ConfigError, match=rf"models:/{name}@challenger: a qwen2_audio model, whose family has no encoder cache"):
            load_version(f"models:/{name}@challenger", tmp_path / "written", encoder_cache_dir=tmp_path / "states")


def test_eval_logs_a_nested_run_per_test_set_with_the_worst_first(tmp_path, server, client, tiny_whisper, speech_dir):
    lines = (speech_dir / "transcripts.jsonl").read_text().splitlines()
    us = tmp_path / "us.jsonl"
    gb = tmp_path / "gb.jsonl"
    us.write_text("".join(line.replace('"clips/', f'"{speech_dir}/clips/') + "\n" for line in lines if "en-us" in line))
    gb.write_text("".join(line.replace('"clips/', f'"{speech_dir}/clips/') + "\n" for line in lines if "en-gb" in line))
    out = subprocess.run(
        [sys.executable, "-m", "audiorl_cli.main", "eval", "--model", str(tiny_whisper), "--baseline", str(tiny_whisper),
         "--data", f"us={us}", "--data", f"gb={gb}", "--max-new-tokens", "8", "--experiment", "evals"],
        capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": server.url}, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    experiment = client.get_experiment_by_name("evals")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["audiorl.test_set"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"us", "gb"}
    for name, child in children.items():
        for key in ("wer", "cer", "substitutions", "deletions", "insertions", "sentence_error_rate"):
            assert key in child.data.metrics, key
        assert child.data.metrics["baseline/wer"] == child.data.metrics["wer"]  # the same model twice
        assert parent.data.metrics[f"{name}/wer"] == child.data.metrics["wer"]
        table = json.loads(open(client.download_artifacts(child.info.run_id, "utterances.json", str(tmp_path))).read())
        wers = [row[table["columns"].index("wer")] for row in table["data"]]
        assert len(wers) == 6 and wers == sorted(wers, reverse=True)
    assert "wer_per_test_set.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert f"run {parent.info.run_id}" in out.stdout


def test_the_gate_rule():
    assert decide(None, {"a": 0.5}, ["a"], margin=0.1, tolerance=0.0).promote
    better = decide({"a": 0.5, "b": 0.30}, {"a": 0.40, "b": 0.305}, ["a"], margin=0.1, tolerance=0.02)
    assert better.promote, better.reason
    # a gain below the margin, or any regression past the tolerance, keeps the champion
    small = decide({"a": 0.5, "b": 0.3}, {"a": 0.47, "b": 0.3}, ["a"], margin=0.1, tolerance=0.0)
    assert not small.promote and "needs at least -10.0%" in small.reason
    worse = decide({"a": 0.5, "b": 0.3}, {"a": 0.3, "b": 0.33}, ["a"], margin=0.1, tolerance=0.05)
    assert not worse.promote and "b:" in worse.reason and "a:" not in worse.reason
    same = decide({"a": 0.5}, {"a": 0.5}, ["a"], margin=0.0, tolerance=0.0)
    assert not same.promote  # no gain is no reason to switch


def test_the_gate_refuses_a_challenger_that_writes_on_silence_more_often():
    # a check set of speech and silent clips whose WER barely moves when the challenger writes a
    # word on every silent clip: the share of those clips written on decides
    rule = {"margin": 0.1, "tolerance": 0.05}
    louder = decide({"a": 0.5, "mixed": 0.20}, {"a": 0.3, "mixed": 0.205}, ["a"], **rule,
                    champion_no_speech={"mixed": 0.25}, challenger_no_speech={"mixed": 1.0})
    assert not louder.promote
    assert "mixed: writes on 100.0% of the clips without speech where the champion wrote on 25.0% (+75.0 points)" in louder.reason
    assert [(r.measure, r.passed) for r in louder.rows if r.test_set == "mixed"] == [("WER", True), ("no-speech output", False)]
    assert decide({"a": 0.5, "mixed": 0.20}, {"a": 0.3, "mixed": 0.205}, ["a"], **rule, no_speech_tolerance=0.75,
                  champion_no_speech={"mixed": 0.25}, challenger_no_speech={"mixed": 1.0}).promote
    quieter = decide({"a": 0.5, "mixed": 0.20}, {"a": 0.3, "mixed": 0.19}, ["a"], **rule,
                     champion_no_speech={"mixed": 0.25}, challenger_no_speech={"mixed": 0.0})
    assert quieter.promote, quieter.reason


def test_promote_moves_the_champion_only_for_a_better_challenger(tmp_path, client, tiny_whisper, speech_dir):
    name = "gate"
    sft = {"name": "sft"}
    gate = tmp_path / "gate.jsonl"
    gate.write_text((speech_dir / "transcripts.jsonl").read_text().replace('"clips/', f'"{speech_dir}/clips/'))
    # a check set with two clips without speech beside two with speech
    mixed = [json.loads(line) for line in gate.read_text().splitlines()[:2]]
    for i, level in enumerate((0.0, 0.01)):
        sf.write(tmp_path / f"silent-{i}.wav", level * np.random.default_rng(i).standard_normal(16000), 16000)
        mixed.append({"audio": str(tmp_path / f"silent-{i}.wav"), "text": "", "no_speech": True})
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed))

    def register(run, **train):
        cfg = _config(tmp_path, tiny_whisper, speech_dir, run, objective=sft, **train)
        cfg.tracking.registered_model_name = name
        cfg.data.eval = None
        audiorl.train(cfg)
        return client.get_model_version_by_alias(name, "challenger").version

    def promote(*extra):
        out = subprocess.run([sys.executable, "-m", "audiorl_cli.main", "promote", name, "--gate", f"all={gate}", "--margin", "0.05",
                              "--check", f"mixed={tmp_path / 'mixed.jsonl'}", "--tolerance", "1", "--no-speech-tolerance", "1", *extra],
                             capture_output=True, text=True, env={**os.environ}, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    untrained = register("untrained", max_steps=1, learning_rate=1e-12)
    # the server named on the command line, not in the environment: scoring loads the versions from it
    elsewhere = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([sys.executable, "-m", "audiorl_cli.main", "promote", name, "--gate", f"all={gate}", "--tracking-uri", client.tracking_uri],
                         capture_output=True, text=True, env=elsewhere, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    first = out.stdout
    assert not (tmp_path / "mlruns").exists()
    assert "promoted: no champion yet" in first
    assert client.get_model_version_by_alias(name, "champion").version == untrained

    trained = register("trained", max_steps=40, learning_rate=3e-3, per_device_train_batch_size=6)
    second = promote()
    tags = client.get_model_version(name, trained).tags
    assert "promoted" in second and tags["audiorl.promotion.decision"] == "promoted", second
    assert client.get_model_version_by_alias(name, "champion").version == trained
    assert float(tags["audiorl.eval.all.wer"]) < float(client.get_model_version(name, untrained).tags["audiorl.eval.all.wer"])
    assert "challenger" in second and "no-speech" in second  # the side-by-side table, with the silent clips' row
    rate = tags["audiorl.eval.mixed.no_speech_output_rate"]  # measured on the 2 silent clips of 4, and kept
    assert tags["audiorl.eval.mixed.no_speech_clips"] == "2" and rate in ("0.0", "0.5", "1.0")
    assert "already the champion" in promote()  # safe to run twice

    worse = register("worse-again", max_steps=1, learning_rate=1e-12)
    third = promote()
    assert "not promoted" in third
    assert client.get_model_version_by_alias(name, "champion").version == trained
    assert client.get_model_version(name, worse).tags["audiorl.promotion.decision"] == "rejected"
    assert promote().splitlines()[-1] == third.splitlines()[-1]  # the same decision, from the stored scores


def test_promote_reads_the_encoder_states_a_frozen_encoder_run_left(tmp_path, client, tiny_whisper, speech_dir):
    """A version tuned with its encoder frozen has its starting model's encoder weights, so
    `promote --encoder-cache-dir` finds every clip's states where the run's evaluation left them,
    and scores as it does without them."""
    from audiorl.tracking.promotion import score_version

    states = tmp_path / "states"
    gate = tmp_path / "gate.jsonl"
    gate.write_text((speech_dir / "transcripts.jsonl").read_text().replace('"clips/', f'"{speech_dir}/clips/'))
    cfg = _config(tmp_path, tiny_whisper, speech_dir, "frozen", objective={"name": "sft"}, max_steps=3, learning_rate=3e-3)
    cfg.model.freeze_encoder, cfg.model.encoder_cache_dir = True, str(states)
    cfg.data.eval = str(gate)
    audiorl.train(cfg)
    version = client.get_model_version_by_alias("frozen", "challenger").version
    kept = sorted(states.glob("*.pt"))
    clips = len(gate.read_text().splitlines())
    assert len(kept) >= clips

    out = subprocess.run([sys.executable, "-m", "audiorl_cli.main", "promote", "frozen", "--gate", f"all={gate}",
                          "--encoder-cache-dir", str(states)], capture_output=True, text=True, env={**os.environ}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(states.glob("*.pt")) == kept  # not one clip encoded again: no new entry
    cached = float(client.get_model_version("frozen", version).tags["audiorl.eval.all.wer"])
    fresh = tmp_path / "fresh-states"
    plain = score_version(client, "frozen", version, {"again": gate}, log=lambda *_: None, encoder_cache_dir=fresh)
    assert len(list(fresh.glob("*.pt"))) == clips  # an empty folder: every clip encoded once
    assert plain["again"].wer == cached


def test_a_resumed_run_keeps_its_run_and_logs_no_step_twice(tmp_path, tiny_whisper, speech_dir):
    from audiorl.trainer import checkpoint_dirs

    store = f"sqlite:///{tmp_path / 'resume.db'}"
    cfg = _config(tmp_path, tiny_whisper, speech_dir, "resumed", max_steps=4, save_steps=2, resume="auto")
    cfg.tracking.tracking_uri = store
    cfg.tracking.log_model = False
    cfg.data.eval = None
    first = audiorl.train(cfg)
    # as if the job died after logging step 4 but before its checkpoint: resume from step 2
    import shutil

    shutil.rmtree(checkpoint_dirs(first.output_dir)[-1])
    second = audiorl.train(cfg)
    assert second.run_id == first.run_id
    client = MlflowClient(store)
    steps = [m.step for m in client.get_metric_history(first.run_id, "loss")]
    assert steps == [1, 2, 3, 4]
    assert len(client.search_runs([client.get_experiment_by_name("resumed").experiment_id])) == 1


def test_training_survives_a_tracking_outage_and_sync_sends_the_rest(tmp_path, tiny_whisper, speech_dir):
    server = MlflowServer(tmp_path / "outage-server").start()
    try:
        config = write_config(tmp_path / "outage.yaml", {
            "model": {"name_or_path": str(tiny_whisper)},
            "data": {"train": str(speech_dir / "pairs.jsonl"), "max_audio_seconds": 5},
            "objective": {"loss_type": ["sigmoid"], "beta": 0.5},
            "train": {"output_dir": str(tmp_path / "outage"), "max_steps": 24, "per_device_train_batch_size": 2,
                      "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 12, "resume": "never", "num_threads": 1},
            "tracking": {"tracking_uri": server.url, "experiment_name": "outage", "registered_model_name": "outage",
                         "system_metrics": False},
        })
        proc = subprocess.Popen([sys.executable, "-m", "audiorl_cli.main", "train", str(config)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        client = MlflowClient(server.url)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            if runs and len(client.get_metric_history(runs[0].info.run_id, "loss")) >= 3:
                break
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        run_id = runs[0].info.run_id
        server.stop()  # mid-run
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        assert err.count("cannot be reached") == 1  # warned once
        unsent = tmp_path / "outage" / "mlflow-unsent.jsonl"
        kinds = [json.loads(line)["kind"] for line in unsent.read_text().splitlines()]
        assert "metrics" in kinds and kinds[-2:] == ["register", "terminate"]
        assert "audiorl tracking sync" in err

        server.start()  # back, same store
        synced = subprocess.run([sys.executable, "-m", "audiorl_cli.main", "tracking", "sync", str(tmp_path / "outage")],
                                capture_output=True, text=True, timeout=600)
        assert synced.returncode == 0, synced.stderr[-3000:]
        assert not unsent.exists()
        steps = [m.step for m in client.get_metric_history(run_id, "loss")]
        assert steps == list(range(1, 25))  # every step, each once
        assert client.get_run(run_id).info.status == "FINISHED"
        assert client.get_model_version_by_alias("outage", "challenger").run_id == run_id
    finally:
        server.stop()


def test_no_secret_reaches_params_or_tags(tmp_path, client, tiny_whisper, speech_dir):
    cfg = _config(tmp_path, tiny_whisper, speech_dir, "secrets", max_steps=1)
    cfg.tracking.log_model = False
    cfg.tracking.tags = {"owner": "asr-team"}
    cfg.job.secret_env = [{"name": "HF_TOKEN", "secret": "hub", "key": "token"}]  # a reference only
    cfg.job.env = {"NCCL_SOCKET_IFNAME": "eth0"}
    cfg.tracking.tracking_uri = client.tracking_uri.replace("http://", "http://alice:hunter2@")
    outcome = audiorl.train(cfg)
    run = client.get_run(outcome.run_id)
    blob = json.dumps([run.data.params, run.data.tags])
    assert "hunter2" not in blob
    assert run.data.params["tracking.tracking_uri"].startswith("http://alice:***@")
    assert run.data.params["job.env.NCCL_SOCKET_IFNAME"] == "eth0"


def test_an_unreachable_server_before_training_is_a_clear_error(tmp_path, tiny_whisper, speech_dir):
    from audiorl.errors import TrainingError
    from tests.mlflow_server import free_port

    cfg = _config(tmp_path, tiny_whisper, speech_dir, "nowhere")
    cfg.tracking.tracking_uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrainingError, match="cannot be reached before training.*tracking.enabled=false"):
        audiorl.train(cfg)
    assert time.monotonic() - start < 60


def test_registering_leaves_the_callers_tracking_uri_alone(tmp_path, tiny_whisper, speech_dir, server, monkeypatch):
    import mlflow

    mine = f"sqlite:///{tmp_path / 'mine.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mine)
    cfg = _config(tmp_path, tiny_whisper, speech_dir, "elsewhere", max_steps=1)
    cfg.tracking.tracking_uri = server.url
    cfg.data.eval = None
    audiorl.train(cfg)
    assert os.environ["MLFLOW_TRACKING_URI"] == mine and mlflow.get_tracking_uri() == mine


def test_a_resumed_run_sends_what_its_earlier_attempt_kept_and_a_new_run_will_not_take_it(tmp_path):
    from audiorl.config import TrackingConfig
    from audiorl.errors import TrainingError
    from audiorl.tracking import Outbox, Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    first = Tracker(TrackingConfig(tracking_uri=uri, experiment_name="outbox"))
    run_id = first.start(spill_dir=out)
    first.end("KILLED")
    # what the first attempt could not send before it was killed
    Outbox(out).keep({"kind": "metrics", "step": 7, "timestamp": 0, "metrics": {"loss": 1.5}})

    with pytest.raises(TrainingError, match=rf"mlflow-unsent.jsonl holds 1 item\(s\) that run {run_id} never sent.*"
                                            rf"audiorl tracking sync {out}"):
        Tracker(TrackingConfig(tracking_uri=uri, experiment_name="outbox")).start(spill_dir=out)  # a new run here
    assert len(Outbox(out)) == 1  # still there, untouched

    again = Tracker(TrackingConfig(tracking_uri=uri, experiment_name="outbox"))
    assert again.start(spill_dir=out, resume=True) == run_id
    again.log_metrics({"loss": 1.0}, step=8)
    again.end()
    history = MlflowClient(uri).get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(7, 1.5), (8, 1.0)]
    assert len(Outbox(out)) == 0 and not (out / "mlflow-unsent.jsonl").exists()


@pytest.mark.parametrize("api", ["pytorchjob", "trainjob"])
def test_submit_precreates_the_run_and_passes_it_to_every_pod_of_either_kind(tmp_path, server, api):
    """`audiorl submit` makes the MLflow run before the job exists and hands it to the pods, the
    same for a PyTorchJob as for a TrainJob; the job's run-id label is the run's id."""
    from audiorl.k8s.client import Cluster
    from audiorl.k8s.submission import prepare
    from tests.k8s_emulator import Emulator

    config = write_config(tmp_path / "cluster-run.yaml", {
        "model": {"name_or_path": "/models/whisper-small"}, "data": {"train": "/data/pairs.jsonl"},
        "tracking": {"tracking_uri": server.url, "experiment_name": f"submit-{api}"},
        "job": {"api": api, "nodes": 2, "namespace": "speech"},
    })
    rendered, run_id = prepare(config, log=lambda m: None)
    assert run_id and rendered.job["metadata"]["labels"]["audiorl.dev/run-id"] == run_id
    with Emulator(tmp_path, namespace="speech") as k8s:
        Cluster("speech", kubeconfig=str(k8s.kubeconfig), kind=rendered.job["kind"]).submit(rendered, log=lambda m: None)
        (stored,) = k8s.objects(f"{api}s").values()
    if api == "trainjob":
        containers = [stored["spec"]["trainer"]]  # one trainer container, on every node
    else:
        containers = [spec["template"]["spec"]["containers"][0] for spec in stored["spec"]["pytorchReplicaSpecs"].values()]
    for container in containers:
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["MLFLOW_RUN_ID"] == run_id and env["MLFLOW_TRACKING_URI"] == server.url
        assert env["MLFLOW_EXPERIMENT_NAME"] == f"submit-{api}"
    run = MlflowClient(server.url).get_run(run_id)
    assert run.data.tags["audiorl.job_name"] == "cluster-run" and run.info.status == "RUNNING"
