"""GRPO end to end: rollouts, rewards, the trainer, MLflow metrics."""

import pytest
import torch

import audiorl
from audiorl.audio import AudioLimits
from audiorl.config import ModelConfig, RunConfig
from audiorl.data.collate import RecordDataset, TranscriptCollator
from audiorl.data.records import read_records
from audiorl.models.registry import load_adapter
from audiorl.rollout import SamplingSettings, sample


@pytest.fixture
def short_reward(tmp_path, monkeypatch):
    """A reward that prefers short transcripts: a signal GRPO should pick up within a few steps."""
    (tmp_path / "toy_rewards.py").write_text(
        "def short(completions, **columns):\n    return [-len(c) / 20 for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "toy_rewards:short"


def _config(tmp_path, model_dir, speech_dir, **objective):
    return RunConfig.model_validate(
        {
            "model": {"name_or_path": str(model_dir)},
            "data": {"train": str(speech_dir / "transcripts.jsonl"), "max_audio_seconds": 5},
            "objective": {"name": "grpo", "num_generations": 4, "max_completion_length": 8, **objective},
            "train": {"output_dir": str(tmp_path / "run"), "per_device_train_batch_size": 3, "learning_rate": 3e-3,
                      "logging_steps": 1, "save_steps": None, "num_threads": 1, "seed": 1},
            "tracking": {"enabled": True},
        }
    )


def _history(run_id, key):
    from mlflow.tracking import MlflowClient

    return [m.value for m in sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)]


def test_grpo_learns_to_prefer_what_the_reward_prefers(tmp_path, tiny_whisper, speech_dir, short_reward):
    cfg = _config(tmp_path, tiny_whisper, speech_dir, rewards=[{"name": short_reward}], beta=0.04)
    cfg.train.max_steps = 20
    cfg.train.learning_rate = 1e-2
    outcome = audiorl.train(cfg)
    rewards = _history(outcome.run_id, "reward")
    assert len(rewards) == 20
    # a random model, 4 samples per clip: noisy, but the mean reward climbs (about -0.7 -> -0.47 here)
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.1, rewards
    for key in (f"rewards/{short_reward}/mean", f"rewards/{short_reward}/std", "reward", "reward_std", "kl",
                "clip_ratio/region_mean", "completions/clipped_ratio", "advantages/mean_abs"):
        assert _history(outcome.run_id, key), key


def test_num_iterations_reuses_each_rollout(tmp_path, tiny_whisper, speech_dir):
    cfg = _config(tmp_path, tiny_whisper, speech_dir, num_iterations=2, rewards=[{"name": "wer"}, {"name": "length", "weight": 0.5}])
    cfg.train.max_steps = 4
    outcome = audiorl.train(cfg)
    rewards = _history(outcome.run_id, "reward")
    assert len(rewards) == 4
    assert rewards[0] == rewards[1] and rewards[2] == rewards[3]  # same rollouts, two steps each
    # the second step on a rollout has a policy that moved: ratios differ from 1
    assert _history(outcome.run_id, "loss")[0] != _history(outcome.run_id, "loss")[1]


@pytest.mark.parametrize("family", ["whisper", "qwen2_audio"])
def test_rollout_encodes_each_clip_once(tiny_models, speech_dir, family):
    adapter = load_adapter(ModelConfig(family=family, name_or_path=str(tiny_models[family])))
    records = read_records(speech_dir / "transcripts.jsonl", "transcript")[:3]
    dataset = RecordDataset(records, AudioLimits(sampling_rate=adapter.sampling_rate, max_seconds=5))
    batch = TranscriptCollator(adapter)([dataset[i] for i in range(3)])
    tower = adapter.model.model.encoder if family == "whisper" else adapter.model.model.audio_tower
    rows = []
    hook = tower.register_forward_hook(lambda m, i, o: rows.append((o[0] if isinstance(o, tuple) else o.last_hidden_state).shape[0]))
    try:
        context = adapter.encode(batch["features"])
        rollout = sample(adapter, context, SamplingSettings(num_generations=8, max_new_tokens=6, top_k=50),
                         generator=torch.Generator().manual_seed(0), with_logps=True)
    finally:
        hook.remove()
    assert sum(rows) == 3  # three clips encoded once, for 24 hypotheses (on a CPU Whisper encodes clip by clip)
    assert len(rollout.texts) == 24 and rollout.clip_index.tolist() == [i for i in range(3) for _ in range(8)]
    assert rollout.token_logps.shape[0] == 24 and torch.all(rollout.token_logps <= 0)
    stops = set(adapter.stop_token_ids)
    assert rollout.truncated == [ids[-1] not in stops for ids in rollout.token_ids]


@pytest.mark.parametrize("family", ["whisper", "qwen2_audio"])
def test_a_grpo_step_encodes_each_clip_once_when_the_encoder_is_frozen(tmp_path, tiny_models, speech_dir, family):
    from audiorl.api import build_step

    records = read_records(speech_dir / "transcripts.jsonl", "transcript")[:3]
    counts = {}
    for frozen in (True, False):
        cfg = RunConfig.model_validate({
            "model": {"family": family, "name_or_path": str(tiny_models[family]), "freeze_encoder": frozen, "encoder_cache": False,
                      # an audio LLM's context is its projector's output: frozen means both
                      **({"freeze_projector": frozen} if family != "whisper" else {})},
            "objective": {"name": "grpo", "num_generations": 4, "max_completion_length": 6, "beta": 0.04 if frozen else 0.0},
            "train": {"output_dir": str(tmp_path / "run")},
        })
        adapter = load_adapter(cfg.model)
        dataset = RecordDataset(records, AudioLimits(sampling_rate=adapter.sampling_rate, max_seconds=5))
        step, collate = build_step(cfg, adapter, dataset, "fp")
        batch = collate([dataset[i] for i in range(3)])
        tower = adapter.model.model.encoder if family == "whisper" else adapter.model.model.audio_tower
        rows: list[int] = []

        def count(module, inputs, output, rows=rows):
            rows.append((output[0] if isinstance(output, tuple) else output.last_hidden_state).shape[0])

        hook = tower.register_forward_hook(count)
        try:
            step(batch).loss.backward()
        finally:
            hook.remove()
        counts[frozen] = sum(rows)
    # frozen: the rollout's states serve the loss and the reference; trainable: the loss needs its own pass with gradients
    assert counts == {True: 3, False: 6}


def test_sft_weight_teaches_the_references_beside_the_reward(tmp_path, tiny_whisper, speech_dir, monkeypatch):
    # a reward that is the same for every sample: every advantage is 0, GRPO alone moves nothing,
    # and whatever the model learns comes from the SFT term on the references
    (tmp_path / "flat_rewards.py").write_text("def flat(completions, **columns):\n    return [0.0 for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = _config(tmp_path, tiny_whisper, speech_dir, rewards=[{"name": "flat_rewards:flat"}], sft_weight=1.0)
    cfg.train.max_steps = 8
    outcome = audiorl.train(cfg)
    sft = _history(outcome.run_id, "loss/sft")
    assert len(sft) == 8 and sft[-1] < 0.9 * sft[0] and sft == sorted(sft, reverse=True), sft  # about 6.1 -> 5.1
    assert _history(outcome.run_id, "advantages/mean_abs") == [0.0] * 8
    # the loss is the SFT term alone here (zero advantages, no KL)
    assert _history(outcome.run_id, "loss") == pytest.approx(sft, rel=1e-5)


def test_sft_weight_belongs_to_grpo():
    from audiorl.config import validate_config
    from audiorl.errors import ConfigError

    with pytest.raises(ConfigError, match=r"objective.sft_weight: not a knob of objective.name=dpo \(it belongs to objective.name=grpo\)"):
        validate_config({"model": {"name_or_path": "m"}, "objective": {"name": "dpo", "sft_weight": 0.5}})


@pytest.mark.parametrize("objective", [
    {"loss_type": "cispo", "epsilon_high": 5.0, "advantage_estimator": "rloo", "top_entropy_quantile": 0.5},
    {"loss_type": "sapo", "multi_objective_aggregation": "normalize_then_sum"},
], ids=["cispo-rloo-entropy", "sapo-gdpo"])
def test_the_newer_losses_learn_what_the_reward_prefers(tmp_path, tiny_whisper, speech_dir, short_reward, objective):
    rewards = [{"name": short_reward}, {"name": "wer", "weight": 0.5}]
    cfg = _config(tmp_path, tiny_whisper, speech_dir, rewards=rewards, **objective)
    cfg.train.max_steps = 20
    cfg.train.learning_rate = 1e-2
    outcome = audiorl.train(cfg)
    short = _history(outcome.run_id, f"rewards/{short_reward}/mean")
    assert len(short) == 20 and sum(short[-5:]) / 5 > sum(short[:5]) / 5  # transcripts got shorter
    if "top_entropy_quantile" in objective:
        kept = _history(outcome.run_id, "entropy_mask/kept")
        assert all(0.3 <= k <= 0.7 for k in kept)  # about half the tokens carry the policy loss


def test_one_rollout_feeds_steps_per_generation_slices(tmp_path, tiny_whisper, speech_dir):
    from audiorl.errors import ConfigError
    from audiorl.run import build_step

    cfg = _config(tmp_path, tiny_whisper, speech_dir, steps_per_generation=2, sft_weight=1.0)
    cfg.train.per_device_train_batch_size = 4
    adapter = load_adapter(cfg.model)
    step, collate = build_step(cfg, adapter, None, "fp")
    assert step.batch_repeats == 2
    records = read_records(speech_dir / "transcripts.jsonl", "transcript")
    dataset = RecordDataset(records, AudioLimits(sampling_rate=adapter.sampling_rate, max_seconds=5))
    batch = collate([dataset[i] for i in range(4)])
    first, second = step(batch), step(batch)
    assert step.rollouts == 1  # both slices from one rollout
    # the slices are different clips (their references' NLL differs), 2 clips x 4 samples each
    assert float(first.metrics["loss/sft"]) != pytest.approx(float(second.metrics["loss/sft"]))
    one_slice = collate([dataset[i] for i in range(2, 4)])
    from audiorl.objectives import sft_loss

    scored = adapter.sequence_logps(adapter.encode(one_slice["features"]), one_slice["target_ids"])
    assert float(second.metrics["loss/sft"]) == pytest.approx(float(sft_loss(scored.token_logps, scored.mask).loss), rel=1e-5)
    step(collate([dataset[i] for i in range(4, 8)]))
    assert step.rollouts == 2
    # through the trainer: 4 optimizer steps from 2 rollouts, kept in the checkpoint
    cfg.train.max_steps, cfg.train.save_steps = 4, 4
    outcome = audiorl.train(cfg)
    state = torch.load(outcome.output_dir / "checkpoints" / "checkpoint-4" / "state.pt", weights_only=False)
    assert state["step"]["rollouts"] == 2
    cfg.train.per_device_train_batch_size = 3
    with pytest.raises(ConfigError, match="steps_per_generation=2 must divide train.per_device_train_batch_size=3"):
        build_step(cfg, adapter, None, "fp")
