"""lkfast's CUDA kernels (csrc/cuda) and the CUDA dispatch table (lkfast/ops/cuda_table.py).

On a machine with a CUDA device: backend "cuda" against the fp64 reference of tests/reference.py
(forward, input gradient, weight gradient, bias gradient) over RepLKNet / ConvNeXt / SLaK kernel
sizes, maps smaller than the kernel, every layout, fp32 / fp16 / bf16 / fp64, and against PyTorch's
own CUDA convolution in the same dtype; and ``auto`` dispatching from a measured table.

Without a GPU, nothing here runs the CUDA kernels. What runs instead:
* the extension's CUDA entry points are checked to be compiled in (when nvcc was present at build
  time);
* ``test_cuda_tiling_replayed_in_python_*``: a Python port of the kernels' index arithmetic (tile,
  halo, shared-memory pitch, padding skip, 4-tap window, split-K), replayed thread-block by
  thread-block in torch on the CPU with every shared-memory access bounds- and alignment-checked.
  It checks the tiling scheme, not the compiled kernels, and must be kept in step with
  dwconv_cuda.cu by hand when the kernels change;
* the dispatch table's file format and choice rules, on CPU tensors with fake backend availability.
"""
import pytest
import torch
import torch.nn.functional as F

import lkfast.ops as ops
from lkfast import _ext
from lkfast.ops import cuda_table
from lkfast.ops.backends import BACKENDS, Plan
from reference import (FORMATS, GPU_SHAPES, HAS_CUDA, TOLERANCE, backend_or_skip, case_id, check_op, make_input,
                       make_weight, rel_err)

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none visible to torch here)")


def test_cuda_entry_points_compiled():
    if _ext.load_error:
        pytest.skip(f"lkfast._C is not built: {_ext.load_error}")
    if not getattr(_ext._C, "with_cuda", False):
        pytest.skip("lkfast._C was built without CUDA (no nvcc or a CPU-only torch at build time)")
    assert callable(_ext._C.cuda_forward) and callable(_ext._C.cuda_weight_grad)


# ---------------------------------------------------------------------------------------------
# A Python port of dwconv_cuda.cu's index arithmetic (values in fp64): not the compiled kernels


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
def test_cuda_tiling_replayed_in_python_forward(shape, config):
    """The forward tiling, replayed in Python (not the CUDA kernel), equals F.conv2d."""
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
def test_cuda_tiling_replayed_in_python_weight_grad(shape, splits, expect_phases):
    """The weight gradient's split-K tiling, replayed in Python (not the CUDA kernel), equals
    PyTorch's weight gradient, with the thread-phase count the kernel would pick."""
    N, C, H, W, kh, kw = shape
    x = torch.randn(N, C, H, W, dtype=torch.float64)
    go = torch.randn(N, C, H, W, dtype=torch.float64)
    gw, phases = emulate_weight_grad(go, x, kh, kw, splits)
    assert phases == expect_phases
    ref = torch.ops.aten.convolution_backward(go, x, torch.empty(C, 1, kh, kw, dtype=torch.float64), None, [1, 1],
                                              [kh // 2, kw // 2], [1, 1], False, [0, 0], C, [False, True, False])[1]
    torch.testing.assert_close(gw, ref, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# On a GPU: the compiled kernels


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=case_id)
def test_cuda_backend_matches_conv2d(shape, fmt, dtype):
    check_op(backend_or_skip("cuda", "cuda", dtype), shape, fmt, dtype, "cuda")
    # And agrees with PyTorch's own CUDA convolution (cuDNN or its depthwise kernel) in the same dtype.
    N, C, H, W, kh, kw = shape
    x, w = make_input((N, C, H, W), fmt, dtype, "cuda"), make_weight(C, kh, kw, dtype, "cuda")
    ours = ops.depthwise_conv2d(x, w, backend="cuda")
    theirs = F.conv2d(x, w, padding=(kh // 2, kw // 2), groups=C)
    assert rel_err(ours, theirs) < 2 * TOLERANCE[dtype]["forward"]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_cuda_auto_is_correct_and_uses_table(fmt, tmp_path, monkeypatch):
    """On a GPU, ``auto`` takes each pass's backend from the measured row of this GPU and key (a
    table written here with a mixed plan), and the result is right."""
    x = make_input((2, 64, 28, 28), fmt, torch.float16, "cuda")
    w = make_weight(64, 31, 31, torch.float16, "cuda")
    usable = [n for n in cuda_table.TABLE_BACKENDS if not BACKENDS[n].not_supported_reasons(x, w)]
    measured = Plan(usable[-1], usable[0], usable[len(usable) // 2])  # a different backend per pass where possible
    key = cuda_table.key_of(x, w)
    assert key.gpu == torch.cuda.get_device_name(x.device) and key.layout == cuda_table.layout_of(x)
    monkeypatch.setenv(cuda_table.ENV_VAR, str(cuda_table.save_table({key: measured}, "test", tmp_path / "t.json")))
    why = ops.plan_for(x, w, explain=True)
    assert why.plan == measured and "measured at this call's key" in why.source
    check_op("auto", (2, 64, 28, 28, 31, 31), fmt, torch.float16, "cuda")


# ---------------------------------------------------------------------------------------------
# The dispatch table (lkfast/ops/cuda_table.py): its file and its choices, on CPU tensors filed
# under a GPU name, with fake backend availability (no GPU needed)

H200, A100 = "NVIDIA H200", "NVIDIA A100-SXM4-80GB"


def _call(N=64, C=128, H=56, W=56, k=31, dtype=torch.float16, channels_last=True):
    x = torch.empty(N, C, H, W, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.empty(C, 1, k, k, dtype=dtype)


def test_cuda_table_save_and_load_round_trip(tmp_path):
    rows = {(H200, "float16", "channels_last", 31, 31, 64, 128, 56, 56): ("cuda", "triton", "torch"),
            (H200, "bfloat16", "nchw", 13, 13, 64, 1024, 7, 7): ("torch", "torch", "cuda")}
    path = cuda_table.save_table(rows, f"{H200}, 2026-11-29", tmp_path / "table.json")
    table = cuda_table.load_table(path)
    assert table.rows == rows and table.measured_on == f"{H200}, 2026-11-29" and table.path == str(path)
    assert all(isinstance(v, Plan) for v in table.rows.values())
    # (key, value) pairs as bench_gpu.py keeps them in its JSON are accepted too
    again = cuda_table.save_table([[list(k), list(v)] for k, v in rows.items()], "x", tmp_path / "pairs.json")
    assert cuda_table.load_table(again).rows == rows
    shipped = cuda_table.load_table(cuda_table.SHIPPED_PATH)  # the package's own file parses
    assert all(key.gpu and len(plan) == 3 for key, plan in shipped.rows.items())


@pytest.mark.parametrize("key, value, match", [
    ((H200, "float16", "nchw", 31, 31, 64, 128, 56), ("cuda",) * 3, r"key must be \(gpu, dtype, layout"),
    ((H200, "half", "nchw", 31, 31, 64, 128, 56, 56), ("cuda",) * 3, r"dtype must be one of .*got 'half'"),
    ((H200, "float16", "nhwc", 31, 31, 64, 128, 56, 56), ("cuda",) * 3, r"layout must be one of nchw, channels_last"),
    ((H200, "float16", "nchw", 31, 31, 0, 128, 56, 56), ("cuda",) * 3, r"positive integers"),
    ((H200, "float16", "nchw", 31, 31, 64, 128, 56, 56), ("cuda", "cpu", "torch"), r"backends must be among cuda, triton, torch"),
    ((H200, "float16", "nchw", 31, 31, 64, 128, 56, 56), ("cuda", "torch"), r"\(forward, input_grad, weight_grad\)"),
])
def test_cuda_table_refuses_bad_rows(tmp_path, key, value, match):
    with pytest.raises(ValueError, match=match):
        cuda_table.save_table({key: value}, "x", tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()


def test_cuda_table_env_var_is_read_per_call(tmp_path, monkeypatch):
    x, w = _call()
    first = cuda_table.save_table({cuda_table.key_of(x, w, H200): ("triton",) * 3}, "a", tmp_path / "a.json")
    second = cuda_table.save_table({cuda_table.key_of(x, w, H200): ("torch", "cuda", "cuda")}, "b", tmp_path / "b.json")
    everything = lambda name: True  # noqa: E731
    monkeypatch.setenv(cuda_table.ENV_VAR, str(first))
    assert cuda_table.choose(x, w, everything, gpu=H200)[0] == ("triton",) * 3
    monkeypatch.setenv(cuda_table.ENV_VAR, str(second))  # after import, between calls
    assert cuda_table.choose(x, w, everything, gpu=H200)[0] == ("torch", "cuda", "cuda")
    cuda_table.save_table({cuda_table.key_of(x, w, H200): ("cuda",) * 3}, "c", second)  # rewritten in place
    assert cuda_table.choose(x, w, everything, gpu=H200)[0] == ("cuda",) * 3
    monkeypatch.setenv(cuda_table.ENV_VAR, str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="LKFAST_CUDA_TABLE"):
        cuda_table.choose(x, w, everything, gpu=H200)
    monkeypatch.delenv(cuda_table.ENV_VAR)
    assert cuda_table.table_path() == cuda_table.SHIPPED_PATH


def test_cuda_table_choice_rules(tmp_path, monkeypatch):
    """Own row first; else the nearest row of the same GPU, dtype and layout only; a winner that
    cannot run becomes torch (never a backend that lost there); no row: the default order."""
    rows = {
        (H200, "float16", "channels_last", 31, 31, 64, 128, 56, 56): ("triton", "cuda", "cuda"),
        (H200, "float16", "channels_last", 13, 13, 64, 1024, 7, 7): ("torch", "torch", "cuda"),
        (H200, "float16", "nchw", 29, 29, 64, 256, 28, 28): ("cuda", "torch", "triton"),
        (A100, "float16", "channels_last", 29, 29, 64, 256, 28, 28): ("torch", "torch", "torch"),
    }
    monkeypatch.setenv(cuda_table.ENV_VAR, str(cuda_table.save_table(rows, "test", tmp_path / "t.json")))
    everything = lambda name: True  # noqa: E731

    x, w = _call()
    plan, source = cuda_table.choose(x, w, everything, gpu=H200)
    assert plan == ("triton", "cuda", "cuda") and "measured at this call's key" in source
    # k=29 at 28x28, channels_last: the A100 row is the exact shape but another GPU; the H200 nchw
    # row is another layout; the nearest H200 channels_last row is the k=31 one.
    x, w = _call(C=256, H=28, W=28, k=29)
    plan, source = cuda_table.choose(x, w, everything, gpu=H200)
    assert plan == ("triton", "cuda", "cuda") and "nearest measured row" in source and "kernel 31x31" in source
    assert cuda_table.choose(x, w, everything, gpu=A100)[0] == ("torch",) * 3
    x, w = _call(N=8, C=1024, H=7, W=7, k=13)  # batch differs: nearest is the k=13 row
    assert cuda_table.choose(x, w, everything, gpu=H200)[0] == ("torch", "torch", "cuda")
    # the batch is part of the key: two rows differing only in N, the call's N picks
    x, w = _call(N=2, C=256, H=28, W=28, k=29, channels_last=False)
    assert cuda_table.choose(x, w, everything, gpu=H200)[0] == ("cuda", "torch", "triton")  # the N=64 row only
    rows[(H200, "float16", "nchw", 29, 29, 1, 256, 28, 28)] = ("torch", "cuda", "cuda")
    cuda_table.save_table(rows, "test", tmp_path / "t.json")
    assert cuda_table.choose(x, w, everything, gpu=H200)[0] == ("torch", "cuda", "cuda")  # N=1 is nearer to 2
    x, w = _call(N=32, C=256, H=28, W=28, k=29, channels_last=False)
    assert cuda_table.choose(x, w, everything, gpu=H200)[0] == ("cuda", "torch", "triton")  # N=64 is nearer to 32
    # the measured forward winner (triton) cannot run: torch, although cuda could and is first in
    # the default order (cuda lost to triton on that row)
    x, w = _call()
    plan, source = cuda_table.choose(x, w, lambda name: name != "triton", gpu=H200)
    assert plan == ("torch", "cuda", "cuda") and "forward: triton cannot run this call" in source
    # no row for this GPU / dtype: the default order, first usable
    x, w = _call(dtype=torch.float32)
    plan, source = cuda_table.choose(x, w, lambda name: name != "cuda", gpu=H200)
    assert plan == ("triton",) * 3 and "no row measured on NVIDIA H200 for float32 channels_last" in source
    assert cuda_table.choose(x, w, lambda name: False, gpu=H200)[0] == ("torch",) * 3
    assert cuda_table.choose(x, w, everything, gpu="NVIDIA H100")[0] == ("cuda",) * 3


def test_cuda_table_key_names_the_layout_the_op_computes_in():
    x, w = _call(N=2, C=8, H=5, W=7, k=3, channels_last=False)
    assert cuda_table.key_of(x, w, H200) == (H200, "float16", "nchw", 3, 3, 2, 8, 5, 7)
    assert cuda_table.key_of(x.contiguous(memory_format=torch.channels_last), w, H200).layout == "channels_last"
    assert cuda_table.key_of(x[..., ::2], w[..., :, :], H200).layout == "nchw"  # strided: computed as NCHW
    with pytest.raises(ValueError, match="not a GPU; pass gpu="):
        cuda_table.key_of(x, w)


def test_cuda_table_choice_traces_under_torch_compile(tmp_path, monkeypatch):
    """The table is read at trace time and its plan is a constant of the graph (fullgraph: no
    graph break for the file read), as plan_for needs on a GPU under torch.compile."""
    x, w = _call(N=2, C=3, H=4, W=4, k=3, dtype=torch.float32)
    monkeypatch.setenv(cuda_table.ENV_VAR, str(cuda_table.save_table(
        {cuda_table.key_of(x, w, H200): ("triton", "torch", "cuda")}, "test", tmp_path / "t.json")))

    @torch.compile(fullgraph=True, backend="eager")
    def scale_by_plan(t, weight):
        plan, _ = cuda_table.choose(t, weight, lambda name: True, gpu=H200)
        return t * (3.0 if plan == ("triton", "torch", "cuda") else 5.0)

    x = torch.ones(x.shape).contiguous(memory_format=torch.channels_last)
    assert torch.equal(scale_by_plan(x, w.float()), x * 3.0)
