"""Content-addressed store for expensive, reusable work (preprocessed data, teachers, teacher outputs).

An entry lives at ``<root>/<kind>/<key>/`` where ``key`` hashes exactly the config that determines
it. Entries are built in a temporary folder and renamed into place, so a reader never sees half an
entry; a ``MANIFEST.json`` holds each file's SHA-256, checked on every read, so a corrupt or
truncated entry is rebuilt rather than used. A file lock per key makes concurrent builders of one
key (trials starting together, on one machine or on a shared file system) compute it once.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from tskd_tune.errors import StorageError, TskdError
from tskd_tune.heartbeat import beat

MANIFEST = "MANIFEST.json"
# what a full disk or an unwritable folder raises; other OSErrors are not storage problems
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def digest(obj: Any, length: int = 16) -> str:
    """Stable hash of a JSON-able object (dict key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Hit:
    """A ready cache entry: its folder and whether it was found (True) or built just now (False)."""

    path: Path
    cached: bool


class Store:
    """A content-addressed store rooted at ``root``; ``enabled=False`` builds every entry afresh."""

    def __init__(self, root: Path | str, enabled: bool = True):
        self.root = Path(root)
        self.enabled = enabled

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def get_or_build(self, kind: str, key_obj: Any, build: Callable[[Path], None]) -> Hit:
        """Return the entry for ``key_obj``, calling ``build(tmp_dir)`` to fill it when absent or corrupt."""
        key = digest(key_obj)
        if not self.enabled:
            tmp = Path(tempfile.mkdtemp(prefix=f"tskd-{kind}-"))
            build(tmp)
            return Hit(tmp, cached=False)
        final = self.path(kind, key)
        if verify(final):
            return Hit(final, cached=True)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TskdError(f"cache.dir: cannot create {final.parent} ({exc.strerror})") from None
        with _locked(str(final) + ".lock"):
            if verify(final):  # another process built it while we waited for the lock
                return Hit(final, cached=True)
            tmp = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
            try:
                tmp.mkdir()
                build(tmp)
                write_manifest(tmp, key_obj)
                if final.exists():
                    shutil.rmtree(final)  # a corrupt entry: replaced, never reused
                os.replace(tmp, final)
            except OSError as exc:
                if exc.errno not in STORAGE_ERRNOS:
                    raise
                raise StorageError(f"cache.dir: cannot write {final} ({exc.strerror})") from None
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        return Hit(final, cached=False)


@contextlib.contextmanager
def _locked(path: str):
    """Hold the file lock ``path``; waiting for another process's build counts as progress (watchdog)."""
    lock = FileLock(path)
    while True:
        try:
            lock.acquire(timeout=10)
            break
        except Timeout:
            beat()
    try:
        yield
    finally:
        lock.release()


def atomic_write(path: Path, data: bytes | str, write: Callable[[Path, bytes], None] | None = None) -> None:
    """Write ``path`` so that readers see the old content or the new, never half: a temporary file,
    flushed to disk, then renamed over it. A full disk or an unwritable folder raises a one-line
    StorageError and leaves the old file as it was. ``write`` replaces the plain write (fault injection)."""
    path = Path(path)
    data = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        (write or _write_synced)(tmp, data)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        kept = f"; the previous {path.name} is kept" if path.exists() else ""
        raise StorageError(f"{path}: cannot write it ({exc.strerror or exc}){kept}") from None


def write_json(path: Path, obj: Any) -> None:
    """:func:`atomic_write` of ``obj`` as indented JSON (what the product writes is never half a file)."""
    atomic_write(path, json.dumps(obj, indent=2, default=str))


def writable_dir(path: Path, what: str) -> Path:
    """Create ``path`` if needed and check that a file can be written in it, before any work starts;
    otherwise a one-line StorageError naming ``what`` (a flag or YAML path) and the folder."""
    path = Path(path)
    probe = path / f".tskd-write-test-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise StorageError(f"{what}: cannot write to {path} ({exc.strerror or exc})") from None
    return path


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_manifest(folder: Path, key_obj: Any) -> None:
    files = {
        str(p.relative_to(folder)): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"key": key_obj, "files": files}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str))
    os.replace(tmp, folder / MANIFEST)


def verify(folder: Path) -> bool:
    """True when ``folder`` is a complete entry whose files all match their recorded checksums."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return all(file_sha256(folder / name) == sha for name, sha in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False
