"""Scoring several transcripts per clip: cross-attention keys and values projected once per clip
against once per transcript (the naive way: each transcript with its own copy of the encoder
states).

GRPO scores G sampled transcripts per clip and DPO a chosen and a rejected one. On Whisper the
decoder's cross-attention projects the clip's 1500 encoder positions into keys and values in
every layer, which is most of the decoder's work for a short transcript; AudioRL's adapter
projects them once per clip and reads each clip's transcripts as one longer query against them.

    python bench/shared_cross_attention.py                 # tiny.en, GRPO's 8 clips x 4 and DPO's 8 x 2, 5 rounds
    python bench/shared_cross_attention.py --rounds 3 --threads 2

It first checks that both ways give the same log-probs and gradients (exit code 1 if not), then
times forward and backward of both ways round by round (in a shuffled order each round, seeded),
in the same process, and prints the median of naive / shared per layout with the range over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from audiorl.config import ModelConfig
from audiorl.models.registry import load_adapter
from audiorl.quickstart import real_base

WORDS = "the quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing matches".split()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--words", type=int, default=12, help="words per transcript")
    parser.add_argument("--workdir", default="audiorl-quickstart", help="where tiny.en is imported to (once)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    adapter = load_adapter(ModelConfig(family="whisper", name_or_path=str(real_base(Path(args.workdir))), freeze_encoder=True))
    adapter.model.train()
    layouts = {"GRPO, 8 clips x 4 samples": (8, torch.arange(8).repeat_interleave(4)),
               "DPO, 8 clips x (chosen, rejected)": (8, torch.arange(8).repeat(2))}
    failed = False
    print(f"tiny.en, {args.words}-word transcripts, forward + backward of the decoder, {args.threads} threads, {args.rounds} rounds")
    print("| layout | naive s | shared s | naive / shared (min-max) |")
    print("|---|---|---|---|")
    for label, (clips, index) in layouts.items():
        waves = [rng.standard_normal(16000 * 4).astype(np.float32) * 0.1 for _ in range(clips)]
        with torch.no_grad():
            context = adapter.encode(adapter.features(waves))
        texts = [" ".join(rng.choice(WORDS, args.words)) for _ in range(len(index))]
        targets = adapter.target_ids(texts)

        def step(shared: bool, context=context, targets=targets, index=index):
            adapter.model.zero_grad()
            start = time.perf_counter()
            out = adapter.sequence_logps(context, targets, index) if shared else adapter.sequence_logps(context.select(index), targets)
            out.token_logps.sum().backward()
            seconds = time.perf_counter() - start
            grad = adapter.model.model.decoder.layers[0].encoder_attn.k_proj.weight.grad.clone()
            return seconds, out.token_logps.detach(), grad

        _, ours, ours_grad = step(True)
        _, naive, naive_grad = step(False)
        if not (torch.allclose(ours, naive, atol=1e-5) and torch.allclose(ours_grad, naive_grad, rtol=1e-4, atol=1e-6)):
            print(f"{label}: the shared path disagrees with the naive one", file=sys.stderr)
            failed = True
            continue
        naive_s, shared_s = [], []
        order = np.random.default_rng(1)
        for _ in range(args.rounds):
            for shared in order.permutation([False, True]).tolist():  # a shuffled order each round, seeded
                (shared_s if shared else naive_s).append(step(shared)[0])
        ratios = [n / s for n, s in zip(naive_s, shared_s)]
        print(f"| {label} | {statistics.median(naive_s):.2f} | {statistics.median(shared_s):.2f} | "
              f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
