"""What the CLI does, one import away:

    import audiorl
    cfg = audiorl.load_config("examples/my-run.yaml", ["train.max_steps=50"])
    outcome = audiorl.train(cfg)
    result = audiorl.evaluate(outcome.final_model_dir, "data/test.jsonl")
    print(result.wer)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from audiorl.audio import AudioLimits
from audiorl.config import ModelConfig, RunConfig, TextNormalization, load_config
from audiorl.data.records import Record, Rejected, fingerprint, read_records, validate_records
from audiorl.errors import ConfigError, DataError
from audiorl.models.base import ModelAdapter
from audiorl.models.registry import detect_family, load_adapter
from audiorl.progress import console
from audiorl.runtime import resolve_device, seed_everything
from audiorl.tracking import Tracker
from audiorl.trainer import Preempted, TrainResult


@dataclass
class TrainOutcome:
    output_dir: Path
    final_model_dir: Path
    result: TrainResult
    run_id: str | None
    tracking: str
    skipped: list[Rejected] = field(default_factory=list)
    eval_before: dict[str, float] = field(default_factory=dict)

    def wer_by_set(self) -> list[tuple[str, float | None, float, float]]:
        """(test set, WER before, WER after, CER after) per test set, then over all of them
        ("all sets"; a single unnamed set is "eval"); empty without evaluation."""
        after, before = self.result.eval_metrics, self.eval_before
        if not after:
            return []
        sets = list(dict.fromkeys(key.split("/")[1] for key in after if key.count("/") == 2))
        rows = [(name, f"eval/{name}/") for name in sets] + [("all sets" if sets else "eval", "eval/")]
        return [(name, before.get(prefix + "wer"), after[prefix + "wer"], after[prefix + "cer"]) for name, prefix in rows]


def _text_check(adapter: ModelAdapter, max_tokens: int, kind: str):
    def check(record: Record) -> None:
        texts = [record.chosen, record.rejected] if kind == "preference" else [record.reference]
        for text, ids in zip(texts, adapter.target_ids(texts)):
            if len(ids) > max_tokens:
                raise DataError(
                    f"{record.source}: transcript {text[:30]!r}... is {len(ids)} tokens, over the limit of "
                    f"{max_tokens} (data.max_target_tokens / the model's maximum)"
                )

    return check


def load_records(
    path: str, adapter: ModelAdapter, limits: AudioLimits, kind: str, *, on_bad: str, max_tokens: int | None, label: str
) -> tuple[list[Record], list[Rejected]]:
    records = read_records(path, kind)  # type: ignore[arg-type]
    limit = min(max_tokens or adapter.max_target_tokens, adapter.max_target_tokens)
    good, bad = validate_records(
        records, limits, on_bad=on_bad, text_check=_text_check(adapter, limit, kind), description=f"checking {label}"  # type: ignore[arg-type]
    )
    if bad:
        console.print(f"[yellow]{label}: skipped {len(bad)} of {len(records)} records (data.on_bad_record=skip)[/]")
    return good, bad


def _reference(cfg: RunConfig, adapter, dataset, collate, data_fp: str):
    """The DPO/GRPO reference: precomputed and cached, the LoRA-disabled network, or a frozen copy."""
    from audiorl.reference import AdapterDisabledReference, FrozenReference, precompute_reference, reference_cache_key

    if cfg.objective.precompute_reference:
        return precompute_reference(
            adapter,
            dataset,
            collate,
            batch_size=cfg.train.per_device_eval_batch_size,
            cache_dir=Path(cfg.train.output_dir) / "cache",
            key=reference_cache_key(adapter, data_fp),
            num_workers=cfg.data.num_workers,
        )
    if adapter.uses_lora:
        return AdapterDisabledReference(adapter)
    return FrozenReference(adapter)


def build_recipe(cfg: RunConfig, adapter: ModelAdapter, dataset, data_fp: str):
    """The objective's recipe (batch -> loss) and the collator its batches need."""
    from audiorl.data.collate import PreferenceCollator, TranscriptCollator
    from audiorl.recipes import GRPORecipe, PreferenceRecipe, SFTRecipe, disable_dropout
    from audiorl.rewards import build_reward

    objective = cfg.objective
    if objective.name == "dpo":
        if objective.disable_dropout:
            disable_dropout(adapter.model)
        collate = PreferenceCollator(adapter)
        return PreferenceRecipe(adapter, objective, _reference(cfg, adapter, dataset, collate, data_fp)), collate
    collate = TranscriptCollator(adapter)
    if objective.name == "grpo":
        # TRL's convention: beta 0 loads no reference model
        reference = _reference(cfg, adapter, dataset, collate, data_fp) if objective.beta != 0.0 else None
        reward = build_reward([r.model_dump() for r in objective.rewards], cfg.data.normalize)
        return GRPORecipe(adapter, objective, reference, reward, seed=cfg.train.seed), collate
    return SFTRecipe(adapter, objective.ctc_weight), collate


def train(config: RunConfig | str | Path, overrides: list[str] | None = None) -> TrainOutcome:
    """Train as the config says; returns where the final model and the MLflow run are."""
    from audiorl.data.collate import RecordDataset
    from audiorl.evaluation import evaluate as run_eval
    from audiorl.scoring import pooled
    from audiorl.trainer import Trainer

    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    if cfg.data.train is None:
        raise ConfigError("data.train: required for training (a JSONL manifest or a saved dataset)")
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    from audiorl import distributed

    device = resolve_device(cfg.train.device)
    dist_info = distributed.init(device, cfg.train.distributed.timeout_s)
    device = distributed.rank_device(device, dist_info)
    if not dist_info.is_main:
        os.environ["AUDIORL_NO_PROGRESS"] = "1"  # one progress bar per job, rank 0's
    seed_everything(cfg.train.seed)
    fsdp = dist_info.enabled and cfg.train.distributed.strategy == "fsdp"
    if fsdp and cfg.model.lora is not None:
        raise ConfigError("train.distributed.strategy=fsdp with model.lora is not supported yet; use ddp (LoRA keeps memory low)")
    output_dir = Path(cfg.train.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    adapter = load_adapter(cfg.model, device)
    if fsdp:
        # sharded modules gather their weights in collective calls that every rank must make: a
        # rank whose clips were cached would skip them while the others wait
        adapter.encoder_cache = None
    limits = AudioLimits(sampling_rate=adapter.sampling_rate, max_seconds=cfg.data.max_audio_seconds)
    kind = "preference" if cfg.objective.name == "dpo" else "transcript"
    records, skipped = [], []
    sources = cfg.data.train_sources()
    for source in sources:
        source_records, source_skipped = load_records(
            source, adapter, limits, kind, on_bad=cfg.data.on_bad_record, max_tokens=cfg.data.max_target_tokens,
            label="train data" if len(sources) == 1 else f"train data ({source})",
        )
        records += source_records
        skipped += source_skipped
    eval_sets: dict[str, list[Record]] = {}
    for set_name, path in cfg.data.eval_sets().items():
        eval_sets[set_name], eval_skipped = load_records(
            path, adapter, limits, "transcript", on_bad=cfg.data.on_bad_record, max_tokens=cfg.data.max_target_tokens,
            label=f"eval data ({set_name})",
        )
        skipped += eval_skipped
    data_fp = fingerprint(records)

    from audiorl.tracking import run_tags
    from audiorl.trainer import resume_target

    tracker = Tracker(cfg.tracking, active=dist_info.is_main)
    tags = run_tags(cfg)
    run_id = tracker.start(
        cfg,
        tags={
            **tags,
            "audiorl.data_fingerprint": data_fp,
            "audiorl.config_fingerprint": cfg.fingerprint(dist_info.world_size),
        },
        spill_dir=output_dir,
        # a run that continues from a checkpoint continues its MLflow run too
        resume=resume_target(cfg.train) is not None,
    )
    node_monitor = _watch_node(cfg, tracker, dist_info)
    if skipped and dist_info.is_main:
        lines = "\n".join(json.dumps({"source": r.source, "reason": r.reason}) for r in skipped)
        (output_dir / "skipped_records.jsonl").write_text(lines + "\n")
        tracker.log_metrics({"data/skipped_records": len(skipped)}, step=0)
        tracker.log_artifact(output_dir / "skipped_records.jsonl", "data")

    status = "FAILED"
    try:
        dataset = RecordDataset(records, limits)
        recipe, collate = build_recipe(cfg, adapter, dataset, data_fp)

        eval_before: dict[str, float] = {}

        # one test set keeps the plain names (eval/wer, eval/step-N.json); several get eval/<set>/...
        # each, and eval/wer is then the corpus WER over all of them
        several = len(eval_sets) > 1
        prefixes = {set_name: f"eval/{set_name}/" if several else "eval/" for set_name in eval_sets}

        def evaluate_now(step: int) -> dict[str, float]:
            results = {
                set_name: run_eval(
                    adapter,
                    records_of_set,
                    limits,
                    normalization=cfg.data.normalize,
                    batch_size=cfg.train.per_device_eval_batch_size,
                    max_new_tokens=cfg.train.generation_max_new_tokens,
                    description=f"eval {set_name} @ step {step}" if several else f"eval @ step {step}",
                )
                for set_name, records_of_set in eval_sets.items()
            }
            metrics: dict[str, float] = {}
            for set_name, result in results.items():
                metrics.update(result.metrics(prefixes[set_name]))
                tracker.log_dict(result.to_dict(), f"{prefixes[set_name]}step-{step:06d}.json")
                if several:
                    console.print(f"eval @ step {step} {set_name}: WER {result.wer:.3f}  CER {result.cer:.3f}")
            overall = pooled(list(results.values()), cfg.data.normalize) if several else next(iter(results.values()))
            if several:
                metrics.update(overall.metrics("eval/"))
            if step == 0 and not eval_before:
                eval_before.update(metrics)
            console.print(f"eval @ step {step}{' (all sets)' if several else ''}: WER {overall.wer:.3f}  CER {overall.cer:.3f}")
            return metrics

        # Under FSDP the sharded model cannot generate on rank 0 alone: evaluate before sharding
        # and, at the end, on the exported model.
        in_loop_eval = eval_sets and dist_info.is_main and not fsdp
        if fsdp and eval_sets and dist_info.is_main and cfg.train.eval_before_training:
            evaluate_now(0)
        trainer = Trainer(
            cfg.train,
            recipe,
            dataset,
            collate,
            device=device,
            num_workers=cfg.data.num_workers,
            evaluate=evaluate_now if in_loop_eval else None,
            log=tracker.log_metrics,
            fingerprint=cfg.fingerprint(dist_info.world_size),
            dist_info=dist_info,
        )
        result = trainer.train()
        if adapter.encoder_cache is not None and dist_info.is_main:
            cache = adapter.encoder_cache
            console.print(f"encoder cache: {cache.misses} clip encodings computed, {cache.hits} reused")
        final_dir = output_dir / "final"
        full_weights = trainer.full_state_dict()  # collective under FSDP
        if dist_info.is_main:  # every rank holds the same weights; one writes them
            adapter.save_pretrained(str(final_dir), state_dict=full_weights)
            (output_dir / "config.yaml").write_text(cfg.to_yaml())
            if fsdp and eval_sets:
                final = load_adapter(cfg.model.model_copy(update={"name_or_path": str(final_dir), "lora": None}), device)
                adapter = final
                metrics = evaluate_now(result.global_step)
                tracker.log_metrics(metrics, result.global_step)
                result.eval_metrics = metrics
            if eval_before and result.eval_metrics:
                from audiorl.plots import wer_chart

                after = result.eval_metrics
                chart = wer_chart({name: {"before": eval_before[prefix + "wer"], "after": after[prefix + "wer"]}
                                   for name, prefix in prefixes.items()},
                                  title=f"WER before and after training ({tags['audiorl.objective']})")
                tracker.log_figure(chart, "eval/wer_before_after.png")
            if cfg.tracking.log_model:
                registered = (cfg.tracking.registered_model_name or cfg.tracking.experiment_name) if cfg.tracking.register_model else None
                version = tracker.register_model(
                    final_dir,
                    cfg.model.model_copy(update={"name_or_path": str(final_dir), "lora": None}),
                    name=registered,
                    tags={key: tags[key] for key in ("audiorl.base_model", "audiorl.objective")} | {"audiorl.data_fingerprint": data_fp},
                    max_new_tokens=cfg.train.generation_max_new_tokens,
                )
                if version:
                    console.print(f"registered {registered} version {version} (alias challenger)")
        distributed.barrier()
        status = "FINISHED"
    except Preempted:
        status = "KILLED"
        raise
    finally:
        if node_monitor is not None:
            node_monitor.end()
        tracker.end(status)
        distributed.shutdown()
    return TrainOutcome(
        output_dir=output_dir,
        final_model_dir=final_dir,
        result=result,
        run_id=run_id,
        tracking=tracker.where(),
        skipped=skipped,
        eval_before=eval_before,
    )


def export_checkpoint(config: RunConfig | str | Path, checkpoint: str | Path, out: str | Path, overrides: list[str] | None = None) -> Path:
    """A checkpoint of a run (say, one stopped early or preempted) as a `save_pretrained` model,
    exactly as the run's final export would have written it at that step."""
    from audiorl.trainer import load_model_weights

    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    adapter = load_adapter(cfg.model, "cpu")
    if cfg.objective.name == "sft" and cfg.objective.ctc_weight:
        adapter.add_ctc_head()  # the checkpoint holds it; the export leaves it out
    load_model_weights(adapter.model, Path(checkpoint))
    adapter.save_pretrained(str(out))
    return Path(out)


def import_model(source: str | Path, out: str | Path, *, dtype: str = "float32") -> Path:
    """A CTranslate2 model directory as a `save_pretrained` model (see audiorl.models.ct2)."""
    from audiorl.models.ct2 import import_ct2

    return import_ct2(source, out, dtype=dtype)


def export_model(source: str | Path, out: str | Path, *, checkpoint: str | Path | None = None, format: str | None = None,
                 quantization: str = "float32", force: bool = False, overrides: list[str] | None = None) -> Path:
    """Export a model. With `checkpoint`, `source` is the run's config and the checkpoint goes out
    as the run's final export would write it (`format` "transformers", the default there) or as a
    CTranslate2 model; otherwise `source` is a saved model (a `save_pretrained` directory, which
    AudioRL writes with LoRA merged, or an MLflow model URI such as `models:/NAME@champion`) and
    goes out as a CTranslate2 model (see audiorl.models.ct2)."""
    import tempfile

    from audiorl.models.ct2 import export_ct2

    format = format or ("transformers" if checkpoint is not None else "ctranslate2")
    if format not in ("transformers", "ctranslate2"):
        raise ConfigError(f"--format {format!r}: use transformers or ctranslate2")
    if checkpoint is None:
        if format == "transformers":
            raise ConfigError("a saved model is already in the transformers format; export it with --format ctranslate2, "
                              "or give a run's config and a CHECKPOINT")
        return export_ct2(str(source), out, quantization=quantization, force=force)
    if format == "transformers":
        return export_checkpoint(Path(source), checkpoint, out, overrides)
    with tempfile.TemporaryDirectory(prefix="audiorl-export-") as tmp:
        export_checkpoint(Path(source), checkpoint, tmp, overrides)
        return export_ct2(tmp, out, quantization=quantization, force=force)


def _watch_node(cfg: RunConfig, tracker: Tracker, dist_info):
    """System metrics of this node (CPU, memory, GPU) under node-N, from its first process. Rank 0
    uses its own tracker; the first process of every other node attaches to rank 0's run."""
    from audiorl import distributed

    run = distributed.broadcast_from_main((tracker.run_id, tracker.tracking_uri))
    if not (cfg.tracking.enabled and cfg.tracking.system_metrics and run[0]) or dist_info.local_rank != 0:
        return None
    node = f"node-{distributed.node_rank()}"
    if dist_info.is_main:
        tracker.start_system_metrics(node, cfg.tracking.system_metrics_interval_s)
        return None
    side = Tracker(cfg.tracking)
    side.attach(*run)
    side.start_system_metrics(node, cfg.tracking.system_metrics_interval_s)
    return side


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
    from audiorl.evaluation import evaluate as run_eval

    adapter = model if isinstance(model, ModelAdapter) else _load_model(model, family, language, device)
    limits = AudioLimits(sampling_rate=adapter.sampling_rate, max_seconds=max_audio_seconds)

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
    from audiorl.tracking import log_evaluation

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
    # with a cache folder the encoder states land on disk, where a frozen-encoder run on the same
    # clips finds them (building trains nothing, so the encoder is frozen here anyway)
    cache = {"freeze_encoder": True, "encoder_cache_dir": str(encoder_cache_dir)} if encoder_cache_dir else {}
    adapter = _load_model(model, family, language, device, **cache)
    if encoder_cache_dir and adapter.encoder_cache is None:
        raise ConfigError(f"--encoder-cache-dir: the {adapter.family} family has no encoder cache")
    limits = AudioLimits(sampling_rate=adapter.sampling_rate, max_seconds=max_audio_seconds)
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
    from audiorl.data.builders import build_pairs
    from audiorl.rollout import SamplingSettings

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
    from audiorl.data.builders import find_hard_cases

    adapter, limits, records = _load_for_building(
        model, data, family=family, language=language, device=device, max_audio_seconds=max_audio_seconds, on_bad_record=on_bad_record,
        encoder_cache_dir=encoder_cache_dir,
    )
    return find_hard_cases(adapter, records, limits, out, **options)
