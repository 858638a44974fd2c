"""What the CLI does, one import away:

    import audiorl
    cfg = audiorl.load_config("examples/my-run.yaml", ["train.max_steps=50"])
    outcome = audiorl.train(cfg)
    result = audiorl.evaluate(outcome.final_model_dir, "data/test.jsonl")
    print(result.wer)
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from audiorl.audio import limits_for
from audiorl.config import ModelConfig, RunConfig, TextNormalization, load_config
from audiorl.data.builders import build_pairs, find_hard_cases
from audiorl.data.records import load_records
from audiorl.errors import ConfigError
from audiorl.evaluation import evaluate as run_eval
from audiorl.lazy import on_first_use
from audiorl.methods import method_for
from audiorl.models.base import ModelAdapter
from audiorl.models.ct2 import export_ct2, import_ct2
from audiorl.models.registry import detect_family, encoder_cache_settings, load_adapter, require_encoder_cache
from audiorl.rollout import SamplingSettings
from audiorl.run import TrainOutcome, build_step, train
from audiorl.runtime import resolve_device
from audiorl.tracking import log_evaluation
from audiorl.trainer import load_model_weights

__all__ = ["TrainOutcome", "build_step", "evaluate", "evaluate_and_log", "export_checkpoint", "export_model", "import_model",
           "make_hard_cases", "make_pairs", "train"]

# mlflow is imported when a registered model is exported, not with the library
model_versions: Any = on_first_use("audiorl.tracking.model_versions")


def export_checkpoint(config: RunConfig | str | Path, checkpoint: str | Path, out: str | Path, overrides: list[str] | None = None) -> Path:
    """A checkpoint of a run (say, one stopped early or preempted) as a `save_pretrained` model,
    exactly as the run's final export would have written it at that step."""
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    adapter = load_adapter(cfg.model, "cpu")
    method_for(cfg.objective).prepare_adapter(cfg.objective, adapter)  # what the checkpoint holds beyond the model; the export leaves it out
    load_model_weights(adapter.model, Path(checkpoint))
    adapter.save_pretrained(str(out))
    return Path(out)


def import_model(source: str | Path, out: str | Path, *, dtype: str = "float32") -> Path:
    """A CTranslate2 model directory as a `save_pretrained` model (see audiorl.models.ct2)."""
    return import_ct2(source, out, dtype=dtype)


def export_model(source: str | Path, out: str | Path, *, checkpoint: str | Path | None = None, format: str | None = None,
                 quantization: str = "float32", force: bool = False, overrides: list[str] | None = None) -> Path:
    """Export a model. With `checkpoint`, `source` is the run's config and the checkpoint goes out
    as the run's final export would write it (`format` "transformers", the default there) or as a
    CTranslate2 model; otherwise `source` is a saved model (a `save_pretrained` directory, which
    AudioRL writes with LoRA merged, or an MLflow model URI such as `models:/NAME@champion`) and
    goes out as a CTranslate2 model (see audiorl.models.ct2)."""
    format = format or ("transformers" if checkpoint is not None else "ctranslate2")
    if format not in ("transformers", "ctranslate2"):
        raise ConfigError(f"--format {format!r}: use transformers or ctranslate2")
    if checkpoint is None:
        if format == "transformers":
            raise ConfigError("a saved model is already in the transformers format; export it with --format ctranslate2, "
                              "or give a run's config and a CHECKPOINT")
        if str(source).startswith(("models:/", "runs:/")):
            with tempfile.TemporaryDirectory(prefix="audiorl-export-") as tmp:
                return export_ct2(model_versions.write_out(str(source), tmp), out, quantization=quantization, force=force)
        return export_ct2(source, out, quantization=quantization, force=force)
    if format == "transformers":
        return export_checkpoint(Path(source), checkpoint, out, overrides)
    with tempfile.TemporaryDirectory(prefix="audiorl-export-") as tmp:
        export_checkpoint(Path(source), checkpoint, tmp, overrides)
        return export_ct2(tmp, out, quantization=quantization, force=force)


def evaluate(
    model: str | Path | ModelAdapter,
    data: str | Path | Mapping[str, str | Path],
    *,
    family: str | None = None,
    language: str | None = "en",
    batch_size: int = 8,
    max_new_tokens: int = 128,
    normalization: TextNormalization | None = None,
    max_audio_seconds: float = 30.0,
    on_bad_record: str = "error",
    device: str = "auto",
):
    """Greedy-decode a manifest with a model and score it (WER, CER, per-utterance results).

    `data` is one manifest (returns one EvalResult) or a mapping of test-set names to manifests
    (returns {name: EvalResult}; the model is loaded once). The family is read from the model
    directory's config.json unless given."""
    adapter = model if isinstance(model, ModelAdapter) else _load_model(model, family, language, device)
    limits = limits_for(adapter.sampling_rate, max_audio_seconds, adapter.window_seconds)

    def one(path: str | Path, label: str):
        records, _ = load_records(str(path), adapter, limits, "transcript", on_bad=on_bad_record, max_tokens=None, label=label)
        return run_eval(
            adapter, records, limits, normalization=normalization, batch_size=batch_size,
            max_new_tokens=max_new_tokens, description=f"evaluating {label}",
        )

    if isinstance(data, Mapping):
        return {name: one(path, name) for name, path in data.items()}
    return one(data, "eval data")


def evaluate_and_log(
    model: str | Path,
    sets: Mapping[str, str | Path],
    *,
    baseline: str | Path | None = None,
    experiment: str = "audiorl-eval",
    log: bool = True,
    run_name: str | None = None,
    **options,
):
    """Evaluate `model` (and `baseline`, if given) on named test sets and log the evaluation to
    MLflow: a run with a nested run per test set and the WER chart. Returns (results, baseline
    results or None, run id or None)."""
    results = evaluate(model, sets, **options)
    before = evaluate(baseline, sets, **options) if baseline is not None else None
    run_id = None
    if log:
        run_id = log_evaluation(results, model=str(model), experiment=experiment, baseline=before,
                                baseline_model=str(baseline) if baseline is not None else None, run_name=run_name)
    return results, before, run_id


def _load_model(model: str | Path, family: str | None, language: str | None, device: str, **settings) -> ModelAdapter:
    """A saved model by path or hub id; its family from its config.json unless named."""
    family = family or detect_family(str(model))
    if family is None:
        raise ConfigError(f"{model}: cannot tell the model family from its config.json; name it (--family)")
    return load_adapter(ModelConfig(family=family, name_or_path=str(model), language=language, **settings), resolve_device(device))


def _load_for_building(model, data, *, family, language, device, max_audio_seconds, on_bad_record, encoder_cache_dir=None):
    # with a cache folder the encoder states land on disk, where a frozen-encoder run on the same clips finds them
    adapter = _load_model(model, family, language, device, **encoder_cache_settings(encoder_cache_dir))
    require_encoder_cache(adapter, encoder_cache_dir, str(model))
    limits = limits_for(adapter.sampling_rate, max_audio_seconds, adapter.window_seconds)
    records, _ = load_records(str(data), adapter, limits, "transcript", on_bad=on_bad_record, max_tokens=None, label="input data")
    return adapter, limits, records


def make_pairs(
    model: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    family: str | None = None,
    language: str | None = "en",
    device: str = "auto",
    max_audio_seconds: float = 30.0,
    on_bad_record: str = "error",
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 128,
    encoder_cache_dir: str | Path | None = None,
    **options,
):
    """Preference pairs from a model's sampled hypotheses (see audiorl.data.builders.build_pairs)."""
    adapter, limits, records = _load_for_building(
        model, data, family=family, language=language, device=device, max_audio_seconds=max_audio_seconds, on_bad_record=on_bad_record,
        encoder_cache_dir=encoder_cache_dir,
    )
    sampling = SamplingSettings(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens)
    return build_pairs(adapter, records, limits, out, sampling=sampling, **options)


def make_hard_cases(
    model: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    family: str | None = None,
    language: str | None = "en",
    device: str = "auto",
    max_audio_seconds: float = 30.0,
    on_bad_record: str = "error",
    encoder_cache_dir: str | Path | None = None,
    **options,
):
    """The clips a model fails on, for reward shaping (see audiorl.data.builders.find_hard_cases)."""
    adapter, limits, records = _load_for_building(
        model, data, family=family, language=language, device=device, max_audio_seconds=max_audio_seconds, on_bad_record=on_bad_record,
        encoder_cache_dir=encoder_cache_dir,
    )
    return find_hard_cases(adapter, records, limits, out, **options)
