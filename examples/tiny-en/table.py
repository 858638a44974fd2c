"""Rebuild the README's table "Real gains on tiny.en": every method against plain fine-tuning.

Run from the repository root after the data commands in the README (the quickstart and four
`audiorl data synth` calls):

    python examples/tiny-en/table.py

1. the learning rate of SFT and MPO is chosen from 1e-5, 3e-5 and 1e-4 by WER on a validation
   split (`data/tiny-en-val`: other sentences in the same hard conditions), never on a test set;
2. every method then runs with the same 120 tuning clips and the same 40 optimizer steps, SFT and
   MPO over three seeds, DPO at MPO's rate; the no-speech pair (SFT against GRPO, on the same
   clips plus 30 without speech) at SFT's rate;
3. the table is read back from the MLflow runs (eval/<set>/wer, eval/no-speech/no_speech_output_rate,
   the run's wall time) and printed as Markdown.

`--report` prints the table from the runs that have finished and runs nothing. A run that already finished (its MLflow run FINISHED, its final model written) is read, not run again.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

RATES = ["1e-5", "3e-5", "1e-4"]
SEEDS = [42, 43, 44]
VALIDATION = "{tune-clean: data/tiny-en-val/validation.jsonl, tune-noisy: data/tiny-en-val/validation-noisy.jsonl}"
TEST_SETS = ["heldout-clean", "heldout-noisy", "general"]
RUNS = Path("runs/tiny-en")


def _finished_run(out: Path):
    """(client, run) of an output folder's MLflow run, if it ran to the end (the pointer is written at the start)."""
    from mlflow.tracking import MlflowClient

    pointer = out / "mlflow-run.json"
    if not pointer.exists():
        return None
    pointer = json.loads(pointer.read_text())
    client = MlflowClient(pointer["tracking_uri"])
    run = client.get_run(pointer["run_id"])
    return (client, run) if run.info.status == "FINISHED" and (out / "final").exists() else None


REPORT_ONLY = "--report" in sys.argv  # print the table from the runs that finished; run nothing


def train(recipe: str, name: str, *overrides: str) -> dict:
    """Run one recipe (unless done) and return its final metrics and wall time from MLflow."""
    out = RUNS / name
    finished = _finished_run(out)
    if finished is None and REPORT_ONLY:
        return {}
    if finished is None:
        command = ["audiorl", "train", f"examples/tiny-en/{recipe}.yaml", "--set", f"train.output_dir={out}",
                   "--set", f"tracking.run_name={name}", *[part for o in overrides for part in ("--set", o)]]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        finished = _finished_run(out)
        if finished is None:
            raise SystemExit(f"{out}: the run ended without a finished MLflow run")
    client, run = finished
    metrics = dict(run.data.metrics)
    metrics["minutes"] = (run.info.end_time - run.info.start_time) / 60000
    for key in list(metrics):
        if key.startswith("eval/") and key.endswith(("/wer", "/no_speech_output_rate")):
            history = client.get_metric_history(run.info.run_id, key)
            metrics[key + "@0"] = min(history, key=lambda m: m.step).value
    return metrics


def validation_wer(metrics: dict) -> float:
    if not metrics:
        return float("inf")
    return (metrics["eval/tune-clean/wer"] + metrics["eval/tune-noisy/wer"]) / 2


def main() -> None:
    chosen = {}
    for method in ("sft", "mpo"):
        scores = {rate: validation_wer(train(method, f"sweep-{method}-{rate}", f"train.learning_rate={rate}", f"data.eval={VALIDATION}",
                                             "tracking.log_model=false"))
                  for rate in RATES}
        chosen[method] = min(scores, key=scores.get)
        print(f"{method}: validation WER by learning rate {scores} -> {chosen[method]}", flush=True)
    rates = {"sft": chosen["sft"], "mpo": chosen["mpo"], "dpo": chosen["mpo"], "no-speech-sft": chosen["sft"], "no-speech-grpo": chosen["sft"]}
    rows: dict[str, list[dict]] = {method: [] for method in rates}
    # every method once first, then the other seeds of the top two
    for seed in SEEDS:
        for method in rates if seed == SEEDS[0] else ("sft", "mpo"):
            rows[method] += [m for m in [train(method, f"{method}-seed{seed}", f"train.learning_rate={rates[method]}", f"train.seed={seed}")] if m]

    def cell(runs: list[dict], key: str, fmt: str = "{:.3f}") -> str:
        values = [r[key] for r in runs if key in r]
        if not values:
            return "n/a"
        if len(values) == 1:
            return fmt.format(values[0])
        return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"

    if not any(rows.values()):
        raise SystemExit("no run of the table has finished yet")
    first = next(runs[0] for runs in rows.values() if runs)
    print("\n| model | learning rate | " + " | ".join(f"{s} WER" for s in TEST_SETS) + " | no-speech clips written on | minutes |")
    print("|---|---|" + "---|" * (len(TEST_SETS) + 2))
    print("| base (tiny.en) | | " + " | ".join(f"{first[f'eval/{s}/wer@0']:.3f}" for s in TEST_SETS)
          + f" | {first.get('eval/no-speech/no_speech_output_rate@0', float('nan')):.0%} | |")
    for method, runs in rows.items():
        if not runs:
            continue
        seeds = f" ({len(runs)} seeds)" if len(runs) > 1 else ""
        print(f"| {method}{seeds} | {rates[method]} | " + " | ".join(cell(runs, f"eval/{s}/wer") for s in TEST_SETS)
              + f" | {cell(runs, 'eval/no-speech/no_speech_output_rate', '{:.0%}')} | {cell(runs, 'minutes', '{:.1f}')} |")


if __name__ == "__main__":
    sys.exit(main())
