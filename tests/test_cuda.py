"""lkfast's CUDA kernels (csrc/cuda): backend "cuda" against torch.nn.functional.conv2d.

On a machine with a CUDA device (``-m gpu``): forward, input gradient and weight gradient over
RepLKNet / ConvNeXt / SLaK kernel sizes, maps smaller than the kernel, both layouts, strided views,
fp32 / fp16 / bf16 (and fp64), compared with fp64 PyTorch and with cuDNN.

Everywhere: the extension's CUDA entry points are checked to be compiled in (when nvcc was present
at build time), and the kernels' tiling is checked by a host emulation: the same tile, halo,
shared-memory pitch, padding skip, 4-tap window and split-K index arithmetic as dwconv_cuda.cu,
replayed thread-block by thread-block in torch on the CPU, with every shared-memory access
bounds- and alignment-checked. Keep the emulation in step with the kernels when they change.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from lkfast import _ext

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none visible to torch here)")


def test_cuda_entry_points_compiled():
    if _ext.load_error:
        pytest.skip(f"lkfast._C is not built: {_ext.load_error}")
    if not getattr(_ext._C, "with_cuda", False):
        pytest.skip("lkfast._C was built without CUDA (no nvcc or a CPU-only torch at build time)")
    assert callable(_ext._C.cuda_forward) and callable(_ext._C.cuda_weight_grad)


# ---------------------------------------------------------------------------------------------
# Host emulation of dwconv_cuda.cu (index arithmetic only; arithmetic in fp64)


def _round_up(a, b):
    return (a + b - 1) // b * b


def smem_pitch(tile_w, kwp, rw):
    pitch = _round_up(tile_w + kwp, 4)
    if rw == 8:
        if (pitch // 4) % 2 == 0:
            pitch += 4
    else:
        while (pitch // 4) % 8 != 4:
            pitch += 4
    return pitch


class Smem:
    """A flat shared-memory array whose 4-wide loads check bounds and 16-byte alignment."""

    def __init__(self, size):
        self.data = torch.zeros(size, dtype=torch.float64)

    def load4(self, index):  # index: integer tensor of element offsets, one per thread
        assert int(index.min()) >= 0 and int(index.max()) + 3 < self.data.numel(), "shared-memory read out of bounds"
        assert bool((index % 4 == 0).all()), "misaligned 16-byte shared-memory load"
        return [self.data[index + k] for k in range(4)]


def _fill_halo(s, xc, h0, w0, rows, pitch, cols, ph, pw, H, W, base=0):
    sr = torch.arange(rows)[:, None].expand(rows, pitch)
    sc = torch.arange(pitch)[None, :].expand(rows, pitch)
    ih, iw = h0 + sr - ph, w0 + sc - pw
    ok = (sc < cols) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    vals = torch.zeros(rows, pitch, dtype=torch.float64)
    vals[ok] = xc[ih[ok], iw[ok]]
    s.data[base:base + rows * pitch] = vals.reshape(-1)


def emulate_forward(x, weight, bias, flip, RB, RW, TXN, TYN):
    N, C, H, W = x.shape
    kh, kw = weight.shape[-2:]
    kwp, ph, pw = _round_up(kw, 4), kh // 2, kw // 2
    TW, TH = TXN * RW, TYN * RB
    pitch = smem_pitch(TW, kwp, RW)
    rows, cols = TH + kh - 1, TW + kw - 1
    y = torch.full((N, C, H, W), float("nan"), dtype=torch.float64)
    ty, tx = torch.meshgrid(torch.arange(TYN), torch.arange(TXN), indexing="ij")
    for n in range(N):
        for c in range(C):
            s_w = Smem(kh * kwp)
            wc = weight[c, 0].double()
            if flip:
                wc = wc.flip(0, 1)
            s_w.data.view(kh, kwp)[:, :kw] = wc
            for h0 in range(0, H, TH):
                for w0 in range(0, W, TW):
                    s_in = Smem(rows * pitch)
                    _fill_halo(s_in, x[n, c].double(), h0, w0, rows, pitch, cols, ph, pw, H, W)
                    oy_last, ox_last = min(h0 + TH, H) - 1, min(w0 + TW, W) - 1
                    r_lo, r_hi = max(0, ph - oy_last), min(kh, H + ph - h0)
                    j_lo, j_hi = max(0, pw - ox_last) & ~3, min(kwp, (W + pw - w0 + 3) & ~3)
                    acc = [[torch.zeros(TYN, TXN, dtype=torch.float64) for _ in range(RW)] for _ in range(RB)]
                    for r in range(r_lo, r_hi):
                        for q in range(RB):
                            irow = (ty + q * TYN + r) * pitch + tx * RW
                            win = []
                            for t in range(0, RW, 4):
                                win += s_in.load4(irow + j_lo + t)
                            for jb in range(j_lo, j_hi, 4):
                                win = win[:RW] + s_in.load4(irow + jb + RW)
                                wv = s_w.load4(torch.tensor(r * kwp + jb))
                                for jj in range(4):
                                    for t in range(RW):
                                        acc[q][t] = acc[q][t] + win[t + jj] * wv[jj]
                                win = win[4:]
                    b = 0.0 if bias is None else float(bias[c])
                    for q in range(RB):
                        for t in range(RW):
                            oy, ox = h0 + ty + q * TYN, w0 + tx * RW + t
                            ok = (oy < H) & (ox < W)
                            y[n, c, oy[ok], ox[ok]] = acc[q][t][ok] + b
    return y


def emulate_weight_grad(go, x, kh, kw, splits, TH=16, TW=16, THREADS=128, MAXG=4):
    """Returns dW and the number of phases (threads per 4-tap group) the kernel would use."""
    N, C, H, W = x.shape
    kwp, ph, pw = _round_up(kw, 4), kh // 2, kw // 2
    pitch = smem_pitch(TW, kwp, 4)
    rows, cols = TH + kh - 1, TW + kw - 1
    tiles_w = (W + TW - 1) // TW
    tiles = ((H + TH - 1) // TH) * tiles_w
    items = N * tiles
    per_split = (items + splits - 1) // splits
    splits = (items + per_split - 1) // per_split
    ngw = kwp // 4
    groups = kh * ngw
    phases = 1
    while phases < 8 and groups * phases * 2 <= THREADS:
        phases *= 2
    assert TH * TW + rows * pitch >= THREADS * 4, "the phase sums do not fit in the tiles' shared memory"
    ws = torch.full((splits, C, kh, kw), float("nan"), dtype=torch.float64)
    tid = torch.arange(THREADS)
    for offset in range(0, groups, THREADS * MAXG):
        for c in range(C):
            for split in range(splits):
                acc = [[torch.zeros(THREADS, dtype=torch.float64) for _ in range(4)] for _ in range(MAXG)]
                for item in range(split * per_split, min(items, (split + 1) * per_split)):
                    n, tile = divmod(item, tiles)
                    h0, w0 = (tile // tiles_w) * TH, (tile % tiles_w) * TW
                    smem = Smem(TH * TW + rows * pitch)
                    g = torch.zeros(TH, TW, dtype=torch.float64)
                    hv_, wv_ = min(TH, H - h0), min(TW, W - w0)
                    g[:hv_, :wv_] = go[n, c, h0:h0 + hv_, w0:w0 + wv_].double()
                    smem.data[:TH * TW] = g.reshape(-1)
                    _fill_halo(smem, x[n, c].double(), h0, w0, rows, pitch, cols, ph, pw, H, W, base=TH * TW)
                    h_valid, w_valid4 = min(TH, H - h0), (min(TW, W - w0) + 3) & ~3
                    for k in range(MAXG):
                        unit = tid + k * THREADS
                        group, phase = offset + unit // phases, unit % phases
                        live = group < groups
                        i, j0 = group // ngw, (group % ngw) * 4
                        live &= ~((h0 + i - ph >= H) | (h0 + h_valid - 1 + i - ph < 0))
                        if not bool(live.any()):
                            continue
                        i, j0, phase = i[live], j0[live], phase[live]
                        for h in range(h_valid):
                            rows_h = phase == (h % phases)  # thread takes rows h = phase (mod phases)
                            xrow = TH * TW + (h + i) * pitch + j0
                            grow = torch.tensor(h * TW)
                            win = smem.load4(xrow)
                            for w in range(0, w_valid4, 4):
                                win = win[:4] + smem.load4(xrow + w + 4)
                                gv = smem.load4(grow + w)
                                for ww in range(4):
                                    for t in range(4):
                                        acc[k][t][live] += torch.where(rows_h, gv[ww] * win[ww + t], 0.0)
                                win = win[4:]
                if phases > 1:  # the shared-memory sum of each group's phases
                    partial = torch.stack(acc[0], dim=1).reshape(-1)
                    for th in range(0, THREADS, phases):
                        group = th // phases
                        if group >= groups:
                            continue
                        i, j0 = group // ngw, (group % ngw) * 4
                        for t in range(4):
                            if j0 + t < kw:
                                ws[split, c, i, j0 + t] = sum(partial[(th + p) * 4 + t] for p in range(phases))
                    continue
                for k in range(MAXG):
                    group = offset + tid + k * THREADS
                    for th in range(THREADS):
                        if group[th] >= groups:
                            continue
                        i, j0 = int(group[th]) // ngw, (int(group[th]) % ngw) * 4
                        for t in range(4):
                            if j0 + t < kw:
                                ws[split, c, i, j0 + t] = acc[k][t][th]
    return ws.sum(0).unsqueeze(1), phases


# The two forward configurations of dwconv_cuda.cu: (RB, RW, TXN, TYN)
SMALL_TILES = (1, 4, 4, 16)
WIDE_TILES = (2, 8, 4, 32)


@pytest.mark.parametrize("shape,config", [
    ((1, 2, 13, 11, 7, 7), SMALL_TILES),
    ((1, 1, 7, 7, 13, 13), SMALL_TILES),     # map smaller than the kernel
    ((1, 1, 19, 21, 5, 31), SMALL_TILES),    # rectangular, two tiles
    ((1, 1, 9, 9, 63, 63), SMALL_TILES),     # the largest kernel of the contract
    ((1, 1, 37, 70, 9, 5), WIDE_TILES),      # wide tiles, partial tiles on both axes
    ((1, 1, 66, 40, 31, 31), WIDE_TILES),
], ids=lambda v: "x".join(map(str, v)) if len(v) == 6 else "rb%d_rw%d" % v[:2])
def test_cuda_forward_tiling_emulated(shape, config):
    N, C, H, W, kh, kw = shape
    x = torch.randn(N, C, H, W, dtype=torch.float64)
    w = torch.randn(C, 1, kh, kw, dtype=torch.float64)
    b = torch.randn(C, dtype=torch.float64)
    for flip in (False, True):
        y = emulate_forward(x, w, b, flip, *config)
        ref = F.conv2d(x, w.flip(-1, -2) if flip else w, b, padding=(kh // 2, kw // 2), groups=C)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape,splits,expect_phases", [
    ((2, 1, 13, 11, 7, 7), 3, 8),     # 14 groups x 8 phases
    ((1, 1, 7, 7, 13, 13), 1, 2),     # kernel rows entirely in padding are skipped
    ((2, 1, 20, 18, 5, 11), 4, 8),    # several tiles, uneven split
    ((1, 1, 18, 9, 27, 27), 2, 1),    # 189 groups: one phase, two groups for some threads
    ((1, 1, 6, 5, 63, 63), 1, 1),     # 1008 tap groups: two launches with a group offset
])
def test_cuda_weight_grad_splitk_emulated(shape, splits, expect_phases):
    N, C, H, W, kh, kw = shape
    x = torch.randn(N, C, H, W, dtype=torch.float64)
    go = torch.randn(N, C, H, W, dtype=torch.float64)
    gw, phases = emulate_weight_grad(go, x, kh, kw, splits)
    assert phases == expect_phases
    ref = torch.ops.aten.convolution_backward(go, x, torch.empty(C, 1, kh, kw, dtype=torch.float64), None, [1, 1],
                                              [kh // 2, kw // 2], [1, 1], False, [0, 0], C, [False, True, False])[1]
    torch.testing.assert_close(gw, ref, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# On a GPU


def _layout(x, fmt):
    if fmt == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if fmt == "strided":
        return torch.cat([x, x], dim=3)[..., ::2]
    return x


TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 4e-3, torch.bfloat16: 2e-2}
GPU_SHAPES = [
    (2, 128, 56, 56, 31, 31),   # RepLKNet-31B stages at 224
    (2, 256, 28, 28, 29, 29),
    (2, 512, 14, 14, 27, 27),
    (2, 1024, 7, 7, 13, 13),
    (2, 96, 56, 56, 7, 7),      # ConvNeXt
    (2, 64, 56, 56, 51, 5),     # SLaK
    (2, 64, 56, 56, 5, 51),
    (1, 33, 17, 19, 63, 63),
    (3, 5, 70, 33, 3, 3),
    (1, 7, 9, 9, 1, 31),
]


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_backend_matches_conv2d(shape, fmt, dtype):
    import lkfast.ops as ops

    N, C, H, W, kh, kw = shape
    x = _layout(torch.randn(N, C, H, W, device="cuda").to(dtype), fmt).requires_grad_(True)
    weight = (torch.randn(C, 1, kh, kw, device="cuda") / math.sqrt(kh * kw)).to(dtype).requires_grad_(True)
    bias = torch.randn(C, device="cuda").to(dtype)
    y = ops.depthwise_conv2d(x, weight, bias, backend="cuda")
    grad_out = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, [x, weight], grad_out)
    x64, w64 = x.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    ry = F.conv2d(x64, w64, bias.double(), padding=(kh // 2, kw // 2), groups=C)
    rgx, rgw = torch.autograd.grad(ry, [x64, w64], grad_out.double())
    tol = TOL[dtype]
    assert _rel(y, ry) < tol and _rel(gx, rgx) < tol and _rel(gw, rgw) < 4 * tol
    expect_cl = fmt == "channels_last"
    assert y.is_contiguous(memory_format=torch.channels_last) if expect_cl else y.is_contiguous()
    # And agrees with cuDNN / PyTorch's own CUDA kernel in the same dtype, within its rounding.
    torch_y = ops.depthwise_conv2d(x.detach(), weight.detach(), bias, backend="torch")
    assert _rel(y, torch_y) < 2 * tol


@pytest.mark.gpu
@gpu
def test_cuda_auto_is_correct_and_uses_table():
    import lkfast.ops as ops
    from lkfast.ops import cuda_table

    x = torch.randn(2, 64, 56, 56, device="cuda", dtype=torch.float16)
    w = torch.randn(64, 1, 31, 31, device="cuda", dtype=torch.float16) / 31
    plan = ops.plan_for(x, w)
    assert all(p in ("cuda", "triton", "torch") for p in plan)
    if cuda_table.MEASURED:
        assert cuda_table.lookup(cuda_table.key_of(x, w)) is not None
    ref = F.conv2d(x.float(), w.float(), padding=15, groups=64)
    assert _rel(ops.depthwise_conv2d(x, w), ref) < 4e-3


# ---------------------------------------------------------------------------------------------
# The auto table (lkfast/ops/cuda_table.py): lookup logic, on CPU tensors standing in for CUDA ones


def test_cuda_table_nearest_row_and_fallback(monkeypatch):
    from lkfast.ops import cuda_table

    table = {
        ("float16", "channels_last", 31, 31, 128, 56, 56): ("cuda", "cuda", "cuda"),
        ("float16", "channels_last", 13, 13, 1024, 7, 7): ("torch", "torch", "cuda"),
        ("float16", "nchw", 31, 31, 128, 56, 56): ("triton", "cuda", "torch"),
    }
    monkeypatch.setattr(cuda_table, "MEASURED", table)
    x = torch.empty(8, 256, 28, 28, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w = torch.empty(256, 1, 29, 29, dtype=torch.float16)
    assert cuda_table.key_of(x, w) == ("float16", "channels_last", 29, 29, 256, 28, 28)
    everything = lambda name: True
    assert cuda_table.choose(x, w, everything) == ("cuda", "cuda", "cuda")  # nearest: the k=31 row
    small = torch.empty(8, 1024, 7, 7, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    assert cuda_table.choose(small, torch.empty(1024, 1, 13, 13, dtype=torch.float16), everything) == ("torch", "torch", "cuda")
    nchw = torch.empty(8, 128, 56, 56, dtype=torch.float16)
    w31 = torch.empty(128, 1, 31, 31, dtype=torch.float16)
    assert cuda_table.choose(nchw, w31, lambda name: name != "triton") == ("torch", "cuda", "torch")
    # no row for this dtype: the default order, first usable backend
    assert cuda_table.choose(nchw.float(), w31.float(), lambda name: name == "triton") == ("triton",) * 3
    assert cuda_table.choose(nchw.float(), w31.float(), lambda name: False) == ("torch",) * 3


def test_gpu_benchmark_script_dry_run(tmp_path):
    """benchmarks/bench_gpu.py end to end on tiny CPU shapes: a GPU session must not lose its few
    minutes to a broken script."""
    import importlib.util
    import json
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_gpu.py")
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--dry-run", "--out", str(tmp_path), "--budget", "60"]) == 0
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert result["table"] and all(len(v) == 3 for _, v in result["table"])
    assert "| tiny-k7 |" in (tmp_path / "gpu_bench.md").read_text()
