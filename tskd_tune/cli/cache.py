"""`tskd-tune cache ls` and `tskd-tune cache prune`: what the content-addressed cache holds, and trimming it."""

from __future__ import annotations

import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Annotated

import typer

from tskd_tune.cli.app import app, out
from tskd_tune.errors import TskdError

cache_app = typer.Typer(
    help="What the cache holds (features, teachers, logits, generators, pools), and pruning it.",
    no_args_is_help=True,
)
app.add_typer(cache_app, name="cache")

DirOpt = Annotated[Path, typer.Option("--dir", help="The cache folder (cache.dir).")]
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _ago(stamp: float) -> str:
    s = max(0.0, time.time() - stamp)
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= span:
            return f"{s / span:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def duration(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``2w`` or a plain number of days -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m:
        raise TskdError(f"--older-than: a duration such as 30d, 12h or 90m, got {text!r}")
    return float(m.group(1)) * UNITS[m.group(2) or "d"]


@cache_app.command("ls")
def ls(
    dir_: DirOpt = Path("runs/cache"),
    entries_: Annotated[bool, typer.Option("--entries", help="One line per entry, not per kind.")] = False,
) -> None:
    """The cache's entries by kind: count, size and last use (least recently used first with --entries)."""
    from tskd_tune.cache import entries

    if not dir_.is_dir():
        raise TskdError(f"--dir: {dir_} is not a folder (no cache there yet)")
    found = entries(dir_)
    if entries_:
        for e in found:
            state = "" if e.complete else "  (incomplete)"
            out.print(
                f"{e.kind:<15} {e.key:<18} {_size(e.size):>9}  {_ago(e.last_used):>9}{state}", markup=False
            )
    by_kind: dict[str, list] = defaultdict(list)
    for e in found:
        by_kind[e.kind].append(e)
    out.print(f"{'kind':<15} {'entries':>7} {'size':>9}  last used", markup=False)
    for kind, group in sorted(by_kind.items(), key=lambda kv: -sum(e.size for e in kv[1])):
        out.print(
            f"{kind:<15} {len(group):>7} {_size(sum(e.size for e in group)):>9}  "
            f"{_ago(max(e.last_used for e in group))}",
            markup=False,
        )
    out.print(
        f"{'total':<15} {len(found):>7} {_size(sum(e.size for e in found)):>9}  in {dir_}", markup=False
    )


@cache_app.command("prune")
def prune_cmd(
    dir_: DirOpt = Path("runs/cache"),
    max_gb: Annotated[
        float | None,
        typer.Option("--max-gb", help="Remove entries until the cache holds at most this many GB.", min=0.0),
    ] = None,
    older_than: Annotated[
        str | None, typer.Option("--older-than", help="Remove entries unused for this long (30d, 12h, 90m).")
    ] = None,
    kind: Annotated[
        str | None, typer.Option("--kind", help="Only entries of this kind (see `cache ls`).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be removed; remove nothing.")
    ] = False,
) -> None:
    """Remove entries, least recently used first; never one being built. A later trial that needs a removed
    entry rebuilds it."""
    from tskd_tune.cache import GB, entries, prune

    if max_gb is None and older_than is None:
        raise TskdError(
            "cache prune: give --max-gb N and/or --older-than D (see tskd-tune cache prune --help)"
        )
    if not dir_.is_dir():
        raise TskdError(f"--dir: {dir_} is not a folder (no cache there yet)")
    kinds = {e.kind for e in entries(dir_)}
    if kind is not None and kind not in kinds:
        raise TskdError(
            f"--kind: no entries of kind {kind!r} in {dir_} (it holds: {', '.join(sorted(kinds)) or 'none'})"
        )
    removed = prune(
        dir_,
        max_gb=max_gb,
        older_than_s=duration(older_than) if older_than else None,
        kind=kind,
        dry_run=dry_run,
    )
    verb = "would remove" if dry_run else "removed"
    for e in removed:
        out.print(f"{verb} {e.kind}/{e.key} ({_size(e.size)}, used {_ago(e.last_used)})", markup=False)
    left = sum(e.size for e in entries(dir_)) / GB
    out.print(
        f"{verb} {len(removed)} entr{'y' if len(removed) == 1 else 'ies'} "
        f"({sum(e.size for e in removed) / GB:.2f} GB); the cache holds {left:.2f} GB",
        markup=False,
    )
