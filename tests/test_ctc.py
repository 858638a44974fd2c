"""The auxiliary CTC loss for training a Whisper from scratch: it trains the encoder, is logged,
and never leaves training (the export is a plain Whisper)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import audiorl
from audiorl.config import validate_config
from audiorl.errors import ConfigError, ModelError
from tests.conftest import write_config


def test_ctc_head_trains_the_encoder_and_stays_out_of_the_export(tmp_path, adapter, speech_dir):
    from audiorl.audio import AudioLimits
    from audiorl.data.records import read_records

    adapter.add_ctc_head()
    records = read_records(speech_dir / "transcripts.jsonl", "transcript")[:3]
    limits = AudioLimits(sampling_rate=adapter.sampling_rate, max_seconds=5)
    context = adapter.encode(adapter.features([r.load(limits) for r in records]))
    loss = adapter.ctc_loss(context, adapter.target_ids([r.reference for r in records]))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    encoder_grads = [p.grad for n, p in adapter.model.named_parameters() if n.startswith("model.encoder.") and p.grad is not None]
    assert encoder_grads and any(g.abs().sum() > 0 for g in encoder_grads)
    assert all(p.grad is None for n, p in adapter.model.named_parameters() if n.startswith("model.decoder."))

    adapter.save_pretrained(str(tmp_path / "export"))
    weights = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert not [k for k in weights if "ctc" in k]
    assert any("ctc" in n for n, _ in adapter.model.named_parameters())  # still there for training


def test_sft_with_ctc_logs_it_and_learns(tmp_path, tiny_whisper, speech_dir):
    cfg = audiorl.load_config(write_config(tmp_path / "ctc.yaml", {
        "model": {"name_or_path": str(tiny_whisper)},
        "data": {"train": str(speech_dir / "transcripts.jsonl"), "max_audio_seconds": 5},
        "objective": {"name": "sft", "ctc_weight": 0.5},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 12, "learning_rate": 3e-3, "logging_steps": 1,
                  "per_device_train_batch_size": 6, "save_steps": None, "resume": "never"},
        "tracking": {"experiment_name": "ctc", "log_model": False},
    }))
    outcome = audiorl.train(cfg)
    from mlflow.tracking import MlflowClient

    ctc = [m.value for m in sorted(MlflowClient().get_metric_history(outcome.run_id, "loss/ctc"), key=lambda m: m.step)]
    assert len(ctc) == 12 and min(ctc[-3:]) < ctc[0]
    config = json.loads((outcome.final_model_dir / "config.json").read_text())
    assert config["architectures"] == ["WhisperForConditionalGeneration"]
    # the export reloads as a plain Whisper, with nothing unexpected
    reloaded = audiorl.evaluate(outcome.final_model_dir, speech_dir / "transcripts.jsonl", max_new_tokens=4)
    assert reloaded.num_utterances == 12


def test_ctc_is_an_sft_option_for_whisper_only(tiny_models):
    with pytest.raises(ConfigError, match=r"objective.ctc_weight: not a knob of objective.name=dpo \(it belongs to objective.name=sft\)"):
        validate_config({"model": {"name_or_path": "x"}, "objective": {"name": "dpo", "ctc_weight": 0.3}})
    from audiorl.config import ModelConfig
    from audiorl.models.registry import load_adapter

    qwen = load_adapter(ModelConfig(family="qwen2_audio", name_or_path=str(tiny_models["qwen2_audio"])))
    with pytest.raises(ModelError, match="no auxiliary CTC loss"):
        qwen.add_ctc_head()


def test_a_checkpoint_exports_as_the_final_model_would(tmp_path, tiny_whisper, speech_dir):
    import subprocess
    import sys

    config = write_config(tmp_path / "ckpt.yaml", {
        "model": {"name_or_path": str(tiny_whisper)},
        "data": {"train": str(speech_dir / "transcripts.jsonl"), "max_audio_seconds": 5},
        "objective": {"name": "sft", "ctc_weight": 0.5},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "learning_rate": 3e-3, "save_steps": 2,
                  "per_device_train_batch_size": 6, "resume": "never"},
        "tracking": {"enabled": False},
    })
    outcome = audiorl.train(config)
    out = subprocess.run([sys.executable, "-m", "audiorl_cli.main", "model", "export", str(config),
                          str(tmp_path / "run" / "checkpoints" / "checkpoint-2"), "--out", str(tmp_path / "exported")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    final = load_file(str(outcome.final_model_dir / "model.safetensors"))
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    assert final.keys() == exported.keys()
    assert all(torch.equal(final[k], exported[k]) for k in final)
    bad = subprocess.run([sys.executable, "-m", "audiorl_cli.main", "model", "export", str(config), str(tmp_path), "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 5 and "not a checkpoint folder" in bad.stderr
