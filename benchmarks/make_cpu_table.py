"""Measure the CPU dispatch table shipped with lkfast (lkfast/ops/cpu_table.json), per instruction set.

    python benchmarks/make_cpu_table.py [--isa avx512,avx2] [--out lkfast/ops/cpu_table.json]

For each instruction set, a child process runs lkfast's own calibration
(``lkfast.ops.cpu_dispatch.choose``, the same measurement a machine makes on first use) over the
RepLKNet-31B and ConvNeXt stage shapes (batch 64, 8 and 1, fp32 and bf16, NCHW and channels_last), with
both sides capped to that instruction set: ``LKFAST_CPU_ISA`` caps lkfast's kernels and
``ONEDNN_MAX_CPU_ISA`` caps PyTorch's oneDNN. The child checks that PyTorch honoured the cap by
asking oneDNN which kernel it ran (``ONEDNN_VERBOSE``). The rows record the winner and both times;
the file records the CPU it was measured on. Timing is wall clock on whatever else the machine is
doing: run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lkfast.bench import onednn_depthwise_implementation

ONEDNN_CAP = {"avx512": "AVX512_CORE_AMX", "avx2": "AVX2"}
# (channels, map size, kernel): RepLKNet-31B's four stages at 224 px, then ConvNeXt-T's.
SHAPES = [(128, 56, 31), (256, 28, 29), (512, 14, 27), (1024, 7, 13),
          (96, 56, 7), (192, 28, 7), (384, 14, 7), (768, 7, 7)]
# The evaluation's default batch (64), the benchmarks' (8) and one image: the winner can turn with
# the batch (ConvNeXt-T's stage 4 at 68bbfeb: lkfast's forward 1.4x oneDNN at batch 1, 0.56-0.81x
# at 16-128), and the lookup weighs it like the other dimensions.
BATCHES = (64, 8, 1)
DTYPES = ("float32", "bfloat16")
LAYOUTS = ("nchw", "channels_last")

CHILD = r"""
import json, os, sys, subprocess, torch
from lkfast.ops import cpu_dispatch as cd
spec = json.loads(sys.argv[1])
rows = []
for dtype in spec["dtypes"]:
    for layout in spec["layouts"]:
        for n in spec["batches"]:
            for c, s, k in spec["shapes"]:
                x = torch.randn(n, c, s, s, dtype=getattr(torch, dtype))
                if layout == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                w = torch.randn(c, 1, k, k, dtype=x.dtype)
                for p in cd.MEASURED_PASSES:
                    choice = cd.choose(x, w, p, calibrate=True)
                    key = cd.shape_class(x.shape, k, k, x.dtype, layout == "channels_last")
                    entry = cd.calibration().get((p,) + key)
                    rows.append({"pass": p, "key": list(key), "backend": choice.backend,
                                 "seconds": entry["seconds"], "shape": [n, c, s, s, k],
                                 **({"bounded": entry["bounded"]} if "bounded" in entry else {})})
                    print(p, dtype, layout, n, c, s, k, choice.backend,
                          {b: round(t * 1e3, 2) for b, t in entry["seconds"].items()}, flush=True)
print("ROWS", json.dumps({"isa": cd.fingerprint()["isa"], "rows": rows}))
"""

def _load_average() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine skews every time here."""
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--isa", default="avx512,avx2", help="comma list of avx512, avx2 (default both)")
    parser.add_argument("--out", default=str(Path(__file__).parents[1] / "lkfast" / "ops" / "cpu_table.json"))
    parser.add_argument("--quick", action="store_true", help="batch 8, fp32 only (a smoke run)")
    args = parser.parse_args(argv)
    spec = {"shapes": SHAPES, "batches": [8] if args.quick else list(BATCHES),
            "dtypes": ["float32"] if args.quick else list(DTYPES), "layouts": list(LAYOUTS)}
    table = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    for isa in args.isa.split(","):
        if isa not in ONEDNN_CAP:
            parser.error(f"unknown instruction set {isa!r}; choose from {', '.join(ONEDNN_CAP)}")
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, LKFAST_CPU_ISA=isa, ONEDNN_MAX_CPU_ISA=ONEDNN_CAP[isa],
                       LKFAST_CACHE=cache, LKFAST_CALIBRATE="1")
            onednn = onednn_depthwise_implementation(env)
            load_before = _load_average()
            print(f"== {isa}: lkfast capped by LKFAST_CPU_ISA={isa}, oneDNN by ONEDNN_MAX_CPU_ISA="
                  f"{ONEDNN_CAP[isa]} -> oneDNN ran {onednn}; load average {load_before}", flush=True)
            proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env, text=True,
                                  stdout=subprocess.PIPE, check=True)
            load_after = _load_average()
            print(f"== {isa}: done; load average {load_after}", flush=True)
        result = None
        for line in proc.stdout.splitlines():
            if line.startswith("ROWS "):
                result = json.loads(line[5:])
            else:
                print(line)
        if result["isa"] != isa:
            print(f"   this CPU cannot run {isa} (lkfast ran {result['isa']}): not recorded")
            continue
        from lkfast.ops.cpu_dispatch import _cpu_model

        table[isa] = {"measured_on": f"{_cpu_model()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}",
                      "onednn_implementation": onednn, "load_average": [load_before, load_after],
                      "rows": result["rows"]}
    Path(args.out).write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
