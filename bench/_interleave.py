"""Interleaved timing for benchmarks on a shared machine.

Other work on the machine comes and goes over minutes: timing variant A to the end and then B
puts a different load under each. Running them round-robin (A B, B A, ...) puts every round's
variants under about the same load, so the per-round ratio (baseline time / variant time) holds
even when the seconds drift; the median of those ratios and their spread are what to read.

A variant is a callable or a command (a list of strings, run as a fresh process). A callable
that returns a number reports its own time in seconds (a step timed inside a worker process,
say); one that returns None is timed here, wall clock.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Variant = Callable[[], "float | None"] | Sequence[str]


def add_arguments(parser: argparse.ArgumentParser, rounds: int = 5, warmup: int = 0, aliases: Sequence[str] = ()) -> None:
    parser.add_argument("--rounds", *aliases, type=int, default=rounds, help="interleaved rounds, each times every variant once")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed rounds first")
    parser.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                        help="the same variant order every round (by default each round's order is shuffled, seeded)")


def measure(variant: Variant) -> float:
    start = time.perf_counter()
    if callable(variant):
        reported = variant()
        return time.perf_counter() - start if reported is None else float(reported)
    done = subprocess.run(list(variant), check=False, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(variant)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return elapsed


def interleave(variants: dict[str, Variant], rounds: int, *, warmup: int = 0, shuffle: bool = True, seed: int = 0,
               progress: bool = False) -> dict[str, list[float]]:
    """Per-round times of each variant: `warmup` untimed rounds, then `rounds` timed ones."""
    rng = random.Random(seed)  # the same orders on a rerun
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(-warmup, rounds):
        order = list(variants)
        if shuffle:
            rng.shuffle(order)  # so no variant always runs right after another (warm caches, a load spike)
        took = {name: measure(variants[name]) for name in order}
        if r >= 0:
            for name, seconds in took.items():
                times[name].append(seconds)
        if progress:
            label = f"round {r + 1}/{rounds}" if r >= 0 else "warm-up"
            print(f"  {label}: " + ", ".join(f"{name} {seconds:.4g} s" for name, seconds in took.items()), flush=True)
    return times


@dataclass
class Spread:
    median: float
    low: float
    high: float
    q1: float
    q3: float


def spread(values: Sequence[float]) -> Spread:
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return Spread(statistics.median(values), min(values), max(values), q1, q3)


def ratios(times: dict[str, list[float]], baseline: str) -> dict[str, list[float]]:
    """Per round, the baseline's time over each variant's (above 1: faster than the baseline)."""
    return {name: [b / t for b, t in zip(times[baseline], values)] for name, values in times.items()}


def print_table(times: dict[str, list[float]], baseline: str, *, unit: str = "s", label: str = "variant",
                extra: dict[str, dict[str, str]] | None = None) -> None:
    """Median time and median speed-up vs the baseline with its min-max and IQR; `extra`: more columns."""
    extra = extra or {}
    stats = {name: spread(r) for name, r in ratios(times, baseline).items()}
    width, median = max(len(label), *map(len, times)), f"median {unit}"
    head = f"{label:<{width}} {median:>{len(median)}} {'speed-up':>9} {'min-max':>13} {'IQR':>13}"
    print(head + "".join(f" {column:>10}" for column in extra))
    for name, values in times.items():
        s = stats[name]
        row = (f"{name:<{width}} {statistics.median(values):{len(median)}.4g} {s.median:8.2f}x "
               f"{f'{s.low:.2f}-{s.high:.2f}x':>13} {f'{s.q1:.2f}-{s.q3:.2f}x':>13}")
        print(row + "".join(f" {column.get(name, '-'):>10}" for column in extra.values()))
    n = len(times[baseline])
    print(f"(speed-up per round: {baseline} time / this row's time; median, min-max and interquartile range "
          f"over {n} round{'s' * (n != 1)})")
