"""Wall time of the operator-side commands a person types on a laptop: `audiorl --help` and
`audiorl render CONFIG`, each a fresh process, against the naive way (the same command with the
training stack, torch and transformers, imported up front as a CLI that imports everything at
the top would). Prints the best of N runs of each, interleaved, and the ratio.

    python bench/cli_startup.py [--runs 7]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "cluster-whisper-dpo.yaml"

RUN_CLI = "import sys; from audiorl_cli.main import main; sys.argv = ['audiorl', *sys.argv[1:]]; main()"
# the naive CLI: what `audiorl train` needs, imported for every command
NAIVE = "import torch, transformers, audiorl.api; " + RUN_CLI


def _time(code: str, args: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{args} failed: {done.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    commands = {"audiorl --help": ["--help"], "audiorl render": ["render", str(CONFIG), "--run-id", "bench"]}
    print(f"{'command':16} {'lazy (s)':>9} {'naive (s)':>10} {'ratio':>6}")
    for label, argv in commands.items():
        _time(RUN_CLI, argv)  # warm the file cache
        lazy, naive = [], []
        for _ in range(args.runs):
            lazy.append(_time(RUN_CLI, argv))
            naive.append(_time(NAIVE, argv))
        best, worst = min(lazy), min(naive)
        print(f"{label:16} {best:9.3f} {worst:10.3f} {worst / best:5.1f}x" + ("" if best < 0.5 else "   (over the 0.5 s budget)"))


if __name__ == "__main__":
    main()
