"""G rollouts per clip: AudioRL's batched sampling (audio encoded once per clip, G hypotheses
decoded together with the KV cache) against calling `generate` once per hypothesis (encoder
run again for each), interleaved over rounds in one process. Prints the median over rounds of
the per-round time ratio, with its min-max and interquartile range.

    python bench/rollout.py                        # whisper-base size, 4 clips of 30 s, G = 8, 5 rounds
    python bench/rollout.py --size tiny --rounds 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _interleave import add_arguments, interleave, print_table
from dpo_step import SIZES, build, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    add_arguments(parser, rounds=5, aliases=["--repeats"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("AUDIORL_NO_PROGRESS", "1")
    import numpy as np
    import torch

    from audiorl.rollout import SamplingSettings, sample

    seconds = args.seconds or float(SIZES[args.size][1]["chunk_seconds"])
    with tempfile.TemporaryDirectory() as tmp:
        adapter = load(build(args.size, Path(tmp)), args.threads)
    adapter.model.eval()
    rng = np.random.default_rng(0)
    waves = [(0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32) for _ in range(args.clips)]
    settings = SamplingSettings(num_generations=args.generations, max_new_tokens=args.max_new_tokens, top_k=50)

    naive, ours = "generate per hypothesis", "batched (encoder once per clip)"
    tokens = {}  # decoded per variant, to show both did the same work

    def batched():
        with torch.no_grad():
            context = adapter.encode(adapter.features(waves))
            out = sample(adapter, context, settings, generator=torch.Generator().manual_seed(0))
        tokens[ours] = sum(len(t) for t in out.token_ids)

    def one_by_one():
        tokens[naive] = 0
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for wave in waves:
                for _ in range(args.generations):
                    context = adapter.encode(adapter.features([wave]))
                    out = adapter.generate(context, max_new_tokens=args.max_new_tokens, do_sample=True, top_k=50, generator=g)
                    tokens[naive] += len(out.token_ids[0])

    times = interleave({naive: one_by_one, ours: batched}, args.rounds, warmup=args.warmup, shuffle=args.shuffle,
                       progress=True)
    print(f"\n{args.generations} rollouts x {args.clips} clips of {seconds:g} s, {args.size} size, {args.threads} thread(s), "
          f"up to {args.max_new_tokens} tokens each, {args.rounds} rounds:")
    print_table(times, naive, label="rollouts", extra={"tokens": {k: str(v) for k, v in tokens.items()}})


if __name__ == "__main__":
    main()
