"""bf16 autocast on a CPU with native bf16 (AMX / AVX512-BF16): the `ddpm` generator, fp32 vs bf16, one run.

The generator is the CPU's heaviest synthetic-data cost (issue 21: a 64 px generator needs thousands of
steps). `synthetic.mixed_precision` (on by default) now autocasts to bf16 on CPUs that run it natively.
This script times, in one process and interleaved (fp32, bf16, fp32, bf16, ...), the median of:

    train step    one optimisation step of the shipped 64 px generator (32-64-64 channels, batch 16)
    sample step   one denoising step of a 64-image sampling batch

and prints the fp32 / bf16 ratio of each. Quality is not measured here: `synth_gate.py` compares the
semantic gate's figures of a bf16 and an fp32 generator trained alike.

    .venv/bin/python benchmarks/cpu_bf16.py                 # -> benchmarks/results/cpu_bf16.json
    .venv/bin/python benchmarks/cpu_bf16.py --threads 1 --repeats 5
    .venv/bin/python benchmarks/cpu_bf16.py --quick         # smoke run (not a figure)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from _common import provenance, table, write_result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10, help="timed steps per precision and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 steps per precision, one round")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.rounds = 2, 1

    import torch
    import torch.nn.functional as F

    from tskd_tune.config import validate
    from tskd_tune.runtime import autocast_bf16, native_bf16
    from tskd_tune.synth.generator import SAMPLE_BATCH, make_unet

    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    if not native_bf16(cpu):
        print("this CPU has no native bf16 (AMX or AVX512-BF16): the generator runs float32 here")
        return 1
    gc = validate({"synthetic": {"generator": "ddpm", "image_size": 64}}).synthetic
    torch.manual_seed(0)
    unet = make_unet(gc, 1, 64)
    opt = torch.optim.AdamW(unet.parameters(), lr=gc.lr)
    x = torch.randn(gc.batch_size, 1, 64, 64)
    t = torch.randint(1000, (gc.batch_size,))
    xs = torch.randn(SAMPLE_BATCH, 1, 64, 64)
    ts = torch.full((SAMPLE_BATCH,), 500)

    def train(amp: bool) -> None:
        with autocast_bf16(cpu, amp):
            pred = unet(x, t).sample
        loss = F.mse_loss(pred.float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sample(amp: bool) -> None:
        with torch.inference_mode(), autocast_bf16(cpu, amp):
            unet(xs, ts)

    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for name, fn in (("train step", train), ("sample step", sample)):
            for prec, amp in (("fp32", False), ("bf16", True)):
                fn(amp)  # warm-up: oneDNN picks its kernels on the first call
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    fn(amp)
                    times.setdefault((name, prec), []).append(time.perf_counter() - t0)
    rows = []
    for name in ("train step", "sample step"):
        fp32 = statistics.median(times[(name, "fp32")])
        bf16 = statistics.median(times[(name, "bf16")])
        rows.append(
            {
                "what": name,
                "fp32_s": round(fp32, 4),
                "bf16_s": round(bf16, 4),
                "speedup": round(fp32 / bf16, 2),
            }
        )
    print(table(rows))
    write_result(
        "cpu_bf16",
        {
            "provenance": provenance(),
            "threads": args.threads,
            "generator": {"image_size": 64, "channels": gc.channels, "batch_size": gc.batch_size},
            "sample_batch": SAMPLE_BATCH,
            "rows": rows,
        },
        quick=args.quick,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
