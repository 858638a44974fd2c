import json
import subprocess
import sys

import pytest

from audiorl.config import RunConfig, flatten, is_secret_key, load_config
from audiorl.errors import ConfigError
from tests.conftest import write_config

BASE = {"model": {"name_or_path": "some/model"}, "data": {"train": "pairs.jsonl"}}


def test_unknown_key_names_the_key_path_and_file(tmp_path):
    path = write_config(tmp_path / "run.yaml", {**BASE, "train": {"learning_rat": 1e-5}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert "train.learning_rat" in str(err.value)
    assert "unknown key" in str(err.value)


def test_wrong_type_names_the_key_and_value(tmp_path):
    path = write_config(tmp_path / "run.yaml", {**BASE, "train": {"per_device_train_batch_size": "four"}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.per_device_train_batch_size" in str(err.value)
    assert "'four'" in str(err.value)


def test_missing_required_section_key(tmp_path):
    path = write_config(tmp_path / "run.yaml", {"model": {"family": "whisper"}})
    with pytest.raises(ConfigError, match=r"model\.name_or_path: required key is missing"):
        load_config(path)


def test_yaml_syntax_error_reports_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name_or_path: x\ntrain: [unclosed\n")
    with pytest.raises(ConfigError, match=r"line \d+"):
        load_config(path)


def test_overrides_apply_before_validation(tmp_path):
    path = write_config(tmp_path / "run.yaml", BASE)
    cfg = load_config(path, ["train.learning_rate=3e-5", "objective.loss_type=[sigmoid, sft]", "train.max_steps=7"])
    assert cfg.train.learning_rate == pytest.approx(3e-5)
    assert cfg.objective.loss_type == ["sigmoid", "sft"]
    assert cfg.train.max_steps == 7
    with pytest.raises(ConfigError, match=r"train\.max_steps"):
        load_config(path, ["train.max_steps=-3"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(path, ["train.not_a_knob=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(path, ["train.max_steps"])


def test_mpo_loss_list_and_weights():
    cfg = RunConfig.model_validate(
        {**BASE, "objective": {"loss_type": "sigmoid,bco_pair,sft", "loss_weights": [0.8, 0.2, 1.0]}}
    )
    assert cfg.objective.loss_type == ["sigmoid", "bco_pair", "sft"]
    assert cfg.objective.weights == [0.8, 0.2, 1.0]
    with pytest.raises(ValueError, match="loss_weights has 2 entries but loss_type has 3"):
        RunConfig.model_validate({**BASE, "objective": {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [1, 2]}})
    with pytest.raises(ValueError, match="unknown loss_type"):
        RunConfig.model_validate({**BASE, "objective": {"loss_type": ["sigmod"]}})


def test_flatten_drops_secrets_and_uri_passwords():
    flat = flatten(
        {
            "tracking": {"tracking_uri": "https://alice:hunter2@mlflow.example.com", "api_token": "abc"},
            "job": {"env": {"HF_TOKEN": "hf_x", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "LANG": "C"}},
            "train": {"learning_rate": 1e-5},
        }
    )
    blob = json.dumps(flat)
    assert "hunter2" not in blob and "abc" not in blob and "hf_x" not in blob and "s3cr3t" not in blob
    assert flat["tracking.tracking_uri"] == "https://alice:***@mlflow.example.com"
    assert flat["job.env.LANG"] == "C"
    assert flat["train.learning_rate"] == 1e-5


def test_secret_keys_are_whole_words():
    # a key that merely contains "token" (tokens, tokenizers) is a setting, not a secret, and
    # must still reach MLflow params
    flat = flatten(RunConfig.model_validate({**BASE, "data": {"max_target_tokens": 64}}).to_dict())
    assert flat["data.max_target_tokens"] == 64 and flat["train.generation_max_new_tokens"] == 128
    for name in ("HF_TOKEN", "apiKey", "x-api-key", "AWS_SECRET_ACCESS_KEY", "DB_PASSWD", "credentials"):
        assert is_secret_key(name), name
    for name in ("TOKENIZERS_PARALLELISM", "max_target_tokens", "keyword", "NCCL_SOCKET_IFNAME"):
        assert not is_secret_key(name), name


def test_fingerprint_ignores_logging_but_not_hyperparameters():
    a = RunConfig.model_validate(BASE)
    b = RunConfig.model_validate({**BASE, "train": {"logging_steps": 1, "output_dir": "elsewhere"}})
    c = RunConfig.model_validate({**BASE, "train": {"learning_rate": 1e-4}})
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()


def test_cli_config_show_prints_resolved_config(tmp_path):
    path = write_config(tmp_path / "run.yaml", BASE)
    proc = subprocess.run(
        [sys.executable, "-m", "audiorl_cli.main", "config", "show", str(path), "--set", "train.max_steps=11", "--json"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["train"]["max_steps"] == 11
    assert shown["objective"]["beta"] == 0.1  # defaults are filled in
    assert shown["model"]["name_or_path"] == "some/model"


def test_cli_error_is_one_line_and_nonzero(tmp_path):
    path = write_config(tmp_path / "run.yaml", {**BASE, "train": {"bogus": 1}})
    proc = subprocess.run([sys.executable, "-m", "audiorl_cli.main", "config", "show", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "train.bogus" in lines[0]
    assert "Traceback" not in proc.stderr
    debug = subprocess.run(
        [sys.executable, "-m", "audiorl_cli.main", "--debug", "config", "show", str(path)], capture_output=True, text=True
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr
