"""Where a search's files live: a folder, ``file://`` or a bucket URI, and the copies this machine
keeps of a search held at a URI."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from tskd_tune.errors import TskdError

# Buckets every node reaches by URI (pyarrow/fsspec file systems): shared by construction.
BUCKET_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "az", "hdfs")


def is_bucket(storage: str | os.PathLike) -> bool:
    """True for a bucket URI (``s3://``, ``gs://``, ...), which every node reaches on its own."""
    text = str(storage)
    return "://" in text and text.split("://", 1)[0].lower() in BUCKET_SCHEMES


def is_uri(storage: str | os.PathLike) -> bool:
    """True for a storage URI (a bucket, or ``file://``) that goes through pyarrow rather than plain paths."""
    return "://" in str(storage)


def check_storage(storage: str) -> None:
    """Refuse, in one line, a ``--storage`` URI that is neither ``file://`` nor a bucket."""
    if is_uri(storage) and not (is_bucket(storage) or str(storage).startswith("file://")):
        raise TskdError(
            f"--storage: {storage}: expected a folder, file:///PATH or a bucket URI "
            f"({', '.join(s + '://' for s in BUCKET_SCHEMES)})"
        )


def storage_dir(storage: str | os.PathLike) -> Path | None:
    """The local folder behind ``storage`` (a path or ``file://``); None for a bucket."""
    if is_bucket(storage):
        return None
    text = str(storage)
    return Path(urlsplit(text).path) if text.startswith("file://") else Path(text)


def local_copy(location: str) -> Path:
    """Where this machine keeps its copy of a search folder held at a storage URI (stable across runs)."""
    scheme, rest = location.split("://", 1)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "tskd-tune" / "storage" / scheme / rest.strip("/")


def pull(location: str, local: Path, only: tuple[str, ...] | None = None) -> bool:
    """Copy a search folder from a storage URI to ``local`` (checkpoints left out); False if there is none.

    ``only``: just these top-level files (what a quick existence check needs).
    """
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(location)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return False
    if only is not None:
        infos = [fs.get_file_info(f"{root}/{name}") for name in only]
    else:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    for info in infos:
        rel = info.path[len(root) :].lstrip("/")
        if info.type != pafs.FileType.File or any(part.startswith("checkpoint_") for part in rel.split("/")):
            continue
        target = local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as src, open(target, "wb") as dst:
            dst.write(src.read())
    return True


def push(local: Path, location: str, names: list[str]) -> None:
    """Copy the named files of the local search folder to the storage URI."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(location)
    fs.create_dir(root, recursive=True)
    for name in names:
        if (local / name).is_file():
            with open(local / name, "rb") as src, fs.open_output_stream(f"{root}/{name}") as dst:
                dst.write(src.read())
