"""MWER worked by hand on a 3-hypothesis list, and trained on real speech with a tiny Whisper."""

import math
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from test_preference_methods import _config
from test_training import final_weights

import audiorl
from audiorl.config import TextNormalization
from audiorl.methods.mwer import word_errors
from audiorl.objectives.mwer import first_occurrences, mwer_loss


def test_mwer_loss_and_gradient_by_hand_on_three_hypotheses():
    logps = torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64, requires_grad=True)
    errors = torch.tensor([2.0, 0.0, 4.0], dtype=torch.float64)
    out = mwer_loss(logps, errors, group_size=3)
    z = math.exp(-1) + math.exp(-2) + math.exp(-3)
    p = [math.exp(-1) / z, math.exp(-2) / z, math.exp(-3) / z]
    mean = 2.0  # (2 + 0 + 4) / 3
    assert float(out.loss.detach()) == pytest.approx(sum(pi * (w - mean) for pi, w in zip(p, [2, 0, 4])))
    out.loss.backward()
    expected = sum(pi * w for pi, w in zip(p, [2, 0, 4]))
    for i, w in enumerate([2, 0, 4]):
        assert float(logps.grad[i]) == pytest.approx(p[i] * (w - expected))
    # a descent step raises the error-free hypothesis and lowers the 4-error one
    assert logps.grad[1] < 0 < logps.grad[2]
    assert float(out.metrics["mwer/expected_errors"]) == pytest.approx(expected)
    assert float(out.metrics["mwer/oracle_errors"]) == 0.0


def test_a_hypothesis_drawn_twice_is_one_entry_of_the_list():
    texts = ["a b", "a c", "a b", "x", "x", "y"]
    keep = torch.tensor(first_occurrences(texts, 3))
    assert keep.tolist() == [True, True, False, True, False, True]
    logps = torch.tensor([-1.0, -1.0, -1.0, -0.5, -0.5, -2.0], dtype=torch.float64)
    errors = torch.tensor([0.0, 2.0, 0.0, 1.0, 1.0, 3.0], dtype=torch.float64)
    once = mwer_loss(logps, errors, 3, keep)
    # clip 1: "a b" and "a c" equally likely, mean errors 1: loss 0.5 * (0 - 1) + 0.5 * (2 - 1) = 0
    p = math.exp(-0.5) / (math.exp(-0.5) + math.exp(-2))
    clip2 = p * (1 - 2) + (1 - p) * (3 - 2)
    assert float(once.loss) == pytest.approx((0 + clip2) / 2)
    assert float(once.metrics["mwer/distinct_hypotheses"]) == 2.0


def test_word_errors_are_counted_as_evaluation_counts_them():
    norm = TextNormalization(normalizer="whisper_english")
    assert word_errors(["Turn on the lights.", "", "two words"], ["turn on the light", "", "too words here"], norm) == [1, 0, 2]


def test_mwer_trains_from_its_own_samples_and_resumes_the_same(tmp_path, tiny_whisper, speech_dir):
    cfg = _config(tmp_path, tiny_whisper, speech_dir, {"name": "mwer", "num_hypotheses": 4, "max_completion_length": 16, "mwer_ce_weight": 1.0},
                  data={"train": str(speech_dir / "transcripts.jsonl")},
                  train={"per_device_train_batch_size": 6, "max_steps": 8, "save_steps": 4, "learning_rate": 3e-3}, tracking={"enabled": True})
    outcome = audiorl.train(cfg)
    history = {key: [m.value for m in sorted(MlflowClient().get_metric_history(outcome.run_id, key), key=lambda m: m.step)]
               for key in ("loss/ce", "mwer/expected_errors", "mwer/oracle_errors", "mwer/distinct_hypotheses")}
    assert len(history["loss/ce"]) == 8 and history["loss/ce"][-1] < history["loss/ce"][0]
    assert min(history["mwer/distinct_hypotheses"]) > 1.0  # sampling gives a list, not one hypothesis repeated
    assert all(e >= o for e, o in zip(history["mwer/expected_errors"], history["mwer/oracle_errors"]))
    straight = final_weights(outcome)
    # as if the job died after step 4: the sampling seeds are checkpointed, so the resumed run
    # draws the same lists and ends with the same weights
    run_dir = Path(cfg.train.output_dir)
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-8")
    shutil.rmtree(run_dir / "final")
    cfg.train.resume = "auto"
    resumed = audiorl.train(cfg)
    assert resumed.result.resumed_from.endswith("checkpoint-4")
    for name, weight in final_weights(resumed).items():
        torch.testing.assert_close(weight, straight[name], rtol=0, atol=0, msg=name)
