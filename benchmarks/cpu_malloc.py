"""Training steps on a CPU with glibc's default malloc vs `resources.keep_freed_memory`, one run.

glibc serves blocks above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps them on free,
so a step whose activations are larger faults every page in again; `resources.keep_freed_memory` (on by
default) raises the thresholds so freed blocks stay in the heap. The setting is per process and cannot be
undone, so each (model, setting) runs in its own child process, the settings alternating round by round.
Each child builds its model with the production factories and times the median of REPEATS steps
(forward, loss, backward, optimiser) after one warm-up step; it reports its user and system CPU seconds and
its peak resident memory. Models:

    teacher lora   LiteMedSAM with LoRA in its last 2 blocks and the conv head, from cached prefix states
                   (mni152.yaml's teacher: batch 8, 64x64 tokens of 320 channels into the adapted blocks)
    unet           the U-Net 16-128 student, 64 px, batch 16
    vit_tiny       the ViT-Tiny student (patch 8), 64 px, batch 16

    .venv/bin/python benchmarks/cpu_malloc.py                 # -> benchmarks/results/cpu_malloc.json
    .venv/bin/python benchmarks/cpu_malloc.py --quick         # smoke run (not a figure)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from _common import provenance, table, write_result

MODELS = ("teacher lora", "unet", "vit_tiny")


def child(model: str, keep: bool, repeats: int, threads: int) -> dict:
    """Time `repeats` training steps of `model` in this process (run as a child, one setting per process)."""
    import torch
    import torch.nn.functional as F

    from tskd_tune.config import validate
    from tskd_tune.runtime import keep_freed_memory

    cfg = validate({"resources": {"keep_freed_memory": keep}})
    applied = keep_freed_memory(cfg)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if model == "teacher lora":
        from tskd_tune.models.teacher import adapted, build_teacher

        tcfg = validate(
            {"teacher": {"model": "litemedsam", "adapt": "lora", "lora": {"last_blocks": 2}, "head": "conv"}}
        ).teacher
        base = build_teacher(tcfg, in_chans=1, num_classes=3, image_size=64)
        with torch.no_grad():
            state = base.prefix(torch.rand(8, 1, 64, 64))
        net = adapted(base, tcfg)

        def forward():
            return net.from_state(state)

        y = torch.randint(0, 3, (8, 64, 64))
    else:
        from tskd_tune.models.students import build_student

        scfg = validate({"student": {"model": model}}).student
        net = build_student(scfg, 1, 3, 64)
        x = torch.rand(16, 1, 64, 64)

        def forward():
            return net(x)

        y = torch.randint(0, 3, (16, 64, 64))
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        loss = F.cross_entropy(forward(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    times = []
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "applied": applied,
        "step_s": statistics.median(times),
        "user_s": (r1.ru_utime - r0.ru_utime) / repeats,
        "sys_s": (r1.ru_stime - r0.ru_stime) / repeats,
        "peak_rss_gb": r1.ru_maxrss / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per child")
    ap.add_argument("--rounds", type=int, default=2, help="children per (model, setting), alternating")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 step, 1 round, the students only")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "KEEP"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        model, keep = args.child
        print(json.dumps(child(model, keep == "1", args.repeats, args.threads)))
        return 0
    if args.quick:
        args.repeats, args.rounds = 1, 1
        args.models = [m for m in args.models if m != "teacher lora"]

    runs: dict[tuple[str, bool], list[dict]] = {}
    for _ in range(args.rounds):
        for model in args.models:
            for keep in (False, True):
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        model,
                        str(int(keep)),
                        "--repeats",
                        str(args.repeats),
                        "--threads",
                        str(args.threads),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                runs.setdefault((model, keep), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for model in args.models:
        off, on = runs[(model, False)], runs[(model, True)]

        def med(rs: list[dict], key: str) -> float:
            return statistics.median(r[key] for r in rs)

        rows.append(
            {
                "model": model,
                "default_step_s": round(med(off, "step_s"), 3),
                "keep_step_s": round(med(on, "step_s"), 3),
                "speedup": round(med(off, "step_s") / med(on, "step_s"), 2),
                "default_sys_share": round(med(off, "sys_s") / (med(off, "sys_s") + med(off, "user_s")), 2),
                "keep_sys_share": round(med(on, "sys_s") / (med(on, "sys_s") + med(on, "user_s")), 2),
                "default_peak_gb": round(max(r["peak_rss_gb"] for r in off), 2),
                "keep_peak_gb": round(max(r["peak_rss_gb"] for r in on), 2),
                "applied": all(r["applied"] for r in on),
            }
        )
    print(table(rows))
    write_result(
        "cpu_malloc",
        {
            "provenance": provenance(),
            "threads": args.threads,
            "repeats": args.repeats,
            "rounds": args.rounds,
            "rows": rows,
        },
        quick=args.quick,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
