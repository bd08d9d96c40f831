"""Benchmark of lkfast.ops.frequency_noise: the fused path against the torch.fft reference.

    python benchmarks/bench_frequency.py --out DIR [--device cuda|cpu] [--batch 256] [--size 224]

Times both methods (same generator seed, so the same noise) at a few band centres and writes
DIR/frequency_bench_{gpu,cpu}.json and .md. Timers from lkfast.timing: on CUDA, CUDA events around
back-to-back calls; on the CPU, wall-clock rounds (run it under `flock /tmp/lkfast-bench.lock` on a
shared machine).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from lkfast.ops.frequency import frequency_noise
from lkfast.tables import markdown_table, write_text_atomic
from lkfast.timing import time_ms


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=10, help="timed rounds on the CPU")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    dev = args.device
    x = torch.rand(args.batch, 3, args.size, args.size, device=dev)
    name = torch.cuda.get_device_name() if dev == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    rows = []
    for freq in (0.1 * math.pi, 0.5 * math.pi, 0.9 * math.pi):
        row = {"freq": freq, "batch": args.batch, "size": args.size, "device": name}
        for method in ("reference", "fused"):
            gen = torch.Generator(dev)
            row[method + "_ms"] = time_ms(lambda: frequency_noise(x, freq, generator=gen.manual_seed(0), method=method),
                                          dev, rounds=args.reps)
        a = frequency_noise(x, freq, generator=torch.Generator(dev).manual_seed(0), method="reference")
        b = frequency_noise(x, freq, generator=torch.Generator(dev).manual_seed(0), method="fused")
        row["max_abs_diff"] = (a - b).abs().max().item()
        row["speedup"] = row["reference_ms"] / row["fused_ms"]
        # minimal traffic: read x, write the output (fp32)
        row["fused_gbps"] = 2 * x.numel() * 4 / (row["fused_ms"] * 1e-3) / 1e9
        rows.append(row)
    tag = "gpu" if dev == "cuda" else "cpu"
    write_text_atomic(os.path.join(args.out, f"frequency_bench_{tag}.json"), json.dumps(rows, indent=1))
    md = markdown_table(
        ["band centre", "reference ms", "fused ms", "speed-up", "fused GB/s (x in + out)", "max abs diff"],
        [[f"{r['freq'] / math.pi:.1f} pi", f"{r['reference_ms']:.2f}", f"{r['fused_ms']:.2f}", f"{r['speedup']:.2f}x",
          f"{r['fused_gbps']:.1f}", f"{r['max_abs_diff']:.1e}"] for r in rows],
        align="lrrrrr", caption=f"# frequency_noise: fused vs torch.fft reference ({name}, batch {args.batch}, "
                                f"{args.size} px, fp32)")
    write_text_atomic(os.path.join(args.out, f"frequency_bench_{tag}.md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
