"""Data in object storage: manifests (AudioRL, NeMo, Lhotse), their audio and saved datasets at
`s3://` URLs, read from a real S3-compatible server (moto's, on 127.0.0.1) with the credentials
in the environment only, exactly as the same data on a local disk reads."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest

from audiorl.audio import AudioLimits
from audiorl.data.records import read_records, validate_records
from audiorl.errors import DataError

LIMITS = AudioLimits(max_seconds=30)
BUCKET = "speech"


@pytest.fixture(scope="module")
def s3(speech_dir, tmp_path_factory):
    """An S3 server on 127.0.0.1 holding the speech corpus under s3://speech/corpus/ (clips and
    manifests with paths relative to them), with the credentials and endpoint in the environment."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "audiorl-test", "AWS_SECRET_ACCESS_KEY": "audiorl-test-secret", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        for path in sorted(speech_dir.rglob("*")):
            if path.is_file():
                client.upload_file(str(path), BUCKET, f"corpus/{path.relative_to(speech_dir).as_posix()}")
        yield client, env
    server.stop()


def _put(client, key: str, body: bytes | str) -> str:
    client.put_object(Bucket=BUCKET, Key=key, Body=body.encode() if isinstance(body, str) else body)
    return f"s3://{BUCKET}/{key}"


def _fresh_filesystems():
    """s3fs keeps one filesystem per set of options: a test that changes the environment's
    credentials starts a new one."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def test_a_remote_manifest_and_its_audio_read_as_the_local_copy(s3, speech_dir):
    records = read_records(f"s3://{BUCKET}/corpus/pairs.jsonl", "preference")
    local = read_records(speech_dir / "pairs.jsonl", "preference")
    assert [r.audio for r in records][:1] == [f"s3://{BUCKET}/corpus/clips/en-us-0.wav"]
    assert records[3].source == f"s3://{BUCKET}/corpus/pairs.jsonl:4"
    assert [(r.chosen, r.rejected) for r in records] == [(r.chosen, r.rejected) for r in local]
    good, bad = validate_records(records, LIMITS)  # decoded, checked complete, checked for silence: remote as local
    assert len(good) == len(local) and not bad
    for remote, here in zip(records, local):
        assert remote.duration() == pytest.approx(here.duration())
        np.testing.assert_array_equal(remote.load(LIMITS), here.load(LIMITS))


def test_remote_nemo_segments_gzipped_manifests_and_saved_datasets(s3, speech_dir, tmp_path):
    import datasets

    client, _ = s3
    # a NeMo manifest with segments of one clip: the same samples as a local read of the same rows
    rows = [{"audio_filepath": "clips/en-us-0.wav", "offset": 0.1, "duration": 0.5, "text": "turn on"},
            {"audio_filepath": "clips/en-us-0.wav", "offset": 0.6, "duration": 0.4, "text": "the kitchen"}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    nemo = _put(client, "corpus/nemo.jsonl.gz", gzip.compress(text.encode()))
    (speech_dir / "nemo-local.jsonl").write_text(text)
    remote, local = read_records(nemo, "transcript"), read_records(speech_dir / "nemo-local.jsonl", "transcript")
    assert [r.offset for r in remote] == [0.1, 0.6] and [r.seconds for r in remote] == [0.5, 0.4]
    for a, b in zip(remote, local):
        np.testing.assert_array_equal(a.load(LIMITS), b.load(LIMITS))
    # a dataset written by save_to_disk straight to S3, read back by URL
    pairs = [json.loads(line) for line in (speech_dir / "pairs.jsonl").read_text().splitlines()][:3]
    ds = datasets.Dataset.from_dict({"audio": [str(speech_dir / r["audio"]) for r in pairs], "chosen": [r["chosen"] for r in pairs],
                                     "rejected": [r["rejected"] for r in pairs]})
    ds.cast_column("audio", datasets.Audio(decode=False)).save_to_disk(f"s3://{BUCKET}/datasets/pairs")
    from_s3 = read_records(f"s3://{BUCKET}/datasets/pairs", "preference")
    assert [r.chosen for r in from_s3] == [r["chosen"] for r in pairs]
    np.testing.assert_array_equal(from_s3[2].load(LIMITS), read_records(speech_dir / "pairs.jsonl", "preference")[2].load(LIMITS))


def test_remote_bad_records_and_missing_objects_are_named(s3):
    client, _ = s3
    manifest = _put(client, "corpus/bad.jsonl", json.dumps({"audio": "clips/en-us-1.wav", "text": "set a timer"}) + "\n"
                    + json.dumps({"audio": "clips/gone.wav", "text": "x"}) + "\n" + json.dumps({"audio": "clips", "text": "x"}) + "\n")
    records = read_records(manifest, "transcript")
    good, bad = validate_records(records, LIMITS, on_bad="skip")
    assert len(good) == 1
    assert [b.reason for b in bad] == [
        f"{manifest}:2: audio file not found (s3://{BUCKET}/corpus/clips/gone.wav)",
        f"{manifest}:3: a folder, not a file (s3://{BUCKET}/corpus/clips)",
    ]
    with pytest.raises(DataError, match=rf"s3://{BUCKET}/corpus/nothing.jsonl: manifest or dataset not found"):
        read_records(f"s3://{BUCKET}/corpus/nothing.jsonl", "transcript")


def test_without_credentials_the_error_says_where_they_come_from(s3, monkeypatch, tmp_path):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    _fresh_filesystems()
    try:
        with pytest.raises(DataError, match=r"s3://speech/corpus/pairs.jsonl: .*credentials come from the environment .*AWS_ACCESS_KEY_ID"):
            read_records(f"s3://{BUCKET}/corpus/pairs.jsonl", "preference")
    finally:
        monkeypatch.undo()
        _fresh_filesystems()


def test_credentials_in_a_data_location_are_refused_without_echoing_them():
    from audiorl.config import validate_config
    from audiorl.errors import ConfigError

    for where in ({"train": "s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI@speech/t.jsonl"},
                  {"train": "s3://speech/t.jsonl", "eval": {"dev": "https://host/dev.jsonl?X-Amz-Signature=0a1b2c3d4e5f"}}):
        with pytest.raises(ConfigError, match=r"the location carries credentials .*job.secret_env") as caught:
            validate_config({"model": {"name_or_path": "m"}, "data": where})
        assert "wJalrXUtnFEMI" not in str(caught.value) and "0a1b2c3d4e5f" not in str(caught.value)


def test_a_run_trains_and_evaluates_on_s3_data_and_the_cli_checks_it(s3, tmp_path, tiny_whisper, speech_dir):
    import audiorl
    from tests.test_training import make_config

    _, env = s3
    cfg = make_config(tmp_path, tiny_whisper, speech_dir,
                      data={"train": f"s3://{BUCKET}/corpus/pairs.jsonl", "eval": {"remote": f"s3://{BUCKET}/corpus/transcripts.jsonl"}},
                      objective={"loss_type": ["sigmoid", "sft"]}, train={"max_steps": 2, "save_steps": None},
                      tracking={"enabled": True})
    outcome = audiorl.train(cfg)
    assert (outcome.final_model_dir / "model.safetensors").exists()
    assert 0 <= outcome.eval_before["eval/wer"] and "eval/wer" in outcome.result.eval_metrics  # the step-0 and final evaluations ran
    # the same run on the local copy of the same data trains the same weights
    local = make_config(tmp_path / "local", tiny_whisper, speech_dir, objective={"loss_type": ["sigmoid", "sft"]},
                        train={"max_steps": 2, "save_steps": None})
    from tests.test_training import final_weights

    here, there = final_weights(audiorl.train(local)), final_weights(outcome)
    assert all(torch_equal(here[k], there[k]) for k in here)
    # MLflow holds the URL, never the credentials the environment gave
    from mlflow.tracking import MlflowClient

    params = MlflowClient().get_run(outcome.run_id).data.params
    assert params["data.train"] == f"s3://{BUCKET}/corpus/pairs.jsonl"
    assert env["AWS_SECRET_ACCESS_KEY"] not in json.dumps(params)
    checked = subprocess.run([sys.executable, "-m", "audiorl_cli.main", "data", "check", f"s3://{BUCKET}/corpus/pairs.jsonl",
                              "--kind", "preference"], capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert "12 records" in checked.stdout and "no problems found" in checked.stdout


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_on_kubernetes_the_credentials_travel_by_reference():
    from audiorl.config import validate_config
    from audiorl.errors import ConfigError
    from audiorl.k8s.render import render

    data = {"train": "s3://speech/corpus/pairs.jsonl", "eval": "s3://speech/corpus/test.jsonl"}
    job = {"env": {"AWS_ENDPOINT_URL": "http://minio.storage:9000", "AWS_DEFAULT_REGION": "us-east-1"},
           "secret_env": [{"name": "AWS_ACCESS_KEY_ID", "secret": "s3-credentials", "key": "access_key"},
                          {"name": "AWS_SECRET_ACCESS_KEY", "secret": "s3-credentials", "key": "secret_key"}]}
    cfg = validate_config({"model": {"name_or_path": "/models/m"}, "data": data, "job": job})
    for api in ("pytorchjob", "trainjob"):
        rendered = render(cfg, name="remote", run_id="r1", api=api)
        job_spec = rendered.job
        container = job_spec["spec"]["trainer"] if api == "trainjob" else \
            job_spec["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "s3-credentials", "key": "secret_key"}
        assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage:9000" and "value" not in env["AWS_ACCESS_KEY_ID"]
        assert "train: s3://speech/corpus/pairs.jsonl" in rendered.to_yaml()  # the run config in the ConfigMap
    # a key written into job.env instead is refused, naming it
    with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY"):
        render(validate_config({"model": {"name_or_path": "/models/m"}, "data": data,
                                "job": {"env": {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI"}}}), name="remote", run_id="r1")


def test_webdataset_shards_on_s3_read_each_sample_from_its_place(s3, speech_dir, tmp_path, capsys):
    from tests.test_webdataset import write_shards

    client, _ = s3
    rows = write_shards(tmp_path / "shards", speech_dir)
    for shard in sorted((tmp_path / "shards").glob("*.tar")):
        client.upload_file(str(shard), BUCKET, f"shards/{shard.name}")
    records = read_records(f"s3://{BUCKET}/shards/train-{{000000..000002}}.tar", "preference")
    assert [r.chosen for r in records] == [r["chosen"] for r in rows]
    said = " ".join("".join(capsys.readouterr()).split())
    assert "3 remote shard(s) without an index (s3://speech/shards/train-000000.tar, ...) were scanned" in said and "audiorl data index" in said
    assert records[4].source == f"s3://{BUCKET}/shards/train-000001.tar:utt0004"
    local = read_records(speech_dir / "pairs.jsonl", "preference")
    for remote, here in zip(records, local):
        np.testing.assert_array_equal(remote.load(LIMITS), here.load(LIMITS))
    # indexed in place on S3: the index objects sit beside the shards, and the records are the scan's
    from audiorl.data.builders import index_shards

    done = index_shards([f"s3://{BUCKET}/shards/train-{{000000..000002}}.tar"])
    assert [(index, n) for _, index, n in done] == [(f"s3://{BUCKET}/shards/train-00000{i}.tar.index.json", 4) for i in range(3)]
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="shards/")["Contents"]}
    assert {f"shards/train-00000{i}.tar.index.json" for i in range(3)} <= keys
    _fresh_filesystems()
    capsys.readouterr()
    indexed = read_records(f"s3://{BUCKET}/shards/train-{{000000..000002}}.tar", "preference")
    assert "without an index" not in "".join(capsys.readouterr())
    assert [(r.source, r.audio, r.chosen) for r in indexed] == [(r.source, r.audio, r.chosen) for r in records]
    np.testing.assert_array_equal(indexed[4].load(LIMITS), local[4].load(LIMITS))
    # a shard uploaded again with other contents: its index no longer fits
    client.upload_file(str(tmp_path / "shards" / "train-000000.tar"), BUCKET, "shards/train-000001.tar")
    _fresh_filesystems()
    with pytest.raises(DataError, match=r"train-000001.tar.index.json: written for another version of s3://speech/shards/train-000001.tar"):
        read_records(f"s3://{BUCKET}/shards/train-{{000000..000002}}.tar", "preference")
