"""The `audiorl` command end to end, as a user runs it (subprocesses, real files)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").rglob("*.yaml"))


def audiorl(*args, cwd=None, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "audiorl_cli.main", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout,
    )


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_config_is_valid(example):
    proc = audiorl("config", "show", example)
    assert proc.returncode == 0, proc.stderr
    assert "objective:" in proc.stdout


def test_train_then_eval_from_the_command_line(tmp_path, tiny_whisper, speech_dir):
    out = tmp_path / "run"
    proc = audiorl(
        "train", REPO / "examples" / "tiny-local-dpo.yaml",
        "--set", f"model.name_or_path={tiny_whisper}",
        "--set", f"data.train={speech_dir / 'pairs.jsonl'}",
        "--set", f"data.eval={speech_dir / 'transcripts.jsonl'}",
        "--set", f"train.output_dir={out}",
        "--set", "train.max_steps=2",
        "--set", "train.eval_steps=null",
        "--set", "train.generation_max_new_tokens=6",
    )
    assert proc.returncode == 0, proc.stderr
    assert f"final model: {out / 'final'}" in proc.stdout.replace("\n", "")
    assert re.search(r"^eval: WER [0-9.]+ \(before: [0-9.]+\)  CER [0-9.]+$", proc.stdout, re.MULTILINE), proc.stdout
    assert "MLflow run" in proc.stdout
    assert (out / "final" / "model.safetensors").exists()
    assert (out / "config.yaml").exists()

    result_file = tmp_path / "eval.json"
    proc = audiorl(
        "eval", "--model", out / "final", "--data", speech_dir / "transcripts.jsonl",
        "--data", f"pairs={speech_dir / 'pairs.jsonl'}", "--max-new-tokens", 6, "--output", result_file,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("transcripts: WER ") and "\npairs: WER " in proc.stdout
    results = json.loads(result_file.read_text())
    assert set(results) == {"transcripts", "pairs"}
    for result in results.values():
        assert result["num_utterances"] == 12 and len(result["utterances"]) == 12
        assert result["decoding"] == "greedy"
    # the same clips and references: the same scores
    assert results["transcripts"]["wer"] == results["pairs"]["wer"]


def test_train_with_a_missing_manifest_fails_in_one_line(tmp_path, tiny_whisper):
    proc = audiorl(
        "train", REPO / "examples" / "tiny-local-dpo.yaml",
        "--set", f"model.name_or_path={tiny_whisper}",
        "--set", f"data.train={tmp_path / 'nope.jsonl'}",
        "--set", f"train.output_dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 3
    assert proc.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nope.jsonl'}: manifest or dataset not found"
    assert "Traceback" not in proc.stderr


def _quickstart_run(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # about 4 minutes on 2 free cores; the limit leaves room for a slower or busier machine
    proc = audiorl("quickstart", "--workdir", "qs", *args, cwd=tmp_path, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "heldout-clean WER:" in text and "heldout-noisy WER:" in text and "before ->" in text
    assert (tmp_path / "qs" / "run" / "final" / "model.safetensors").exists()
    assert (tmp_path / "qs" / "quickstart.yaml").exists()
    # pairs come from the base's samples: the reference against the worst sample
    pairs = [json.loads(line) for line in (tmp_path / "qs" / "speech" / "pairs.jsonl").read_text().splitlines()]
    train = {json.loads(line)["text"] for line in (tmp_path / "qs" / "speech" / "train.jsonl").read_text().splitlines()}
    assert len(pairs) > 100 and all(p["chosen"] in train and p["rejected_wer"] > 0 for p in pairs)
    tests = {json.loads(line)["text"] for line in (tmp_path / "qs" / "speech" / "validation-noisy.jsonl").read_text().splitlines()}
    assert tests and not tests & train  # evaluation on sentences the tuning never heard
    # the embedded MLflow store in ./mlruns holds the run with its evaluations
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("audiorl-quickstart")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert "eval/wer_before_after.png" in {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    history = {name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"eval/{name}/wer")}
               for name in ("heldout-clean", "heldout-noisy")}
    return run, history


def test_quickstart_tunes_the_real_tiny_en(tmp_path):
    """The newcomer's command as the README gives it: Whisper tiny.en imported from the installed
    package, fresh espeak-ng speech where it is worst, N-best pairs from its own samples, MPO,
    WER before/after per test set, the local MLflow store."""
    run, history = _quickstart_run(tmp_path)
    assert run.data.tags["audiorl.base_model"] == str((tmp_path / "qs" / "whisper-tiny.en").resolve())
    config = json.loads((tmp_path / "qs" / "whisper-tiny.en" / "config.json").read_text())
    assert (config["d_model"], config["vocab_size"]) == (384, 51864)  # the real tiny.en, not the toy
    for name, steps in history.items():
        assert set(steps) == {0, 20, 40}
        # 40 steps lower WER on held-out sentences by over 15% on both sets (measured: -32%, -37%)
        assert steps[40] < 0.85 * steps[0], (name, steps)


def test_quickstart_toy_base(tmp_path):
    """--toy: the same steps on the shipped 2 M-parameter base (which never heard these accents)."""
    run, history = _quickstart_run(tmp_path, "--toy", "--max-steps", 80)
    assert run.data.tags["audiorl.base_model"].endswith("models/tiny-whisper-base")
    for name, steps in history.items():
        assert set(steps) == {0, 40, 80}
        # 80 steps of MPO from the base already lower WER on accents it never heard by over 10%
        assert steps[80] < 0.9 * steps[0], (name, steps)
