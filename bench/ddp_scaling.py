"""Samples per second of a small Whisper DPO run: 2 processes under torchrun against 1, one
thread each, the same per-process batch (weak scaling). Prints the scaling efficiency
(samples/s with 2 processes divided by twice the samples/s with 1).

    python bench/ddp_scaling.py [--steps 20] [--batch 8]

Speech comes from espeak-ng (`audiorl data synth`, 128 clips); the model is a Whisper with random weights
(d_model 256, 4 + 4 layers, 10 s windows).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="pairs per process per step")
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
        rates = {}
        for nproc in (1, 2, 1, 2):  # interleaved, the best of two each
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
            run = sorted(client.search_runs([client.get_experiment_by_name(name).experiment_id]), key=lambda r: r.info.start_time)[-1]
            history = sorted(client.get_metric_history(run.info.run_id, "samples_per_second"), key=lambda m: m.step)
            steady = [m.value for m in history[2:]]  # the first steps include warm-up
            rate = sum(steady) / len(steady)
            rates[nproc] = max(rates.get(nproc, 0.0), rate)
            print(f"  {nproc} process(es): {rate:6.2f} samples/s", flush=True)
    efficiency = rates[2] / (2 * rates[1])
    print(f"\nDPO, small Whisper, {args.batch} pairs per process per step, 1 thread per process:")
    print(f"  1 process: {rates[1]:.2f} samples/s   2 processes: {rates[2]:.2f} samples/s   "
          f"speed-up {rates[2] / rates[1]:.2f}x   scaling efficiency {efficiency:.0%}")


if __name__ == "__main__":
    main()
