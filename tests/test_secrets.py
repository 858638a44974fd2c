"""One rule for secrets, by key name and by value shape, and where it applies: `render` refuses a
secret anywhere in what the job would carry (naming the key, never the value), MLflow params and
tags and the spill file hold none, and a rejected config value that may be one is not echoed."""

from __future__ import annotations

import json

import pytest

from audiorl.config import flatten, validate_config
from audiorl.errors import ConfigError
from audiorl.k8s.render import render
from audiorl.secrets import find_secrets, redact, redact_tree, secret_shape

# made-up credentials in the shapes real ones have
SECRET_VALUES = {
    "hugging face": "hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345",
    "openai": "sk-proj-AbCdEfGhIjKlMnOpQrSt1234",
    "github": "ghp_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
    "aws key id": "AKIAIOSFODNN7EXAMPLE",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlc2lnbmF0dXJl",
    "url password": "https://alice:hunter2hunter2@mlflow.example.com",
    "url empty user": "https://:SeCrEtVaLuE42@mlflow.example.com",
    "url token user": "https://ghs_tokenAsTheUserName0123@git.example.com/repo",
    "query token": "https://mlflow.example.com/api?token=SeCrEtVaLuE42",
    "presigned s3": "https://bucket.s3.amazonaws.com/a.wav?X-Amz-Signature=SeCrEtVaLuE42&X-Amz-Date=20261203",
}
SECRET_PARTS = {"hunter2hunter2", "SeCrEtVaLuE42", "ghs_tokenAsTheUserName0123", "hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345",
                "sk-proj-AbCdEfGhIjKlMnOpQrSt1234", "ghp_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789", "AKIAIOSFODNN7EXAMPLE",
                "c2lnbmF0dXJlc2lnbmF0dXJl"}
PLAIN_VALUES = ["openai/whisper-small", "s3://speech/train.jsonl", "https://mlflow.example.com", "/cache/huggingface", "nvidia.com/gpu",
                "ghcr.io/audiorl/audiorl:0.1.0", "hf_home", "sk-1", "https://mlflow.example.com/?experiment=7", "team-speech"]


@pytest.mark.parametrize("kind", sorted(SECRET_VALUES))
def test_secret_shapes_are_recognised_and_redacted(kind):
    value = SECRET_VALUES[kind]
    assert secret_shape(value), kind
    cleaned = redact(f"see {value} there")
    assert not any(part in cleaned for part in SECRET_PARTS) and "***" in cleaned and cleaned.startswith("see ")


@pytest.mark.parametrize("value", PLAIN_VALUES)
def test_ordinary_values_are_not_secrets(value):
    assert secret_shape(value) is None and redact(value) == value


def test_secret_names_and_nested_values():
    tree = {"kwargs": {"api_key": "abc", "threshold": 0.5}, "list": ["x", SECRET_VALUES["openai"]], "HF_TOKEN": "t"}
    assert sorted(path for path, _ in find_secrets(tree)) == ["HF_TOKEN", "kwargs.api_key", "list[1]"]
    cleaned = redact_tree(tree)
    assert cleaned["kwargs"] == {"api_key": "***", "threshold": 0.5} and cleaned["HF_TOKEN"] == "***" and cleaned["list"] == ["x", "***"]


BASE = {"model": {"name_or_path": "/models/whisper-small"}, "data": {"train": "/data/pairs.jsonl"}}


@pytest.mark.parametrize("where, extra", [
    ("tracking.tracking_uri", {"tracking": {"tracking_uri": SECRET_VALUES["url empty user"]}}),
    ("tracking.tracking_uri", {"tracking": {"tracking_uri": SECRET_VALUES["query token"]}}),
    ("tracking.tags.note", {"tracking": {"tags": {"note": SECRET_VALUES["hugging face"]}}}),
    ("job.annotations.owner", {"job": {"annotations": {"owner": SECRET_VALUES["github"]}}}),
    ("objective.rewards[0].kwargs.api_key", {"objective": {"name": "grpo", "rewards": [{"name": "wer", "kwargs": {"api_key": "k-123"}}]}}),
])  # a data location with credentials is refused before render, by the config (tests/test_remote_data.py)
def test_render_refuses_a_secret_the_job_would_carry_naming_the_key(where, extra):
    import copy

    data = copy.deepcopy(BASE)
    for section, values in extra.items():
        data.setdefault(section, {}).update(values)
    cfg = validate_config(data)
    for api in ("pytorchjob", "trainjob"):
        with pytest.raises(ConfigError) as caught:
            render(cfg, name="job", run_id="r1", api=api)
        message = str(caught.value)
        assert where in message and "job.secret_env" in message
        assert not any(part in message for part in SECRET_PARTS) and "k-123" not in message


@pytest.mark.parametrize("value", [SECRET_VALUES["hugging face"], SECRET_VALUES["openai"], SECRET_VALUES["url token user"]])
def test_a_secret_shaped_value_under_an_innocent_env_name_is_refused(value):
    with pytest.raises(ConfigError, match=r"job.env.*'NOTE' looks like a secret") as caught:
        validate_config({**BASE, "job": {"env": {"NOTE": value}}})
    assert value not in str(caught.value)


def test_a_rejected_value_that_may_be_a_secret_is_not_echoed():
    with pytest.raises(ConfigError) as caught:
        validate_config({**BASE, "job": {"env": {"PIN_CODE": 8675309}}})
    assert "job.env.PIN_CODE" in str(caught.value) and "8675309" not in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        validate_config({**BASE, "train": {"learning_rate": "fast"}})
    assert "'fast'" in str(caught.value)  # an ordinary mistake is still shown


def test_mlflow_params_tags_and_the_spill_file_hold_no_secret(tmp_path):
    from mlflow.tracking import MlflowClient

    from audiorl.tracking.run import Tracker

    cfg = validate_config({**BASE, "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                                                "tags": {"ticket": SECRET_VALUES["query token"], "owner": "asr-team"}},
                           "objective": {"name": "grpo", "rewards": [{"name": "wer", "kwargs": {"api_key": "k-123",
                                                                                                "endpoint": SECRET_VALUES["url password"]}}]}})
    params = flatten(cfg.to_dict())
    assert not any(part in json.dumps(params) for part in SECRET_PARTS) and "k-123" not in json.dumps(params)
    tracker = Tracker(cfg.tracking)
    run_id = tracker.start(cfg, tags={"source": SECRET_VALUES["presigned s3"], "db_password": "p4ss"}, spill_dir=tmp_path / "out")
    tracker.end("FINISHED")
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    blob = json.dumps([run.data.params, run.data.tags]) + "".join(p.read_text() for p in (tmp_path / "out").iterdir() if p.is_file())
    assert not any(part in blob for part in SECRET_PARTS) and "k-123" not in blob and "p4ss" not in blob
    assert run.data.tags["owner"] == "asr-team" and run.data.tags["ticket"].endswith("token=***")


def test_errors_log_lines_and_printed_configs_mask_secrets(tmp_path):
    """The one rule reaches what AudioRL prints: an error quoting a signed path, a console line
    with a URL's password, and `config show` of a run file whose tracking URI holds one."""
    import io
    import subprocess
    import sys

    from audiorl.errors import DataError
    from audiorl.progress import RedactingConsole

    error = DataError("m.jsonl:3: audio file not found: s3://bucket/clip.wav?X-Amz-Signature=0a1b2c3d4e")
    assert str(error) == "m.jsonl:3: audio file not found: s3://bucket/clip.wav?X-Amz-Signature=***"
    out = io.StringIO()
    RedactingConsole(file=out, width=200).print("MLflow at https://alice:hunter2@mlflow.example cannot be reached", 42)
    assert out.getvalue().split() == ["MLflow", "at", "https://alice:***@mlflow.example", "cannot", "be", "reached", "42"]
    run = tmp_path / "run.yaml"
    run.write_text("model:\n  name_or_path: /models/m\ndata:\n  train: /data/t.jsonl\ntracking:\n  tracking_uri: https://:hunter2@mlflow.example\n")
    shown = subprocess.run([sys.executable, "-m", "audiorl_cli.main", "config", "show", str(run)], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "tracking_uri: https://:***@mlflow.example" in shown.stdout and "hunter2" not in shown.stdout
