"""With a frozen encoder, each clip is encoded once for the whole run: training steps, the
reference, evaluation and sampling reuse the states, in memory or from disk, and get the same
numbers as without the cache."""

from __future__ import annotations

import torch

from audiorl.audio import AudioLimits
from audiorl.config import LoraSettings, ModelConfig
from audiorl.data.collate import PreferenceCollator, RecordDataset
from audiorl.data.records import read_records
from audiorl.methods.dpo import DPOConfig, PreferenceStep
from audiorl.models.registry import load_adapter
from audiorl.reference import FrozenReference


def _adapter(tiny_whisper, **settings):
    torch.manual_seed(0)
    return load_adapter(ModelConfig(name_or_path=str(tiny_whisper), **settings))


def _batch(adapter, speech_dir, rows):
    records = read_records(speech_dir / "pairs.jsonl", "preference")
    dataset = RecordDataset(records, AudioLimits(sampling_rate=adapter.sampling_rate, max_seconds=5))
    return PreferenceCollator(adapter)([dataset[i] for i in rows])


def _encoded_clips(adapter) -> list[int]:
    """The clips each encoder call encodes (on a CPU, one per call)."""
    sizes: list[int] = []
    core = adapter.model.get_base_model() if adapter.uses_lora else adapter.model
    core.model.encoder.register_forward_hook(lambda m, i, o: sizes.append(o.last_hidden_state.shape[0]))
    return sizes


def test_frozen_encoder_runs_once_per_clip_across_steps_with_the_same_loss(tiny_whisper, speech_dir):
    cached = _adapter(tiny_whisper, freeze_encoder=True)
    plain = _adapter(tiny_whisper, freeze_encoder=True, encoder_cache=False)
    assert cached.encoder_cache is not None and plain.encoder_cache is None
    encoded = _encoded_clips(cached)
    step = PreferenceStep(cached, DPOConfig(), FrozenReference(cached))
    baseline = PreferenceStep(plain, DPOConfig(), FrozenReference(plain))
    first, second = _batch(cached, speech_dir, [0, 1, 2]), _batch(cached, speech_dir, [2, 3, 0])
    clips_encoded = []
    for batch in (first, second, first):
        out = step(batch)
        out.loss.backward()
        expected = baseline(batch)
        expected.loss.backward()
        torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=0)
        clips_encoded.append(sum(encoded))
    # clips 0, 1, 2 once, then only clip 3: the partly cached batch encodes its new clip alone
    assert clips_encoded == [3, 4, 4]
    assert (cached.encoder_cache.misses, cached.encoder_cache.hits) == (4, 5)
    grads = [p.grad for p in cached.model.parameters() if p.grad is not None]
    grads_plain = [p.grad for p in plain.model.parameters() if p.grad is not None]
    for a, b in zip(grads, grads_plain):
        torch.testing.assert_close(a, b)


def test_a_training_encoder_is_never_cached(tiny_whisper, speech_dir):
    full = _adapter(tiny_whisper)
    assert full.encoder_cache is None
    # LoRA in the encoder's attention trains the encoder even with its base weights frozen
    lora = _adapter(tiny_whisper, freeze_encoder=True, lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    assert lora.encoder_trainable
    encoded = _encoded_clips(lora)
    batch = _batch(lora, speech_dir, [0, 1])
    lora.encode(batch["features"])
    lora.encode(batch["features"])
    assert sum(encoded) == 4


def test_disk_cache_serves_another_process_and_keys_on_model_and_clip(tiny_whisper, tmp_path, speech_dir):
    from audiorl.models.whisper import build_tiny_whisper
    from tests.conftest import REJECTED, SENTENCES

    directory = tmp_path / "encoder-cache"
    writer = _adapter(tiny_whisper, freeze_encoder=True, encoder_cache_dir=str(directory))
    batch = _batch(writer, speech_dir, [0, 1])
    written = writer.encode(batch["features"]).hidden_states
    assert len(list(directory.glob("*.pt"))) == 2

    reader = _adapter(tiny_whisper, freeze_encoder=True, encoder_cache_dir=str(directory))
    encoded = _encoded_clips(reader)
    read = reader.encode(batch["features"]).hidden_states
    assert encoded == [] and torch.equal(read, written)

    # the same clips through a different model: new entries, never the other model's states
    other_dir = build_tiny_whisper(tmp_path / "other", SENTENCES + REJECTED, vocab_size=400, seed=1)
    other = _adapter(other_dir, freeze_encoder=True, encoder_cache_dir=str(directory))
    encoded = _encoded_clips(other)
    states = other.encode(batch["features"]).hidden_states
    assert sum(encoded) == 2 and not torch.equal(states, written)
    assert len(list(directory.glob("*.pt"))) == 4


def test_memory_bound_evicts_the_least_recently_used(tiny_whisper, speech_dir):
    adapter = _adapter(tiny_whisper, freeze_encoder=True)
    batch = _batch(adapter, speech_dir, [0])
    one_clip = adapter.encode(batch["features"]).hidden_states[0]
    size = one_clip.numel() * one_clip.element_size()
    adapter.enable_encoder_cache(max_bytes=2 * size)
    encoded = _encoded_clips(adapter)
    for rows in ([0], [1], [0], [2], [1]):  # 1 is the least recently used when 2 arrives
        adapter.encode(_batch(adapter, speech_dir, rows)["features"])
    assert encoded == [1, 1, 1, 1]


def test_pair_building_leaves_encoder_states_for_the_run_on_the_same_clips(tiny_whisper, tmp_path, speech_dir):
    """`data pairs --encoder-cache-dir D` and a run with model.encoder_cache_dir D: the run's first
    visit to those clips reads their states from D instead of encoding them."""
    from audiorl.api import make_pairs
    from audiorl.data.collate import TranscriptCollator

    directory = tmp_path / "states"
    make_pairs(tiny_whisper, speech_dir / "transcripts.jsonl", tmp_path / "pairs.jsonl", num_samples=2,
                       max_new_tokens=4, max_audio_seconds=5, encoder_cache_dir=directory)
    records = read_records(speech_dir / "transcripts.jsonl", "transcript")
    assert len(list(directory.glob("*.pt"))) == len(records)

    run = _adapter(tiny_whisper, freeze_encoder=True, encoder_cache_dir=str(directory))
    encoded = _encoded_clips(run)
    dataset = RecordDataset(records, AudioLimits(sampling_rate=run.sampling_rate, max_seconds=5))
    run.encode(TranscriptCollator(run)([dataset[i] for i in range(4)])["features"])
    assert encoded == [] and run.encoder_cache.hits == 4
