"""Host time per call of lkfast.ops.depthwise_conv2d on CUDA: ``auto`` against named backends.

    python benchmarks/probe_host_overhead.py        # on a CUDA machine; prints, writes nothing

The probe behind benchmarks/results/gpu_h200/host_overhead.log. For small maps (RepLKNet-31B's
stages 3 and 4, batch 64, fp16) it times 200 back-to-back calls twice: without a synchronize (host
time per call: what Python, torch.library and the kernel launchers cost) and with one at the end
(wall time per call). Where the two agree the op is host-bound. Each backend runs on the eager
path (what a plain call takes) and, marked "(registered op)", through the registered custom op
(what every call took before the eager path: lkfast.ops.depthwise ``_eager`` patched off). Then
cProfile of 100 forward + input-gradient steps, auto and triton_mma, sorted by own time.
"""
from __future__ import annotations

import contextlib
import cProfile
import io
import pstats
import sys
import time

import torch

CASES = [  # (N, C, H, k, memory format)
    (64, 512, 14, 27, torch.contiguous_format),
    (64, 512, 14, 27, torch.channels_last),
    (64, 1024, 7, 13, torch.contiguous_format),
]
# (backend, eager path): the registered op's rows show what the eager path saves
VARIANTS = (("auto", True), ("triton_mma", True), ("cuda", True), ("auto", False), ("triton_mma", False))
CALLS = 200


def main() -> int:
    if not torch.cuda.is_available():
        print("probe_host_overhead: no CUDA device; nothing to measure")
        return 2
    from unittest import mock

    import lkfast.ops as ops
    from lkfast.ops import depthwise

    torch.backends.cudnn.benchmark = True
    for index, (N, C, H, k, fmt) in enumerate(CASES):
        x = torch.randn(N, C, H, H, device="cuda", dtype=torch.float16).contiguous(memory_format=fmt).requires_grad_(True)
        w = (torch.randn(C, 1, k, k, device="cuda") / k).half()
        g = torch.randn_like(x)
        print("shape", N, C, H, k, torch.float16, fmt, "plan", ops.plan_for(x, w))

        def forward(backend):
            with torch.no_grad():
                ops.depthwise_conv2d(x, w, backend=backend)

        def step(backend):
            torch.autograd.grad(ops.depthwise_conv2d(x, w, backend=backend), [x], g)

        for name, fn in (("fwd", forward), ("fwd+igrad", step)):
            for backend, eager in VARIANTS:
                path = contextlib.nullcontext() if eager else mock.patch.object(depthwise, "_eager", lambda *a: False)
                with path:
                    for _ in range(5):
                        fn(backend)
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    for _ in range(CALLS):
                        fn(backend)
                    host = (time.perf_counter() - start) / CALLS
                    torch.cuda.synchronize()
                    wall = (time.perf_counter() - start) / CALLS
                label = backend + ("" if eager else " (registered op)")
                print(f"  {name:10s} {label:28s} host {host * 1e6:8.1f} us/call  wall {wall * 1e6:8.1f} us/call")
        if index == 0:
            for backend in ("auto", "triton_mma"):
                profile = cProfile.Profile()
                profile.enable()
                for _ in range(100):
                    step(backend)
                profile.disable()
                torch.cuda.synchronize()
                out = io.StringIO()
                pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(18)
                print(backend, out.getvalue()[-3500:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
