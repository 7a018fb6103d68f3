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
import math
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
PARTIAL = ".partial-"
"""Name prefix of a build's resumable state (:meth:`Store.partial`), beside the entry it builds."""
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

    def partial(self, kind: str, key_obj: Any) -> Path | None:
        """A folder where a long build of ``key_obj`` keeps what lets an interrupted build resume (its
        checkpoints), the same for every run of the same build; None when the cache is off. Listed by
        :func:`entries` as incomplete, so a prune may remove one left behind, never while its build runs.
        The build removes it once the entry is written."""
        if not self.enabled:
            return None
        final = self.path(kind, digest(key_obj))
        return final.parent / f"{PARTIAL}{final.name}"

    def get_or_build(self, kind: str, key_obj: Any, build: Callable[[Path], None]) -> Hit:
        """Return the entry for ``key_obj``, calling ``build(tmp_dir)`` to fill it when absent or corrupt."""
        key = digest(key_obj)
        if not self.enabled:
            tmp = Path(tempfile.mkdtemp(prefix=f"tskd-{kind}-"))
            build(tmp)
            return Hit(tmp, cached=False)
        final = self.path(kind, key)
        if verify(final):
            used(final)
            return Hit(final, cached=True)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TskdError(f"cache.dir: cannot create {final.parent} ({exc.strerror})") from None
        with _locked(str(final) + ".lock"):
            if verify(final):  # another process built it while we waited for the lock
                used(final)
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
                hint = ""
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    size = sum(e.size for e in entries(self.root)) / GB
                    hint = (
                        f"; the cache holds {size:.2f} GB: `tskd-tune cache prune --dir {self.root} --max-gb N` "
                        f"frees space (least recently used first), or set cache.max_gb"
                    )
                raise StorageError(f"cache.dir: cannot write {final} ({exc.strerror}){hint}") from None
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
    """:func:`atomic_write` of ``obj`` as indented strict JSON (:func:`json_text`; never half a file)."""
    atomic_write(path, json_text(obj))


def json_text(obj: Any, indent: int | None = 2) -> str:
    """``obj`` as strict JSON: a non-finite float (NaN, an infinity: an undefined score) is ``null``, since
    Python's ``NaN`` is not JSON and strict parsers (``jq``, browsers, most languages) refuse the whole file;
    numpy numbers and arrays are numbers and lists, anything else its ``str``."""
    return json.dumps(_finite(obj), indent=indent, default=str, allow_nan=False)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy scalars and arrays, tensors
        return _finite(obj.tolist())
    return obj


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


# ---------------------------------------------------------------------------------------------- usage, eviction
GB = 1024**3
STALE_S = 3600.0
"""An incomplete entry (no manifest) untouched this long is an interrupted build's leftover, not a build."""


@dataclass(frozen=True)
class Entry:
    """One entry of the store: ``kind``/``key``, its bytes on disk and when it was last used (built or hit)."""

    kind: str
    key: str
    path: Path
    size: int
    last_used: float
    complete: bool


def used(folder: Path) -> None:
    """Mark an entry as used now (its manifest's modification time): eviction goes least recently used first."""
    with contextlib.suppress(OSError):  # a read-only shared cache is still usable
        os.utime(folder / MANIFEST)


def entries(root: Path | str) -> list[Entry]:
    """Every entry under ``root`` (``<kind>/<key>/``), least recently used first. An entry without a manifest
    (an interrupted build's leftover, a ``.tmp-`` folder, a build's ``.partial-`` state) counts as
    incomplete, last used when a file in it was last written."""
    out = []
    root = Path(root)
    for kind in (
        sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if root.is_dir()
        else []
    ):
        for folder in kind.iterdir():
            if not folder.is_dir():
                continue
            try:
                files = [f for f in folder.rglob("*") if f.is_file()]
                manifest = folder / MANIFEST
                complete = manifest.is_file() and not folder.name.startswith(".tmp-")
                stats = [f.stat() for f in files]
                stamp = (
                    manifest.stat().st_mtime
                    if complete
                    else max([folder.stat().st_mtime] + [st.st_mtime for st in stats])
                )
                size = sum(st.st_size for st in stats)
            except OSError:  # removed while we looked
                continue
            out.append(Entry(kind.name, folder.name, folder, size, stamp, complete))
    return sorted(out, key=lambda e: e.last_used)


def prune(
    root: Path | str,
    *,
    max_gb: float | None = None,
    older_than_s: float | None = None,
    kind: str | None = None,
    keep_since: float | None = None,
    dry_run: bool = False,
) -> list[Entry]:
    """Remove entries, least recently used first: those unused for ``older_than_s``, then more until the cache
    holds at most ``max_gb``; only ``kind`` when given. Never an entry used since ``keep_since`` (a running
    search's start: its trials hold what they use) or one whose build lock another process holds. Each
    entry is renamed away under its lock, then deleted, so a reader sees it whole or not at all.
    Returns what was removed (or, with ``dry_run``, what would be)."""
    import time

    now, all_entries = time.time(), entries(root)
    total = sum(e.size for e in all_entries)
    removed = []
    for e in all_entries:
        if kind is not None and e.kind != kind:
            continue
        if keep_since is not None and e.last_used >= keep_since:
            continue
        if not e.complete and now - e.last_used < STALE_S:  # maybe a build in progress
            continue
        old = older_than_s is not None and now - e.last_used >= older_than_s
        over = max_gb is not None and total > max_gb * GB
        if not (old or over):
            continue
        if dry_run or _evict(e):
            removed.append(e)
            total -= e.size
    return removed


def _evict(e: Entry) -> bool:
    # a build's partial state is guarded by its entry's build lock: never removed while that build runs
    lock = FileLock(str(e.path.parent / e.key.removeprefix(PARTIAL)) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False  # being built (or rebuilt) right now
    try:
        gone = e.path.parent / f".evicted-{e.key}-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(e.path, gone)
        except OSError:
            return False
        shutil.rmtree(gone, ignore_errors=True)
        return True
    finally:
        lock.release()  # the lock file stays: another process may be waiting on it
