"""Samples per second of a small Whisper DPO run: 2 processes under torchrun against 1, one
thread each, the same per-process batch (weak scaling), the two runs in turn over --rounds
rounds. Prints the median over rounds of the per-round speed-up (samples/s with 2 processes over
samples/s with 1 in the same round) and the scaling efficiency (the speed-up over 2), each with
its min-max and interquartile range.

    python bench/ddp_scaling.py [--steps 20] [--batch 8] [--rounds 3]

Speech comes from espeak-ng (`audiorl data synth`, 128 clips); the model is a Whisper with random weights
(d_model 256, 4 + 4 layers, 10 s windows).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _interleave import add_arguments, interleave, print_table, ratios, spread


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="pairs per process per step")
    add_arguments(parser, rounds=3)  # each round is two training runs, about a minute and a half
    args = parser.parse_args()
    from mlflow.tracking import MlflowClient

    from audiorl.data.builders import write_jsonl
    from audiorl.data.synth import SynthSettings, synthesize
    from audiorl.models.whisper import build_tiny_whisper

    env = {**os.environ, "OMP_NUM_THREADS": "1", "AUDIORL_NO_PROGRESS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = synthesize(SynthSettings(out=root / "data", num_sentences=64, utterances_per_sentence=2, seed=0)).out
        rows = [json.loads(line) for line in (corpus / "train.jsonl").read_text().splitlines()]
        # throughput does not depend on what the pairs say: the rejected side is the sentence reversed
        pairs = write_jsonl([{"audio": r["audio"], "chosen": r["text"], "rejected": " ".join(r["text"].split()[::-1])} for r in rows],
                            corpus / "pairs.jsonl")
        texts = [r["text"] for r in rows] + [" ".join(r["text"].split()[::-1]) for r in rows]
        model = build_tiny_whisper(root / "model", texts, vocab_size=400, d_model=256, encoder_layers=4,
                                   decoder_layers=4, attention_heads=4, ffn_dim=1024, chunk_seconds=10)
        uri = f"sqlite:///{root / 'mlflow.db'}"

        def train(nproc: int) -> float:
            """One training run; its seconds per sample, so that the per-round time ratio is the speed-up."""
            name = f"p{nproc}"
            config = root / f"{name}.yaml"
            config.write_text(yaml.safe_dump({
                "model": {"name_or_path": str(model)},
                "data": {"train": str(pairs), "max_audio_seconds": 10},
                "objective": {"loss_type": ["sigmoid"]},
                "train": {"output_dir": str(root / name), "max_steps": args.steps, "per_device_train_batch_size": args.batch,
                          "learning_rate": 1e-4, "logging_steps": 1, "save_steps": None, "resume": "never", "num_threads": 1},
                "tracking": {"tracking_uri": uri, "experiment_name": name},
            }))
            launcher = [sys.executable, "-m", "audiorl_cli.main"] if nproc == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={_port()}", "-m", "audiorl_cli.main"]
            subprocess.run(launcher + ["train", str(config)], check=True, env=env, capture_output=True)
            client = MlflowClient(uri)
            run = max(client.search_runs([client.get_experiment_by_name(name).experiment_id]), key=lambda r: r.info.start_time)
            history = sorted(client.get_metric_history(run.info.run_id, "samples_per_second"), key=lambda m: m.step)
            steady = [m.value for m in history[2:]]  # the first steps include warm-up
            rate = sum(steady) / len(steady)
            print(f"  {nproc} process(es): {rate:6.2f} samples/s", flush=True)
            return 1 / rate

        times = interleave({"1 process": lambda: train(1), "2 processes": lambda: train(2)}, args.rounds,
                           warmup=args.warmup, shuffle=args.shuffle)
    print(f"\nDPO, small Whisper, {args.batch} pairs per process per step, 1 thread per process, {args.rounds} rounds:")
    print_table(times, "1 process", unit="s/sample", label="processes",
                extra={"samples/s": {name: f"{statistics.median([1 / t for t in ts]):.2f}" for name, ts in times.items()}})
    e = spread([r / 2 for r in ratios(times, "1 process")["2 processes"]])
    print(f"scaling efficiency (speed-up / 2): median {e.median:.0%}, min-max {e.low:.0%}-{e.high:.0%}, "
          f"IQR {e.q1:.0%}-{e.q3:.0%}")


if __name__ == "__main__":
    main()
