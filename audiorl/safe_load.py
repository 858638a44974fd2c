"""Loading what AudioRL wrote to disk (checkpoints, caches) without running code from it.

A checkpoint folder on a shared volume is data anyone with write access can change, and pickle
runs whatever a file tells it to. So every `.pt` file is read with `torch.load(weights_only=True)`
(tensors, numbers, strings and containers only; torch >= 2.6, where that loader is safe), and a
torch.distributed.checkpoint folder is read through a reader whose `.metadata` unpickler knows only
the classes DCP itself writes there, and a planner that loads the non-tensor entries with
`weights_only=True` too. Anything else is a `CheckpointError` naming the file.
"""

from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta

from audiorl.errors import TrainingError


class CheckpointError(TrainingError):
    """A checkpoint (or cache) file that does not load: tampered, truncated or from elsewhere."""


# what torch.distributed.checkpoint pickles into `.metadata` (torch 2.6-2.14), and nothing else
_DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                              "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_METADATA_CLASSES.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not something a checkpoint's metadata holds")


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def load_dcp(state: dict[str, Any], folder: str | Path, *, no_dist: bool = True) -> None:
    """`dcp.load` into `state`, reading `folder` without unpickling anything but DCP's metadata
    classes and plain data."""
    # DCP logs a failed metadata read with its traceback on the root logger before it raises; the
    # error below says it in one line
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        dcp.load(state, storage_reader=_SafeReader(str(folder)), planner=_SafePlanner(), no_dist=no_dist)
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - DCP wraps what its readers raise (a BaseException)
        raise CheckpointError(f"{folder}: the sharded weights do not load ({_reason(exc)})") from None
    finally:
        logging.disable(previous)


def load_pt(path: str | Path) -> Any:
    """A `.pt` file AudioRL wrote: tensors, numbers, strings and containers only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError (zip), EOFError, ...
        raise CheckpointError(f"{path}: does not load as plain tensors and data ({_reason(exc)})") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, CheckpointException):  # per-rank tracebacks: the last line of each says it
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        exc_text = lines[-1] if lines else str(exc)
    else:
        exc_text = str(exc)
    # weights_only refusals explain themselves at length: the start says it
    return f"{type(exc).__name__}: {' '.join(exc_text.split())[:240]}"
