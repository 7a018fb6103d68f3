"""What every benchmark script shares: machine facts, the result file, a printed table, plots.

Each result JSON records the machine, the date, the exact command and the git commit, so a figure in
docs/BENCHMARKS.md can be traced to the run that produced it.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PYTHON = sys.executable


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=REPO)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_seconds() -> tuple[float, float | None]:
    """(all, stolen by the host) CPU time since boot; stolen is None where the OS does not count it."""
    t = psutil.cpu_times()
    guest = getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)  # already counted in user and nice
    return sum(t) - guest, getattr(t, "steal", None)


def reference_speed(seconds: float = 0.5, size: int = 256) -> dict:
    """A fixed workload's speed on one thread, and the share of the CPU the host stole meanwhile.

    Walls from two sessions compare only on the same machine; the machine a session gets varies (1.5x and
    more between two of the same CPU model), so each result records how fast this one was: fp32 matmuls of
    ``size`` x ``size`` on one thread for about ``seconds``, in GFLOP/s. A wall scaled by the ratio of two
    sessions' figures is comparable; the figure is only a guide where other work ran at the time (load_avg).
    """
    import torch

    threads = torch.get_num_threads()
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    before = _cpu_seconds()
    torch.set_num_threads(1)
    try:
        a @ b  # warm-up
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            for _ in range(8):
                a @ b
            n += 8
    finally:
        torch.set_num_threads(threads)
    after = _cpu_seconds()
    out = {"matmul_gflops_1thread": round(2 * size**3 * n / elapsed / 1e9, 2), "seconds": round(elapsed, 2)}
    if before[1] is not None and after[0] > before[0]:
        out["steal_pct"] = round(100 * (after[1] - before[1]) / (after[0] - before[0]), 1)
    return out


def machine() -> dict:
    """The facts a reader needs to judge a figure: CPU, cores, load, memory, GPU, library versions, and a
    reference speed (``reference_speed``)."""
    import torch

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "reference": reference_speed(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
    }


def command_line() -> str:
    """This run's command, as a shell would take it."""
    return " ".join(shlex.quote(a) for a in [Path(PYTHON).name, *sys.argv])


def provenance() -> dict:
    """Date, command line, git commit (and whether the tree had local changes), machine."""
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line(),
        "git_commit": _git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else ""),
        "machine": machine(),
    }


def write_result(name: str, payload: dict, quick: bool = False, folder: Path = RESULTS) -> Path:
    """Write ``benchmarks/results/NAME.json`` (``NAME.quick.json`` for smoke runs, which are not figures), or
    the same name in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}{'.quick' if quick else ''}.json"
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return path


def read_cells(path: Path) -> dict[str, dict]:
    """The finished cells of a grid (one JSON object per line of ``path``, each with an ``id``), by id."""
    if not path.is_file():
        return {}
    return {c["id"]: c for c in map(json.loads, path.read_text().splitlines())}


def append_cell(path: Path, cell: dict) -> None:
    """Append one finished cell to ``path``, so an interrupted grid resumes after it."""
    with path.open("a") as f:
        f.write(json.dumps(cell, default=float) + "\n")


def plot_path(name: str, quick: bool = False, folder: Path = RESULTS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}{'.quick' if quick else ''}.png"


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain-text table (also valid Markdown) of ``rows``; floats get 3 significant decimals."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)) + " |"  # noqa: E731
    out = [line(columns), "| " + " | ".join("-" * w for w in widths) + " |"]
    return "\n".join(out + [line(r) for r in cells])


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation, min and max (std is 0 for a single value)."""
    vals = [float(v) for v in values if v is not None and v == v]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
    }


def trial_cell(
    space: str, overrides: dict, keep: tuple[str, ...], prefixes: tuple[str, ...] = ("test_dice_",)
) -> dict:
    """One ``run_trial(test=True)`` of ``space`` with ``overrides``: the metrics named in ``keep``, the scalar
    ones whose names start with one of ``prefixes``, and the cell's wall time (``wall_s``)."""
    from tskd_tune.config import load_config
    from tskd_tune.trial import run_trial

    t0 = time.perf_counter()
    result = run_trial(load_config(space, overrides), test=True)
    out = {k: result.get(k) for k in keep}
    out |= {k: v for k, v in result.items() if k.startswith(prefixes) and not isinstance(v, (list, dict))}
    return out | {"wall_s": time.perf_counter() - t0}


def paired_row(by_key: dict, ours: str, other: str, n: int) -> dict | None:
    """Test Dice of variant ``ours`` minus ``other`` at N = ``n``, paired by seed over the cells of ``by_key``
    ((variant, n, seed) -> cell): mean and std of the differences, the seeds ``ours`` wins, and the mean and
    lowest per-seed ratio; None where no seed has both."""
    seeds = [s for (v, nn, s) in by_key if v == ours and nn == n and (other, n, s) in by_key]
    if not seeds:
        return None
    pairs = [(by_key[(ours, n, s)]["test_dice"], by_key[(other, n, s)]["test_dice"]) for s in seeds]
    sp = spread([a - b for a, b in pairs])
    return {
        "ours": ours,
        "vs": other,
        "n": n,
        "seeds": sp["n"],
        "dice_diff": sp["mean"],
        "diff_std": sp["std"],
        "wins": sum(a > b for a, b in pairs),
        "ratio": spread([a / b for a, b in pairs])["mean"],
        "ratio_min": min(a / b for a, b in pairs),
    }


def summarise(rows: list[dict], by: str, groups, keys: list[str]) -> list[dict]:
    """One row per group of ``rows`` (``row[by]`` in ``groups``): its searches, how many reached their target
    (``cpu_to_target_s`` set), and the mean and ``_std`` of each of ``keys``."""
    out = []
    for group in groups:
        mine = [r for r in rows if r[by] == group]
        row = {
            by: group,
            "searches": len(mine),
            "reached": sum(r["cpu_to_target_s"] is not None for r in mine),
        }
        for key in keys:
            sp = spread([r[key] for r in mine])
            row |= {key: sp["mean"], key + "_std": sp["std"]}
        out.append(row)
    return out


def run_cli(args: list[str], env: dict | None = None, check: bool = True) -> tuple[float, str]:
    """Run ``python -m tskd_tune ARGS`` from the repository root; returns (wall seconds, stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [PYTHON, "-m", "tskd_tune", *args], capture_output=True, text=True, cwd=REPO, env=env
    )
    wall = time.perf_counter() - t0
    if check and proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): tskd-tune {' '.join(args)}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def launch(
    space, name: str, storage: Path, trials: int, concurrency: int, tracking_uri: str, sets: dict, *extra: str
) -> tuple[float, float]:
    """``tskd-tune launch SPACE`` as search ``name`` in ``storage`` (an earlier folder of that name removed
    first), each of ``sets`` a ``--set`` (JSON values); returns (unix start time, wall seconds)."""
    cli = [
        "launch",
        str(space),
        "--name",
        name,
        "--storage",
        str(storage),
        "--num-samples",
        str(trials),
        "--max-concurrent",
        str(concurrency),
        "--tracking-uri",
        tracking_uri,
        *extra,
    ]
    for k, v in sets.items():
        cli += ["--set", f"{k}={json.dumps(v)}"]
    shutil.rmtree(Path(storage) / name, ignore_errors=True)
    start = time.time()
    wall, _ = run_cli(cli)
    return start, wall


def running_best(trials: list[dict], counts=lambda t: True) -> list[tuple[float, float | None]]:
    """(compute so far, best ``metric`` so far) after each of ``trials`` in their order: every trial's
    ``cpu_s`` adds to the compute, only those ``counts`` accepts to the best (None until one has)."""
    out, cpu, best = [], 0.0, None
    for t in trials:
        cpu += t["cpu_s"] or 0.0
        if counts(t) and t["metric"] is not None:
            best = t["metric"] if best is None else max(best, t["metric"])
        out.append((cpu, best))
    return out


def read_trials(search_dir: Path) -> list[dict]:
    """Every trial of a finished Ray Tune search folder, in creation order, from its ``result.json``.

    Per trial: ``index`` (1-based, the order Tune created it), ``epochs`` reported, ``first_ts`` /
    ``last_ts`` (unix seconds of its first and last report), ``metric`` (the last reported ``val_dice``,
    what the searcher and the leaderboard see) and ``first_iter_s`` (seconds from the trial's start to
    its first report: teacher, transfer set and the first epoch) and ``cpu_s`` (the CPU-seconds the trial's
    process had spent at its last report: its compute, also when ASHA stopped it).
    """
    trials = []
    for d in Path(search_dir).iterdir():
        if not (d.is_dir() and re.fullmatch(r"t\d+_\w+", d.name) and (d / "result.json").is_file()):
            continue
        rows = []
        for line in (d / "result.json").read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
        if not rows:
            continue
        index = int(d.name[1:].split("_")[0])  # t<index>_<trial id>
        trials.append(
            {
                "index": index,
                "trial_id": rows[0].get("trial_id"),
                "epochs": max(r.get("epoch", 0) for r in rows),
                "first_ts": rows[0]["timestamp"],
                "last_ts": rows[-1]["timestamp"],
                "first_iter_s": rows[0].get("time_this_iter_s"),
                "metric": next((r["val_dice"] for r in reversed(rows) if "val_dice" in r), None),
                "node_ip": rows[0].get("node_ip"),
                "cpu_s": next((r["cpu_s"] for r in reversed(rows) if "cpu_s" in r), None),
            }
        )
    return sorted(trials, key=lambda t: t["index"])


def save_figure(fig, path: Path) -> None:
    """Lay out, write (120 dpi) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
