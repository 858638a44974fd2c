"""The training loop. It knows a method's step (batch -> loss), the trainable module, a dataset and a
collator; it knows no model family and no method.

Order of data is a seeded permutation per epoch, and the loop counts micro-batches, so a resumed
run sees exactly the batches an uninterrupted one would. Checkpoints hold the model, optimizer,
scheduler, step, RNG states and the step's own state (`Step.state_dict`); they are written to a temporary folder
and renamed, so a crash never leaves a half-written checkpoint that `resume: auto` would pick.

Seam for distributed training: `Trainer.wrap_model` (identity in a single process); the device
comes from `audiorl.runtime.resolve_device`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from audiorl.config import TrainConfig
from audiorl.distributed import Dist, barrier, mean_across_ranks, strategy_for
from audiorl.errors import TrainingError
from audiorl.methods.base import Step
from audiorl.progress import make_progress
from audiorl.runtime import seed_everything, set_deterministic
from audiorl.safe_load import CheckpointError, load_dcp, load_pt
from audiorl.secrets import redact

CHECKPOINTS = "checkpoints"


@contextlib.contextmanager
def _quiet_single_process():
    """torch.distributed.checkpoint warns that it runs in one process, which is what we asked."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class Preempted(TrainingError):
    """SIGTERM arrived; a checkpoint was written."""

    exit_code = 143


class StepModule(nn.Module):
    """The step as a module, so that DistributedDataParallel sees one forward per step (the
    adapters call submodules directly). Only the trained model is registered: a frozen reference
    copy stays outside, untouched by DDP."""

    def __init__(self, loss_step: Step):
        super().__init__()
        self.model = loss_step.model
        self._step = [loss_step]

    def forward(self, batch: dict[str, Any]):
        return self._step[0](batch)


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast only where the hardware does it well (bf16 matmul on CPU is ~90x slower)."""
    if setting == "no":
        return None
    if setting == "fp16":
        return torch.float16
    if setting == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


@dataclass
class TrainResult:
    global_step: int
    last_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: str | None = None


def _rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and numbers only, so a checkpoint loads with
    `weights_only=True` (Python's and NumPy's own state objects would need pickle)."""
    version, words, gauss_next = random.getstate()
    _, key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py, nps = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    np.random.set_state(("MT19937", nps["key"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])



def checkpoint_dirs(output_dir: Path) -> list[Path]:
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def load_model_weights(model: nn.Module, checkpoint: Path) -> None:
    """Put a checkpoint's model weights (its `dcp/` folder, written by any number of ranks) into
    `model`; the optimizer state is left where it is."""
    if not (Path(checkpoint) / "trainer_state.json").exists():
        raise TrainingError(f"{checkpoint}: not a checkpoint folder (no trainer_state.json)")
    target = {"model": get_model_state_dict(model)}
    with _quiet_single_process():
        load_dcp(target, Path(checkpoint) / "dcp", no_dist=True)
    set_model_state_dict(model, target["model"])


def resume_target(config: TrainConfig) -> Path | None:
    """The checkpoint a run with this config continues from, if any."""
    resume = config.resume
    if resume == "never":
        return None
    if resume == "auto":
        found = checkpoint_dirs(Path(config.output_dir))
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer_state.json").exists():
        raise TrainingError(f"train.resume={resume!r}: not a checkpoint folder (no trainer_state.json)")
    return path

class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        loss_step: Step,
        dataset: Dataset,
        collate_fn: Callable,
        *,
        device: torch.device,
        num_workers: int = 0,
        evaluate: Callable[[int], dict[str, float]] | None = None,
        log: Callable[[dict[str, float], int], None] | None = None,
        fingerprint: str = "",
        dist_info: Dist | None = None,
        order: Callable[[int], list[int]] | None = None,
        data_fingerprint: str = "",
        inspect_batch: Callable[[dict, int], None] | None = None,
        batches: Callable[[int], list[list[int]]] | None = None,
    ):
        self.config = config
        self.loss_step = loss_step
        self.dataset = dataset
        self.order = order  # epoch -> the dataset's indices in order (default: a seeded permutation)
        self.data_fingerprint = data_fingerprint  # the training records' content, checked on resume
        self.inspect_batch = inspect_batch  # (batch, step): sees each batch in this process before its step (streaming's bad records)
        self.batches = batches  # epoch -> this rank's micro-batches, the same number every epoch (batches by duration)
        self.collate_fn = collate_fn
        self.device = device
        self.num_workers = num_workers
        self.evaluate = evaluate
        self.log = log or (lambda metrics, step: None)
        self.fingerprint = fingerprint
        self.output_dir = Path(config.output_dir)
        self.dist = dist_info or Dist()
        self.model = loss_step.model
        self.autocast = autocast_dtype(config.mixed_precision, device)
        self.strategy = strategy_for(config.distributed.strategy, self.dist).name
        self.module = self.wrap_model(loss_step)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise TrainingError("no trainable parameters: check model.freeze_encoder / model.lora")
        self.params = params
        self.optimizer = torch.optim.AdamW(
            params,
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon,
            weight_decay=config.weight_decay,
        )
        # one optimizer step sees per_device_train_batch_size x world_size records
        self.global_batch = config.per_device_train_batch_size * self.dist.world_size
        self.batches_per_epoch = len(batches(0)) if batches is not None else math.ceil(len(dataset) / self.global_batch)
        steps_per_epoch = math.ceil(self.batches_per_epoch * loss_step.batch_repeats / config.gradient_accumulation_steps)
        self.total_steps = config.max_steps or max(1, math.ceil(config.num_train_epochs * steps_per_epoch))
        warmup = config.warmup_steps or math.ceil(config.warmup_ratio * self.total_steps)
        from transformers import get_scheduler

        self.scheduler = get_scheduler(
            config.lr_scheduler_type, self.optimizer, num_warmup_steps=warmup, num_training_steps=self.total_steps
        )
        # fp16 gradients underflow without loss scaling; bf16 and fp32 need none
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast == torch.float16)
        self.step = 0
        self.bad_steps = 0
        self._stop_signal: int | None = None

    def wrap_model(self, loss_step: Step) -> nn.Module | None:
        """Under torchrun the step runs inside DistributedDataParallel (gradients averaged over
        ranks in backward) or FSDP2 (each transformer layer sharded on its own, the rest at the
        root; a mixed-precision policy when autocast is on). A single process calls the step."""
        if self.strategy == "single":
            return None
        if self.strategy == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(StepModule(loss_step), device_ids=ids)
        policy = MixedPrecisionPolicy(param_dtype=self.autocast, reduce_dtype=torch.float32) if self.autocast else MixedPrecisionPolicy()
        module = StepModule(loss_step)
        for layer in loss_step.adapter.shard_units():  # the family says which layers are units
            fully_shard(layer, mp_policy=policy)
        fully_shard(module, mp_policy=policy)
        return module

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Under FSDP, the whole model's weights gathered to CPU (every rank must call this);
        otherwise None: the model in memory is already whole."""
        if self.strategy != "fsdp":
            return None
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # tied weights (an output layer sharing the input embedding) come back as separate
        # copies; keep the first name only, as save_pretrained does for an unsharded model
        canonical = {id(p): n for n, p in self.model.named_parameters()}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            if canonical[id(param)] != name:
                full.pop(name, None)
        return full

    # -- data order ----------------------------------------------------------------------------

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches for an epoch: one seeded order shared by all ranks (a
        permutation, or what `order` gives: a weighted mixture's draws), cut into global batches,
        each split into equal per-rank slices (so 2 ranks of batch b see what 1 rank of batch 2b
        sees). Under several ranks a short last batch wraps around. `batches` replaces all that
        with its own (by duration)."""
        if self.batches is not None:
            return self.batches(epoch)
        if self.order is not None:
            order = self.order(epoch)
        else:
            generator = torch.Generator().manual_seed(self.config.seed + epoch)
            order = torch.randperm(len(self.dataset), generator=generator).tolist()
        size, bs, rank = self.global_batch, self.config.per_device_train_batch_size, self.dist.rank
        batches = []
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            if self.dist.enabled and len(chunk) < size:
                chunk = chunk + (order * size)[: size - len(chunk)]
            batches.append(chunk[rank * bs : (rank + 1) * bs] if self.dist.enabled else chunk)
        return batches

    def _micro_batches(self, start_micro: int):
        """Micro-batches in order from `start_micro`; each is served `batch_repeats` times in a row
        (GRPO's num_iterations reuses one batch's rollouts for several steps)."""
        repeats = self.loss_step.batch_repeats
        micro = start_micro
        while True:
            data_index, served = divmod(micro, repeats)
            epoch, position = divmod(data_index, self.batches_per_epoch)
            batches = self._epoch_batches(epoch)[position:]
            loader = DataLoader(
                self.dataset, batch_sampler=batches, collate_fn=self.collate_fn, num_workers=self.num_workers
            )
            for batch in loader:
                for _ in range(repeats - served):
                    yield epoch, batch
                    micro += 1
                served = 0

    # -- checkpoints ---------------------------------------------------------------------------

    def checkpoint_dirs(self) -> list[Path]:
        return checkpoint_dirs(self.output_dir)

    def save_checkpoint(self) -> Path:
        """Rank 0 writes the (replicated) model and optimizer; every rank adds its RNG state."""
        root = self.output_dir / CHECKPOINTS
        final = root / f"checkpoint-{self.step}"
        tmp = root / f".checkpoint-{self.step}.tmp"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        # model and optimizer through torch.distributed.checkpoint: every rank writes its shards
        # (replicated tensors once), and a later run reshards them for its own process count
        with _quiet_single_process():
            dcp.save(self._dcp_state(), checkpoint_id=str(tmp / "dcp"), no_dist=not self.dist.enabled)
        if not self.dist.is_main:
            torch.save(_rng_state(), tmp / f"rng-{self.dist.rank}.pt")
        barrier()
        if self.dist.is_main:
            self._write_checkpoint(tmp, final)
        barrier()
        return final

    def _dcp_state(self) -> dict[str, Any]:
        return {"model": get_model_state_dict(self.model), "optim": get_optimizer_state_dict(self.model, self.optimizer)}

    def _write_checkpoint(self, tmp: Path, final: Path) -> None:
        torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(
            {"rng": _rng_state(), "step": self.loss_step.state_dict(), "scaler": self.scaler.state_dict()}, tmp / "state.pt"
        )
        state = {
            "global_step": self.step,
            "micro_batches": self.step * self.config.gradient_accumulation_steps,
            "total_steps": self.total_steps,
            "world_size": self.dist.world_size,
            "bad_steps": self.bad_steps,
            "config_fingerprint": self.fingerprint,
            "data_fingerprint": self.data_fingerprint,
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        limit = self.config.save_total_limit
        if limit:
            for old in self.checkpoint_dirs()[:-limit]:
                shutil.rmtree(old, ignore_errors=True)

    def _resume_target(self) -> Path | None:
        return resume_target(self.config)

    def load_checkpoint(self, path: Path) -> None:
        """Continue from `path`. Its files are all read (safely: no code runs from them) and
        checked before anything is applied; one that does not load is a CheckpointError naming
        it, and a checkpoint of another config a TrainingError."""
        try:
            state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
            step = int(state["global_step"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path / 'trainer_state.json'}: not a trainer state ({type(exc).__name__}: {exc})") from None
        if self.fingerprint and state.get("config_fingerprint") not in (None, self.fingerprint):
            raise TrainingError(
                f"{path}: this checkpoint was written by a run with a different config; "
                "use a new train.output_dir, or train.resume=never to start over"
            )
        if self.data_fingerprint and state.get("data_fingerprint") not in (None, "", self.data_fingerprint):
            raise TrainingError(
                f"{path}: the training data changed since this checkpoint was written (the manifests' records or the clips' "
                "sizes differ, or streamed shards are dealt to another number of ranks): the data order it continues would be "
                "another; restore the data (and the number of ranks), or use a new train.output_dir"
            )
        scheduler = load_pt(path / "scheduler.pt")
        extra = load_pt(path / "state.pt")
        own_rng = path / f"rng-{self.dist.rank}.pt"
        rng = load_pt(own_rng) if own_rng.exists() else extra.get("rng") if isinstance(extra, dict) else None
        if not isinstance(extra, dict) or "step" not in extra or not isinstance(rng, dict) or not {"python", "numpy", "torch"} <= set(rng):
            raise CheckpointError(f"{path / 'state.pt'}: not a training state written by this version of AudioRL")
        target = self._dcp_state()
        with _quiet_single_process():
            load_dcp(target, path / "dcp", no_dist=not self.dist.enabled)
        set_model_state_dict(self.model, target["model"])
        set_optimizer_state_dict(self.model, self.optimizer, target["optim"])
        self.scheduler.load_state_dict(scheduler)
        _set_rng_state(rng)
        self.bad_steps = int(state.get("bad_steps", 0))
        self.loss_step.load_state_dict(extra["step"])
        if extra.get("scaler"):
            self.scaler.load_state_dict(extra["scaler"])
        self.step = step

    def resume(self) -> Path | None:
        """Load the checkpoint the config asks for and return it. With `resume: auto`, one that
        does not load (tampered, truncated) is reported and the next older one tried; when none
        loads the run stops rather than start over on top of them."""
        target = self._resume_target()
        if target is None:
            return None
        if self.config.resume != "auto":
            self.load_checkpoint(target)
            return target
        failures = []
        for candidate in reversed(self.checkpoint_dirs()):
            try:
                self.load_checkpoint(candidate)
            except CheckpointError as exc:
                failures.append(str(exc))
                print(redact(f"warning: {exc}; trying the checkpoint before it"), file=sys.stderr, flush=True)
                continue
            if failures:
                print(f"resuming from {candidate.name}, the newest checkpoint that loads", file=sys.stderr, flush=True)
            return candidate
        raise CheckpointError(
            f"no checkpoint in {self.output_dir / CHECKPOINTS} loads ({'; '.join(failures)}): move them away, or set "
            "train.resume=never to start over"
        )

    # -- the loop ------------------------------------------------------------------------------

    def _forward(self, batch: dict[str, Any]):
        run = self.module if self.module is not None else self.loss_step
        if self.autocast is None:
            return run(batch)
        with torch.autocast(device_type=self.device.type, dtype=self.autocast):
            return run(batch)

    def train(self) -> TrainResult:
        cfg = self.config
        seed_everything(cfg.seed)
        set_deterministic(cfg.deterministic)
        result = TrainResult(global_step=0)
        target = self.resume()
        if target is not None:
            result.resumed_from = str(target)
            if self.dist.is_main:
                print(f"resumed from {target.name}: step {self.step} of {self.total_steps}", file=sys.stderr, flush=True)
        if self.evaluate and cfg.eval_before_training and self.step == 0:
            self._run_eval(result)
        accum = cfg.gradient_accumulation_steps
        self.model.train()
        window: dict[str, list[float]] = defaultdict(list)
        window_samples, window_start = 0, time.perf_counter()
        previous = self._catch_sigterm()
        try:
            with make_progress() as progress:
                task = progress.add_task("training", total=self.total_steps, completed=self.step, status="")
                micro_in_step = 0
                batches = self._micro_batches(self.step * accum)
                while self.step < self.total_steps:
                    epoch, batch = next(batches)
                    if self.inspect_batch is not None:
                        self.inspect_batch(batch, self.step)
                    micro_in_step += 1
                    last_micro = micro_in_step == accum
                    # under DDP, gradients are averaged over ranks on the last micro-batch only
                    with self._gradient_sync(last_micro):
                        out = self._forward(batch)
                        self.scaler.scale(out.loss / accum).backward()
                    if torch.isfinite(out.loss.detach()):
                        window["loss"].append(out.loss.item())
                        for key, value in out.metrics.items():
                            window[key].append(float(value))
                    window_samples += len(batch["index"])
                    if not last_micro:
                        if self._preempted():
                            # no need to finish the accumulation: the last completed step is
                            # what the checkpoint holds, and this step's data is seen again
                            self.optimizer.zero_grad(set_to_none=True)
                            self._stop_after_checkpoint()
                        continue
                    micro_in_step = 0
                    grad_norm = self._optimizer_step()
                    self.step += 1
                    if math.isfinite(grad_norm):
                        window["grad_norm"].append(grad_norm)
                    else:
                        self._count_bad_step()
                    last_loss = window.get("loss", [float("nan")])[-1]
                    progress.update(task, completed=self.step, status=f"loss {last_loss:.4f}")
                    if self.step % cfg.logging_steps == 0 or self.step == self.total_steps:
                        elapsed = max(time.perf_counter() - window_start, 1e-9)
                        metrics = {k: float(np.mean(v)) for k, v in window.items()}
                        metrics.update(
                            learning_rate=self.scheduler.get_last_lr()[0],
                            samples_per_second=window_samples / elapsed,
                            epoch=epoch + 1,
                            bad_steps=self.bad_steps,
                        )
                        metrics = mean_across_ranks(metrics, self.device)
                        metrics["samples_per_second"] *= self.dist.world_size
                        self.log(metrics, self.step)
                        result.last_metrics = metrics
                        window.clear()
                        window_samples, window_start = 0, time.perf_counter()
                    if self._preempted():
                        self._stop_after_checkpoint()
                    if self.evaluate and cfg.eval_steps and self.step % cfg.eval_steps == 0 and self.step != self.total_steps:
                        self._run_eval(result)
                        self.model.train()
                    if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step != self.total_steps:
                        self.save_checkpoint()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if cfg.save_steps:
            self.save_checkpoint()
        if self.evaluate:
            self._run_eval(result)
        result.global_step = self.step
        return result

    def _gradient_sync(self, sync: bool):
        """Average gradients over ranks only on a step's last micro-batch."""
        if self.strategy == "ddp" and not sync:
            return self.module.no_sync()
        if self.strategy == "fsdp":
            self.module.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def _count_bad_step(self) -> None:
        """A step whose loss or gradients were NaN/inf: its update is skipped and it is counted."""
        self.bad_steps += 1
        if self.bad_steps > self.config.max_bad_steps:
            raise TrainingError(
                f"{self.bad_steps} steps had a NaN/inf loss or gradient (train.max_bad_steps={self.config.max_bad_steps}), "
                f"the last at step {self.step}; lower train.learning_rate or check the data"
            )

    def _catch_sigterm(self):
        """Kubernetes sends SIGTERM on preemption: finish the step, write a checkpoint, exit."""
        if threading.current_thread() is not threading.main_thread():
            return None

        grace = self.config.preemption_grace_s

        def handler(signum, frame):
            self._stop_signal = signum
            # if the checkpoint cannot be written in time, leave before the SIGKILL that follows
            watchdog = threading.Timer(grace, lambda: os._exit(Preempted.exit_code))
            watchdog.daemon = True
            watchdog.start()

        return signal.signal(signal.SIGTERM, handler)

    def _stop_after_checkpoint(self) -> None:
        self.save_checkpoint()
        raise Preempted(f"stopped by SIGTERM after step {self.step}; checkpoint written, resume with train.resume=auto")

    def _preempted(self) -> bool:
        flag = 1.0 if self._stop_signal is not None else 0.0
        if self.dist.enabled:  # every rank stops at the same step, or the checkpoint's barriers hang
            flag = mean_across_ranks({"stop": flag}, self.device)["stop"]
        return flag > 0

    def _optimizer_step(self) -> float:
        """Clip and step; returns the gradient norm (NaN/inf: the update is skipped on every rank,
        as the gradients were averaged before this point)."""
        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP: the norm over every shard
            norm = norm.full_tensor()
        if torch.isfinite(norm):
            if self.config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def _run_eval(self, result: TrainResult) -> None:
        result.eval_metrics = self.evaluate(self.step)  # the evaluator logs what it measures
