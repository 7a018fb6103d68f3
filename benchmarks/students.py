"""Student efficiency: parameters, CPU latency (batch 1 and 16, PyTorch and ONNX Runtime) of every
student against every teacher, with test Dice where a trained model exists.

Latency is a timing figure: run it on a quiet machine. Models are built by
the production factories with random weights (latency does not depend on the weights); a teacher is
timed as deployed, its LoRA merged, i.e. the plain segmenter. Dice comes from `--dice` (one ts_kd trial
per student on mni152 at the kd_methods sizing, N and seed below; a quality figure) or, for the
benchmark's own U-Net and teacher, from benchmarks/results/kd_methods.json when it exists.

    .venv/bin/python benchmarks/students.py [--sizes 64 256] [--threads 2] [--dice]
    .venv/bin/python benchmarks/students.py --quick
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from _common import REPO, RESULTS, provenance, table, write_result

from tskd_tune.config import StudentConfig, TeacherConfig

STUDENTS = {
    "unet 8-64": {"model": "unet", "channels": [8, 16, 32, 64]},
    "unet 16-128 (default)": {"model": "unet", "channels": [16, 32, 64, 128]},
    "timm_unet mobilenetv3_small": {
        "model": "timm_unet",
        "encoder": "mobilenetv3_small_100",
        "channels": [16, 24, 48, 96],
    },
    "timm_unet resnet18": {"model": "timm_unet", "encoder": "resnet18", "channels": [32, 64, 128, 256]},
    "vit_tiny": {"model": "vit_tiny"},
}
TEACHERS = {
    "ViT-S/8 depth 4 (demo, mni152)": {
        "model": "vit_small_patch16_224",
        "model_kwargs": {"patch_size": 8, "depth": 4},
    },
    "ViT-S/16 (12 blocks)": {"model": "vit_small_patch16_224", "model_kwargs": {}},
    "ViT-B/16 (12 blocks)": {"model": "vit_base_patch16_224", "model_kwargs": {}},
    "LiteMedSAM (256 px encoder)": {"model": "litemedsam"},
}
CLASSES = 3  # mni152: background, grey matter, white matter


def build(kind: str, spec: dict, size: int) -> torch.nn.Module:
    if kind == "student":
        from tskd_tune.models.students import build_student

        return build_student(StudentConfig(**spec), 1, CLASSES, size).eval()
    from tskd_tune.models.teacher import build_teacher

    kwargs = dict(spec.get("model_kwargs", {}))
    if spec["model"] != "litemedsam":
        kwargs["img_size"] = size
    cfg = TeacherConfig(model=spec["model"], model_kwargs=kwargs)
    return build_teacher(cfg, in_chans=1, num_classes=CLASSES, image_size=size).eval()


def torch_latency(model, size: int, batch: int, repeats: int) -> float:
    from tskd_tune.metrics import latency_ms

    return latency_ms(model, 1, size, batch=batch, repeats=repeats, warmup=2)


def onnx_latency(model, size: int, batches: list[int], repeats: int, threads: int) -> dict[int, float | str]:
    """Median ms per forward in ONNX Runtime (CPU provider, ``threads`` intra-op threads) per batch size."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        x = torch.rand(1, 1, size, size)
        try:
            with torch.inference_mode():
                torch.onnx.export(
                    model,
                    (x,),
                    str(path),
                    input_names=["image"],
                    output_names=["logits"],
                    dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                    dynamo=False,
                )
        except Exception as exc:  # noqa: BLE001 - a model that does not export is a row, not a crash
            return dict.fromkeys(batches, f"export failed: {exc.__class__.__name__}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        out = {}
        for b in batches:
            feed = {"image": np.random.default_rng(0).random((b, 1, size, size), dtype=np.float32)}
            try:
                for _ in range(2):
                    sess.run(None, feed)
            except Exception as exc:  # noqa: BLE001 - e.g. a traced reshape that fixed the batch size at export
                out[b] = f"run failed: {exc.__class__.__name__}"
                continue
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                sess.run(None, feed)
                times.append(time.perf_counter() - t0)
            out[b] = statistics.median(times) * 1000
        return out


def dice_from_kd_methods(n: int | None = None, seed: int | None = None) -> dict[str, tuple[float, str]]:
    """Test Dice of the models the kd_methods run trained (its U-Net student, its teacher), with its source.

    With ``n`` and ``seed``: that cell of the run (to sit beside students trained at the same N and seed);
    otherwise each one's mean over seeds at the largest N it has run at.
    """
    path = RESULTS / "kd_methods.json"
    if not path.is_file():
        return {}
    res = json.loads(path.read_text())
    names = {}
    # the run's U-Net student is its space's (with the run's overrides), matched to a row here by its spec
    from tskd_tune.config import load_config

    student = load_config(REPO / res["space"], res.get("base_overrides") or {}).student
    for name, spec in STUDENTS.items():
        if spec["model"] == student.model == "unet" and spec["channels"] == list(student.channels):
            names["ts_kd"] = name
    teacher_rows = {
        "vit_small_patch16_224": "ViT-S/8 depth 4 (demo, mni152)",
        "litemedsam": "LiteMedSAM (256 px encoder)",
    }
    if res.get("teacher_model") in teacher_rows:
        names["teacher"] = teacher_rows[res["teacher_model"]]
    if n is not None and seed is not None:
        cells = {c["variant"]: c for c in res.get("cells", []) if c["n"] == n and c["seed"] == seed}
        return {
            name: (cells[v]["test_dice"], f"kd_methods.json, N={n}, seed {seed}")
            for v, name in names.items()
            if v in cells
        }
    out = {}
    for v, name in names.items():  # the largest N this variant has run at
        rows = sorted((r for r in res["summary"] if r["variant"] == v), key=lambda r: r["n"])
        if rows:
            r = rows[-1]
            out[name] = (r["test_dice"], f"kd_methods.json, N={r['n']}, mean over {r['seeds']} seed(s)")
    return out


def train_dice(names: list[str], n: int, seed: int, quick: bool) -> dict[str, tuple[float, str]]:
    """One ts_kd trial per student (the kd_methods sizing, teacher cached there) -> test Dice.

    Each finished student is appended to ``WORK/students_dice.jsonl`` and not retrained by a later run
    (delete the file to retrain). main runs this in a child process, so that latencies are timed in a
    process that has not trained.
    """
    sys.path.insert(0, str(Path(__file__).parent))
    from kd_methods import BASE, QUICK, run_cell

    base = QUICK if quick else BASE
    work = REPO / ("runs/bench-kd-quick" if quick else "runs/bench-kd")
    done_file = work / "students_dice.jsonl"
    done = {}
    if done_file.exists():
        for line in done_file.read_text().splitlines():
            rec = json.loads(line)
            done[(rec["student"], rec["n"], rec["seed"])] = rec["test_dice"]
    source = f"ts_kd trial of this student, mni152, N={n}, seed {seed}"
    out = {}
    for name in names:
        if (name, n, seed) in done:
            out[name] = (done[(name, n, seed)], source)
            print(f"  {name}: test Dice {out[name][0]:.3f} (from {done_file.relative_to(REPO)})", flush=True)
            continue
        spec = STUDENTS[name]
        over = (
            base
            | {f"student.{k}": v for k, v in spec.items()}
            | {
                "distill.method": "ts_kd",
                "data.labeled": n,
                "seed": seed,
                "data.seed": seed,
                "cache.dir": str(work / "cache"),
            }
        )
        if quick and spec["model"] != "unet":
            over["student.channels"] = spec.get("channels", [8, 16, 32])[:3]
        out[name] = (run_cell("search_spaces/mni152.yaml", over)["test_dice"], source)
        work.mkdir(parents=True, exist_ok=True)
        with done_file.open("a") as f:
            f.write(json.dumps({"student": name, "n": n, "seed": seed, "test_dice": out[name][0]}) + "\n")
        print(f"  {name}: test Dice {out[name][0]:.3f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--students", nargs="+", default=list(STUDENTS), help=f"subset of {list(STUDENTS)}")
    ap.add_argument("--teachers", nargs="+", default=list(TEACHERS), help=f"subset of {list(TEACHERS)}")
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--dice", action="store_true", help="train each student once (ts_kd) for its test Dice")
    ap.add_argument("--dice-n", type=int, default=20)
    ap.add_argument("--dice-seed", type=int, default=0)
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 32 px, 2 repeats, two students, one teacher"
    )
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.repeats = [32], 2
        args.students = [s for s in args.students if s.startswith("unet 8") or s == "vit_tiny"]
        args.teachers = args.teachers[:1]
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    dice = dice_from_kd_methods(args.dice_n, args.dice_seed) if args.dice else dice_from_kd_methods()
    if args.dice:
        # in a child process: a process that has trained times forwards up to 2x slower (measured: the
        # U-Net 8-64 at 64 px, batch 1, 2.3 ms after five training runs in the process vs 1.1 ms without)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            dice |= pool.submit(train_dice, args.students, args.dice_n, args.dice_seed, args.quick).result()
    rows = []
    for size in args.sizes:
        for kind, names, specs in (
            ("student", args.students, STUDENTS),
            ("teacher", args.teachers, TEACHERS),
        ):
            for name in names:
                try:
                    model = build(kind, specs[name], size)
                except Exception as exc:  # noqa: BLE001 - e.g. litemedsam without its optional extra
                    print(f"skip {name} at {size} px: {exc}", flush=True)
                    continue
                row = {
                    "model": name,
                    "role": kind,
                    "size": size,
                    "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                }
                for b in args.batches:
                    row[f"torch_b{b}_ms"] = torch_latency(model, size, b, args.repeats)
                if not args.no_onnx:
                    for b, ms in onnx_latency(model, size, args.batches, args.repeats, args.threads).items():
                        row[f"onnx_b{b}_ms"] = ms
                row["test_dice"] = dice[name][0] if name in dice and size == min(args.sizes) else None
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
    # speed-up at batch 1 over the first teacher listed (the benchmarks' own), per size
    for size in args.sizes:
        ref = next((r for r in rows if r["role"] == "teacher" and r["size"] == size), None)
        for r in rows:
            if r["size"] == size:
                r["speedup_b1"] = ref["torch_b1_ms"] / r["torch_b1_ms"] if ref else None
    print()
    print(table(rows))
    result = provenance() | {
        "threads": args.threads,
        "repeats": args.repeats,
        "dice_source": {name: source for name, (_, source) in dice.items()},
        "speedup_reference": args.teachers[0] if args.teachers else None,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "rows": rows,
        "note": "latency: median ms per forward, random weights, CPU; Dice: test Dice on mni152 where trained",
    }
    out = write_result("students", result, args.quick)
    print(f"\nwritten to {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
