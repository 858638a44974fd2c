"""A training run, top to bottom (`audiorl train`, `audiorl.train`):

1. `set_up_runtime`: threads, device, the process group under torchrun, the distributed strategy,
   the seed; progress bars from the main rank only.
2. `load_data`: the model, then the training records and the test sets, every clip decoded and
   every transcript checked against the model before anything trains.
3. `open_run`: the MLflow run with its tags and fingerprints, node metrics, the skipped records.
4. `build_method`: the method's step (batch -> loss) and collator (`audiorl.methods`).
5. `fit`: the trainer's loop; the evaluator scores the test sets whenever the strategy allows.
6. `export_and_register`: the final model written, scored if the strategy could not score it in
   the loop, charted before/after, logged and registered as the challenger.

Nothing here knows a model family or a method: the adapter and the method answer for themselves.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from audiorl import distributed, progress
from audiorl.audio import AudioLimits, limits_for
from audiorl.config import RunConfig, load_config
from audiorl.data.batching import Plan, duration_plan, epoch_batches
from audiorl.data.collate import RecordDataset
from audiorl.data.mixture import Source, draws_per_source, mixture_order, source_names
from audiorl.data.records import Record, Rejected, fingerprint, is_webdataset, load_records, shard_paths, text_check_for
from audiorl.data.streaming import BadRecords, CheckedDataset, CollateWithRejections, own_shards, rank_batches, streamed_rows
from audiorl.distributed import Dist, Strategy, strategy_for
from audiorl.errors import ConfigError, DataError
from audiorl.evaluation import Evaluator
from audiorl.methods import BuildContext, Step, method_for
from audiorl.models.base import ModelAdapter
from audiorl.models.registry import load_adapter
from audiorl.plots import wer_chart
from audiorl.progress import console
from audiorl.runtime import resolve_device, seed_everything, set_deterministic
from audiorl.secrets import redact
from audiorl.tracking import Tracker, run_tags
from audiorl.trainer import Preempted, Trainer, TrainResult, resume_target


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


@dataclass
class Runtime:
    device: torch.device
    dist: Dist
    strategy: Strategy


@dataclass
class RunData:
    adapter: ModelAdapter
    limits: AudioLimits
    train: list[Record]
    test_sets: dict[str, list[Record]]
    skipped: list[Rejected]
    fingerprint: str
    sources: list[Source] = field(default_factory=list)
    streaming_check: Callable[[Record], None] | None = None  # streaming: the transcript check each record gets when read
    # WebDataset shards dealt to ranks (streaming under several ranks): per rank, its records per
    # source; `train` is then this rank's own, `fingerprint` and `resume_fingerprint` the whole run's
    ranks: list[list[int]] | None = None
    local_fingerprint: str = ""  # what this rank's `train` holds (keys caches of it); `fingerprint` when not dealt
    resume_fingerprint: str = ""  # the records without file times: what a resumed run compares

    @property
    def total(self) -> int:
        """The run's training records, over all ranks."""
        return sum(map(sum, self.ranks)) if self.ranks is not None else len(self.train)

    def source_count(self, index: int) -> int:
        """A source's records over all ranks."""
        return sum(counts[index] for counts in self.ranks) if self.ranks is not None else self.sources[index].count

    @property
    def mixture(self) -> bool:
        return any(s.weight is not None for s in self.sources)

    @property
    def streaming(self) -> bool:
        return self.streaming_check is not None

    def __post_init__(self) -> None:
        self.local_fingerprint = self.local_fingerprint or self.fingerprint
        # what the trainer and a precomputed reference index; streaming checks each record as it is read
        self.dataset = CheckedDataset(self.train, self.limits, self.streaming_check) if self.streaming else \
            RecordDataset(self.train, self.limits)


def train(config: RunConfig | str | Path, overrides: list[str] | None = None) -> TrainOutcome:
    """Train as the config says; returns where the final model and the MLflow run are."""
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    if cfg.data.train is None:
        raise ConfigError("data.train: required for training (a JSONL manifest or a saved dataset)")
    runtime = set_up_runtime(cfg)
    data = load_data(cfg, runtime)
    tags = run_tags(cfg)  # the code version asks git: once per run
    with open_run(cfg, runtime, data, tags) as tracker:
        evaluator = Evaluator(
            data.adapter, data.test_sets, data.limits, normalization=cfg.data.normalize,
            batch_size=cfg.train.per_device_eval_batch_size, max_new_tokens=cfg.train.generation_max_new_tokens,
            tracker=tracker, console=console, before_cache=cfg.train.eval_before_cache_dir,
        )
        loss_step, collate = build_method(cfg, data, runtime)
        trainer, result = fit(cfg, runtime, data, loss_step, collate, evaluator, tracker)
        final_dir = export_and_register(cfg, runtime, data, trainer, evaluator, result, tracker, tags)
    return TrainOutcome(
        output_dir=Path(cfg.train.output_dir), final_model_dir=final_dir, result=result, run_id=tracker.run_id,
        tracking=tracker.where(), skipped=data.skipped, eval_before=evaluator.before,
    )


def set_up_runtime(cfg: RunConfig) -> Runtime:
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    set_deterministic(cfg.train.deterministic)  # here, before anything can touch cuBLAS (Trainer.train sets it too)
    device = resolve_device(cfg.train.device)
    info = distributed.init(device, cfg.train.distributed.timeout_s)
    device = distributed.rank_device(device, info)
    if not info.is_main:
        progress.silence()  # one set of progress bars per job, rank 0's
    seed_everything(cfg.train.seed)
    strategy = strategy_for(cfg.train.distributed.strategy, info)
    if strategy.sharded and cfg.model.lora is not None:
        raise ConfigError("train.distributed.strategy=fsdp with model.lora is not supported yet; use ddp (LoRA keeps memory low)")
    output = Path(cfg.train.output_dir)
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        what = "is a file, not a folder" if output.is_file() else f"cannot be written ({exc.strerror})"
        raise ConfigError(f"train.output_dir {output} {what}: point it at a folder this user can write") from None
    return Runtime(device=device, dist=info, strategy=strategy)


def load_data(cfg: RunConfig, runtime: Runtime) -> RunData:
    adapter = load_adapter(cfg.model, runtime.device)
    if not runtime.strategy.caches_encoder:
        adapter.encoder_cache = None
    limits = limits_for(adapter.sampling_rate, cfg.data.max_audio_seconds, adapter.window_seconds, min_seconds=cfg.data.min_audio_seconds)
    kind = method_for(cfg.objective).data_kind
    checks = dict(on_bad=cfg.data.on_bad_record, max_tokens=cfg.data.max_target_tokens, format=cfg.data.format)
    records: list[Record] = []
    skipped: list[Rejected] = []
    sources = cfg.data.train_sources()
    weights = cfg.data.train_weights() or [None] * len(sources)
    held: list[Source] = []
    dealt = _dealt_shards(cfg, runtime, sources)
    for index, (source, name, weight) in enumerate(zip(sources, source_names(sources), weights)):
        label = "train data" if len(sources) == 1 else f"train data ({source})"
        where = source if dealt is None else dealt[index]
        good, bad = load_records(where, adapter, limits, kind, label=label, check=not cfg.data.streaming, **checks) \
            if where else ([], [])  # type: ignore[arg-type]
        held.append(Source(name, len(records), len(good), weight))
        records += good
        skipped += bad
    test_sets: dict[str, list[Record]] = {}
    for name, path in cfg.data.eval_sets().items():
        test_sets[name], bad = load_records(path, adapter, limits, "transcript", label=f"eval data ({name})", **checks)  # type: ignore[arg-type]
        skipped += bad
    streaming_check = text_check_for(adapter, cfg.data.max_target_tokens, kind) if cfg.data.streaming else None
    own, resume_fp = fingerprint(records), fingerprint(records, mtime=False)
    ranks, run_fp = None, own
    if dealt is not None:
        every = distributed.from_every_rank(([s.count for s in held], own, resume_fp))
        ranks = [counts for counts, _, _ in every]
        run_fp, resume_fp = (hashlib.sha256("|".join(part[i] for part in every).encode()).hexdigest()[:16] for i in (1, 2))
        for source, shards, held_source in zip(sources, dealt, held, strict=True):
            if not held_source.count and (held_source.weight is not None or not records):
                raise DataError(f"train data ({source}): rank {runtime.dist.rank}'s shards ({', '.join(shards) or 'none'}) hold no "
                                f"samples; every rank needs some to draw from (write the corpus as more shards of similar size)")
    if streaming_check is not None:
        on = f" on this rank, {sum(map(sum, ranks))} on all {len(ranks)}" if ranks is not None else ""
        console.print(f"train data: {len(records)} records read{on}; each is checked when training reads it (data.streaming)")
    return RunData(adapter=adapter, limits=limits, train=records, test_sets=test_sets, skipped=skipped, fingerprint=run_fp,
                   sources=held, streaming_check=streaming_check, ranks=ranks, local_fingerprint=own, resume_fingerprint=resume_fp)


def _dealt_shards(cfg: RunConfig, runtime: Runtime, sources: list[str]) -> list[list[str]] | None:
    """This rank's shards of each source when training streams WebDataset shards under several
    ranks (`own_shards`): every shard of every source in order, dealt out; for a weighted mixture
    each source's shards dealt on their own, so that every rank draws from every source. None when
    every rank reads all the training data: one rank, no streaming, or a source that is a manifest
    (its rows are read by every rank)."""
    if not cfg.data.streaming or runtime.dist.world_size < 2:
        return None
    if not all(cfg.data.format == "webdataset" or (cfg.data.format == "auto" and is_webdataset(s)) for s in sources):
        return None
    rank, world = runtime.dist.rank, runtime.dist.world_size
    if cfg.data.train_weights() is not None:
        dealt = [own_shards(shard_paths(source), rank, world, label=f"train data ({source})") for source in sources]
        console.print(f"train data: each source's WebDataset shards dealt to {world} ranks, "
                      f"{' + '.join(str(len(mine)) for mine in dealt)} to rank 0; each rank reads its own only")
        return dealt
    every = [(index, shard) for index, source in enumerate(sources) for shard in shard_paths(source)]
    mine = own_shards(every, rank, world)
    console.print(f"train data: {len(every)} WebDataset shards dealt to {world} ranks, {len(mine)} to rank 0; each rank reads its own only")
    return [[shard for index, shard in mine if index == source] for source in range(len(sources))]


@contextlib.contextmanager
def open_run(cfg: RunConfig, runtime: Runtime, data: RunData, tags: dict[str, str]) -> Iterator[Tracker]:
    """The MLflow run (on the main rank; a no-op tracker elsewhere), ended FINISHED, KILLED on
    preemption or FAILED, and node metrics from the first process of every node."""
    output_dir = Path(cfg.train.output_dir)
    resuming = resume_target(cfg.train) is not None
    tracker = Tracker(cfg.tracking, active=runtime.dist.is_main)
    tracker.start(
        cfg,
        tags={
            **tags,
            "audiorl.data_fingerprint": data.fingerprint,
            "audiorl.config_fingerprint": cfg.fingerprint(runtime.dist.world_size),
        },
        spill_dir=output_dir,
        # a run that continues from a checkpoint continues its MLflow run too
        resume=resuming,
    )
    node_monitor = _watch_node(cfg, tracker, runtime.dist)
    if len(data.sources) > 1 and runtime.dist.is_main:
        _log_sources(cfg, data, tracker)
    if runtime.dist.is_main:
        _write_skipped(output_dir / SKIPPED_FILE, data.skipped, keep_streamed=resuming)
    if data.skipped and runtime.dist.is_main:
        tracker.log_metrics({"data/skipped_records": len(data.skipped)}, step=0)
        tracker.log_artifact(output_dir / SKIPPED_FILE, "data")
    status = "FAILED"
    try:
        yield tracker
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


SKIPPED_FILE = "skipped_records.jsonl"


def _write_skipped(path: Path, skipped: list[Rejected], *, keep_streamed: bool) -> None:
    """The records the up-front pass skipped, one JSON line each; a resumed run keeps the lines
    streaming wrote before (they count towards data.max_bad_fraction), a new run starts afresh."""
    kept = [json.dumps(row) for row in streamed_rows(path)] if keep_streamed else []
    lines = [json.dumps({"source": redact(r.source), "reason": redact(r.reason)}) for r in skipped] + kept
    if lines:
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif path.exists():
        path.unlink()


def _log_sources(cfg: RunConfig, data: RunData, tracker: Tracker) -> None:
    """Per source: its records, and for a mixture its weight's share and the draws it gives in the
    first epoch (the console and MLflow's `data/source/NAME/...` metrics at step 0)."""
    draws = _first_draws(cfg, data) if data.mixture else {}
    total_weight = sum(s.weight or 0 for s in data.sources)
    metrics: dict[str, float] = {}
    for index, source in enumerate(data.sources):
        line = f"train source {source.name}: {data.source_count(index)} records"
        metrics[f"data/source/{source.name}/records"] = data.source_count(index)
        if data.mixture:
            share = (source.weight or 0) / total_weight
            line += f", weight {source.weight:g} ({share:.0%} of draws: {draws[source.name]} in the first epoch)"
            metrics[f"data/source/{source.name}/share"] = share
            metrics[f"data/source/{source.name}/draws_per_epoch"] = draws[source.name]
        console.print(line)
    tracker.log_metrics(metrics, step=0)


def _first_draws(cfg: RunConfig, data: RunData) -> dict[str, int]:
    """A mixture's draws per source in the first epoch: of its one order, or, when shards are
    dealt to ranks, of every rank's own order over its own records (their counts are known here)."""
    if data.ranks is None:
        return draws_per_source(data.sources, mixture_order(data.sources, cfg.train.seed, 0))
    draws = dict.fromkeys((s.name for s in data.sources), 0)
    for rank, counts in enumerate(data.ranks):
        starts = [sum(counts[:i]) for i in range(len(counts))]
        own = [Source(s.name, start, count, s.weight) for s, start, count in zip(data.sources, starts, counts, strict=True)]
        for name, n in draws_per_source(own, mixture_order(own, cfg.train.seed, 0, rank=rank)).items():
            draws[name] += n
    return draws


def build_method(cfg: RunConfig, data: RunData, runtime: Runtime) -> tuple[Step, object]:
    """The method's step (batch -> loss) and the collator its batches need."""
    return build_step(cfg, data.adapter, data.dataset, data.local_fingerprint, lockstep=runtime.strategy.lockstep)


def build_step(cfg: RunConfig, adapter: ModelAdapter, dataset, data_fp: str, *, lockstep: bool = False):
    return method_for(cfg.objective).build(BuildContext(cfg, adapter, dataset, data_fp, lockstep=lockstep))


def fit(cfg: RunConfig, runtime: Runtime, data: RunData, loss_step: Step, collate, evaluator: Evaluator,
        tracker: Tracker) -> tuple[Trainer, TrainResult]:
    # a sharded model cannot generate on one rank: the base is scored before the trainer shards it
    if evaluator and runtime.strategy.evaluates_export and cfg.train.eval_before_training:
        evaluator(0)
    if data.streaming:
        collate = CollateWithRejections(collate)  # the bad records each batch met travel with it to BadRecords
    trainer = Trainer(
        cfg.train, loss_step, data.dataset, collate, device=runtime.device,
        num_workers=cfg.data.num_workers, evaluate=evaluator if evaluator and runtime.strategy.evaluates_in_loop else None,
        log=tracker.log_metrics, fingerprint=cfg.fingerprint(runtime.dist.world_size), dist_info=runtime.dist,
        # a mixture over all the records; on dealt shards each rank draws its own, through `batches`
        order=functools.partial(mixture_order, data.sources, cfg.train.seed) if data.mixture and data.ranks is None else None,
        data_fingerprint=data.resume_fingerprint,
        inspect_batch=_bad_records(cfg, runtime, data, tracker),
        batches=_batches(cfg, runtime, data),
    )
    result = trainer.train()
    if data.streaming and runtime.dist.is_main and (Path(cfg.train.output_dir) / SKIPPED_FILE).is_file():
        tracker.log_artifact(Path(cfg.train.output_dir) / SKIPPED_FILE, "data")
    cache = data.adapter.encoder_cache
    if cache is not None and runtime.dist.is_main:
        unreadable = f"; {cache.unreadable} unreadable cache file(s) replaced" if cache.unreadable else ""
        console.print(f"encoder cache: {cache.misses} clip encodings computed, {cache.hits} reused{unreadable}")
    return trainer, result


def _batches(cfg: RunConfig, runtime: Runtime, data: RunData) -> Callable[[int], list[list[int]]] | None:
    """This rank's micro-batches per epoch when they are not the trainer's slices of one seeded
    order: each rank's own records when shards are dealt to ranks (`rank_batches`, every rank as
    many as the rank with the most), or batches by length (data.batch_seconds); None for batches
    of a fixed count over all the records."""
    dealt = data.ranks is not None
    plan = _duration_plan(cfg, data, 1 if dealt else runtime.dist.world_size)
    if dealt:
        own = functools.partial(rank_batches, data.sources, cfg.train.per_device_train_batch_size, cfg.train.seed, runtime.dist.rank,
                                plan=plan)
        return functools.partial(own, length=max(distributed.from_every_rank(len(own(0)))))
    return functools.partial(epoch_batches, plan, cfg.train.seed, runtime.dist.rank) if plan is not None else None


def _duration_plan(cfg: RunConfig, data: RunData, world_size: int) -> Plan | None:
    """Batches by length of this rank's records (data.batch_seconds), grouped `world_size` at a
    time; None without data.batch_seconds, or when the model pads every clip to a fixed window,
    where every clip costs the same (said on the console)."""
    if cfg.data.batch_seconds is None:
        return None
    window = data.adapter.window_seconds
    if window is not None:
        console.print(f"[yellow]data.batch_seconds: {data.adapter.family} pads every clip to its {window:g} s input window, so "
                      f"every clip costs the same; batches stay at train.per_device_train_batch_size="
                      f"{cfg.train.per_device_train_batch_size} clips[/]")
        return None
    plan = duration_plan([record.duration() for record in data.train], cfg.data.batch_seconds, world_size)
    sizes = [len(micro) for group in plan for micro in group]
    own = " of this rank's records" if data.ranks is not None else ""
    console.print(f"batches by length (data.batch_seconds={cfg.data.batch_seconds:g}){own}: {len(plan)} batches per epoch, "
                  f"{min(sizes)}-{max(sizes)} clips per device batch")
    return plan


def _bad_records(cfg: RunConfig, runtime: Runtime, data: RunData, tracker: Tracker) -> BadRecords | None:
    """Streaming's account of the bad records it meets (None without streaming)."""
    if not data.streaming:
        return None
    return BadRecords(data.total, 0.0 if cfg.data.on_bad_record == "error" else cfg.data.max_bad_fraction,
                      Path(cfg.train.output_dir) / SKIPPED_FILE, log=tracker.log_metrics, warn=console.print, rank=runtime.dist.rank,
                      resume=resume_target(cfg.train) is not None, gather=distributed.from_every_rank if runtime.dist.enabled else None)


def export_and_register(cfg: RunConfig, runtime: Runtime, data: RunData, trainer: Trainer, evaluator: Evaluator,
                        result: TrainResult, tracker: Tracker, tags: dict[str, str]) -> Path:
    output_dir = Path(cfg.train.output_dir)
    final_dir = output_dir / "final"
    full_weights = trainer.full_state_dict()  # collective under FSDP
    if not runtime.dist.is_main:  # every rank holds the same weights; one writes them
        return final_dir
    data.adapter.save_pretrained(str(final_dir), state_dict=full_weights)
    (output_dir / "config.yaml").write_text(cfg.to_yaml())
    exported = cfg.model.model_copy(update={"name_or_path": str(final_dir), "lora": None})
    if evaluator and runtime.strategy.evaluates_export:
        result.eval_metrics = evaluator(result.global_step, adapter=load_adapter(exported, runtime.device))
    before_after = evaluator.wer_before_and_after(result.eval_metrics)
    if before_after:
        tracker.log_figure(wer_chart(before_after, title=f"WER before and after training ({tags['audiorl.objective']})"),
                           "eval/wer_before_after.png")
    if cfg.tracking.log_model:
        registered = (cfg.tracking.registered_model_name or cfg.tracking.experiment_name) if cfg.tracking.register_model else None
        version = tracker.register_model(
            final_dir, exported, name=registered,
            tags={key: tags[key] for key in ("audiorl.base_model", "audiorl.objective")} | {"audiorl.data_fingerprint": data.fingerprint},
            max_new_tokens=cfg.train.generation_max_new_tokens,
        )
        if version:
            console.print(f"registered {registered} version {version} (alias challenger)")
    return final_dir


def _watch_node(cfg: RunConfig, tracker: Tracker, info: Dist):
    """System metrics of this node (CPU, memory, GPU) under node-N, from its first process. Rank 0
    uses its own tracker; the first process of every other node attaches to rank 0's run."""
    run = distributed.broadcast_from_main((tracker.run_id, tracker.tracking_uri))
    if not (cfg.tracking.enabled and cfg.tracking.system_metrics and run[0]) or info.local_rank != 0:
        return None
    node = f"node-{distributed.node_rank()}"
    if info.is_main:
        tracker.start_system_metrics(node, cfg.tracking.system_metrics_interval_s)
        return None
    side = Tracker(cfg.tracking)
    side.attach(*run)
    side.start_system_metrics(node, cfg.tracking.system_metrics_interval_s)
    return side
