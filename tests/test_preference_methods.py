"""CPO, SimPO, ORPO and KTO through the Python API on real speech and a tiny Whisper: each trains
its chosen (desirable) transcripts up; the reference-free ones hold one model, KTO two."""

import gc
import json

import pytest
from mlflow.tracking import MlflowClient
from test_training import make_config
from transformers import WhisperForConditionalGeneration

import audiorl
from audiorl.audio import AudioLimits
from audiorl.data.collate import RecordDataset
from audiorl.data.records import read_records
from audiorl.errors import ConfigError, DataError
from audiorl.models.registry import load_adapter
from audiorl.run import build_step


def _config(tmp_path, tiny_whisper, speech_dir, objective, **sections):
    """test_training's config with this objective section in place of its DPO one."""
    base = make_config(tmp_path, tiny_whisper, speech_dir, **sections)
    return type(base).model_validate({**base.model_dump(), "objective": objective})


def _history(run_id, key):
    return [m.value for m in sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)]


def _whisper_models_alive() -> int:
    gc.collect()
    return sum(isinstance(o, WhisperForConditionalGeneration) for o in gc.get_objects())


@pytest.mark.parametrize("objective", [{"name": "cpo"}, {"name": "cpo", "loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.0},
                                       {"name": "orpo", "beta": 0.5}], ids=["cpo", "simpo", "orpo"])
def test_reference_free_methods_raise_the_chosen_side_with_one_model_in_memory(tmp_path, tiny_whisper, speech_dir, objective):
    cfg = _config(tmp_path, tiny_whisper, speech_dir, objective,
                  train={"per_device_train_batch_size": 12, "max_steps": 12, "save_steps": None, "learning_rate": 3e-3},
                  tracking={"enabled": True})
    before = _whisper_models_alive()
    adapter = load_adapter(cfg.model)
    step, _ = build_step(cfg, adapter, None, "fp")
    assert _whisper_models_alive() - before == 1  # the policy and nothing else
    del step, adapter
    outcome = audiorl.train(cfg)
    margins = _history(outcome.run_id, "rewards/margins")
    assert len(margins) == 12 and margins[-1] > margins[0] + 0.1
    # CPO's rewards are summed log-probs without a reference to cancel a short rejected
    # transcript's head start, so not every pair flips in 12 steps; none may flip back
    accuracies = _history(outcome.run_id, "rewards/accuracies")
    assert accuracies[-1] >= max(accuracies[0], 0.6)
    assert _history(outcome.run_id, "nll_loss")[-1] < _history(outcome.run_id, "nll_loss")[0]
    expected_tag = f"cpo:{objective.get('loss_type', 'sigmoid')}" if objective["name"] == "cpo" else "orpo"
    assert MlflowClient().get_run(outcome.run_id).data.tags["audiorl.objective"] == expected_tag


def _unpaired(speech_dir, tmp_path):
    """Each clip once: its reference as a desirable completion on even rows, the paired wrong
    transcript as an undesirable one on odd rows."""
    rows = []
    for i, line in enumerate((speech_dir / "pairs.jsonl").read_text().splitlines()):
        pair = json.loads(line)
        good = i % 2 == 0
        rows.append({"audio": str(speech_dir / pair["audio"]), "completion": pair["chosen"] if good else pair["rejected"], "label": good})
    path = tmp_path / "unpaired.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def test_kto_raises_desirable_and_lowers_undesirable_completions(tmp_path, tiny_whisper, speech_dir):
    path, rows = _unpaired(speech_dir, tmp_path)
    cfg = _config(tmp_path, tiny_whisper, speech_dir, {"name": "kto", "beta": 0.5}, data={"train": str(path)},
                  train={"per_device_train_batch_size": 12, "max_steps": 12, "save_steps": None, "learning_rate": 3e-3},
                  tracking={"enabled": True})
    outcome = audiorl.train(cfg)
    chosen, rejected = _history(outcome.run_id, "rewards/chosen"), _history(outcome.run_id, "rewards/rejected")
    assert len(chosen) == 12
    assert chosen[-1] > chosen[0] + 0.1 and rejected[-1] < rejected[0] - 0.1
    kl = _history(outcome.run_id, "kl")
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and min(kl) >= 0.0  # policy == reference at the start; clamped at 0
    assert MlflowClient().get_run(outcome.run_id).data.tags["audiorl.objective"] == "kto:kto"


def test_kto_holds_a_reference_and_needs_two_clips_per_batch(tmp_path, tiny_whisper, speech_dir):
    path, _ = _unpaired(speech_dir, tmp_path)
    cfg = _config(tmp_path, tiny_whisper, speech_dir, {"name": "kto"}, data={"train": str(path)})
    before = _whisper_models_alive()
    adapter = load_adapter(cfg.model)
    step, collate = build_step(cfg, adapter, None, "fp")
    assert _whisper_models_alive() - before == 2  # the policy and its frozen reference
    # the mismatched completion of a clip is the previous clip's, as TRL's collator cycles them
    records = read_records(path, "unpaired")[:3]
    dataset = RecordDataset(records, AudioLimits(sampling_rate=adapter.sampling_rate, max_seconds=5))
    batch = collate([dataset[i] for i in range(3)])
    assert batch["desirable"].tolist() == [r.label for r in records]
    out = step(batch)
    assert {"kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(out.metrics)
    one = _config(tmp_path, tiny_whisper, speech_dir, {"name": "kto"}, data={"train": str(path)}, train={"per_device_train_batch_size": 1})
    with pytest.raises(ConfigError, match="per_device_train_batch_size must be at least 2"):
        build_step(one, adapter, None, "fp")


def test_unpaired_records_name_a_bad_label(tmp_path, speech_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"audio": "clips/a.wav", "completion": "hello", "label": 1}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: 'label' must be true \(a desirable completion\) or false"):
        read_records(path, "unpaired")
    path.write_text(json.dumps({"audio": "clips/a.wav", "label": True}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing required key 'completion'"):
        read_records(path, "unpaired")
