"""Smoke test of every depthwise backend on tiny shapes: the first thing gpu_check.sh runs on a GPU.

    CUDA_LAUNCH_BLOCKING=1 python benchmarks/gpu_smoke.py [--device cuda|cpu] [--json PATH] [--tiny [--edge]]

Each backend that can run on the device (cuda, triton, triton_mma, torch; on the CPU: cpu, torch,
and triton / triton_mma under TRITON_INTERPRET=1), each dtype it supports among fp32/fp16/bf16, each pass (forward, input
gradient, weight gradient), NCHW and channels_last, a few tiny shapes (a map smaller than the
kernel, a non-square kernel), and on the cuda backend EDGE_CASES (the CUDA kernels' paths those
shapes miss): compared with fp64 ``F.conv2d`` on the CPU. Then ``auto`` end to end
through the op, with autograd. Prints one line per case and exits 1 if any case is wrong or raised,
0 otherwise. Small on purpose: run in its own process (a sticky CUDA fault ends only this one) and
fast enough for compute-sanitizer.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

SHAPES = [(2, 8, 9, 11, 7, 7), (1, 4, 5, 5, 13, 13), (2, 16, 12, 10, 9, 3)]  # N, C, H, W, kh, kw
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("nchw", "channels_last")
# --tiny: one shape in fp32, for a CPU dry run (Triton in its interpreter) and for compute-sanitizer
TINY_SHAPES, TINY_DTYPES = [(1, 4, 6, 6, 5, 5)], (torch.float32,)
# The paths of lkfast's CUDA kernels that SHAPES (maps <= 32 x 32, kernels <= 13) never reach, on
# the cuda backend (and auto) only: no Triton compiles, so they cost the smoke step ~no time.
# (shape, layouts); dtypes as the run's. tests/test_cuda.py checks that they reach each path.
EDGE_CASES = [
    # H > 32: the wide-tile forward (64 x 32 tiles), whose 57x57 taps need 57,840 bytes of shared
    # memory (fp32 accumulation): past the 48 KB default, so cudaFuncSetAttribute must raise the limit;
    # the weight gradient in two launches (855 tap groups > 512) with one thread per group. C = 4:
    # channels_last takes 16-byte vectors in fp32 (a partial channel block) and the scalar path in
    # fp16/bf16 (C % 8 != 0).
    ((1, 4, 33, 9, 57, 57), ("nchw", "channels_last")),
    # a channels_last view one element into its storage: not 16-byte aligned, so the scalar path
    # (a 16-byte load there is a misaligned-address fault)
    ((2, 16, 7, 6, 5, 5), ("channels_last_offset",)),
]
EDGE_BACKENDS = ("cuda",)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}  # max error / max |reference|


def reference(pass_: str, x, w, g):
    """The pass in fp64 on the CPU with F.conv2d and autograd (kernel 180-degree flip = input grad)."""
    x, w, g = (t.detach().cpu().double() for t in (x, w, g))
    kh, kw = w.shape[-2:]
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = F.conv2d(x, w, None, padding=(kh // 2, kw // 2), groups=x.shape[1])
    if pass_ == "forward":
        return y.detach()
    gx, gw = torch.autograd.grad(y, (x, w), g)
    return gx if pass_ == "input_grad" else gw


def run_pass(backend, pass_: str, x, w, g):
    kh, kw = w.shape[-2:]
    if pass_ == "forward":
        return backend.forward(x, w, None, False)
    if pass_ == "input_grad":
        return backend.forward(g, w, None, True)
    return backend.weight_grad(g, x, kh, kw)


def relative_error(out, expected) -> float:
    return ((out.detach().cpu().double() - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def make_map(shape, layout: str, dtype, device, gen) -> torch.Tensor:
    """A standard-normal (N, C, H, W) map in ``layout``: "nchw", "channels_last", or
    "channels_last_offset" (a channels_last view one element into its storage: not 16-byte aligned)."""
    N, C, H, W = shape
    if layout == "channels_last_offset":
        flat = torch.randn(N * C * H * W + 1, generator=gen).to(device, dtype)
        return flat[1:].as_strided((N, C, H, W), (H * W * C, 1, W * C, C))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return torch.randn(N, C, H, W, generator=gen).to(device, dtype).contiguous(memory_format=fmt)


def cases(shapes, dtypes, names, edge: bool):
    """(shape, dtype, layout, backend names) of every case: (``edge``) EDGE_CASES on the EDGE_BACKENDS
    among ``names`` first (no Triton compiles: done in seconds, before the step's cap can stop a
    cold Triton cache's ~90 compiles), then each shape in LAYOUTS on ``names``."""
    yield from _edge_cases(dtypes, names) if edge else ()
    for shape in shapes:
        for dtype in dtypes:
            for layout in LAYOUTS:
                yield shape, dtype, layout, names


def _edge_cases(dtypes, names):
    edge_names = tuple(n for n in names if n in EDGE_BACKENDS)
    for shape, layouts in EDGE_CASES if edge_names else ():  # (none on the CPU)
        for dtype in dtypes:
            for layout in layouts:
                yield shape, dtype, layout, edge_names


def selection(tiny: bool, edge: bool) -> tuple:
    """(shapes, dtypes, edge) of a run: SHAPES in every dtype with EDGE_CASES; --tiny: TINY_SHAPES in
    fp32, and with --edge also fp16 (the CUDA kernels' scalar channels_last path) and EDGE_CASES."""
    if not tiny:
        return SHAPES, DTYPES, True
    return TINY_SHAPES, TINY_DTYPES + ((torch.float16,) if edge else ()), edge


def check(device: str, shapes=SHAPES, dtypes=DTYPES, edge: bool = False, report=None) -> list[dict]:
    """Every case as a dict; ``report(row)`` (if given) is called as each case finishes, so a run
    stopped at its time limit still shows the cases it got through. ``edge``: EDGE_CASES too."""
    from lkfast.ops import depthwise_conv2d
    from lkfast.ops import PASSES, dtype_name
    from lkfast.ops.backends import BACKENDS

    all_names = ("cuda", "triton", "triton_mma", "torch") if device == "cuda" else ("cpu", "triton", "triton_mma", "torch")
    results = []
    gen = torch.Generator().manual_seed(0)
    for shape, dtype, layout, names in cases(shapes, dtypes, all_names, edge):
        N, C, H, W, kh, kw = shape
        x = make_map((N, C, H, W), layout, dtype, device, gen)
        g = make_map((N, C, H, W), layout, dtype, device, gen)
        w = (torch.randn(C, 1, kh, kw, generator=gen) / (kh * kw) ** 0.5).to(device, dtype)
        case = dict(shape=list(shape), dtype=dtype_name(dtype), layout=layout)
        expected = {}  # fp64 reference per pass, computed once per case

        def expect(pass_, x=x, w=w, g=g, expected=expected):
            if pass_ not in expected:
                expected[pass_] = reference(pass_, x, w, g)
            return expected[pass_]

        for name in names:
            why = BACKENDS[name].not_supported_reasons(x, w)
            for pass_ in PASSES:
                row = dict(case, backend=name, pass_=pass_)
                if why:
                    row["skipped"] = "; ".join(why)
                else:
                    try:
                        row["error"] = relative_error(run_pass(BACKENDS[name], pass_, x, w, g),
                                                      expect(pass_))
                        row["ok"] = row["error"] <= TOLERANCE[dtype]
                    except Exception as exc:  # report and go on: the summary names every failure
                        row["ok"], row["raised"] = False, f"{type(exc).__name__}: {str(exc)[:200]}"
                results.append(row)
                if report:
                    report(row)
        row = dict(case, backend="auto", pass_="forward+both_grads (autograd)")
        try:
            xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
            gx, gw = torch.autograd.grad(depthwise_conv2d(xg, wg), (xg, wg), g)
            row["error"] = max(relative_error(gx, expect("input_grad")), relative_error(gw, expect("weight_grad")))
            row["ok"] = row["error"] <= TOLERANCE[dtype]
        except Exception as exc:
            row["ok"], row["raised"] = False, f"{type(exc).__name__}: {str(exc)[:200]}"
        results.append(row)
        if report:
            report(row)
    if device == "cuda":
        torch.cuda.synchronize()
    return results


def print_row(r: dict) -> None:
    """One case's line, flushed at once (a run stopped by its time limit keeps what it printed)."""
    verdict = "skip" if "skipped" in r else ("ok" if r["ok"] else "FAIL")
    detail = r.get("skipped") or r.get("raised") or f"rel err {r['error']:.1e}"
    print(f"{verdict:4s} {r['backend']:10s} {r['pass_']:30s} {r['dtype']:8s} {r['layout']:13s} {r['shape']}  {detail}",
          flush=True)


def check_extension(device: str) -> list[str]:
    """Why the lkfast._C loaded here cannot serve the GPU check (empty when it can): it must be
    recorded as built from the checkout's csrc/ (lkfast._sources), with CUDA, and its kernels must
    compute one small case right on ``device`` ("no kernel image" when built for another GPU)."""
    from lkfast import _ext
    from lkfast._sources import record_path
    from lkfast.ops import PASSES
    from lkfast.ops.backends import BACKENDS

    if _ext._C is None:
        return [_ext.load_error]
    problems = []
    if not record_path(_ext._C.__file__).is_file():
        problems.append(f"no {record_path(_ext._C.__file__).name} beside it: which sources it was built from is unknown")
    if _ext.stale:
        problems.append(_ext.stale)
    if not getattr(_ext._C, "with_cuda", False):
        problems.append("built without CUDA")
    if problems:
        return problems
    x, w, g = (torch.randn(*shape, generator=torch.Generator().manual_seed(i)).to(device)
               for i, shape in enumerate([(2, 8, 12, 10), (8, 1, 7, 5), (2, 8, 12, 10)]))
    backend = BACKENDS["cuda" if device.startswith("cuda") else "cpu"]
    for pass_ in PASSES:
        try:
            error = relative_error(run_pass(backend, pass_, x, w, g), reference(pass_, x, w, g))
        except Exception as exc:
            return [f"{pass_}: {type(exc).__name__}: {str(exc)[:300]}"]
        if not error <= TOLERANCE[torch.float32]:
            problems.append(f"{pass_}: max error {error:.2g} of the reference's largest value")
    return problems


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write every case as JSON here")
    parser.add_argument("--tiny", action="store_true", help="one tiny shape in fp32 only (a CPU dry run, compute-sanitizer)")
    parser.add_argument("--edge", action="store_true",
                        help="also EDGE_CASES (the CUDA kernels' paths the small shapes miss), in fp32 and fp16 with "
                             "--tiny; without --tiny they always run")
    parser.add_argument("--check-extension", action="store_true",
                        help="only check that lkfast._C was built from these sources, with CUDA, and runs on --device "
                             "(gpu_check.sh: whether a carried build can be used)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.check_extension:
        problems = check_extension(args.device)
        for problem in problems:
            print(f"extension: {problem}")
        if not problems:
            from lkfast import _ext
            print(f"extension: {_ext._C.__file__} fits: built from these sources, with CUDA, and correct on {args.device}")
        return 1 if problems else 0
    results: list[dict] = []

    def report(row):
        results.append(row)
        print_row(row)

    stopped = False
    try:
        check(args.device, *selection(args.tiny, args.edge), report=report)
    except KeyboardInterrupt:  # gpu_check.sh's time limit (SIGINT): say how far it got
        stopped = True
    ran = [r for r in results if "skipped" not in r]
    failed = [r for r in ran if not r["ok"]]
    print(f"smoke: {len(ran) - len(failed)} of {len(ran)} cases ok, {len(failed)} failed, "
          f"{len(results) - len(ran)} skipped (backend cannot run them here)"
          + ("; STOPPED (interrupted, e.g. at its time limit) before the remaining cases" if stopped else ""))
    if args.json:
        from lkfast.tables import write_text_atomic

        write_text_atomic(args.json, json.dumps(results, indent=1))
    return 1 if failed or not ran or stopped else 0


if __name__ == "__main__":
    sys.exit(main())
