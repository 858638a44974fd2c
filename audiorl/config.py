"""One run, one YAML file: the pydantic schema and its loader.

The schema has six sections (`model`, `data`, `objective`, `train`, `tracking`, `job`; `objective` is
the section of the method `objective.name` picks, from audiorl.methods). Unknown keys and
wrong types are errors that name the key path and the file. `--set a.b=value` overrides are applied
to the parsed YAML before validation, so they are checked exactly like the file itself.

Knob names follow Hugging Face TrainingArguments and TRL where those have the knob.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from audiorl.errors import ConfigError
from audiorl.methods import ObjectiveConfig, default_objective, keys_of_other_methods
from audiorl.secrets import is_secret_key, redact, redact_tree, secret_shape  # one rule, re-exported here
from audiorl.sections import Section

# how a manifest or dataset is read (audiorl.data.records reads each)
DataFormat = Literal["auto", "audiorl", "nemo", "lhotse", "hf", "webdataset"]


class LoraSettings(Section):
    """LoRA through peft. When set, only the adapter weights train and the reference model is the
    same network with the adapter disabled (no second copy in memory)."""

    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


class ModelConfig(Section):
    family: str = Field("whisper", description="whisper, qwen2_audio, qwen3_asr, step_audio2, or module:Class")
    name_or_path: str = Field(..., description="local directory written by save_pretrained, or a hub id")
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    language: str | None = "en"
    task: Literal["transcribe", "translate"] = "transcribe"
    prompt_format: Literal["auto", "base", "chat"] = Field(
        "auto", description="audio LLMs: the base model's ASR prompt or the instruct model's chat template"
    )
    instruction: str | None = Field(None, description="audio LLMs: replaces the family's default ASR instruction")
    freeze_encoder: bool = False
    encoder_cache: bool = Field(
        True, description="with freeze_encoder (Whisper): compute each clip's encoder states once and reuse them all run"
    )
    encoder_cache_dir: str | None = Field(None, description="also keep the encoder states on disk here, for later runs and processes")
    encoder_cache_max_gb: float = Field(4.0, gt=0, description="memory bound of the encoder cache (least recently used go first)")
    freeze_projector: bool = Field(False, description="audio LLMs: freeze the adapter/projector after the encoder")
    gradient_checkpointing: bool = False
    lora: LoraSettings | None = None


class TextNormalization(Section):
    """How hypotheses and references are normalised before WER/CER."""

    normalizer: Literal["plain", "whisper_english", "whisper_basic"] = Field(
        "plain",
        description="plain: only the two switches below; whisper_english: Whisper's English normaliser (numbers, "
        "spellings, contractions, fillers), as Whisper's papers score; whisper_basic: its language-neutral one",
    )
    lowercase: bool = True
    remove_punctuation: bool = True


_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class TrainSource(Section):
    """One source of a weighted training mixture."""

    path: str = Field(description="manifest or saved dataset")
    weight: float = Field(1.0, gt=0, description="its share of the draws: weight / the sum of all weights")


class DataConfig(Section):
    train: str | list[str | TrainSource] | None = Field(
        None,
        description="JSONL manifest or a Hugging Face dataset saved with save_to_disk; several (a list) are read in turn and "
        "concatenated, e.g. the hard cases plus a replay of speech the model already handles, against forgetting; "
        "list items {path, weight} make a mixture sampled in proportion to the weights",
    )
    eval: str | dict[str, str] | None = Field(
        None, description="a transcript manifest, or several as {test set name: manifest}; WER/CER per set"
    )
    format: DataFormat = Field(
        "auto", description="how train and eval sources are read; auto: told by each one's content"
    )
    max_audio_seconds: float = Field(30.0, gt=0, description="longer clips are bad records (and any over the model's input window)")
    min_audio_seconds: float = Field(0.1, ge=0, description="shorter clips are bad records")
    batch_seconds: float | None = Field(
        None, gt=0, description="batch by audio length: per device, clips of similar length while count x longest <= this "
        "(replaces train.per_device_train_batch_size); for families without a fixed input window"
    )
    streaming: bool = Field(
        False, description="check each training record when training reads it, instead of decoding every clip before the first step; "
        "a bad record's place goes to the next good one"
    )
    max_bad_fraction: float = Field(
        0.05, ge=0, le=1, description="streaming: the run stops once more than this share of the training records turned out bad "
        "(data.on_bad_record=error: at the first)"
    )
    max_target_tokens: int | None = Field(None, gt=0, description="default: the model's own limit")
    on_bad_record: Literal["error", "skip"] = "error"
    num_workers: int = Field(0, ge=0)
    normalize: TextNormalization = Field(default_factory=TextNormalization)

    @field_validator("train")
    @classmethod
    def _train_sources(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("an empty list: give one or more manifests, or leave train out")
            paths = [item if isinstance(item, str) else item.path for item in value]
            if len(set(paths)) != len(paths):
                raise ValueError(f"a manifest is listed twice in {paths}: each source is read once (give it a larger weight instead)")
        return value

    def train_sources(self) -> list[str]:
        """The training manifests, in order (one, or several to concatenate or mix)."""
        if self.train is None:
            return []
        return [self.train] if isinstance(self.train, str) else [item if isinstance(item, str) else item.path for item in self.train]

    def train_weights(self) -> list[float] | None:
        """The mixture weights, one per source, or None when the sources are concatenated (no
        source in the list gives a weight); a source written as a plain path weighs 1."""
        if not isinstance(self.train, list) or all(isinstance(item, str) for item in self.train):
            return None
        return [1.0 if isinstance(item, str) else item.weight for item in self.train]

    @field_validator("eval")
    @classmethod
    def _eval_names(cls, value):
        if isinstance(value, dict):
            if not value:
                raise ValueError("an empty mapping: give one or more {name: manifest}, or leave eval out")
            for name in value:
                if not _SET_NAME.match(name):
                    raise ValueError(f"test set name {name!r}: use letters, digits, '_', '-' and '.', starting with a letter or digit "
                                     "(it names the MLflow metrics eval/<name>/wer)")
        return value

    @model_validator(mode="after")
    def _batches_by_duration(self):
        if self.batch_seconds is not None and isinstance(self.train, list) and any(not isinstance(i, str) for i in self.train):
            raise ValueError("batch_seconds: batches by length do not go with a weighted mixture (the mixture draws records one "
                             "by one); use one of them")
        return self

    @model_validator(mode="after")
    def _no_credentials_in_locations(self):
        # a URL's user information or a signed query is a credential: it would land in MLflow
        # params, the ConfigMap and logs; fsspec's filesystems read credentials from the environment
        for key, where in [("data.train", p) for p in self.train_sources()] + [(f"data.eval.{n}", p) for n, p in self.eval_sets().items()]:
            if secret_shape(where):
                raise ValueError(f"{key}: the location carries credentials ({secret_shape(where)}); give the plain URL and the "
                                 "credentials in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...) or job.secret_env")
        return self

    def eval_sets(self) -> dict[str, str]:
        """The evaluation manifests by test-set name (one manifest is named after its file)."""
        if self.eval is None:
            return {}
        if isinstance(self.eval, str):
            return {Path(self.eval).stem or "eval": self.eval}
        return dict(self.eval)


class DistributedConfig(Section):
    """How the trainer uses several processes under torchrun (ignored in a single process)."""

    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="auto: DDP when launched with more than one process; fsdp: FSDP2, parameters sharded per layer"
    )
    timeout_s: float = Field(1800, gt=0, description="how long a collective waits before the job fails")


class TrainConfig(Section):
    output_dir: str = "runs/audiorl"
    seed: int = 42
    deterministic: bool = Field(
        True,
        description="torch's deterministic kernels: the same seed, data and machine give the same weights (GRPO's sampling "
        "turns a last-bit difference into a different run); false trades that for speed where it costs any",
    )
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides num_train_epochs")
    per_device_train_batch_size: int = Field(4, gt=0)
    per_device_eval_batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    learning_rate: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = Field(
        "auto", description="auto: bf16 autocast on CUDA devices that support it, none on CPU"
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    num_threads: int | None = Field(None, gt=0, description="torch CPU threads")
    logging_steps: int = Field(10, gt=0)
    eval_steps: int | None = Field(None, gt=0, description="evaluate every N optimizer steps (and at the end)")
    eval_before_training: bool = True
    eval_before_cache_dir: str | None = Field(
        None,
        description="keep the step-0 transcripts here, keyed by the starting weights, each test set and the decoding settings; "
        "a later run from the same weights reads them instead of decoding again (a sweep scores its base once)",
    )
    save_steps: int | None = Field(500, gt=0)
    save_total_limit: int | None = Field(2, gt=0)
    resume: str = Field("auto", description="auto, never, or a checkpoint directory")
    generation_max_new_tokens: int = Field(128, gt=0)
    max_bad_steps: int = Field(
        10, ge=0, description="steps whose loss is NaN/inf are skipped and counted; the run stops after this many"
    )
    preemption_grace_s: float = Field(
        25.0, gt=0, description="after SIGTERM: seconds to finish the micro-batch and write a checkpoint before exiting anyway"
    )
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)


class TrackingConfig(Section):
    enabled: bool = True
    tracking_uri: str | None = Field(
        None, description="default: $MLFLOW_TRACKING_URI, else a local SQLite store under ./mlruns"
    )
    experiment_name: str = "audiorl"
    run_name: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    log_model: bool = Field(True, description="log the final model as an MLflow model (transformers pipeline or pyfunc)")
    register_model: bool = Field(True, description="register the logged model as a new version, alias challenger")
    registered_model_name: str | None = Field(None, description="default: the experiment name")
    system_metrics: bool = Field(True, description="CPU/memory/GPU of every node, under node-N")
    system_metrics_interval_s: float = Field(10.0, gt=0)


# ---------------------------------------------------------------------------------------------
# where a run goes on a cluster (read by `audiorl render|submit`, ignored by `audiorl train`)

_QUANTITY = re.compile(r"^(?P<num>[0-9]+(\.[0-9]+)?)(?P<unit>Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)?$")
_UNITS = {
    None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}


def parse_quantity(value: str) -> float:
    """A Kubernetes resource quantity ("16Gi", "500m", "8") as a number (bytes, cores)."""
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (examples: 8, 500m, 64Gi)")
    return float(match["num"]) * _UNITS[match["unit"]]


def _check_quantity(value: str | None) -> str | None:
    if value is not None:
        parse_quantity(value)
    return value


class Resources(Section):
    """CPU and memory as Kubernetes quantities. GPUs are set by `gpus_per_node`."""

    cpu: str | None = None
    memory: str | None = None

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, value: str | None) -> str | None:
        return _check_quantity(value)


class VolumeConfig(Section):
    """A PersistentVolumeClaim mounted into every pod (data, checkpoints, model cache)."""

    name: str = Field(..., description="volume name in the pod (DNS-1123 label)")
    claim: str = Field(..., description="the PersistentVolumeClaim to mount")
    mount_path: str
    read_only: bool = False
    sub_path: str | None = None

    @field_validator("mount_path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"mount_path must be absolute, got {value!r}")
        return value


class SecretEnv(Section):
    """An environment variable read from a Kubernetes Secret: the value never appears in a manifest."""

    name: str = Field(..., description="the variable's name in the container, e.g. MLFLOW_TRACKING_PASSWORD")
    secret: str = Field(..., description="the Secret's name")
    key: str = Field(..., description="the key inside the Secret")
    optional: bool = False


class ElasticConfig(Section):
    """torchrun's elastic mode: the job runs with anywhere from min_nodes to max_nodes nodes."""

    min_nodes: int = Field(..., ge=1)
    max_nodes: int = Field(..., ge=1)
    max_restarts: int = Field(3, ge=0)
    rdzv_backend: Literal["c10d", "etcd", "etcd-v2"] = "c10d"

    @model_validator(mode="after")
    def _range(self) -> ElasticConfig:
        if self.min_nodes > self.max_nodes:
            raise ValueError(f"min_nodes ({self.min_nodes}) is larger than max_nodes ({self.max_nodes})")
        return self


class VolcanoConfig(Section):
    """Gang scheduling through Volcano: all replicas start together or none does."""

    queue: str | None = None


_SECRET_VALUE_HINT = "put it in a Kubernetes Secret and reference it under job.secret_env"


_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _label_key_ok(key: str) -> bool:
    """A label or annotation key as the API server checks it: [prefix/]name."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return False
    return bool(_LABEL_NAME.match(name))


class JobConfig(Section):
    api: Literal["pytorchjob", "trainjob"] = Field(
        "pytorchjob", description="the workload: a Kubeflow Training Operator v1 PyTorchJob, or a Kubeflow Trainer v2 TrainJob"
    )
    runtime: str = Field("torch-distributed", description="with api trainjob: the training runtime the TrainJob runs on")
    runtime_kind: Literal["ClusterTrainingRuntime", "TrainingRuntime"] = Field(
        "ClusterTrainingRuntime", description="with api trainjob: a cluster-wide runtime, or one in the job's namespace"
    )
    name: str | None = Field(None, description="job name (DNS-1035 label); default: the config file's name")
    namespace: str = "default"
    image: str = "ghcr.io/audiorl/audiorl:0.1.0"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list)
    nodes: int = Field(1, ge=1, description="pods (one Master, the rest Workers)")
    gpus_per_node: int = Field(1, ge=0, description="0 for a CPU job")
    gpu_resource: str = "nvidia.com/gpu"
    procs_per_node: int | None = Field(None, ge=1, description="torchrun processes per pod; default: one per GPU, 1 on CPU")
    requests: Resources = Field(default_factory=lambda: Resources(cpu="8", memory="64Gi"))
    limits: Resources = Field(default_factory=lambda: Resources(memory="64Gi"))
    shm_size: str = Field("16Gi", description="size of the memory-backed /dev/shm")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] | None = None
    priority_class: str | None = None
    kueue_queue: str | None = Field(None, description="Kueue LocalQueue name")
    volcano: VolcanoConfig | None = None
    service_account: str | None = None
    volumes: list[VolumeConfig] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict, description="plain environment variables (no secrets)")
    secret_env: list[SecretEnv] = Field(default_factory=list)
    ttl_seconds_after_finished: int | None = Field(259200, ge=0)
    backoff_limit: int | None = Field(3, ge=0)
    active_deadline_seconds: int | None = Field(None, gt=0)
    restart_policy: Literal["OnFailure", "Never", "ExitCode", "Always"] = "OnFailure"
    clean_pod_policy: Literal["Running", "All", "None"] = "Running"
    termination_grace_period_seconds: int = Field(30, gt=0)
    elastic: ElasticConfig | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("shm_size")
    @classmethod
    def _shm_quantity(cls, value: str) -> str:
        return _check_quantity(value)

    @field_validator("env")
    @classmethod
    def _no_inline_secrets(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            if is_secret_key(key) or secret_shape(str(item)):
                raise ValueError(f"env {key!r} looks like a secret: {_SECRET_VALUE_HINT}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        if self.kueue_queue and self.volcano is not None:
            raise ValueError("kueue_queue and volcano both set: a job is admitted by one scheduler, choose one")
        if self.elastic is not None and not self.elastic.min_nodes <= self.nodes <= self.elastic.max_nodes:
            raise ValueError(
                f"nodes ({self.nodes}) must lie in the elastic range [{self.elastic.min_nodes}, {self.elastic.max_nodes}]"
            )
        names = [v.name for v in self.volumes]
        dupes = sorted({n for n in names if names.count(n) > 1} | ({"config", "dshm"} & set(names)))
        if dupes:
            raise ValueError(f"volume names {dupes} are taken (repeated, or reserved for the config and /dev/shm)")
        limit = self.limits.memory
        if limit is not None and parse_quantity(self.shm_size) >= parse_quantity(limit):
            raise ValueError(
                f"shm_size {self.shm_size} is not below the memory limit {limit}: /dev/shm counts against the pod's memory"
            )
        for resource in ("cpu", "memory"):
            asked, most = getattr(self.requests, resource), getattr(self.limits, resource)
            if asked is not None and most is not None and parse_quantity(asked) > parse_quantity(most):
                raise ValueError(f"requests.{resource} {asked} is above limits.{resource} {most}: the API server refuses such a pod")
        mounts = [v.mount_path for v in self.volumes]
        taken = sorted({m for m in mounts if mounts.count(m) > 1} | ({"/etc/audiorl", "/dev/shm"} & set(mounts)))
        if taken:
            raise ValueError(f"volume mount paths {taken} are taken (repeated, or the config's /etc/audiorl and /dev/shm)")
        for where, labels in (("labels", self.labels), ("annotations", self.annotations)):
            for key in labels:
                if not _label_key_ok(key):
                    raise ValueError(f"{where} key {key!r} is not a valid Kubernetes key: an optional DNS prefix and '/', then at most "
                                     "63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit")
        return self

    @property
    def processes_per_node(self) -> int:
        if self.procs_per_node is not None:
            return self.procs_per_node
        return max(self.gpus_per_node, 1)


class RunConfig(Section):
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    objective: ObjectiveConfig = Field(default_factory=default_objective)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    job: JobConfig = Field(default_factory=JobConfig)

    @model_validator(mode="after")
    def _grace(self) -> RunConfig:
        if self.train.preemption_grace_s >= self.job.termination_grace_period_seconds:
            raise ValueError(
                f"train.preemption_grace_s ({self.train.preemption_grace_s:g}) must be below "
                f"job.termination_grace_period_seconds ({self.job.termination_grace_period_seconds}), or Kubernetes "
                "kills the pod before the checkpoint is written"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def fingerprint(self, world_size: int = 1) -> str:
        """A short hash of everything that changes what training computes. The batch counts as
        the global batch (per device x processes), so a run may resume on another process count."""
        payload = self.to_dict()
        payload.pop("tracking", None)
        payload.pop("job", None)
        for key in ("logging_steps", "eval_steps", "eval_before_cache_dir", "save_steps", "save_total_limit", "resume", "output_dir", "distributed"):
            payload["train"].pop(key, None)
        payload["train"]["per_device_train_batch_size"] *= world_size
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value), the value parsed as YAML (so 1e-5, true, [a, b] work)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example --set train.learning_rate=1e-5")
    key, raw = item.split("=", 1)
    path = [part for part in key.strip().split(".")]
    if not key.strip() or any(not part for part in path):
        raise ConfigError(f"--set {item!r}: the key must be a dotted path such as train.max_steps")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc.problem})") from exc
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise ConfigError(f"--set {item!r}: {where} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


_FREE_FORM = {("job", "env"), ("job", "labels"), ("job", "annotations"), ("tracking", "tags")}


def _format_validation_error(exc: ValidationError, source: str) -> str:
    problems = []
    for err in exc.errors():
        parts = [str(part) for part in err["loc"]]
        method = None
        if len(parts) > 1 and parts[0] == "objective":
            method = parts.pop(1)  # the method's tag: objective.<method>.key is objective.key
        loc = ".".join(parts) or "(top level)"
        msg = err["msg"]
        others = keys_of_other_methods(parts[-1], method) if method and err["type"] == "extra_forbidden" else []
        if others:
            msg = (f"not a knob of objective.name={method} (it belongs to {' or '.join(f'objective.name={o}' for o in others)}); "
                   "remove it, or change objective.name")
        elif err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against `audiorl config show`)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif "input" in err and err["type"] not in ("value_error",):
            # the rejected value is shown unless it is (or is named as) a secret, or is a free-form
            # value (environment, labels, annotations, tags) where secrets tend to be put
            hidden = (is_secret_key(parts[-1] if parts else "") or secret_shape(str(err["input"]))
                      or tuple(parts[:2]) in _FREE_FORM)
            shown = "the value is not shown: it may be a secret" if hidden else repr(err["input"])
            msg = f"{msg} (got {shown})"
        problems.append(f"{loc}: {msg}")
    return f"{source}: invalid config: " + "; ".join(problems)


def validate_config(data: Any, source: str = "<config>") -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a run config must be a mapping with sections model, data, objective, train, tracking, job")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run file, apply `--set` overrides, validate."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a directory, not a YAML run file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the run file as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML: {getattr(exc, 'problem', exc)}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run config must be a mapping with sections model, data, objective, train, tracking, job")
    apply_overrides(data, overrides or [])
    return validate_config(data, source=str(path))


# ---------------------------------------------------------------------------------------------
# secrets never reach MLflow params or logs



def redact_value(value: Any) -> Any:
    """A value fit for logs and MLflow: its secret parts (by shape) replaced by ***."""
    return redact(value)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested sections to dotted keys for MLflow params: secret-named keys are dropped,
    and secrets inside values (lists and mappings too) are redacted by the one rule."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if is_secret_key(key):
            continue
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}."))
        elif isinstance(value, list):
            flat[name] = json.dumps(redact_tree(value))
        else:
            flat[name] = redact_value(value)
    return flat
