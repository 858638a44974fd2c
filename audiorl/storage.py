"""Where data lives: a local path, or any fsspec URL (`s3://`, `gs://`, `az://`, `https://`, ...)
for manifests, audio and saved datasets alike.

Credentials never come from AudioRL's config (a URL that carries any is refused there): the
filesystem behind a URL reads them as it always does. For S3 (`s3fs`, the `audiorl[s3]` extra)
that is `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, `AWS_PROFILE` or an
instance role, and `AWS_ENDPOINT_URL` for an S3-compatible store (MinIO, Ceph, ...); on
Kubernetes those come from Secrets by reference (`job.secret_env`).

A relative path in a remote manifest is read against the manifest's own folder, as a local one is.
"""

from __future__ import annotations

import gzip
import io
import posixpath
import re
from pathlib import Path
from typing import IO, Any

import fsspec

from audiorl.errors import DataError

_SCHEME = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://")

_CREDENTIALS_HINT = ("credentials come from the environment (for S3: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                     "AWS_ENDPOINT_URL for an S3-compatible store) or, on Kubernetes, job.secret_env")


def is_url(path: Any) -> bool:
    """A `scheme://...` location other than `file://` (which is a local path)."""
    if not isinstance(path, str):
        return False
    match = _SCHEME.match(path)
    return match is not None and match["scheme"].lower() != "file"


def _local(path: str | Path) -> Path:
    text = str(path)
    return Path(text[len("file://"):] if text.lower().startswith("file://") else text)


def location(path: str | Path) -> str | Path:
    """A URL kept as the string it is (a `Path` would fold `s3://` into `s3:/`), a local path as a Path."""
    return str(path) if is_url(str(path)) else Path(path)


def join(base: str | Path, relative: str) -> str:
    """`relative` read against the folder `base` (a URL or a local folder); an absolute path or a
    URL stays as it is."""
    if is_url(relative):
        return relative
    if is_url(str(base)):
        return posixpath.join(str(base), relative)
    path = Path(relative)
    return str(path if path.is_absolute() else _local(base) / path)


def parent(path: str | Path) -> str:
    """The folder that holds `path`."""
    text = str(path)
    if is_url(text):
        return text.rstrip("/").rsplit("/", 1)[0]
    return str(_local(text).parent)


def _filesystem(url: str, where: str):
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        scheme = _SCHEME.match(url)["scheme"]
        extra = " (pip install 'audiorl[s3]')" if scheme.lower() in ("s3", "s3a") else ""
        raise DataError(f"{where}: reading {scheme}:// needs its fsspec filesystem: {exc}{extra}") from None
    except ValueError as exc:
        raise DataError(f"{where}: not a location fsspec can read ({exc})") from None


def _failure(exc: BaseException, url: str, where: str, missing: str = "not found") -> DataError:
    """A remote read's failure as one line that says what to do."""
    if isinstance(exc, FileNotFoundError):
        return DataError(f"{where}: {missing} ({url})")
    name = type(exc).__name__
    if isinstance(exc, PermissionError) or "Credential" in name or "AccessDenied" in str(exc):
        return DataError(f"{where}: access to {url} was refused ({name}: {exc}); {_CREDENTIALS_HINT}")
    return DataError(f"{where}: cannot read {url} ({name}: {exc})")


# one member of a tar shard (WebDataset): tarmember://OFFSET+SIZE/NAME::SHARD, where SHARD is a
# local path or a URL; reading it reads those bytes of the shard, nothing else
_MEMBER = re.compile(r"^tarmember://(?P<offset>\d+)\+(?P<size>\d+)/(?P<name>.*?)::(?P<shard>.+)$")


def member_location(shard: str, name: str, offset: int, size: int) -> str:
    return f"tarmember://{offset}+{size}/{name}::{shard}"


def member_of(path: str) -> tuple[str, str, int, int] | None:
    """(shard, member name, offset, size) of a tar member's location, or None for anything else."""
    found = _MEMBER.match(path) if isinstance(path, str) else None
    return (found["shard"], found["name"], int(found["offset"]), int(found["size"])) if found else None


class _Window(io.RawIOBase):
    """`size` bytes of a seekable file from `offset`, as a seekable file of its own."""

    def __init__(self, handle: IO[bytes], offset: int, size: int):
        self.handle, self.offset, self.size, self.position = handle, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = min(max(0, base + position), self.size)
        return self.position

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.size - self.position)
        if count <= 0:
            return 0
        self.handle.seek(self.offset + self.position)
        data = self.handle.read(count)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)

    def close(self) -> None:
        self.handle.close()
        super().close()


def open_binary(path: str | Path, where: str | None = None, *, missing: str = "not found") -> IO[bytes]:
    """A seekable binary file: a remote one reads only the byte ranges asked for (a segment of a
    long recording fetches that segment, not the file; a tar member, its bytes of the shard)."""
    where = where or str(path)
    member = member_of(str(path))
    if member is not None:
        shard, _, offset, size = member
        return _Window(open_binary(shard, where, missing="tar shard not found"), offset, size)
    if not is_url(str(path)):
        try:
            return _local(path).open("rb")
        except FileNotFoundError:
            raise DataError(f"{where}: {missing} ({path})") from None
        except IsADirectoryError:
            raise DataError(f"{where}: a folder, not a file ({path})") from None
        except OSError as exc:
            raise DataError(f"{where}: cannot read {path} ({exc.strerror})") from None
    fs, inner = _filesystem(str(path), where)
    folder = DataError(f"{where}: a folder, not a file ({path})")
    try:
        handle = fs.open(inner, "rb")
    except FileNotFoundError as exc:
        raise folder if is_dir(path, where) else _failure(exc, str(path), where, missing) from None
    except Exception as exc:  # noqa: BLE001 - each filesystem raises its own (botocore, aiohttp, ...)
        raise _failure(exc, str(path), where, missing) from None
    if not getattr(handle, "size", None) and is_dir(path, where):  # object stores open a folder as an empty file
        handle.close()
        raise folder
    return handle


def open_text(path: str | Path, where: str | None = None) -> IO[str]:
    """A UTF-8 text file, decompressed when its name ends in `.gz`."""
    where = where or str(path)
    if not is_url(str(path)):
        local = _local(path)
        return gzip.open(local, "rt", encoding="utf-8") if local.suffix == ".gz" else local.open(encoding="utf-8")
    _filesystem(str(path), where)  # the clear error for a missing filesystem package
    try:
        return fsspec.open(str(path), "rt", encoding="utf-8", compression="gzip" if str(path).endswith(".gz") else None).open()
    except Exception as exc:  # noqa: BLE001 - as above
        raise _failure(exc, str(path), where) from None


def write_text(path: str | Path, text: str) -> None:
    """Write a UTF-8 text file, here or at a URL (the filesystem's credentials, as for reading)."""
    if not is_url(str(path)):
        try:
            _local(path).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise DataError(f"{path}: cannot write it ({exc.strerror})") from None
        return
    fs, inner = _filesystem(str(path), str(path))
    try:
        with fs.open(inner, "w", encoding="utf-8") as handle:
            handle.write(text)
    except Exception as exc:  # noqa: BLE001 - each filesystem raises its own
        raise _failure(exc, str(path), str(path)) from None


def _ask(path: str | Path, where: str | None, local, remote: str) -> bool:
    """A yes/no question about a location: `local(Path)` here, the filesystem's `remote` method there."""
    if not is_url(str(path)):
        return bool(local(_local(path)))
    fs, inner = _filesystem(str(path), where or str(path))
    try:
        return bool(getattr(fs, remote)(inner))
    except Exception as exc:  # noqa: BLE001 - as above
        raise _failure(exc, str(path), where or str(path)) from None


def exists(path: str | Path, where: str | None = None) -> bool:
    return _ask(path, where, Path.exists, "exists")


def is_dir(path: str | Path, where: str | None = None) -> bool:
    return _ask(path, where, Path.is_dir, "isdir")


class Stats:
    """Size and version of many remote files, one folder listing per folder (20,000 clips in one
    folder cost about 20 listing requests, not 20,000 lookups); local files are stat'ed."""

    def __init__(self) -> None:
        self._listings: dict[str, dict[str, dict]] = {}

    def of(self, path: str, *, mtime: bool = True) -> str | None:
        """`size|version` (the version: mtime locally when `mtime`, the object's ETag remotely,
        which stays the same when the same bytes are uploaded again), or None when unreadable."""
        member = member_of(path)
        if member is not None:
            shard = self.of(member[0], mtime=mtime)
            return None if shard is None else f"{shard}|{member[2]}+{member[3]}"
        if not is_url(path):
            try:
                stat = _local(path).stat()
            except OSError:
                return None
            return f"{stat.st_size}|{stat.st_mtime_ns if mtime else ''}"
        try:
            fs, inner = _filesystem(path, path)
            folder = inner.rstrip("/").rsplit("/", 1)[0]
            if folder not in self._listings:
                self._listings[folder] = {fs._strip_protocol(e["name"]): e for e in fs.ls(folder, detail=True)}
            entry = self._listings[folder].get(fs._strip_protocol(inner))
        except Exception:  # noqa: BLE001 - an unreadable listing leaves the path alone in the hash
            return None
        if entry is None:
            return None
        version = entry.get("ETag") or entry.get("etag") or entry.get("mtime") or entry.get("LastModified") or ""
        return f"{entry.get('size')}|{version}"
