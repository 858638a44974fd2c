"""Wall time of the operator-side commands a person types on a laptop: `audiorl --help` and
`audiorl render CONFIG`, each a fresh process, against the naive way (the same command with the
training stack, torch and transformers, imported up front as a CLI that imports everything at
the top would). Runs the two ways of each command in turn over --rounds rounds (after a warm-up
round for the file cache) and prints the median time of each and the median over rounds of the
per-round ratio, with its min-max and interquartile range.

    python bench/cli_startup.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _interleave import add_arguments, interleave, print_table

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "cluster-whisper-dpo.yaml"

RUN_CLI = "import sys; from audiorl_cli.main import main; sys.argv = ['audiorl', *sys.argv[1:]]; main()"
# the naive CLI: what `audiorl train` needs, imported for every command
NAIVE = "import torch, transformers, audiorl.api; " + RUN_CLI
BUDGET = 0.5  # seconds: what a person at a laptop waits without noticing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, rounds=7, warmup=1, aliases=["--runs"])
    args = parser.parse_args()
    commands = {"audiorl --help": ["--help"], "audiorl render": ["render", str(CONFIG), "--run-id", "bench"]}
    for label, argv in commands.items():
        times = interleave({"naive": [sys.executable, "-c", NAIVE, *argv], "lazy": [sys.executable, "-c", RUN_CLI, *argv]},
                           args.rounds, warmup=args.warmup, shuffle=args.shuffle)
        print(f"\n{label}, a fresh process each, {args.rounds} rounds:")
        print_table(times, "naive", label="imports")
        if statistics.median(times["lazy"]) >= BUDGET:
            print(f"  lazy: over the {BUDGET} s budget")


if __name__ == "__main__":
    main()
