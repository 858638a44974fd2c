"""Batched transcription of test sets, scored by `audiorl.scoring`.

Clips are sorted by length before batching so that padding and decoding steps are not wasted;
results come back in the original order. Decoding is greedy (one beam) unless told otherwise, and
the result says so.

The step-0 transcripts can be kept on disk (`train.eval_before_cache_dir`), keyed by a hash of the
starting weights themselves, the whole model section (prompt and instruction included), the test
set's content, the decoding settings, the device kind and the code and library versions: runs
that start from the same weights (a learning-rate sweep; seeds too, unless a seeded LoRA
initialisation makes their weights differ) decode each test set once between them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from audiorl.audio import AudioLimits
from audiorl.config import TextNormalization
from audiorl.data.records import Record, fingerprint
from audiorl.lazy import on_first_use
from audiorl.models.base import ModelAdapter, model_source, weights_digest
from audiorl.progress import progress_bar
from audiorl.scoring import EvalResult, pooled, score

# needed for the step-0 cache key only
transformers: Any = on_first_use("transformers")
store: Any = on_first_use("audiorl.tracking.store")


@torch.no_grad()
def transcribe(
    adapter: ModelAdapter,
    records: list[Record],
    limits: AudioLimits,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    description: str = "transcribing",
) -> list[str]:
    """Greedy transcripts for `records`, in their order."""
    # sort by length (from the headers) so each batch pads little; decode one batch at a time
    order = sorted(range(len(records)), key=lambda i: records[i].duration())
    texts: list[str] = [""] * len(records)
    was_training = adapter.model.training
    adapter.model.eval()
    try:
        with progress_bar(description, total=len(records)) as advance:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                context = adapter.encode(adapter.features([records[i].load(limits) for i in rows]))
                generated = adapter.generate(context, max_new_tokens=max_new_tokens)
                for row, text in zip(rows, generated.texts):
                    texts[row] = text
                advance(len(rows))
    finally:
        adapter.model.train(was_training)
    return texts


def evaluate(
    adapter: ModelAdapter,
    records: list[Record],
    limits: AudioLimits,
    *,
    normalization: TextNormalization | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    description: str = "evaluating",
) -> EvalResult:
    hypotheses = transcribe(
        adapter, records, limits, batch_size=batch_size, max_new_tokens=max_new_tokens, description=description
    )
    return score_transcripts(records, hypotheses, normalization)


def score_transcripts(records: list[Record], hypotheses: list[str], normalization: TextNormalization | None) -> EvalResult:
    return score([r.reference for r in records], hypotheses, normalization, sources=[r.source for r in records],
                 hotwords=[r.extra.get("hotwords") for r in records])


@dataclass
class Evaluator:
    """The test sets of a training run, and the one place they are scored and logged.

    Called with a step number, it decodes every set with the adapter it holds, logs the metrics
    and each set's per-utterance JSON to the run, prints a line per set and returns the metrics.
    One test set keeps the plain names (`eval/wer`, `eval/step-N.json`); several get
    `eval/<set>/...` each, and `eval/wer` is then the corpus WER over all of them. The first
    evaluation at step 0 is kept as `before`, for the chart and the outcome.
    """

    adapter: ModelAdapter
    sets: dict[str, list[Record]]
    limits: AudioLimits
    normalization: TextNormalization
    batch_size: int
    max_new_tokens: int
    tracker: Any
    console: Any
    before: dict[str, float] = field(default_factory=dict)
    before_cache: str | Path | None = None  # train.eval_before_cache_dir

    def __post_init__(self) -> None:
        self.several = len(self.sets) > 1
        self.prefixes = {name: f"eval/{name}/" if self.several else "eval/" for name in self.sets}

    def __bool__(self) -> bool:
        return bool(self.sets)

    def __call__(self, step: int, adapter: ModelAdapter | None = None) -> dict[str, float]:
        """Score every set with the run's adapter (or `adapter`, e.g. the exported model)."""
        cached = bool(self.before_cache) and step == 0 and adapter is None and not self.before
        key = self._before_key() if cached and self._cache_folder() else None
        results = {}
        for name, records in self.sets.items():
            description = f"eval {name} @ step {step}" if self.several else f"eval @ step {step}"
            path = self._before_file(key, records) if key else None
            hypotheses = self._read_before(path, name, records) if path else None
            if hypotheses is None:
                hypotheses = transcribe(adapter or self.adapter, records, self.limits, batch_size=self.batch_size,
                                        max_new_tokens=self.max_new_tokens, description=description)
                if path:
                    self._write_before(path, name, hypotheses)
            results[name] = score_transcripts(records, hypotheses, self.normalization)
        metrics: dict[str, float] = {}
        for name, result in results.items():
            metrics.update(result.metrics(self.prefixes[name]))
            self.tracker.log_dict(result.to_dict(), f"{self.prefixes[name]}step-{step:06d}.json")
            if self.several:
                self.console.print(f"eval @ step {step} {name}: WER {result.wer:.3f}  CER {result.cer:.3f}")
        overall = pooled(list(results.values()), self.normalization) if self.several else next(iter(results.values()))
        if self.several:
            metrics.update(overall.metrics("eval/"))
        self.tracker.log_metrics(metrics, step)
        if step == 0 and not self.before:
            self.before.update(metrics)
        self.console.print(f"eval @ step {step}{' (all sets)' if self.several else ''}: WER {overall.wer:.3f}  CER {overall.cer:.3f}")
        return metrics

    def _before_key(self) -> dict[str, Any]:
        """What the step-0 transcripts depend on besides the test set."""
        return {"weights": weights_digest(self.adapter.model), "model": model_source(self.adapter),
                "model_config": self.adapter.config.model_dump(mode="json"), "limits": repr(self.limits), "batch_size": self.batch_size,
                "max_new_tokens": self.max_new_tokens, "device": self.adapter.device.type, "code": store.code_version(),
                "torch": torch.__version__, "transformers": transformers.__version__}

    def _cache_folder(self) -> bool:
        """Whether the cache folder exists or could be made (if not, the run decodes without it)."""
        try:
            Path(self.before_cache).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self.console.print(f"[yellow]train.eval_before_cache_dir {self.before_cache}: cannot create it ({exc}); decoding without the cache[/]")
            return False
        return True

    def _before_file(self, key: dict[str, Any], records: list[Record]) -> Path:
        key = {**key, "records": fingerprint(records)}
        return Path(self.before_cache) / f"eval-before-{hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]}.json"

    def _write_before(self, path: Path, name: str, hypotheses: list[str]) -> None:
        # a file of our own, renamed into place: writers on other hosts sharing the folder never
        # leave half a file or take each other's; a folder that cannot be written costs the cache only
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({"test_set": name, "hypotheses": hypotheses}, f)
            os.replace(tmp, path)
        except OSError as exc:
            self.console.print(f"[yellow]{path}: cannot write the step-0 transcripts of {name} ({exc}); the run goes on without them[/]")
            if tmp:
                Path(tmp).unlink(missing_ok=True)

    def _read_before(self, path: Path, name: str, records: list[Record]) -> list[str] | None:
        if not path.exists():
            return None
        try:
            hypotheses = json.loads(path.read_text())["hypotheses"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.console.print(f"[yellow]{path}: unreadable ({exc}); decoding {name} again[/]")
            return None
        if not isinstance(hypotheses, list) or len(hypotheses) != len(records) or not all(isinstance(h, str) for h in hypotheses):
            self.console.print(f"[yellow]{path}: does not hold one transcript per clip of {name}; decoding it again[/]")
            return None
        self.console.print(f"eval {name} @ step 0: the starting weights' transcripts from {path}")
        return hypotheses

    def wer_before_and_after(self, after: dict[str, float]) -> dict[str, dict[str, float]]:
        """{set: {"before", "after"}} for the chart; empty unless both evaluations ran."""
        if not (self.before and after):
            return {}
        return {name: {"before": self.before[prefix + "wer"], "after": after[prefix + "wer"]} for name, prefix in self.prefixes.items()}
