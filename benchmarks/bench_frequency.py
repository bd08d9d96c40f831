"""Benchmark of lkfast.ops.frequency_noise: the fused and separable paths against the torch.fft reference.

    python benchmarks/bench_frequency.py --out DIR [--device cuda|cpu] [--batch 256] [--size 224] [--suffix S]

Times the three methods (same generator seed, so the same noise) at a few band centres and writes
DIR/frequency_bench_{gpu,cpu}{S}.json and .md (``--suffix _b1_64px`` keeps a second shape's
files beside the first: the eval draws each image's noise on its own, batch 1). Timers from lkfast.timing: on CUDA, CUDA events around
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

METHODS = ("reference", "fused", "separable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=10, help="timed rounds on the CPU")
    parser.add_argument("--suffix", default="", help="appended to the output files' names")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    dev = args.device
    x = torch.rand(args.batch, 3, args.size, args.size, device=dev)
    name = torch.cuda.get_device_name() if dev == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    rows = []
    for freq in (0.1 * math.pi, 0.5 * math.pi, 0.9 * math.pi):
        row = {"freq": freq, "batch": args.batch, "size": args.size, "device": name}
        for method in METHODS:
            gen = torch.Generator(dev)
            row[method + "_ms"] = time_ms(lambda: frequency_noise(x, freq, generator=gen.manual_seed(0), method=method),
                                          dev, rounds=args.reps)
        a = frequency_noise(x, freq, generator=torch.Generator(dev).manual_seed(0), method="reference")
        for method in METHODS[1:]:
            b = frequency_noise(x, freq, generator=torch.Generator(dev).manual_seed(0), method=method)
            row[f"{method}_max_abs_diff"] = (a - b).abs().max().item()
            row[f"{method}_speedup"] = row["reference_ms"] / row[method + "_ms"]
            # minimal traffic: read x, write the output (fp32)
            row[f"{method}_gbps"] = 2 * x.numel() * 4 / (row[method + "_ms"] * 1e-3) / 1e9
        row["speedup"], row["max_abs_diff"] = row["fused_speedup"], row["fused_max_abs_diff"]  # (the earlier files' keys)
        rows.append(row)
    tag = "gpu" if dev == "cuda" else "cpu"
    write_text_atomic(os.path.join(args.out, f"frequency_bench_{tag}{args.suffix}.json"), json.dumps(rows, indent=1))
    auto = "separable" if dev == "cpu" else "fused"
    md = markdown_table(
        ["band centre", "reference ms", "fused ms", "separable ms", "fused speed-up", "separable speed-up",
         f"auto ({auto}) GB/s (x in + out)", "max abs diff (fused, separable)"],
        [[f"{r['freq'] / math.pi:.1f} pi", f"{r['reference_ms']:.2f}", f"{r['fused_ms']:.2f}", f"{r['separable_ms']:.2f}",
          f"{r['fused_speedup']:.2f}x", f"{r['separable_speedup']:.2f}x", f"{r[auto + '_gbps']:.1f}",
          f"{r['fused_max_abs_diff']:.1e}, {r['separable_max_abs_diff']:.1e}"] for r in rows],
        align="lrrrrrrr", caption=f"# frequency_noise: fused and separable vs the torch.fft reference ({name}, batch "
                                  f"{args.batch}, {args.size} px, fp32)")
    write_text_atomic(os.path.join(args.out, f"frequency_bench_{tag}{args.suffix}.md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
