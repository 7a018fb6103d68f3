"""Scaling: wall time of one fixed search (16 trials, random sampler, FIFO: every run trains the same
configs to the end) at concurrency 1, 2, ... on one machine, and on a local two-node Ray cluster.

Each trial gets ``resources.cpu`` CPUs (default 1, one torch thread): a worker is one CPU, so on a
machine with C cores concurrency above C only queues. Speed-up = T(1) / T(k); efficiency per worker =
speed-up / k. Every run starts on a fresh cache, so each builds its own teachers (concurrent trials
that need the same teacher wait for one build: that is part of what is measured).

Every arm runs `launch --address` against a Ray cluster started beforehand by Ray's
`ray.cluster_utils.Cluster` (its start-up time is reported apart), so no arm pays for starting Ray: one
node with all cores for the single-node arms; for `--two-node`, two raylets on this machine with
``--node-cpus`` CPUs each (a real GCS, scheduling and object transfer between nodes; the node each
trial ran on is read from its MLflow child run's ``ray.node_id`` tag). On one machine this measures
the overhead of a multi-node search, not extra hardware; on two real machines use `cluster/`. Every
arm logs to one `mlflow server` (SQLite behind it) started by the script, since a multi-node search
refuses a local SQLite store.

A timing benchmark: run it on a quiet machine.

    .venv/bin/python benchmarks/scaling.py [--trials 16] [--concurrency 1 2] [--two-node] [--set k=v ...]
    .venv/bin/python benchmarks/scaling.py --quick [--two-node]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from _common import (
    PYTHON,
    REPO,
    launch,
    plot_path,
    provenance,
    read_trials,
    save_figure,
    table,
    write_result,
)

# the sizing of the figures in docs/BENCHMARKS.md (the earlier search-efficiency sizing: mni152 at 64 px,
# ts_kd, N=10, short students, so a trial takes ~30 s)
DEFAULT_SET = {
    "data.image_size": 64,
    "teacher.model_kwargs": {"img_size": 64, "patch_size": 8, "depth": 4},
    "student.epochs": 12,
    "search.grace_period": 3,
    "distill.method": "ts_kd",
}
QUICK_SET = {
    "data.image_size": 32,
    "teacher.model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2},
    "teacher.decoder_channels": 16,
    "teacher.epochs": 2,
    "student.channels": [8, 16, 32],
    "student.epochs": 3,
    "search.grace_period": 1,
    "distill.method": "ts_kd",
}


def nodes_used(work, name: str, uri: str) -> int:
    """Distinct Ray nodes the search's trials ran on, from the ``ray.node_id`` tags of its MLflow child runs."""
    from tskd_tune import tracking

    parent = json.loads((work / "runs" / name / "search.json").read_text())["parent_run_id"]
    c = tracking.client(uri)
    exp = c.get_run(parent).info.experiment_id
    runs = c.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    return len({r.data.tags.get("ray.node_id") for r in runs} - {None})


def run_search(
    space: str, name: str, trials: int, concurrency: int, sets: dict, work, address: str, nodes: int, uri: str
) -> dict:
    shutil.rmtree(work / name, ignore_errors=True)
    (work / name).mkdir(parents=True)  # its cache: fresh for every run
    over = sets | {
        "search.algorithm": "random",
        "search.scheduler": "fifo",
        "search.seed": 0,
        "cache.dir": str(work / name / "cache"),
    }
    start, wall = launch(space, name, work / "runs", trials, concurrency, uri, over, "--address", address)
    tr = read_trials(work / "runs" / name)
    first = min((t["first_ts"] for t in tr), default=None)
    return {
        "name": name,
        "concurrency": concurrency,
        "nodes": nodes,
        "trials": len(tr),
        "wall_s": wall,
        "trials_per_hour": 3600 * len(tr) / wall,
        "launch_to_first_report_s": first - start if first else None,
        "nodes_used": nodes_used(work, name, uri),
        "mean_val_dice": sum(t["metric"] or 0 for t in tr) / max(1, len(tr)),
    }


@contextlib.contextmanager
def mlflow_server(folder):
    """`mlflow server` (SQLite behind one worker, proxied artifacts) on a free loopback port; yields its URI.

    A search over two nodes refuses a local SQLite store (each node would write its own copy), so every
    arm logs to this server: the arms then differ only in where their trials run.
    """
    import socket
    import urllib.request

    folder.mkdir(parents=True, exist_ok=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        PYTHON,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{folder}/mlflow.db",
        "--serve-artifacts",
        "--artifacts-destination",
        str(folder / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with open(folder / "mlflow.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=10).status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                sys.exit(f"mlflow server did not start; see {folder / 'mlflow.log'}")
            time.sleep(2)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its workers, nothing else
        proc.wait(timeout=30)


@contextlib.contextmanager
def ray_cluster(nodes: int, cpus: int):
    """A local Ray cluster of ``nodes`` raylets with ``cpus`` CPUs each; yields (address, start-up seconds)."""
    from ray.cluster_utils import Cluster

    t0 = time.perf_counter()
    # no dashboard: port 8265 may belong to another Ray on this machine, and the benchmark does not need it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus, "include_dashboard": False})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=cpus)
        cluster.wait_for_nodes()
        yield cluster.address, time.perf_counter() - t0
    finally:
        cluster.shutdown()


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    single = [r for r in rows if r["nodes"] == 1]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ks = [r["concurrency"] for r in single]
    ax.plot(ks, [r["speedup"] for r in single], "o-", label="measured, one node")
    ax.plot(ks, ks, ":", color="grey", label="ideal")
    for r in rows:
        if r["nodes"] == 2:
            ax.plot([r["concurrency"]], [r["speedup"]], "s", color="tab:red", label="two-node local cluster")
    ax.set_xlabel("trials at once")
    ax.set_ylabel("speed-up over 1 trial at a time")
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="search_spaces/mni152.yaml")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cpu-per-trial", type=float, default=1.0, help="resources.cpu of each trial")
    ap.add_argument("--two-node", action="store_true", help="also run on a local two-node Ray cluster")
    ap.add_argument("--node-cpus", type=int, default=1, help="CPUs of each node of the two-node cluster")
    ap.add_argument("--work", default="runs/bench-scaling")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override k=v")
    ap.add_argument("--quick", action="store_true", help="smoke run: 32 px, 2 trials")
    args = ap.parse_args()
    from tskd_tune.config import parse_overrides

    if args.quick:
        args.trials = min(args.trials, 2)
    sets = (QUICK_SET if args.quick else DEFAULT_SET) | {"resources.cpu": args.cpu_per_trial}
    sets |= parse_overrides(args.overrides)
    cores = os.cpu_count() or 1
    if max(args.concurrency) * args.cpu_per_trial > cores:
        print(f"note: concurrency x cpu-per-trial exceeds the {cores} cores; Ray queues the excess trials")
    work = (REPO / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    rows, startup = [], {}
    shutil.rmtree(work / "mlflow", ignore_errors=True)
    with contextlib.ExitStack() as stack:
        uri = stack.enter_context(mlflow_server(work / "mlflow"))
        with ray_cluster(1, max(cores, int(max(args.concurrency) * args.cpu_per_trial))) as (address, up):
            startup["one_node_s"] = up
            for k in args.concurrency:
                print(f"{args.trials} trials at concurrency {k} ...", flush=True)
                rows.append(run_search(args.space, f"c{k}", args.trials, k, sets, work, address, 1, uri))
        if args.two_node:
            with ray_cluster(2, args.node_cpus) as (address, up):
                startup["two_node_s"] = up
                k = 2 * int(args.node_cpus // args.cpu_per_trial) or 1
                print(f"{args.trials} trials at concurrency {k} on a two-node local cluster ...", flush=True)
                rows.append(
                    run_search(args.space, f"two-node-c{k}", args.trials, k, sets, work, address, 2, uri)
                )
    t1 = next((r["wall_s"] for r in rows if r["concurrency"] == 1 and r["nodes"] == 1), None)
    for r in rows:
        r["speedup"] = t1 / r["wall_s"] if t1 else None
        r["efficiency"] = r["speedup"] / r["concurrency"] if t1 else None
    print()
    print(table(rows))
    result = provenance() | {
        "space": args.space,
        "overrides": sets,
        "trials": args.trials,
        "cores": cores,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "ray_startup_s": startup,
        "rows": rows,
        "note": "wall times: timing figures, valid only on a quiet machine",
    }
    out = write_result("scaling", result, args.quick)
    png = plot_path("scaling", args.quick)
    plot(rows, png)
    print(f"\nwritten to {out.relative_to(REPO)} and {png.relative_to(REPO)}")


if __name__ == "__main__":
    main()
