"""Drawing the next token of a batch: `torch.multinomial` on the softmax (the naive way, and what
AudioRL did before) against inverting the CDF at one uniform draw per row (`next_tokens`), both
on the same logits, interleaved over rounds. A row of Whisper's English vocabulary is 51,864
tokens; a pair-building batch is 16 clips x 4 samples = 64 rows. Prints the median time per
draw and the speed-up.

    python bench/sampling.py                       # 64 rows x 51,864 tokens, 2 threads, 5 rounds
    python bench/sampling.py --rows 8 --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _interleave import add_arguments, interleave, print_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=51864)
    parser.add_argument("--draws", type=int, default=32, help="draws per round (one per decoded token)")
    parser.add_argument("--threads", type=int, default=2)
    add_arguments(parser, rounds=5, warmup=1)
    args = parser.parse_args()
    import torch

    from audiorl.models.sampling import next_tokens

    torch.set_num_threads(args.threads)
    logits = 4 * torch.randn(args.rows, args.vocab, generator=torch.Generator().manual_seed(0))
    naive, ours = "torch.multinomial", "inverse CDF (next_tokens)"

    def multinomial():
        generator = torch.Generator().manual_seed(0)
        for _ in range(args.draws):
            torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=generator)

    def inverse():
        generator = torch.Generator().manual_seed(0)
        for _ in range(args.draws):
            next_tokens(logits, do_sample=True, generator=generator)

    times = interleave({naive: multinomial, ours: inverse}, args.rounds, warmup=args.warmup, shuffle=args.shuffle)
    per_draw = {name: [t / args.draws for t in values] for name, values in times.items()}
    print(f"{args.draws} draws of {args.rows} rows x {args.vocab} tokens, {args.threads} thread(s), {args.rounds} rounds:")
    print_table({name: [1000 * t for t in values] for name, values in per_draw.items()}, naive, unit="ms", label="one draw")


if __name__ == "__main__":
    main()
