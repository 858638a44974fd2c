"""Sampling G transcripts per clip: each clip's cross-attention keys and values kept once and read
by its G samples as one longer query, against the naive way (each sample decoding against its
own copy of the clip's encoder states, so its own keys and values).

GRPO and the pair builder sample G transcripts per clip. On Whisper every decoding step reads
the clip's 1500 encoder positions in every layer; with a copy per sample that read is G times the
memory traffic, and the copies themselves have to be made.

    python bench/grouped_sampling.py                  # tiny.en, 8 clips x 4 samples, 32 tokens, 5 rounds
    python bench/grouped_sampling.py --rounds 3 --generations 8

It first checks that both ways sample the same transcripts from the same per-sample seeds (exit
code 1 if fewer than 90% agree: float rounding may flip a draw that sits on a boundary), then
times them round by round in a shuffled order and prints the median of naive / grouped.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _interleave import add_arguments, interleave

from audiorl.config import ModelConfig
from audiorl.models.registry import load_adapter
from audiorl.quickstart import real_base
from audiorl.rollout import SamplingSettings, row_seeds, sample


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default="audiorl-quickstart", help="where tiny.en is imported to (once)")
    add_arguments(parser, rounds=5, warmup=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adapter = load_adapter(ModelConfig(family="whisper", name_or_path=str(real_base(Path(args.workdir))), freeze_encoder=True))
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(16000 * 4).astype(np.float32) * 0.1 for _ in range(args.clips)]
    with torch.no_grad():
        context = adapter.encode(adapter.features(waves))
    g = args.generations
    seeds = row_seeds(0, 0, list(range(args.clips)), g)
    copies = context.select(torch.arange(args.clips).repeat_interleave(g))  # clip-major, as the group's rows

    def grouped():
        return sample(adapter, context, SamplingSettings(num_generations=g, max_new_tokens=args.max_new_tokens), row_seeds=seeds,
                      early_stop=False)

    def naive():
        return sample(adapter, copies, SamplingSettings(num_generations=1, max_new_tokens=args.max_new_tokens), row_seeds=seeds,
                      early_stop=False)

    same = sum(a == b for a, b in zip(grouped().token_ids, naive().token_ids))
    total = args.clips * g
    print(f"tiny.en, {args.clips} clips x {g} samples, {args.max_new_tokens} tokens each, {args.threads} threads, "
          f"{args.rounds} rounds; {same}/{total} samples identical both ways")
    if same < 0.9 * total:
        print("the grouped path samples other transcripts than the naive one", file=sys.stderr)
        return 1
    times = interleave({"naive": lambda: naive() and None, "grouped": lambda: grouped() and None}, args.rounds, warmup=args.warmup,
                       shuffle=args.shuffle)
    ratios = [n / s for n, s in zip(times["naive"], times["grouped"])]
    print("| naive s | grouped s | naive / grouped (min-max) |\n|---|---|---|")
    print(f"| {statistics.median(times['naive']):.2f} | {statistics.median(times['grouped']):.2f} | "
          f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
