"""GPU throughput of the search: trials/hour with 1, 2 and 4 trials sharing each GPU (Ray's fractional
GPUs, ``resources.gpu = 1/k``; each trial's memory is capped at its share by tskd-tune), GPU
utilisation and memory per trial, with mixed precision (``resources.mixed_precision``: bf16 autocast)
off and on.

Every arm runs the same search (random sampler seed 0, FIFO, so the same configs to the end) on a
fresh cache. While it runs, a thread samples NVML every ``--sample-s`` seconds: device utilisation and
the memory of each process on the GPU (one Ray worker per trial); nvidia-smi is the fallback.

Needs a CUDA GPU. Without one, ``--dry-run`` (also implied by ``--quick``) validates every arm's config,
prints the plan and exits 0 saying that nothing was measured; a real run exits 2.

    .venv/bin/python benchmarks/gpu.py [--per-gpu 1 2 4] [--trials 8] [--set k=v ...]
    .venv/bin/python benchmarks/gpu.py --dry-run
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

from _common import REPO, launch, provenance, read_trials, table, write_result

# big enough to keep a GPU busy: mni152 at 128 px, a 12-block ViT-S/8 teacher, the default U-Net student
DEFAULT_SET = {
    "data.image_size": 128,
    "teacher.model_kwargs": {"img_size": 128, "patch_size": 8},
    "teacher.batch_size": 16,
    "teacher.epochs": 30,
    "student.channels": [16, 32, 64, 128],
    "student.epochs": 20,
    "student.batch_size": 32,
    "distill.method": "ts_kd",
}


class GpuSampler(threading.Thread):
    """Samples device utilisation and per-process memory (MiB) until stopped."""

    def __init__(self, period: float):
        super().__init__(daemon=True)
        self.period, self.stop = period, threading.Event()
        self.util: list[float] = []
        self.proc_mem: dict[int, float] = {}  # pid -> peak MiB
        self.total_mem: list[float] = []

    def _nvml(self):
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]

        def sample():
            for h in handles:
                self.util.append(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
                self.total_mem.append(pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20)
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
                    if p.usedGpuMemory:
                        self.proc_mem[p.pid] = max(self.proc_mem.get(p.pid, 0), p.usedGpuMemory / 2**20)

        return sample

    def _smi(self):
        def sample():
            q = ["nvidia-smi", "--format=csv,noheader,nounits"]
            out = subprocess.run(
                [*q, "--query-gpu=utilization.gpu,memory.used"], capture_output=True, text=True
            )
            for line in out.stdout.strip().splitlines():
                u, m = (float(x) for x in line.split(","))
                self.util.append(u)
                self.total_mem.append(m)
            out = subprocess.run([*q, "--query-compute-apps=pid,used_memory"], capture_output=True, text=True)
            for line in out.stdout.strip().splitlines():
                pid, m = line.split(",")
                self.proc_mem[int(pid)] = max(self.proc_mem.get(int(pid), 0), float(m))

        return sample

    def run(self) -> None:
        try:
            sample = self._nvml()
        except Exception:  # noqa: BLE001 - no NVML bindings or driver: fall back to the CLI
            sample = self._smi()
        while not self.stop.is_set():
            sample()
            self.stop.wait(self.period)

    def summary(self, driver_pid: int | None = None) -> dict:
        trial_mem = [m for pid, m in self.proc_mem.items() if pid != driver_pid]
        return {
            "gpu_util_mean": statistics.fmean(self.util) if self.util else None,
            "gpu_util_p90": sorted(self.util)[int(0.9 * (len(self.util) - 1))] if self.util else None,
            "gpu_mem_total_peak_mib": max(self.total_mem, default=None),
            "gpu_mem_per_trial_peak_mib": max(trial_mem, default=None),
            "gpu_mem_per_trial_mean_mib": statistics.fmean(trial_mem) if trial_mem else None,
            "gpu_processes_seen": len(self.proc_mem),
        }


def arms(per_gpu: list[int], amp: list[bool]) -> list[dict]:
    return [{"per_gpu": k, "mixed_precision": a} for a in amp for k in per_gpu]


def arm_sets(arm: dict, base: dict, gpus: int, cores: int) -> tuple[dict, int]:
    """Config overrides and concurrency of an arm: k trials per GPU, the CPUs split among them."""
    k = arm["per_gpu"]
    concurrency = k * gpus
    cpu = max(1, cores // concurrency)
    return base | {
        "resources.gpu": 1 / k,
        "resources.cpu": cpu,
        "resources.device": "cuda",
        "resources.mixed_precision": arm["mixed_precision"],
        "search.algorithm": "random",
        "search.scheduler": "fifo",
        "search.seed": 0,
    }, concurrency


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="search_spaces/mni152.yaml")
    ap.add_argument("--per-gpu", type=int, nargs="+", default=[1, 2, 4], help="trials sharing one GPU")
    ap.add_argument("--amp", choices=["both", "off", "on"], default="both", help="mixed precision arms")
    ap.add_argument("--trials", type=int, default=8, help="trials per arm")
    ap.add_argument("--sample-s", type=float, default=1.0)
    ap.add_argument("--work", default="runs/bench-gpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override k=v")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the plan; measure nothing")
    ap.add_argument(
        "--quick", action="store_true", help="without a GPU: --dry-run; with one: 2 trials, k in 1 2"
    )
    args = ap.parse_args()
    import torch

    from tskd_tune.config import load_config, parse_overrides

    gpus = torch.cuda.device_count()
    if args.quick and gpus:
        args.trials, args.per_gpu = 2, [k for k in args.per_gpu if k <= 2]
    amp = {"both": [False, True], "off": [False], "on": [True]}[args.amp]
    base = DEFAULT_SET | parse_overrides(args.overrides)
    cores = os.cpu_count() or 1
    plan = []
    for arm in arms(args.per_gpu, amp):
        sets, conc = arm_sets(arm, base, max(gpus, 1), cores)
        load_config(REPO / args.space, sets)  # a bad override fails here, before any search starts
        plan.append(
            arm
            | {
                "concurrency": conc,
                "resources.gpu": sets["resources.gpu"],
                "resources.cpu": sets["resources.cpu"],
            }
        )
    print(table(plan))
    if not gpus or args.dry_run:
        why = "no CUDA GPU is visible" if not gpus else "--dry-run"
        print(
            f"\n{why}: gpu.py has not run; nothing was measured (configs of all {len(plan)} arms are valid)"
        )
        if not gpus and not (args.dry_run or args.quick):
            sys.exit(2)
        return
    work = (REPO / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    rows = []
    for arm in arms(args.per_gpu, amp):
        sets, conc = arm_sets(arm, base, gpus, cores)
        name = f"k{arm['per_gpu']}-{'amp' if arm['mixed_precision'] else 'fp32'}"
        shutil.rmtree(work / name, ignore_errors=True)
        (work / name).mkdir(parents=True)  # its cache and MLflow store: fresh for every run
        sets["cache.dir"] = str(work / name / "cache")
        print(f"{name}: {args.trials} trials, {conc} at once ...", flush=True)
        sampler = GpuSampler(args.sample_s)
        sampler.start()
        try:
            _, wall = launch(
                args.space, name, work / "runs", args.trials, conc, f"sqlite:///{work / name}/mlflow.db", sets
            )
        finally:
            sampler.stop.set()
            sampler.join()
        tr = read_trials(work / "runs" / name)
        rows.append(
            {
                "arm": name,
                "per_gpu": arm["per_gpu"],
                "mixed_precision": arm["mixed_precision"],
                "concurrency": conc,
                "trials": len(tr),
                "wall_s": wall,
                "trials_per_hour": 3600 * len(tr) / wall,
                "mean_val_dice": statistics.fmean([t["metric"] or 0 for t in tr]) if tr else None,
            }
            | sampler.summary()
        )
        print(table(rows[-1:]), flush=True)
    print()
    print(table(rows))
    result = provenance() | {
        "space": args.space,
        "overrides": base,
        "gpus": gpus,
        "gpu_name": torch.cuda.get_device_name(0),
        "trials": args.trials,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "rows": rows,
    }
    out = write_result("gpu", result, args.quick)
    print(f"\nwritten to {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
