"""Qwen2-Audio, Qwen3-ASR and Step-Audio 2 through the same adapter contract as Whisper."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import audiorl
from audiorl.audio import AudioLimits
from audiorl.config import LoraSettings, ModelConfig, RunConfig
from audiorl.data.collate import PreferenceCollator, RecordDataset
from audiorl.data.records import read_records
from audiorl.methods.dpo import DPOConfig, PreferenceStep
from audiorl.models.registry import load_adapter
from audiorl.reference import AdapterDisabledReference, FrozenReference

LLM_FAMILIES = ["qwen2_audio", "qwen3_asr", "step_audio2"]
ALL_FAMILIES = ["whisper"] + LLM_FAMILIES
REPO = Path(__file__).resolve().parents[1]


def _adapter(tiny_models, family, **extra):
    return load_adapter(ModelConfig(family=family, name_or_path=str(tiny_models[family]), **extra))


def _batch(adapter, speech_dir, n=3):
    records = read_records(speech_dir / "pairs.jsonl", "preference")[:n]
    dataset = RecordDataset(records, AudioLimits(sampling_rate=adapter.sampling_rate, max_seconds=5))
    return PreferenceCollator(adapter)([dataset[i] for i in range(n)])


def _full_sequence_loss(adapter, family, features, row, prompt, target):
    """The model's own forward pass over prompt + target with `labels`: mean CE of the target."""
    ids = torch.tensor([prompt + target])
    labels = torch.tensor([[-100] * len(prompt) + target])
    one = {k: v[row : row + 1] for k, v in features.items()}
    if family == "step_audio2":
        out = adapter.model(input_ids=ids, audio_token_id=adapter.audio_token_id, labels=labels, **one)
    else:
        out = adapter.model(input_ids=ids, labels=labels, **one)
    return out.loss


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_logps_cover_the_transcript_only_and_match_the_models_own_loss(tiny_models, speech_dir, family):
    adapter = _adapter(tiny_models, family)
    batch = _batch(adapter, speech_dir)
    context = adapter.encode(batch["features"])
    scored = adapter.sequence_logps(context, batch["chosen_ids"])
    for row, target in enumerate(batch["chosen_ids"]):
        n_audio = int(context.lengths[row]) - len(adapter.prompt_ids(0))
        prompt = adapter.prompt_ids(n_audio)
        assert prompt.count(adapter.audio_token_id) == n_audio > 0
        loss = _full_sequence_loss(adapter, family, batch["features"], row, prompt, target)
        torch.testing.assert_close(scored.sum[row], -loss * len(target), rtol=1e-5, atol=1e-4)
        assert int(scored.num_tokens[row]) == len(target) and target[-1] in adapter.stop_ids


def _tower(model, family):
    return model.encoder if family == "step_audio2" else model.model.audio_tower


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_audio_tower_runs_once_per_clip(tiny_models, speech_dir, family):
    adapter = _adapter(tiny_models, family)
    batch = _batch(adapter, speech_dir, n=3)
    reference = FrozenReference(adapter)
    step = PreferenceStep(adapter, DPOConfig(), reference)
    calls = {"policy": 0, "reference": 0}
    h1 = _tower(adapter.model, family).register_forward_hook(lambda *a: calls.__setitem__("policy", calls["policy"] + 1))
    h2 = _tower(reference.module, family).register_forward_hook(lambda *a: calls.__setitem__("reference", calls["reference"] + 1))
    try:
        out = step(batch)
    finally:
        h1.remove(), h2.remove()
    assert calls == {"policy": 1, "reference": 1}  # one batched call each, for 3 clips x (chosen + rejected)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_save_load_round_trip_and_sampling(tiny_models, speech_dir, family, tmp_path):
    adapter = _adapter(tiny_models, family)
    batch = _batch(adapter, speech_dir, n=2)
    before = adapter.generate(adapter.encode(batch["features"]), max_new_tokens=6)
    adapter.save_pretrained(str(tmp_path / "saved"))
    again = load_adapter(adapter.config.model_copy(update={"name_or_path": str(tmp_path / "saved")}))
    after = again.generate(again.encode(batch["features"]), max_new_tokens=6)
    assert before.token_ids == after.token_ids
    sampled = again.generate(
        again.encode(batch["features"]), max_new_tokens=5, do_sample=True, num_return_sequences=3,
        top_p=0.9, generator=torch.Generator().manual_seed(0),
    )
    assert len(sampled.token_ids) == 6
    assert not any(t in again._suppress for ids in sampled.token_ids for t in ids)


def test_greedy_generation_matches_step_by_step_scoring(tiny_models, speech_dir):
    """The KV-cache decoder with left padding picks, at each step, the argmax of the same
    distribution sequence_logps scores (right padding, no cache)."""
    adapter = _adapter(tiny_models, "qwen2_audio")
    batch = _batch(adapter, speech_dir, n=3)
    context = adapter.encode(batch["features"])
    generated = adapter.generate(context, max_new_tokens=5)
    scored = adapter.sequence_logps(context, generated.token_ids)
    # greedy tokens are the most likely ones, so each must score at least as well as any other
    # single token substitution at the first position
    for row, ids in enumerate(generated.token_ids):
        alt = [(ids[0] + 1) % len(adapter.tokenizer)] + ids[1:]
        alt_score = adapter.sequence_logps(context.select(torch.tensor([row])), [alt]).token_logps[0, 0]
        assert scored.token_logps[row, 0] >= alt_score - 1e-5


def test_lora_reference_equals_base_model_for_an_audio_llm(tiny_models, speech_dir):
    base = _adapter(tiny_models, "qwen2_audio")
    lora = _adapter(tiny_models, "qwen2_audio", lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in lora.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    batch = _batch(base, speech_dir, n=2)
    targets = batch["chosen_ids"]
    with torch.no_grad():
        expected = base.sequence_logps(base.encode(batch["features"]), targets).sum
        enabled = lora.sequence_logps(lora.encode(batch["features"]), targets).sum
        ref = AdapterDisabledReference(lora).logps(batch, lora.encode(batch["features"]), targets, torch.arange(2))
    torch.testing.assert_close(ref, expected, rtol=1e-6, atol=1e-5)
    assert not torch.allclose(enabled, expected, atol=1e-3)


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_freezing_encoder_and_projector(tiny_models, family):
    adapter = _adapter(tiny_models, family, freeze_encoder=True, freeze_projector=True)
    assert not adapter.encoder_trainable
    trainable = {n for n, p in adapter.model.named_parameters() if p.requires_grad}
    assert trainable and not any(re.match(r"(model\.audio_tower|model\.multi_modal_projector|encoder|adapter)\.", n) for n in trainable)


def test_whisper_has_no_projector_to_freeze(tiny_models):
    from audiorl.errors import ConfigError

    with pytest.raises(ConfigError, match="the whisper family has no projector"):
        _adapter(tiny_models, "whisper", freeze_projector=True)


@pytest.mark.parametrize("family", ["qwen3_asr", "step_audio2"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_models, speech_dir, family):
    results = []
    for checkpointing in (False, True):
        adapter = _adapter(tiny_models, family, gradient_checkpointing=checkpointing)
        adapter.model.train()
        batch = _batch(adapter, speech_dir, n=2)
        out = PreferenceStep(adapter, DPOConfig(loss_type=["sigmoid", "sft"]), FrozenReference(adapter))(batch)
        out.loss.backward()
        grad = adapter.embed_tokens(adapter.model).weight.grad.clone()
        results.append((out.loss.detach(), grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("objective", ["dpo", "mpo"])
def test_dpo_and_mpo_train_every_family_through_one_trainer(tiny_models, speech_dir, tmp_path, family, objective):
    losses = {"dpo": {"loss_type": ["sigmoid"]}, "mpo": {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}}
    cfg = RunConfig.model_validate(
        {
            "model": {"family": family, "name_or_path": str(tiny_models[family])},
            "data": {"train": str(speech_dir / "pairs.jsonl"), "eval": str(speech_dir / "transcripts.jsonl"), "max_audio_seconds": 5},
            "objective": {"beta": 0.5, **losses[objective]},
            "train": {"output_dir": str(tmp_path / "run"), "per_device_train_batch_size": 12, "max_steps": 6,
                      "learning_rate": 3e-3, "logging_steps": 1, "save_steps": None, "eval_before_training": False,
                      "generation_max_new_tokens": 4, "per_device_eval_batch_size": 12, "num_threads": 1},
            "tracking": {"enabled": True},
        }
    )
    outcome = audiorl.train(cfg)
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    history = sorted(client.get_metric_history(outcome.run_id, "loss"), key=lambda m: m.step)
    assert history[-1].value < history[0].value - 0.05, [m.value for m in history]
    assert client.get_metric_history(outcome.run_id, "eval/wer")  # evaluation ran with the family's own prompt
    again = load_adapter(cfg.model.model_copy(update={"name_or_path": str(outcome.final_model_dir)}))
    assert again.family == family


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_eval_command_works_for_every_family(tiny_models, speech_dir, family):
    result = audiorl.evaluate(tiny_models[family], speech_dir / "transcripts.jsonl", max_new_tokens=4, batch_size=5)  # family read from config.json
    assert result.num_utterances == 12 and len(result.utterances) == 12


def test_no_family_names_in_the_shared_layers():
    # every module but the families' own (models/) and three that name a family by design: the
    # config schema (its default family and the families its docs list), the text normalisers
    # (Whisper's normalisers are a scoring standard, named after it) and the quickstart (an
    # application that starts from Whisper tiny.en)
    package = REPO / "audiorl"
    by_design = {package / "config.py", package / "text.py", package / "quickstart.py"}
    shared = [f for f in sorted(package.rglob("*.py")) if package / "models" not in f.parents and f not in by_design]
    assert package / "tracking" / "model_versions.py" in shared and package / "k8s" / "render.py" in shared
    pattern = re.compile(r"whisper|qwen|step.?audio", re.IGNORECASE)
    offenders = []
    for file in shared:
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{file.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_step_audio2_loads_the_published_layout_with_no_missing_or_unexpected_keys(tmp_path, tiny_models):
    """Write a checkpoint the way the published Step-Audio-2-mini is laid out (config.json fields,
    safetensors names), then load it with AudioRL's own classes and no remote code."""
    from audiorl.models.step_audio2 import StepAudio2Config, StepAudio2ForCausalLM, published_parameter_names

    published_config = {
        "architectures": ["StepAudio2ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_step_audio_2.StepAudio2Config",
                     "AutoModelForCausalLM": "modeling_step_audio_2.StepAudio2ForCausalLM"},
        "model_type": "step_audio_2",
        "torch_dtype": "float32",
        "use_sliding_window": False,
        "audio_encoder_config": {"n_mels": 128, "n_audio_ctx": 1500, "n_audio_state": 32, "n_audio_head": 4,
                                 "n_audio_layer": 2, "llm_dim": 48, "kernel_size": 3, "adapter_stride": 2},
        "text_config": {"vocab_size": 300, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_attention_groups": 2, "num_key_value_heads": 2,
                        "hidden_act": "silu", "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0},
    }
    out = tmp_path / "published"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(published_config))
    config = StepAudio2Config.from_pretrained(out)
    names = published_parameter_names(config)
    shapes = {k: v.shape for k, v in StepAudio2ForCausalLM(config).state_dict().items()}
    assert set(names) == set(shapes), (set(names) ^ set(shapes))
    torch.manual_seed(0)
    written = {name: torch.randn(shapes[name]) for name in names}
    save_file(written, str(out / "model.safetensors"))
    model, info = StepAudio2ForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    loaded = model.state_dict()
    for name in names:
        torch.testing.assert_close(loaded[name], written[name], msg=name)
    # and the tiny checkpoint we ship for tests is in the same layout
    tiny = load_file(str(tiny_models["step_audio2"] / "model.safetensors"))
    assert set(tiny) == set(published_parameter_names(StepAudio2Config.from_pretrained(tiny_models["step_audio2"])))


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_group_decoding_from_one_prefill_matches_single_decoding(tiny_models, speech_dir, family):
    """Generation prefills once per clip and repeats the cache for the group: greedy copies of a
    group must equal plain greedy decoding of each clip."""
    adapter = _adapter(tiny_models, family)
    batch = _batch(adapter, speech_dir, n=2)
    context = adapter.encode(batch["features"])
    single = adapter.generate(context, max_new_tokens=6).token_ids
    grouped = adapter.generate(context, max_new_tokens=6, num_return_sequences=3).token_ids
    assert grouped == [ids for ids in single for _ in range(3)]
