"""The newcomer's first run, with nothing but this repository and espeak-ng:

1. speak a few dozen sentences in several English voices (espeak-ng), resampled to 16 kHz;
2. write preference pairs: the true transcript is `chosen`, a transcript with a typical ASR error
   (a wrong word, a dropped word, a repeated phrase, an invented tail) is `rejected`;
3. build a tiny Whisper with random weights and its own byte-level BPE;
4. train it with the MPO weighting of the DPO family, evaluating greedy WER/CER on a held-out
   voice before and after;
5. log everything to the local MLflow store and say where to look.

The model starts from random weights, so its WER shows that the loop learns, not a usable
recognizer.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from audiorl.config import RunConfig
from audiorl.data.speech import espeak_binary, speak

SENTENCES = [
    "turn on the kitchen lights",
    "set a timer for ten minutes",
    "what is the weather in paris",
    "call my sister after lunch",
    "play some jazz in the living room",
    "remind me to buy milk tomorrow",
    "how far is the train station",
    "book a table for two at seven",
    "send the report to the team",
    "open the garage door please",
    "the meeting starts at nine",
    "add eggs and bread to the list",
    "what time does the bank close",
    "turn the volume down a little",
    "show me photos from last summer",
    "the blue car is parked outside",
    "start the washing machine now",
    "read my new messages aloud",
    "the flight to london is delayed",
    "switch off the bedroom fan",
    "find a recipe for tomato soup",
    "my password needs to be reset",
    "the printer is out of paper",
    "schedule a call with the doctor",
    "close all the windows tonight",
    "the library opens at eight",
    "order a large pizza with cheese",
    "translate hello into spanish",
    "the package will arrive on friday",
    "lock the front door at night",
    "how many steps did i walk today",
    "give me directions to the museum",
]

TRAIN_VOICES = [("en-us", 150, 45), ("en-gb", 170, 55), ("en-us+f3", 160, 60), ("en-gb-scotland", 140, 40)]
EVAL_VOICE = ("en-029", 160, 50)  # a held-out accent

_FILLERS = ["the", "a", "to", "and", "now", "please", "today", "again"]


def corrupt(text: str, rng: random.Random, vocabulary: list[str]) -> str:
    """A transcript with one typical recognition error."""
    words = text.split()
    kind = rng.choice(["substitute", "delete", "repeat", "tail"])
    if kind == "substitute" or len(words) < 3:
        i = rng.randrange(len(words))
        words[i] = rng.choice([w for w in vocabulary if w != words[i]])
    elif kind == "delete":
        del words[rng.randrange(len(words))]
    elif kind == "repeat":  # a hallucination loop
        i = rng.randrange(len(words) - 1)
        words = words[: i + 2] + words[i : i + 2] + words[i + 2 :]
    else:
        words += rng.sample(_FILLERS, 2)
    out = " ".join(words)
    return out if out != text else out + " " + rng.choice(_FILLERS)


@dataclass
class QuickstartData:
    train_manifest: Path
    eval_manifest: Path
    texts: list[str]


def make_data(workdir: Path, seed: int = 0) -> QuickstartData:
    """Speak the sentences and write train (preference) and eval (transcript) manifests."""
    from audiorl.progress import progress_bar

    espeak_binary()  # fail early, with the install hint, if it is missing
    rng = random.Random(seed)
    vocabulary = sorted({w for s in SENTENCES for w in s.split()})
    audio_dir = workdir / "audio"
    train_rows, eval_rows = [], []
    jobs = [(s, v) for v in TRAIN_VOICES for s in SENTENCES] + [(s, EVAL_VOICE) for s in SENTENCES]
    with progress_bar("speaking (espeak-ng)", total=len(jobs)) as advance:
        for sentence, (voice, speed, pitch) in jobs:
            name = f"{voice.replace('+', '_')}-{SENTENCES.index(sentence):03d}.wav"
            speak(sentence, audio_dir / name, voice=voice, speed=speed, pitch=pitch)
            if (voice, speed, pitch) == EVAL_VOICE:
                eval_rows.append({"audio": f"audio/{name}", "text": sentence, "voice": voice})
            else:
                rejected = corrupt(sentence, rng, vocabulary)
                train_rows.append({"audio": f"audio/{name}", "chosen": sentence, "rejected": rejected, "voice": voice})
            advance()
    train_manifest = workdir / "train.jsonl"
    eval_manifest = workdir / "eval.jsonl"
    train_manifest.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    eval_manifest.write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    texts = SENTENCES + [r["rejected"] for r in train_rows]
    return QuickstartData(train_manifest, eval_manifest, texts)


def quickstart_config(workdir: Path, model_dir: Path, data: QuickstartData, max_steps: int) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {"family": "whisper", "name_or_path": str(model_dir), "language": "en"},
            "data": {"train": str(data.train_manifest), "eval": str(data.eval_manifest), "max_audio_seconds": 5.0},
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
                "learning_rate": 3e-3,
                "warmup_ratio": 0.05,
                "lr_scheduler_type": "cosine",
                "logging_steps": 10,
                "eval_steps": max(max_steps // 4, 1),
                "save_steps": max_steps,
                "resume": "never",
                "generation_max_new_tokens": 24,
                "num_threads": 2,
            },
            "tracking": {"experiment_name": "audiorl-quickstart", "run_name": "quickstart-mpo"},
        }
    )


def run(workdir: str | Path = "audiorl-quickstart", max_steps: int = 600, seed: int = 0):
    from audiorl.api import train
    from audiorl.models.whisper import build_tiny_whisper
    from audiorl.progress import console

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data = make_data(workdir, seed=seed)
    console.print(f"data: {data.train_manifest} (pairs), {data.eval_manifest} (held-out voice)")
    model_dir = build_tiny_whisper(workdir / "tiny-whisper", data.texts, vocab_size=400, d_model=128, ffn_dim=512, seed=seed)
    console.print(f"model: tiny Whisper with random weights in {model_dir}")
    cfg = quickstart_config(workdir, model_dir, data, max_steps)
    config_path = workdir / "quickstart.yaml"
    config_path.write_text(cfg.to_yaml())
    outcome = train(cfg)
    return config_path, outcome
