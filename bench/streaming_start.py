"""Time to the first training step on a 20,000-clip corpus: streaming (`data.streaming: true`,
each record checked when training reads it) against the up-front pass (every clip decoded and
checked before the first step), and the records per second each checks.

    python bench/streaming_start.py                      # 20,000 clips, 2 rounds
    python bench/streaming_start.py --clips 5000 --rounds 1

The corpus is espeak-ng speech (48 utterances: 8 sentences in 6 voices, 22,050 Hz, resampled to
16 kHz when read) behind 20,000 distinct file names (hard links), in a preference manifest. Each
variant is a whole `audiorl.train` of one step (batch 8) on a tiny Whisper from this machine, so
its time is the time to the first step plus what both share after it (saving the model, about a
second), interleaved round by round; the speed-up is up-front time / streaming time. The
records/s column is measured apart, on the same corpus: the up-front pass (`load_records`) over
every record, and streaming's checked dataset over 2,000 records in training order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _interleave import add_arguments, interleave, print_table
from eval_throughput import SENTENCES, VOICES  # the same espeak-ng speech


def build_corpus(root: Path, clips: int) -> Path:
    from audiorl.data.speech import speak

    spoken = []
    for v, voice in enumerate(VOICES):
        for s, sentence in enumerate(SENTENCES):
            path = root / "spoken" / f"{v}-{s}.wav"
            speak(sentence, path, voice=voice)
            spoken.append((path, sentence))
    (root / "clips").mkdir()
    rows = []
    for i in range(clips):
        source, sentence = spoken[i % len(spoken)]
        name = f"clips/{i:05d}.wav"
        os.link(source, root / name)
        rows.append({"audio": name, "chosen": sentence, "rejected": sentence.rsplit(" ", 1)[0]})
    manifest = root / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=1)
    add_arguments(parser, rounds=2, warmup=0)
    args = parser.parse_args()
    os.environ.setdefault("AUDIORL_NO_PROGRESS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    import audiorl
    from audiorl.audio import limits_for
    from audiorl.config import RunConfig
    from audiorl.data.records import load_records, read_records, text_check_for
    from audiorl.data.streaming import CheckedDataset
    from audiorl.models.registry import load_adapter
    from audiorl.models.whisper import build_tiny_whisper

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="audiorl-bench-streaming-") as tmp:
        root = Path(tmp)
        model = build_tiny_whisper(root / "model", SENTENCES, vocab_size=300, seed=0)
        started = time.perf_counter()
        manifest = build_corpus(root / "corpus", args.clips)
        print(f"corpus: {args.clips} clips in {manifest} ({time.perf_counter() - started:.1f} s to build)", flush=True)

        def run(streaming: bool):
            name = "streaming" if streaming else "up-front"

            def one() -> None:
                cfg = RunConfig.model_validate({
                    "model": {"name_or_path": str(model)},
                    "data": {"train": str(manifest), "streaming": streaming, "max_audio_seconds": 30},
                    "objective": {"loss_type": ["sigmoid"]},
                    "train": {"output_dir": str(root / name), "max_steps": 1, "per_device_train_batch_size": 8, "save_steps": None,
                              "resume": "never", "num_threads": args.threads, "eval_before_training": False},
                    "tracking": {"enabled": False},
                })
                audiorl.train(cfg)
            return one

        times = interleave({"up-front": run(False), "streaming": run(True)}, args.rounds, warmup=args.warmup,
                           shuffle=args.shuffle, progress=True)

        # records checked per second: the up-front pass over all, streaming's dataset over 2,000
        from audiorl.config import ModelConfig

        adapter = load_adapter(ModelConfig(name_or_path=str(model)))
        limits = limits_for(adapter.sampling_rate, 30.0, adapter.window_seconds)
        start = time.perf_counter()
        load_records(manifest, adapter, limits, "preference", on_bad="error", max_tokens=None, label="bench")
        upfront_rate = args.clips / (time.perf_counter() - start)
        records = read_records(manifest, "preference")
        dataset = CheckedDataset(records, limits, text_check_for(adapter, None, "preference"))
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(0)).tolist()[:2000]
        start = time.perf_counter()
        for index in order:
            dataset[index]
        streaming_rate = len(order) / (time.perf_counter() - start)

    rates = {"up-front": f"{upfront_rate:.0f}", "streaming": f"{streaming_rate:.0f}"}
    print(f"\n{args.clips} clips, one training step of batch 8 on a tiny Whisper, {args.threads} thread(s):")
    print_table(times, "up-front", label="variant (whole run)", extra={"records/s": rates})
    print("records/s: clips decoded and checked per second (up-front: the whole pass before training; streaming: in training order, "
          "one at a time as the DataLoader reads them)")


if __name__ == "__main__":
    main()
