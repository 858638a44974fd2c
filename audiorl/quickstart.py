"""The newcomer's first run, with nothing but this repository and espeak-ng:

1. speak fresh sentences in the two English accents that the shipped base model
   (`models/tiny-whisper-base`) never heard, half of them with noise (espeak-ng, 16 kHz); hold
   some sentences out as the test set, clean and noisy;
2. sample 8 transcripts per training clip from the base and keep, per clip, the reference as
   `chosen` and the worst sample by WER as `rejected` (N-best preference pairs);
3. tune the base with MPO (the DPO family weighted `[sigmoid, bco_pair, sft]`, `[0.8, 0.2, 1.0]`);
4. evaluate greedy WER/CER on the held-out sentences before and after, per test set, and log
   it all (metrics, per-utterance results, the before/after chart, the tuned model) to the
   local MLflow store.
"""

from __future__ import annotations

from pathlib import Path

from audiorl.config import RunConfig
from audiorl.errors import ConfigError

EXPERIMENT = "audiorl-quickstart"
TEST_SETS = {"heldout-clean": "validation.jsonl", "heldout-noisy": "validation-noisy.jsonl"}


def shipped_base() -> Path:
    """The base model committed in the repository (found next to the installed package)."""
    return Path(__file__).resolve().parent.parent / "models" / "tiny-whisper-base"


def make_speech(workdir: Path, *, num_sentences: int = 300, seed: int = 0) -> Path:
    """Speak the tuning and test clips in the held-out accents; returns the folder of manifests."""
    from audiorl.data.synth import HELDOUT_ACCENTS, SynthSettings, synthesize

    speech = workdir / "speech"
    synthesize(SynthSettings(
        out=speech, num_sentences=num_sentences, accents=list(HELDOUT_ACCENTS), heldout_accents=[], utterances_per_sentence=2,
        heldout_sentence_share=0.2, noise_share=0.5, noisy_validation=True, max_seconds=5.0, seed=seed,
    ))
    return speech


def quickstart_config(workdir: Path, base: Path, speech: Path, max_steps: int) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {"family": "whisper", "name_or_path": str(base), "language": "en"},
            "data": {
                "train": str(speech / "pairs.jsonl"),
                "eval": {name: str(speech / file) for name, file in TEST_SETS.items()},
                "max_audio_seconds": 5.0,
            },
            "objective": {
                "name": "dpo",
                "beta": 0.1,
                "loss_type": ["sigmoid", "bco_pair", "sft"],
                "loss_weights": [0.8, 0.2, 1.0],
                "bco_running_mean": True,
            },
            "train": {
                "output_dir": str(workdir / "run"),
                "max_steps": max_steps,
                "per_device_train_batch_size": 16,
                "per_device_eval_batch_size": 32,
                "learning_rate": 1e-4,
                "warmup_steps": min(10, max_steps // 10),
                "lr_scheduler_type": "cosine",
                "logging_steps": max(1, min(10, max_steps // 4)),
                "eval_steps": max(1, max_steps // 2),
                "save_steps": None,
                "resume": "never",
                "generation_max_new_tokens": 40,
                "num_threads": 1,
            },
            "tracking": {"experiment_name": EXPERIMENT, "run_name": "quickstart-mpo", "registered_model_name": "quickstart-tiny-whisper",
                         "system_metrics": False},
        }
    )


def run(workdir: str | Path = "audiorl-quickstart", max_steps: int = 100, seed: int = 0, base: str | Path | None = None):
    import torch

    from audiorl.api import make_pairs, train
    from audiorl.progress import console

    base = Path(base) if base is not None else shipped_base()
    if not (base / "config.json").exists():
        raise ConfigError(f"{base}: no base model there; the quickstart starts from models/tiny-whisper-base in the repository "
                          "(install with `pip install -e .` from a checkout, or pass --base DIR)")
    torch.set_num_threads(1)  # one thread is the fast way on a small shared machine (see the README)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    speech = make_speech(workdir, seed=seed)
    console.print(f"speech: {speech} (train, validation, validation-noisy)")
    summary = make_pairs(base, speech / "train.jsonl", speech / "pairs.jsonl", policy="reference-worst", num_samples=8,
                         max_new_tokens=40, batch_size=16, seed=seed)
    console.print(f"pairs: {summary.rows} from {summary.clips} clips in {speech / 'pairs.jsonl'}")
    cfg = quickstart_config(workdir, base, speech, max_steps)
    config_path = workdir / "quickstart.yaml"
    config_path.write_text(cfg.to_yaml())
    outcome = train(cfg)
    return config_path, outcome
