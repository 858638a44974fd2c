"""Trained models as MLflow models and registered versions.

A family whose adapter says `mlflow_flavor = "transformers"` is logged with MLflow's
transformers flavor as an `automatic-speech-recognition` pipeline (greedy decoding, the run's
language and task); the others (the audio LLMs, which have no transformers pipeline) as a pyfunc
that transcribes with AudioRL's own adapter. Either way
`mlflow.pyfunc.load_model("models:/NAME@challenger").predict(...)` takes audio (bytes, a file
path, or a 16 kHz float array for the pyfunc) and returns transcripts. A new version gets the
alias `challenger`; `audiorl promote` decides whether it becomes `champion`, scoring the
registered weights with AudioRL's own decoder (`load_version`): the one training evaluates with,
which matches the CTranslate2 export's transcripts, where the transformers pipeline pads short
clips differently.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow  # noqa: TID253 - the pyfunc below subclasses mlflow.pyfunc.PythonModel
import numpy as np

from audiorl.audio import limits_for
from audiorl.config import ModelConfig
from audiorl.data.records import Record
from audiorl.errors import ModelError
from audiorl.lazy import on_first_use

# `audiorl promote` reads versions through this module and must not import torch: the model code
# is imported when a version is loaded or logged
registry: Any = on_first_use("audiorl.models.registry")
runtime: Any = on_first_use("audiorl.runtime")
evaluation: Any = on_first_use("audiorl.evaluation")
transformers: Any = on_first_use("transformers")

CHALLENGER = "challenger"
CHAMPION = "champion"


# predict() takes several input kinds and checks them itself, so it has no type hints for MLflow
warnings.filterwarnings("ignore", message="Add type hints to the `predict` method", category=UserWarning)


class Transcriber(mlflow.pyfunc.PythonModel):
    """A saved AudioRL model as a pyfunc: audio in, transcripts out."""

    def load_context(self, context) -> None:
        settings = dict(context.model_config or {})
        self.max_new_tokens = int(settings.pop("max_new_tokens", 128))
        self.batch_size = int(settings.pop("batch_size", 8))
        self.adapter = registry.load_adapter(ModelConfig(name_or_path=context.artifacts["model"], **settings), runtime.resolve_device("auto"))
        # no length limit of its own, but a clip over the model's input window is refused, not cut off
        self.limits = limits_for(self.adapter.sampling_rate, float("inf"), self.adapter.window_seconds)

    def predict(self, context, model_input, params=None) -> list[str]:
        records = []
        for i, item in enumerate(_items(model_input)):
            if isinstance(item, np.ndarray):
                records.append(Record(audio=item.astype(np.float32), source=f"input[{i}]", sampling_rate=self.adapter.sampling_rate))
            else:
                records.append(Record(audio=item, source=f"input[{i}]"))
        return evaluation.transcribe(self.adapter, records, self.limits, batch_size=self.batch_size, max_new_tokens=self.max_new_tokens)


def _items(model_input: Any) -> list[Any]:
    """bytes, a path, an array, a list of those, or a DataFrame whose first column holds them."""
    try:
        import pandas as pd

        if isinstance(model_input, pd.DataFrame):
            model_input = model_input.iloc[:, 0].tolist()
        elif isinstance(model_input, pd.Series):
            model_input = model_input.tolist()
    except ImportError:  # pragma: no cover - pandas comes with mlflow
        pass
    if isinstance(model_input, (bytes, str, Path)) or (isinstance(model_input, np.ndarray) and model_input.ndim == 1):
        return [model_input]
    if isinstance(model_input, np.ndarray):
        return list(model_input)
    return [bytes(x) if isinstance(x, (bytearray, memoryview)) else x for x in model_input]


def _requirements() -> list[str]:
    # pinned explicitly: MLflow's own inference imports optional packages (torchvision) to guess
    return [f"audiorl=={version('audiorl')}", f"torch=={version('torch').split('+')[0]}", f"transformers=={version('transformers')}"]


def log_model(model_dir: str | Path, model_config, *, registered_name: str | None, max_new_tokens: int = 128):
    """Log the saved model `model_dir` into the active run; with `registered_name`, register it too."""
    # an absolute path: a relative `folder/model` reads like a hub id, and MLflow spends about 20 s
    # retrying the hub for that id's model card (where no network is, or the id is not a repository)
    model_dir = str(Path(model_dir).resolve()) if Path(model_dir).exists() else str(model_dir)
    if registry.adapter_class(model_config.family).mlflow_flavor == "transformers":
        pipe = transformers.pipeline("automatic-speech-recognition", model=model_dir, device="cpu")
        generate: dict[str, Any] = {"num_beams": 1, "max_new_tokens": max_new_tokens}
        # an English-only model takes neither language nor task (transformers refuses both)
        if getattr(pipe.model.generation_config, "is_multilingual", True) is not False:
            generate["task"] = model_config.task
            if model_config.language:
                generate["language"] = model_config.language
        return mlflow.transformers.log_model(
            pipe,
            name="model",
            task="automatic-speech-recognition",
            model_config={"generate_kwargs": generate},
            registered_model_name=registered_name,
            pip_requirements=_requirements(),
        )
    settings = {"family": model_config.family, "language": model_config.language, "max_new_tokens": max_new_tokens,
                "prompt_format": model_config.prompt_format}
    if model_config.instruction:
        settings["instruction"] = model_config.instruction
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=Transcriber(),
        artifacts={"model": model_dir},
        model_config=settings,
        registered_model_name=registered_name,
        pip_requirements=_requirements(),
    )


def _flavors(uri: str) -> dict:
    try:
        return mlflow.models.get_model_info(uri).flavors
    except Exception as exc:  # MLflow raises several kinds for a missing or foreign model
        raise ModelError(f"{uri}: cannot read it as an MLflow model ({exc})") from None


def write_out(uri: str, workdir: str | Path) -> Path:
    """The transformers-flavor model at `uri` (`models:/NAME/VERSION`, `models:/NAME@alias`,
    `runs:/RUN/model`) as a `save_pretrained` folder: its components written to `workdir`."""
    if "transformers" not in _flavors(uri):
        raise ModelError(f"{uri}: not an MLflow transformers model (AudioRL logs that way only families with mlflow_flavor 'transformers')")
    try:
        components = mlflow.transformers.load_model(uri, return_type="components", device="cpu")
    except Exception as exc:
        raise ModelError(f"{uri}: cannot load it as an MLflow transformers model ({exc})") from None
    for part in components.values():
        if hasattr(part, "save_pretrained"):
            part.save_pretrained(workdir)
    return Path(workdir)


def load_version(uri: str, workdir: str | Path, *, device: str = "auto", encoder_cache_dir: str | Path | None = None):
    """The logged model at `uri` as an AudioRL adapter, and the most new tokens it was logged to
    write. A transformers-flavor model is written out to `workdir` (which must outlive the
    adapter's use) and loaded through its family's adapter, with the language and task it was
    logged with; an AudioRL pyfunc already holds an adapter.

    With `encoder_cache_dir` the encoder's states are read from (and kept in) that folder: a
    version tuned with its encoder frozen finds the states its runs left there."""
    flavors = _flavors(uri)
    if "transformers" not in flavors:
        transcriber = mlflow.pyfunc.load_model(uri).unwrap_python_model()
        if not isinstance(transcriber, Transcriber):
            raise ModelError(f"{uri}: neither a transformers model nor one AudioRL logged; AudioRL cannot decode it")
        adapter, max_new_tokens = transcriber.adapter, transcriber.max_new_tokens
    else:
        adapter, max_new_tokens = _load_transformers_version(uri, flavors, workdir, device, encoder_cache_dir)
    registry.require_encoder_cache(adapter, encoder_cache_dir, uri)
    return adapter, max_new_tokens


def _load_transformers_version(uri: str, flavors: dict, workdir: str | Path, device: str, encoder_cache_dir: str | Path | None):
    write_out(uri, workdir)
    family = registry.detect_family(str(workdir))
    if family is None:
        raise ModelError(f"{uri}: its model is of no family AudioRL knows (config.json in {workdir})")
    generate = (flavors.get("python_function", {}).get("config") or {}).get("generate_kwargs", {})
    # an English-only model was logged with neither language nor task
    config = ModelConfig(family=family, name_or_path=str(workdir), language=generate.get("language"), task=generate.get("task", "transcribe"),
                         **registry.encoder_cache_settings(encoder_cache_dir))
    return registry.load_adapter(config, runtime.resolve_device(device)), int(generate.get("max_new_tokens", 128))


@contextlib.contextmanager
def using_tracking_uri(uri: str):
    """MLflow's model logging and `models:/` loading are fluent: they read a process-wide tracking
    URI, and setting that also rewrites $MLFLOW_TRACKING_URI. Point both at the run's server for this call only and put them
    back, so that the caller's own setting stands afterwards."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def register(run_id: str, tracking_uri: str, model_dir: str | Path, model_config, *, name: str | None, tags: dict[str, str],
             max_new_tokens: int = 128) -> str | None:
    """Log `model_dir` into run `run_id`; with a `name`, register it as a new version with `tags`
    and point the `challenger` alias at it. Returns the version (None when not registered)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    status = client.get_run(run_id).info.status
    # a local model has no hub card or licence to look up: those warnings would only mislead
    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)
    with using_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
        info = log_model(model_dir, model_config, registered_name=name, max_new_tokens=max_new_tokens)
    client.update_run(run_id, status=status)  # leaving start_run marked the run finished
    if name is None:
        return None
    version = str(info.registered_model_version)
    for key, value in {**tags, "audiorl.run_id": run_id}.items():
        client.set_model_version_tag(name, version, key, str(value))
    client.set_registered_model_alias(name, CHALLENGER, version)
    return version

