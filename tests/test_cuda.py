"""lkfast's CUDA kernels (csrc/cuda) and the CUDA dispatch table (lkfast/ops/cuda_table.py).

On a machine with a CUDA device: backend "cuda" against the fp64 reference of tests/reference.py
(forward, input gradient, weight gradient, bias gradient) over RepLKNet / ConvNeXt / SLaK kernel
sizes, maps smaller than the kernel, every layout, fp32 / fp16 / bf16 / fp64, and against PyTorch's
own CUDA convolution in the same dtype; and ``auto`` dispatching from a measured table.

Without a GPU, nothing here runs the CUDA kernels. What runs instead:
* the extension's CUDA entry points are checked to be compiled in (when nvcc was present at build
  time);
* ``test_cuda_tiling_replayed_in_python_*``, ``test_cuda_replay_*``, ``test_cuda_channels_last_*``:
  a Python port of the kernels' index arithmetic (tile, halo, shared-memory pitch, the per-thread
  clipping of taps to the image, 4-tap window, split-K; for channels_last the channel lanes, 16-byte
  vectors and the scalar fallback), replayed thread-block by thread-block in torch on the CPU with
  every shared- and global-memory access bounds- and alignment-checked and every multiply-add
  counted (exactly the in-image ones), and Inf/NaN landing exactly where the sum over in-image
  terms has them. It checks the scheme, not the compiled kernels, and must be
  kept in step with dwconv_cuda.cu by hand when the kernels change; the launch sizes it replays
  with (tiling, shared-memory pitch, thread phases, launches) it takes from the kernels' own host
  code, csrc/cuda/dwconv_cuda_limits.h (``lkfast._C.cuda_launch_sizes``, in every build);
* ``cuda_launch_sizes`` and ``cuda_launch_refusal`` (what ``auto`` asks before choosing the cuda
  backend) against sizes worked by hand;
* the dispatch table's file format and choice rules, on CPU tensors with fake backend availability.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import lkfast.ops as ops
from lkfast import _ext
from lkfast.bench import valid_taps
from lkfast.ops import cuda_table
from lkfast.ops.backends import BACKENDS, Plan
from reference import (FORMATS, GPU_SHAPES, HAS_CUDA, TOLERANCE, assert_nonfinite_match, backend_or_skip, case_id,
                       func_transforms,
                       check_op, exact_reference, make_case, make_input, make_weight, rel_err, run_op)

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none visible to torch here)")


def test_cuda_entry_points_compiled():
    if _ext.load_error:
        pytest.skip(f"lkfast._C is not built: {_ext.load_error}")
    if not getattr(_ext._C, "with_cuda", False):
        pytest.skip("lkfast._C was built without CUDA (no nvcc or a CPU-only torch at build time)")
    assert callable(_ext._C.cuda_forward) and callable(_ext._C.cuda_weight_grad)


CUDA_KERNELS = ("forward_kernel", "forward_nhwc_kernel", "weight_grad_kernel", "weight_grad_nhwc_kernel")
# Bytes of stack (spills) ptxas used with nvcc 13.0, as read off the CI build: on sm_90 the NCHW
# weight gradient keeps three hoisted per-group values there (8-16 bytes; see kGradMaxGroups in
# dwconv_cuda.cu); on sm_80 the fp64 NCHW forward (16) and the bf16 channels_last weight gradient
# (8), both at 96 registers. Not measured on a GPU; every other (arch, kernel) uses none, and a new
# spill anywhere fails here.
STACK_ALLOWED = {("sm_90", "weight_grad_kernel"): 16, ("sm_80", "forward_kernel"): 16,
                 ("sm_80", "weight_grad_nhwc_kernel"): 8}


def test_cuda_kernels_compiled_for_every_arch_without_spills():
    """The machine code in lkfast._C, read with cuobjdump: every kernel family in every dtype for each
    architecture built, no local arrays, and no spills beyond the one documented."""
    import re

    from reference import cuobjdump, resource_usage

    if _ext.load_error or not getattr(_ext._C, "with_cuda", False):
        pytest.skip("lkfast._C was built without CUDA (no nvcc or a CPU-only torch at build time)")
    if cuobjdump() is None:
        pytest.skip("cuobjdump not found (neither on PATH nor in Triton's wheel)")
    usage = resource_usage(_ext._C.__file__)
    archs = {arch for arch, _, _ in usage}
    assert archs, "no GPU code in lkfast._C"
    for arch in archs:
        found = {}
        for a, name, use in usage:
            family = re.search(rf"\d+({'|'.join(CUDA_KERNELS)})I", name)
            if a == arch and family:
                found.setdefault(family.group(1), []).append((name, use))
        assert set(found) == set(CUDA_KERNELS), (arch, sorted(found))
        for family, entries in found.items():
            assert len(entries) >= 4, (arch, family, len(entries))  # fp32, fp16, bf16, fp64 (and variants)
            for name, use in entries:
                assert use["LOCAL"] == 0, (arch, name, use)
                assert use["STACK"] <= STACK_ALLOWED.get((arch, family), 0), (arch, name, use)


# ---------------------------------------------------------------------------------------------
# A Python port of dwconv_cuda.cu's index arithmetic (values in fp64): not the compiled kernels


def _round_up(a, b):
    return (a + b - 1) // b * b


def launch_sizes(shape, kh, kw, dtype):
    """The kernels' launch sizes for x of ``shape`` (the tiling, shared-memory pitch and bytes, tiles,
    weight-gradient phases and launches), from their one source, csrc/cuda/dwconv_cuda_limits.h,
    which every build of lkfast._C carries (CPU-only ones too)."""
    if _ext.load_error:
        pytest.skip(f"lkfast._C is not built: {_ext.load_error}")
    return _ext._C.cuda_launch_sizes(list(shape), kh, kw, dtype)


class Smem:
    """A flat shared-memory array whose loads check bounds (and 16-byte alignment for 4-wide
    loads) for the threads that take part (``mask``); other threads get zeros."""

    def __init__(self, size):
        self.data = torch.zeros(size, dtype=torch.float64)

    def _check(self, index, mask, width):
        index = torch.as_tensor(index)
        mask = torch.ones_like(index, dtype=torch.bool) if mask is None else mask
        index, mask = torch.broadcast_tensors(index, mask)  # a broadcast (weight) load: one index for all
        live = index[mask]
        if live.numel():
            assert int(live.min()) >= 0 and int(live.max()) + width <= self.data.numel(), "shared-memory read out of bounds"
            assert width == 1 or bool((live % 4 == 0).all()), "misaligned 16-byte shared-memory load"
        return torch.where(mask, index, 0), mask

    def load4(self, index, mask=None):  # index: integer tensor of element offsets, one per thread
        index, mask = self._check(index, mask, 4)
        return [torch.where(mask, self.data[index + k], 0.0) for k in range(4)]

    def load(self, index, mask=None):
        index, mask = self._check(index, mask, 1)
        return torch.where(mask, self.data[index], 0.0)


def _fill_halo(s, xc, h0, w0, rows, pitch, cols, ph, pw, H, W, base=0):
    sr = torch.arange(rows)[:, None].expand(rows, pitch)
    sc = torch.arange(pitch)[None, :].expand(rows, pitch)
    ih, iw = h0 + sr - ph, w0 + sc - pw
    ok = (sc < cols) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    vals = torch.zeros(rows, pitch, dtype=torch.float64)
    vals[ok] = xc[ih[ok], iw[ok]]
    s.data[base:base + rows * pitch] = vals.reshape(-1)


def _clip_ranges(first, block, kw, pw, W, valid=None):
    """Per thread, for the `block` consecutive positions first + t: the half-open ranges [lo_t, hi_t)
    of taps (or pixels) that meet the image (empty past `valid`, default W), as dwconv_cuda.cu
    computes jl/jh (forward) and wl/wh (weight gradient)."""
    valid = W if valid is None else valid
    lo = [torch.clamp(pw - first - t, min=0) for t in range(block)]
    hi = [torch.where(first + t < valid, torch.clamp(W + pw - first - t, max=kw), lo[t]) for t in range(block)]
    return lo, hi


def in_image_macs(N, C, H, W, kh, kw):
    """Multiply-adds of one pass that touch no padding."""
    return N * C * valid_taps(H, kh) * valid_taps(W, kw)


def emulate_forward(x, weight, bias, flip, RB, RW, TXN, TYN):
    """dwconv_cuda.cu's NCHW forward_kernel, thread block by thread block: returns y and the number
    of multiply-adds the threads perform."""
    N, C, H, W = x.shape
    kh, kw = weight.shape[-2:]
    kwp, ph, pw = _round_up(kw, 4), kh // 2, kw // 2
    TW, TH = TXN * RW, TYN * RB
    sizes = launch_sizes(x.shape, kh, kw, x.dtype)
    assert sizes["forward_tiling"] == (RB, RW, TXN, TYN), f"this map takes the tiling {sizes['forward_tiling']}"
    pitch = sizes["forward_pitch"]
    rows, cols = TH + kh - 1, TW + kw - 1
    y = torch.full((N, C, H, W), float("nan"), dtype=torch.float64)
    ty, tx = torch.meshgrid(torch.arange(TYN), torch.arange(TXN), indexing="ij")
    macs = 0
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
                    ox0 = w0 + tx * RW
                    jl, jh = _clip_ranges(ox0, RW, kw, pw, W)
                    ja, jb = (jl[0] + 3) & ~3, jh[RW - 1] & ~3
                    none = (ox0 + RW > W) | (jb <= ja)
                    ja, jb = torch.where(none, kw, ja), torch.where(none, kw, jb)
                    acc = [[torch.zeros(TYN, TXN, dtype=torch.float64) for _ in range(RW)] for _ in range(RB)]
                    for q in range(RB):
                        oy = h0 + ty + q * TYN
                        r_lo, r_hi = torch.clamp(ph - oy, min=0), torch.clamp(H + ph - oy, max=kh)
                        for r in range(kh):
                            live = (oy < H) & (r >= r_lo) & (r < r_hi)
                            if not bool(live.any()):
                                continue
                            irow = (ty + q * TYN + r) * pitch + tx * RW
                            wrow = torch.tensor(r * kwp)
                            win = []
                            for j4 in range(0, kwp, 4):  # blocked 4-tap groups [ja, jb), sliding window
                                on = live & (j4 >= ja) & (j4 < jb)
                                start = on & (j4 == ja)
                                if bool(start.any()):
                                    fresh = sum((s_in.load4(irow + j4 + t, start) for t in range(0, RW, 4)), [])
                                    win = [torch.where(start, f, old) for f, old in zip(fresh, win)] if win else fresh
                                if not bool(on.any()):
                                    continue
                                win = win[:RW] + s_in.load4(irow + j4 + RW, on)
                                wv = s_w.load4(wrow + j4, on)
                                for jj in range(4):
                                    for t in range(RW):
                                        acc[q][t] += torch.where(on, win[t + jj] * wv[jj], 0.0)
                                macs += 4 * RW * int(on.sum())
                                win = win[4:]
                            for t in range(RW):  # the rest, one tap at a time
                                for j in range(int(jl[t].min()), int(jh[t].max())):
                                    on = live & (((j >= jl[t]) & (j < torch.minimum(jh[t], ja)))
                                                 | ((j >= torch.maximum(jl[t], jb)) & (j < jh[t])))
                                    if bool(on.any()):
                                        acc[q][t] += torch.where(on, s_in.load(irow + t + j, on) * s_w.load(wrow + j, on), 0.0)
                                        macs += int(on.sum())
                    b = 0.0 if bias is None else float(bias[c])
                    for q in range(RB):
                        for t in range(RW):
                            oy, ox = h0 + ty + q * TYN, w0 + tx * RW + t
                            ok = (oy < H) & (ox < W)
                            y[n, c, oy[ok], ox[ok]] = acc[q][t][ok] + b
    return y, macs


def emulate_weight_grad(go, x, kh, kw, splits, TH=16, TW=16, THREADS=128, MAXG=4):
    """dwconv_cuda.cu's NCHW weight_grad_kernel: returns dW, the number of phases (threads per
    4-tap group) the kernel would use, and the multiply-adds the threads perform."""
    N, C, H, W = x.shape
    kwp, ph, pw = _round_up(kw, 4), kh // 2, kw // 2
    sizes = launch_sizes(x.shape, kh, kw, x.dtype)
    pitch = sizes["weight_grad_pitch"]
    rows, cols = TH + kh - 1, TW + kw - 1
    tiles_w = (W + TW - 1) // TW
    tiles = ((H + TH - 1) // TH) * tiles_w
    items = N * tiles
    per_split = (items + splits - 1) // splits
    splits = (items + per_split - 1) // per_split
    ngw = kwp // 4
    groups = kh * ngw
    phases = sizes["weight_grad_phases"]
    assert TH * TW + rows * pitch >= THREADS * 4, "the phase sums do not fit in the tiles' shared memory"
    ws = torch.full((splits, C, kh, kw), float("nan"), dtype=torch.float64)
    tid = torch.arange(THREADS)
    macs = 0
    for offset in range(0, sizes["weight_grad_launches"] * THREADS * MAXG, THREADS * MAXG):
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
                    h_valid, w_valid = min(TH, H - h0), min(TW, W - w0)
                    for k in range(MAXG):
                        unit = tid + k * THREADS
                        group, phase = offset + unit // phases, unit % phases
                        live = group < groups
                        i, j0 = group // ngw, (group % ngw) * 4
                        h_lo, h_hi = torch.clamp(ph - i - h0, min=0), torch.clamp(H + ph - i - h0, max=h_valid)
                        # (tap j0 + t, tile column w): input column w0 + w + j0 + t - pw in [0, W), w < w_valid
                        wl = [torch.clamp(pw - j0 - t - w0, min=0) for t in range(4)]
                        wh = [torch.where(j0 + t < kw, torch.clamp(W + pw - j0 - t - w0, max=w_valid), wl[t])
                              for t in range(4)]
                        wa, wb = (wl[0] + 3) & ~3, wh[3] & ~3
                        wa, wb = torch.where(wb <= wa, TW, wa), torch.where(wb <= wa, TW, wb)
                        for h in range(h_valid):
                            rows_h = live & (h >= h_lo) & (h < h_hi) & (h % phases == phase)
                            if not bool(rows_h.any()):
                                continue
                            xrow = TH * TW + (h + i) * pitch + j0
                            grow = torch.tensor(h * TW)
                            win = []
                            for w in range(0, TW, 4):
                                on = rows_h & (w >= wa) & (w < wb)
                                start = on & (w == wa)
                                if bool(start.any()):
                                    fresh = smem.load4(xrow + w, start)
                                    win = [torch.where(start, f, old) for f, old in zip(fresh, win)] if win else fresh
                                if not bool(on.any()):
                                    continue
                                win = win[:4] + smem.load4(xrow + w + 4, on)
                                gv = smem.load4(grow + w, on)
                                for ww in range(4):
                                    for t in range(4):
                                        acc[k][t] += torch.where(on, gv[ww] * win[ww + t], 0.0)
                                macs += 16 * int(on.sum())
                                win = win[4:]
                            for t in range(4):
                                for w in range(int(wl[t].min()), int(wh[t].max())):
                                    on = rows_h & (((w >= wl[t]) & (w < torch.minimum(wh[t], wa)))
                                                   | ((w >= torch.maximum(wl[t], wb)) & (w < wh[t])))
                                    if bool(on.any()):
                                        acc[k][t] += torch.where(on, smem.load(grow + w, on) * smem.load(xrow + w + t, on), 0.0)
                                        macs += int(on.sum())
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
    return ws.sum(0).unsqueeze(1), phases, macs



# channels_last kernels (forward_nhwc_kernel, weight_grad_nhwc_kernel): 8 channel lanes x 16 lanes


NHWC_LANES, NHWC_THREADS = 8, 128


def nhwc_vector_ok(tensors, C, V):
    """dwconv_cuda.cu's nhwc_vector_ok: 16-byte vectors only when every tensor is 16-byte aligned,
    has unit channel stride and strides multiple of V, and C is a multiple of V."""
    if C % V:
        return False
    return all(t.data_ptr() % 16 == 0 and t.stride(1) == 1 and all(t.stride(d) % V == 0 for d in (0, 2, 3))
               for t in tensors)


class Gmem:
    """A tensor's storage as seen by the kernel: loads and stores of V consecutive elements at
    element offsets from its data pointer, bounds-checked, and 16-byte aligned when V > 1."""

    def __init__(self, t, values=None):
        self.t = t
        self.base = t.data_ptr()
        self.size = t.element_size()
        span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
        flat = torch.as_strided(t, (span,), (1,))  # the elements the tensor spans, from its first
        self.data = (flat.double() if values is None else values).clone()
        self.stores = torch.zeros(span, dtype=torch.int64)

    def _check(self, offset, mask, V):
        live = offset[mask]
        if live.numel():
            assert int(live.min()) >= 0 and int(live.max()) + V <= self.data.numel(), "global access out of bounds"
            if V > 1:
                assert bool(((self.base + live * self.size) % 16 == 0).all()), "misaligned 16-byte global access"
        return torch.where(mask, offset, 0)

    def load(self, offset, mask, V):  # -> V tensors, one per channel of the vector
        offset = self._check(offset, mask, V)
        return [torch.where(mask, self.data[offset + v], 0.0) for v in range(V)]

    def store(self, offset, mask, V, values):
        offset = self._check(offset, mask, V)
        for v in range(V):
            self.data[offset[mask] + v] = values[v][mask]
            self.stores[offset[mask] + v] += 1


def _nhwc_lanes(C, V):
    tid = torch.arange(NHWC_THREADS)
    return tid % NHWC_LANES, tid // NHWC_LANES, NHWC_LANES * V


def emulate_forward_nhwc(x, weight, bias, flip):
    """forward_nhwc_kernel, block by block on x's own storage: returns y (x's dtype, channels_last,
    computed in fp64), the multiply-adds performed, V and the channels each block covered."""
    N, C, H, W = x.shape
    kh, kw = weight.shape[-2:]
    ph, pw = kh // 2, kw // 2
    y = torch.empty_like(x, memory_format=torch.channels_last)
    w = weight.flip(2, 3) if flip else weight
    wt = w.reshape(C, kh * kw).t().contiguous()  # (kh * kw, C) as the host prepares it
    V = 16 // x.element_size()
    V = V if nhwc_vector_ok([x, y], C, V) and wt.data_ptr() % 16 == 0 else 1
    lane, pixel, per_block = _nhwc_lanes(C, V)
    RW, TPX, TW, TH = 4, 4, 16, NHWC_THREADS // NHWC_LANES // 4
    X, Y, Wt = Gmem(x), Gmem(y, torch.full((y.numel(),), float("nan"), dtype=torch.float64)), Gmem(wt)
    xs, ys = x.stride(), y.stride()
    tiles_w = (W + TW - 1) // TW
    macs, covered = 0, []
    for cb in range((C + per_block - 1) // per_block):
        c0 = (cb * NHWC_LANES + lane) * V
        covered.append(sorted({int(c) + v for c in c0[c0 < C] for v in range(V)}))
        for tile in range(((H + TH - 1) // TH) * tiles_w):
            oy = (tile // tiles_w) * TH + pixel // TPX
            ox0 = (tile % tiles_w) * TW + (pixel % TPX) * RW
            for n in range(N):
                alive = (c0 < C) & (oy < H)
                jl, jh = _clip_ranges(ox0, RW, kw, pw, W)
                ja, jb = jl[0], jh[RW - 1]
                ja, jb = torch.where(jb <= ja, kw, ja), torch.where(jb <= ja, kw, jb)
                r_lo, r_hi = torch.clamp(ph - oy, min=0), torch.clamp(H + ph - oy, max=kh)
                acc = [[torch.zeros(NHWC_THREADS, dtype=torch.float64) for _ in range(V)] for _ in range(RW)]
                for r in range(kh):
                    live = alive & (r >= r_lo) & (r < r_hi)
                    if not bool(live.any()):
                        continue
                    xcol = n * xs[0] + c0 * xs[1] + (oy + r - ph) * xs[2] + (ox0 - pw) * xs[3]
                    wrow = r * kw * C + c0
                    win = [None] * RW
                    for j in range(kw):  # blocked taps [ja, jb): a sliding window of RW input vectors
                        on = live & (j >= ja) & (j < jb)
                        start = on & (j == ja)
                        if bool(start.any()):
                            for t in range(RW - 1):
                                fresh = X.load(xcol + (t + j) * xs[3], start, V)
                                win[t] = fresh if win[t] is None else [torch.where(start, f, o) for f, o in zip(fresh, win[t])]
                        if not bool(on.any()):
                            continue
                        win[RW - 1] = X.load(xcol + (RW - 1 + j) * xs[3], on, V)
                        wv = Wt.load(wrow + j * C, on, V)
                        for t in range(RW):
                            for v in range(V):
                                acc[t][v] += torch.where(on, win[t][v] * wv[v], 0.0)
                        macs += RW * V * int(on.sum())
                        win = win[1:] + [None]
                    for t in range(RW):  # the rest, one tap at a time
                        for j in range(int(jl[t].min()), int(jh[t].max())):
                            on = live & (((j >= jl[t]) & (j < torch.minimum(jh[t], ja)))
                                         | ((j >= torch.maximum(jl[t], jb)) & (j < jh[t])))
                            if bool(on.any()):
                                xv, wv = X.load(xcol + (t + j) * xs[3], on, V), Wt.load(wrow + j * C, on, V)
                                for v in range(V):
                                    acc[t][v] += torch.where(on, xv[v] * wv[v], 0.0)
                                macs += V * int(on.sum())
                for t in range(RW):
                    on = alive & (ox0 + t < W)
                    b = [torch.zeros(NHWC_THREADS, dtype=torch.float64) if bias is None
                         else bias.double()[torch.where(on, c0 + v, 0)] for v in range(V)]
                    Y.store(n * ys[0] + c0 * ys[1] + oy * ys[2] + (ox0 + t) * ys[3], on, V,
                            [acc[t][v] + b[v] for v in range(V)])
    assert bool((Y.stores == 1).all()), "every output element is written exactly once"
    out = torch.as_strided(Y.data, y.shape, y.stride())
    return out, macs, V, covered


def emulate_weight_grad_nhwc(go, x, kh, kw, sms=132):
    """weight_grad_nhwc_kernel with its split-K over (n, h) rows: returns dW (fp64), the
    multiply-adds performed and V."""
    N, C, H, W = x.shape
    ph, pw = kh // 2, kw // 2
    V = 16 // x.element_size()
    V = V if nhwc_vector_ok([go, x], C, V) else 1
    lane, tap_lane, per_block = _nhwc_lanes(C, V)
    ngw = (kw + 3) // 4
    groups = kh * ngw
    grid_x, grid_y = (C + per_block - 1) // per_block, (groups + 15) // 16
    rows = N * H
    splits = min(rows, max(1, (8 * sms + grid_x * grid_y - 1) // (grid_x * grid_y)), 65535)
    per_split = (rows + splits - 1) // splits
    splits = (rows + per_split - 1) // per_split
    X, G = Gmem(x), Gmem(go)
    xs, gs = x.stride(), go.stride()
    ws = torch.full((splits, C, kh, kw), float("nan"), dtype=torch.float64)
    macs = 0
    for bx in range(grid_x):
        c0 = (bx * NHWC_LANES + lane) * V
        for by in range(grid_y):
            group = by * 16 + tap_lane
            alive = (c0 < C) & (group < groups)
            i, j0 = group // ngw, (group % ngw) * 4
            wl = [torch.clamp(pw - j0 - t, min=0) for t in range(4)]
            wh = [torch.where(j0 + t < kw, torch.clamp(W + pw - j0 - t, max=W), wl[t]) for t in range(4)]
            wa, wb = wl[0], wh[3]
            wa, wb = torch.where(wb <= wa, W, wa), torch.where(wb <= wa, W, wb)
            for split in range(splits):
                acc = [[torch.zeros(NHWC_THREADS, dtype=torch.float64) for _ in range(V)] for _ in range(4)]
                for row in range(split * per_split, min(rows, (split + 1) * per_split)):
                    n, h = divmod(row, H)
                    ih = h + i - ph
                    live = alive & (ih >= 0) & (ih < H)
                    if not bool(live.any()):
                        continue
                    grow = n * gs[0] + c0 * gs[1] + h * gs[2]
                    xcol = n * xs[0] + c0 * xs[1] + ih * xs[2] + (j0 - pw) * xs[3]
                    win = [None] * 4
                    for w in range(W):
                        on = live & (w >= wa) & (w < wb)
                        start = on & (w == wa)
                        if bool(start.any()):
                            for t in range(3):
                                fresh = X.load(xcol + (w + t) * xs[3], start, V)
                                win[t] = fresh if win[t] is None else [torch.where(start, f, o) for f, o in zip(fresh, win[t])]
                        if not bool(on.any()):
                            continue
                        win[3] = X.load(xcol + (w + 3) * xs[3], on, V)
                        gv = G.load(grow + w * gs[3], on, V)
                        for t in range(4):
                            for v in range(V):
                                acc[t][v] += torch.where(on, gv[v] * win[t][v], 0.0)
                        macs += 4 * V * int(on.sum())
                        win = win[1:] + [None]
                    for t in range(4):
                        for w in range(int(wl[t].min()), int(wh[t].max())):
                            on = live & (((w >= wl[t]) & (w < torch.minimum(wh[t], wa)))
                                         | ((w >= torch.maximum(wl[t], wb)) & (w < wh[t])))
                            if bool(on.any()):
                                xv, gv = X.load(xcol + (w + t) * xs[3], on, V), G.load(grow + w * gs[3], on, V)
                                for v in range(V):
                                    acc[t][v] += torch.where(on, gv[v] * xv[v], 0.0)
                                macs += V * int(on.sum())
                for v in range(V):
                    for t in range(4):
                        on = alive & (j0 + t < kw)
                        ws[split, (c0 + v)[on], i[on], (j0 + t)[on]] = acc[t][v][on]
    return ws.sum(0).unsqueeze(1), macs, V
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
    """The forward tiling, replayed in Python (not the CUDA kernel), equals F.conv2d, and its threads
    perform exactly the multiply-adds that meet the image."""
    N, C, H, W, kh, kw = shape
    x = torch.randn(N, C, H, W, dtype=torch.float64)
    w = torch.randn(C, 1, kh, kw, dtype=torch.float64)
    b = torch.randn(C, dtype=torch.float64)
    for flip in (False, True):
        y, macs = emulate_forward(x, w, b, flip, *config)
        ref = F.conv2d(x, w.flip(-1, -2) if flip else w, b, padding=(kh // 2, kw // 2), groups=C)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
        assert macs == in_image_macs(N, C, H, W, kh, kw)


# RepLKNet-31B's stages where padding dominates (stage 3: 18 of its 24 blocks) and stage 1, in the
# forward configuration dwconv_cuda.cu picks for each map (small tiles up to 32 x 32)
REPLKNET_MAPS = [((1, 1, 14, 14, 27, 27), SMALL_TILES), ((1, 1, 7, 7, 13, 13), SMALL_TILES),
                 ((1, 1, 56, 56, 31, 31), WIDE_TILES)]


@pytest.mark.parametrize("shape,config", REPLKNET_MAPS, ids=lambda v: "x".join(map(str, v)) if len(v) == 6 else "rb%d_rw%d" % v[:2])
def test_cuda_replay_does_only_in_image_multiply_adds_on_replknet_maps(shape, config):
    """Replayed forward and weight gradient on RepLKNet-31B maps: the multiply-adds the threads
    perform are exactly the in-image ones (none on padding), and the results equal PyTorch's."""
    N, C, H, W, kh, kw = shape
    x = torch.randn(N, C, H, W, dtype=torch.float64)
    w = torch.randn(C, 1, kh, kw, dtype=torch.float64)
    go = torch.randn(N, C, H, W, dtype=torch.float64)
    y, macs = emulate_forward(x, w, None, False, *config)
    torch.testing.assert_close(y, F.conv2d(x, w, padding=(kh // 2, kw // 2), groups=C), rtol=1e-10, atol=1e-10)
    assert macs == in_image_macs(N, C, H, W, kh, kw)
    gw, _, wg_macs = emulate_weight_grad(go, x, kh, kw, splits=2)
    ref = torch.ops.aten.convolution_backward(go, x, w, None, [1, 1], [kh // 2, kw // 2], [1, 1], False, [0, 0], C,
                                              [False, True, False])[1]
    torch.testing.assert_close(gw, ref, rtol=1e-10, atol=1e-10)
    assert wg_macs == in_image_macs(N, C, H, W, kh, kw)


@pytest.mark.parametrize("shape,splits,expect_phases", [
    ((2, 1, 13, 11, 7, 7), 3, 8),     # 14 groups x 8 phases
    ((1, 1, 7, 7, 13, 13), 1, 2),     # kernel rows entirely in padding are skipped
    ((2, 1, 20, 18, 5, 11), 4, 8),    # several tiles, uneven split
    ((1, 1, 18, 9, 27, 27), 2, 1),    # 189 groups: one phase, two groups for some threads
    ((1, 1, 6, 5, 63, 63), 1, 1),     # 1008 tap groups: two launches with a group offset
])
def test_cuda_tiling_replayed_in_python_weight_grad(shape, splits, expect_phases):
    """The weight gradient's split-K tiling, replayed in Python (not the CUDA kernel), equals
    PyTorch's weight gradient, with the thread-phase count the kernel would pick and exactly the
    in-image multiply-adds."""
    N, C, H, W, kh, kw = shape
    x = torch.randn(N, C, H, W, dtype=torch.float64)
    go = torch.randn(N, C, H, W, dtype=torch.float64)
    gw, phases, macs = emulate_weight_grad(go, x, kh, kw, splits)
    assert phases == expect_phases
    ref = torch.ops.aten.convolution_backward(go, x, torch.empty(C, 1, kh, kw, dtype=torch.float64), None, [1, 1],
                                              [kh // 2, kw // 2], [1, 1], False, [0, 0], C, [False, True, False])[1]
    torch.testing.assert_close(gw, ref, rtol=1e-10, atol=1e-10)
    assert macs == in_image_macs(N, C, H, W, kh, kw)


def _channels_last(N, C, H, W, dtype, misalign=False):
    """A channels_last tensor; ``misalign``: a view one element into its storage (not 16-byte aligned)."""
    if not misalign:
        return torch.randn(N, C, H, W).to(dtype).contiguous(memory_format=torch.channels_last)
    flat = torch.randn(N * C * H * W + 1).to(dtype)
    return flat[1:].as_strided((N, C, H, W), (H * W * C, 1, W * C, C))


# (N, C, H, W, kh, kw), dtype, misaligned -> expected vector width V and channels per block
NHWC_CASES = [
    ((1, 64, 14, 14, 27, 27), torch.float16, False, 8, 64),     # RepLKNet stage 3 map: 8 x half per lane
    ((2, 40, 7, 7, 13, 13), torch.float32, False, 4, 32),       # stage 4 map; C not a multiple of 32: a partial block
    ((1, 32, 9, 20, 5, 7), torch.bfloat16, False, 8, 64),       # C < 64: half the lanes idle
    ((1, 16, 9, 11, 7, 3), torch.float64, False, 2, 16),
    ((1, 12, 6, 9, 5, 5), torch.float16, False, 1, 8),          # C % 8 != 0: scalar path
    ((1, 16, 6, 9, 5, 5), torch.float32, True, 1, 8),           # data pointer not 16-byte aligned: scalar path
]


@pytest.mark.parametrize("case", NHWC_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-{str(c[1])[6:]}"
                         + ("-misaligned" if c[2] else ""))
def test_cuda_channels_last_replayed_in_python(case):
    """The channels_last kernels replayed on the tensors' own storage: which channels a block covers,
    16-byte vectors only where aligned (scalar otherwise), every output written once, in-image
    multiply-adds only, and forward / input gradient / weight gradient equal to PyTorch's."""
    (N, C, H, W, kh, kw), dtype, misalign, want_v, want_block = case
    x, go = _channels_last(N, C, H, W, dtype, misalign), _channels_last(N, C, H, W, dtype, misalign)
    w = (torch.randn(C, 1, kh, kw) / kh).to(dtype)
    b = torch.randn(C).to(dtype)
    x64, w64, go64 = x.double(), w.double(), go.double()
    for flip in (False, True):
        y, macs, V, covered = emulate_forward_nhwc(x, w, b, flip)
        assert V == want_v and covered[0] == list(range(min(C, want_block)))
        assert [c for block in covered for c in block] == list(range(C))
        ref = F.conv2d(x64, w64.flip(-1, -2) if flip else w64, b.double(), padding=(kh // 2, kw // 2), groups=C)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
        assert macs == in_image_macs(N, C, H, W, kh, kw)
    gw, macs, V = emulate_weight_grad_nhwc(go, x, kh, kw)
    assert V == want_v
    ref = torch.ops.aten.convolution_backward(go64, x64, w64, None, [1, 1], [kh // 2, kw // 2], [1, 1], False,
                                              [0, 0], C, [False, True, False])[1]
    torch.testing.assert_close(gw, ref, rtol=1e-10, atol=1e-10)
    assert macs == in_image_macs(N, C, H, W, kh, kw)


def test_cuda_channels_last_vector_rule():
    """When the channels_last kernels take 16-byte vectors (nhwc_vector_ok), tensor by tensor."""
    x = torch.empty(2, 64, 5, 5, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    assert nhwc_vector_ok([x], 64, 8)
    assert not nhwc_vector_ok([x[:, :60]], 60, 8)                    # C % 8 != 0
    assert nhwc_vector_ok([x[:, 8:]], 56, 8)                         # 16 bytes in: still aligned
    assert not nhwc_vector_ok([x[:, 4:36]], 32, 8)                   # starts 8 bytes into a 16-byte word
    assert not nhwc_vector_ok([x.contiguous()], 64, 8)               # NCHW: channel stride is not 1
    assert nhwc_vector_ok([x[..., ::2]], 64, 8)                      # every other column: strides still multiples of 8
    padded = torch.empty(2 * 1604, dtype=torch.float16).as_strided((2, 64, 5, 5), (1604, 1, 320, 64))
    assert not nhwc_vector_ok([padded], 64, 8)                       # image stride 1604: not a multiple of 8
    assert not nhwc_vector_ok([x, _channels_last(1, 64, 5, 5, torch.float16, misalign=True)], 64, 8)


def _smoke_cuda_paths(smoke, shapes, dtypes, edge):
    """The paths of dwconv_cuda.cu that benchmarks/gpu_smoke.py's cases take on the cuda backend, by
    the kernels' own rules (the configuration choice in forward / weight_grad, the launch helpers)."""
    paths = set()
    gen = torch.Generator().manual_seed(0)
    for shape, dtype, layout, names in smoke.cases(shapes, dtypes, ("cuda", "triton", "triton_mma", "torch"), edge):
        if "cuda" not in names:
            continue
        N, C, H, W, kh, kw = shape
        x = smoke.make_map((N, C, H, W), layout, dtype, "cpu", gen)
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            vec = nhwc_vector_ok([x], C, 16 // x.element_size())
            paths.add(f"channels_last {'vector' if vec else 'scalar'} {x.element_size()}-byte")
            if x.data_ptr() % 16:
                paths.add("channels_last misaligned")
            continue
        sizes = launch_sizes((N, C, H, W), kh, kw, dtype)
        paths.add("forward wide tiles" if sizes["forward_tiling"] == WIDE_TILES else "forward small tiles")
        if sizes["forward_smem"] > 48 * 1024:  # CUDA's default; past it the kernel opts in
            paths.add("forward shared memory > 48 KB")
        paths.add("weight grad one phase" if sizes["weight_grad_phases"] == 1 else "weight grad phases")
        if sizes["weight_grad_launches"] > 1:
            paths.add("weight grad two launches")
    return paths


CUDA_PATHS = {"forward small tiles", "forward wide tiles", "forward shared memory > 48 KB", "weight grad phases",
              "weight grad one phase", "weight grad two launches", "channels_last vector 4-byte",
              "channels_last scalar 4-byte", "channels_last vector 2-byte", "channels_last scalar 2-byte",
              "channels_last misaligned"}


def test_gpu_smoke_reaches_every_cuda_kernel_path():
    """benchmarks/gpu_smoke.py, the first step on a GPU (in its own process, CUDA_LAUNCH_BLOCKING=1),
    runs every configuration of dwconv_cuda.cu on the cuda backend: both forward tilings, shared
    memory past the 48 KB default (cudaFuncSetAttribute), the weight gradient with several thread
    phases and with one, in two launches; channels_last with 16-byte vectors and scalar, in 4- and
    2-byte dtypes, and a misaligned view. Its compute-sanitizer run (--tiny --edge) all but the
    2-byte vectors. (Before EDGE_CASES the smoke's maps were all <= 32 x 32 with kernels <= 13:
    none of the wide tiles, the 48 KB attribute, one phase, two launches or misaligned data.)"""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "gpu_smoke", Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    assert _smoke_cuda_paths(smoke, *smoke.selection(tiny=False, edge=False)) == CUDA_PATHS
    assert _smoke_cuda_paths(smoke, *smoke.selection(tiny=True, edge=True)) == CUDA_PATHS - {"channels_last vector 2-byte"}


# Inf and NaN: the kernels take only the products that meet the image (per-thread tap and pixel
# ranges; the shared-memory halo's zeros and the zero taps past kw are never multiplied), so NaN,
# +Inf and -Inf should land exactly where the sum over in-image terms has them. The replay computes
# the kernels' values by their loops, so it shows the scheme is exact; the compiled kernels are
# checked on a GPU by test_cuda_nonfinite_placement_on_gpu.
NONFINITE_WHERE = ("input", "grad_out", "weight", "all")


@pytest.mark.parametrize("shape,config", [((1, 3, 5, 5, 7, 7), SMALL_TILES), ((1, 2, 9, 9, 3, 3), SMALL_TILES),
                                          ((1, 2, 13, 37, 5, 9), WIDE_TILES)],
                         ids=lambda v: "x".join(map(str, v)) if len(v) == 6 else "rb%d_rw%d" % v[:2])
def test_cuda_replay_nonfinite_placement_is_exact(shape, config):
    """NCHW forward, input gradient and weight gradient, replayed, with NaN/+Inf/-Inf planted in the
    input, output gradient and weight: exactly the masks of the sum over in-image terms."""
    kh, kw = shape[-2:]
    for where in NONFINITE_WHERE:
        x, w, go = make_case(shape, "contiguous", torch.float64, where)
        want = exact_reference(x, w, go)
        got = {"forward": emulate_forward(x, w, None, False, *config)[0],
               "input_grad": emulate_forward(go, w, None, True, *config)[0],
               "weight_grad": emulate_weight_grad(go, x, kh, kw, splits=2)[0]}
        for name, value in got.items():
            assert_nonfinite_match(value, want[name], 1e-10, f"{shape} {where} {name}")


@pytest.mark.parametrize("shape,dtype", [((1, 4, 5, 5, 7, 7), torch.float32), ((1, 3, 9, 9, 3, 3), torch.float32),
                                         ((1, 2, 6, 9, 5, 5), torch.float64)],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v)[6:])
def test_cuda_replay_channels_last_nonfinite_placement_is_exact(shape, dtype):
    """The same for the channels_last kernels, replayed on 16-byte vectors (4 fp32 channels, 2 fp64)
    and on the scalar path (3 channels)."""
    kh, kw = shape[-2:]
    for where in NONFINITE_WHERE:
        x, w, go = make_case(shape, "channels_last", dtype, where)
        want = exact_reference(x, w, go)
        got = {"forward": emulate_forward_nhwc(x, w, None, False)[0],
               "input_grad": emulate_forward_nhwc(go, w, None, True)[0],
               "weight_grad": emulate_weight_grad_nhwc(go, x, kh, kw)[0]}
        for name, value in got.items():
            assert_nonfinite_match(value, want[name], 1e-10, f"{shape} {dtype} {where} {name}")


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


# (N, C, H, W, kh, kw), layout, dtype: both NCHW forward tilings (small tiles up to 32 x 32 maps),
# the weight gradient's phases, channels_last on 16-byte vectors and on the scalar path
GPU_NONFINITE_CASES = [
    ((1, 3, 5, 5, 7, 7), "contiguous", torch.float32),
    ((2, 20, 9, 12, 15, 15), "contiguous", torch.float16),
    ((1, 8, 40, 70, 31, 31), "contiguous", torch.float32),      # wide tiles
    ((2, 64, 14, 14, 27, 27), "channels_last", torch.bfloat16),  # 8 channels a vector
    ((1, 6, 9, 9, 3, 3), "channels_last", torch.float16),       # C % 8 != 0: scalar path
    ((2, 16, 7, 7, 13, 13), "channels_last", torch.float64),
]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape,fmt,dtype", GPU_NONFINITE_CASES,
                         ids=[f"{case_id(c[0])}-{c[1]}-{str(c[2])[6:]}" for c in GPU_NONFINITE_CASES])
def test_cuda_nonfinite_placement_on_gpu(shape, fmt, dtype):
    """The compiled kernels: NaN, +Inf and -Inf planted in the input, output gradient and weight land
    exactly where the sum over in-image terms has them, as the replay says they should."""
    backend = backend_or_skip("cuda", "cuda", dtype)
    for where in NONFINITE_WHERE:
        x, w, go = make_case(shape, fmt, dtype, where, "cuda")
        got = run_op(x, w, None, go, backend)
        want = exact_reference(x, w, go)
        for name in ("forward", "input_grad", "weight_grad"):
            assert_nonfinite_match(got[name], want[name], TOLERANCE[dtype][name], f"{shape} {fmt} {dtype} {where} {name}")


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


@pytest.mark.gpu
@gpu
def test_cuda_auto_falls_back_where_the_kernels_cannot_launch():
    """A 101x101 kernel in fp64 needs 267,712 bytes of shared memory per block in the NCHW forward,
    over an H100/H200's 232,448: ``auto`` passes the cuda backend over (and computes it right with
    another), ``backend="cuda"`` is refused with the reason before any launch."""
    x, w = make_input((1, 2, 40, 40), "contiguous", torch.float64, "cuda"), make_weight(2, 101, 101, torch.float64, "cuda")
    limit = torch.cuda.get_device_properties(x.device).shared_memory_per_block_optin
    if limit >= 267712:
        pytest.skip(f"this GPU allows {limit} bytes of shared memory per block: the kernel fits")
    assert ops.plan_for(x, w).forward != "cuda"
    assert rel_err(ops.depthwise_conv2d(x, w), F.conv2d(x, w, padding=50, groups=2)) < 1e-10
    with pytest.raises(RuntimeError, match="267712 bytes of shared memory"):
        ops.depthwise_conv2d(x, w, backend="cuda")


# The eval's --amp and the attacks' transforms on a GPU: what test_depthwise.py checks on the CPU
# (test_the_op_follows_autocast_whichever_backend_computes, test_torch_func_transforms_compute_with_conv2d)
AUTOCAST_DEVICE, AUTOCAST_DTYPE, AUTOCAST_BACKENDS = "cuda", torch.float16, ("cuda", "triton", "triton_mma", "torch", "auto")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_op_follows_autocast_on_every_gpu_backend(channels_last):
    """Under CUDA autocast (fp16: the eval's --amp on a GPU) the op's fp32 inputs are cast as
    F.conv2d's are, on every GPU backend that can run the call and on auto: fp16 out, close to
    F.conv2d's, and the backward gives fp32 gradients to the fp32 leaves."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ran = []
    for backend in AUTOCAST_BACKENDS:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 64, 28, 28, generator=g).to(AUTOCAST_DEVICE).contiguous(memory_format=fmt).requires_grad_()
        w = (torch.randn(64, 1, 13, 13, generator=g) / 13).to(AUTOCAST_DEVICE).requires_grad_()
        b = torch.randn(64, generator=g).to(AUTOCAST_DEVICE).requires_grad_()
        if backend != "auto" and BACKENDS[backend].not_supported_reasons(x.detach().to(AUTOCAST_DTYPE),
                                                                         w.detach().to(AUTOCAST_DTYPE)):
            continue
        with torch.autocast(AUTOCAST_DEVICE, dtype=AUTOCAST_DTYPE):
            y = ops.depthwise_conv2d(x, w, b, backend=backend)
            reference = F.conv2d(x, w, b, padding=6, groups=64)
        assert y.dtype == reference.dtype == AUTOCAST_DTYPE, backend
        assert rel_err(y, reference) < 2e-2, backend
        y.float().square().sum().backward()
        assert x.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32, backend
        assert x.grad.isfinite().all() and w.grad.isfinite().all() and w.grad.abs().sum() > 0, backend
        ran.append(backend)
    assert "auto" in ran and len(ran) >= 3, ran


@pytest.mark.gpu
@gpu
def test_cuda_op_under_torch_func_transforms_computes_with_conv2d():
    """vmap, jvp, jacrev and a second derivative through the op on GPU tensors equal the same
    transforms of F.conv2d (the op computes with it under a transform); a named lkfast kernel says
    it cannot run there."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 9, 9, generator=g, dtype=torch.float64).to(AUTOCAST_DEVICE)
    w = torch.randn(4, 1, 5, 3, generator=g, dtype=torch.float64).to(AUTOCAST_DEVICE)
    b = torch.randn(4, generator=g, dtype=torch.float64).to(AUTOCAST_DEVICE)

    def fast(x, w):
        return ops.depthwise_conv2d(x, w, b)

    def plain(x, w):
        return F.conv2d(x, w, b, padding=(2, 1), groups=4)

    func = torch.func
    for name, transform in func_transforms(x, w).items():
        torch.testing.assert_close(transform(fast), transform(plain), rtol=1e-10, atol=1e-10, msg=name)
    named = AUTOCAST_BACKENDS[0]
    with pytest.raises(RuntimeError, match=f"backend '{named}' cannot run under torch.func transforms"):
        func.vmap(lambda x: ops.depthwise_conv2d(x, w, backend=named))(x.unsqueeze(1))


# (shape, k, dtype) -> sizes worked by hand from dwconv_cuda.cu's launches. NCHW forward: kh x kwp taps
# (kwp: kw rounded up to 4) and the (TH + kh - 1) x pitch input tile, in the accumulation type (fp64
# for fp64, else fp32); 64 x 32 tiles (RB 2, RW 8: pitch = kwp + 32 rounded up to an odd number of
# 4-element groups) unless both sides are <= 32, then 16 x 16 (RW 4: pitch with (pitch / 4) % 8 == 4).
# NCHW weight gradient: the 16 x 16 dY tile and the (16 + kh - 1) x pitch input tile (the 16-wide
# pitch rule); kh * kwp / 4 tap groups, 2..8 threads each while 2x the threads fit in 128, 512 groups
# per launch. channels_last forward: 4 x 16 tiles.
LAUNCH_SIZES_BY_HAND = [
    # 63x63 on a 56x56 map: forward pitch 96 -> 100, (63 * 64 + 126 * 100) * 4; 1008 groups
    (((2, 64, 56, 56), 63, torch.float32),
     dict(forward_tiling=WIDE_TILES, forward_pitch=100, forward_smem=66528, forward_tiles=2, weight_grad_pitch=80,
          weight_grad_smem=25984, weight_grad_items=32, weight_grad_phases=1, weight_grad_launches=2)),
    # 40x20: one side over 32 is enough for the wide tiles
    (((2, 64, 40, 20), 63, torch.float32), dict(forward_tiling=WIDE_TILES, forward_pitch=100, forward_smem=66528)),
    # 17x19 in fp64: small tiles, pitch 80, (63 * 64 + 78 * 80) * 8
    (((2, 64, 17, 19), 63, torch.float64),
     dict(forward_tiling=SMALL_TILES, forward_pitch=80, forward_smem=82176, forward_tiles=4)),
    # 101x101 in fp64 (kwp 104): forward pitch 136 -> 140, (101 * 104 + 164 * 140) * 8; weight gradient
    # pitch 120 -> 144, (256 + 116 * 144) * 8; 2626 groups in 6 launches
    (((2, 64, 56, 56), 101, torch.float64),
     dict(forward_pitch=140, forward_smem=267712, weight_grad_pitch=144, weight_grad_smem=135680,
          weight_grad_launches=6)),
    # RepLKNet's stage 1 in fp16: (31 * 32 + 94 * 68) * 4, under the 48 KB default
    (((2, 64, 56, 56), 31, torch.float16), dict(forward_pitch=68, forward_smem=29536, weight_grad_phases=1)),
    # 7x7 on 16x16: 14 groups x 8 phases; the weight gradient's dY tile outweighs the 7 x 8 taps
    (((1, 8, 16, 16), 7, torch.float32),
     dict(forward_tiling=SMALL_TILES, forward_pitch=48, forward_smem=4448, weight_grad_pitch=48,
          weight_grad_smem=5248, weight_grad_phases=8, weight_grad_launches=1)),
    # 4096 x 4096: 64 x 128 wide tiles, 1024 x 256 channels_last ones, 256 x 256 weight-gradient items
    (((1, 8, 4096, 4096), 7, torch.float16),
     dict(forward_tiles=8192, nhwc_forward_tiles=262144, weight_grad_items=65536, nhwc_weight_grad_rows=4096)),
]


@pytest.mark.parametrize("case,want", LAUNCH_SIZES_BY_HAND,
                         ids=lambda v: f"{'x'.join(map(str, v[0]))}_k{v[1]}_{str(v[2])[6:]}" if isinstance(v, tuple) else None)
def test_cuda_launch_sizes_are_worked_by_hand(case, want):
    """lkfast._C.cuda_launch_sizes (csrc/cuda/dwconv_cuda_limits.h, the sizing dwconv_cuda.cu launches
    with) against sizes worked by hand (LAUNCH_SIZES_BY_HAND). Counting fp64 as 4 bytes fails it."""
    shape, k, dtype = case
    sizes = launch_sizes(shape, k, k, dtype)
    assert {key: sizes[key] for key in want} == want


def test_cuda_launch_refusal_is_the_kernels_checks():
    """lkfast._C.cuda_launch_refusal, the kernels' own launch checks (dwconv_cuda_limits.h): '' when
    every kernel of both layouts launches; otherwise what needs how much and what the GPU allows."""
    if _ext.load_error:
        pytest.skip(f"lkfast._C is not built: {_ext.load_error}")
    refusal = _ext._C.cuda_launch_refusal
    for shape, k, dtype, smem in [((2, 64, 56, 56), 63, torch.float32, 66528), ((2, 64, 17, 19), 63, torch.float64, 82176),
                                  ((2, 64, 56, 56), 101, torch.float64, 267712)]:
        assert refusal(shape, k, k, dtype, smem) == ""
        assert refusal(shape, k, k, dtype, smem - 1) == (
            f"its NCHW forward kernel needs {smem} bytes of shared memory per block for a {k}x{k} kernel in "
            f"{str(dtype).removeprefix('torch.')}; this GPU allows {smem - 1}")
        assert refusal(shape, k, k, dtype) == refusal(shape, k, k, dtype, None) == ""  # the limit not known
    assert refusal((2, 64, 56, 56), 31, 31, torch.float16, 48 * 1024) == ""  # RepLKNet's stage 1: the 48 KB default
    assert refusal((2, 64, 56, 56), 63, 63, torch.float64, 232448) == ""  # the contract's largest kernel on an H200
    assert refusal((1, 8, 16, 16), 7, 7, torch.float32, 5248) == ""  # the weight gradient's 5,248 B is the larger
    assert "its NCHW weight gradient kernel needs 5248 bytes" in refusal((1, 8, 16, 16), 7, 7, torch.float32, 5247)
    assert refusal((1, 8, 4096, 4096), 7, 7, torch.float16, 232448) == (
        "a 4096x4096 map is 262144 tiles for its channels_last forward kernel, over the grid's 65535")
    assert refusal((1, 8, 1024, 1024), 7, 7, torch.float16, 232448) == ""  # 256 x 64 = 16384 tiles
    assert refusal((1, 8, 4, 16 * 65535), 7, 7, torch.float16, 232448) == ""  # 65535 channels_last tiles: the most
    assert "65536 tiles for its channels_last forward" in refusal((1, 8, 4, 16 * 65535 + 1), 7, 7, torch.float16)
    assert refusal((2 ** 31 - 1, 1, 1, 1), 3, 3, torch.float32) == ""  # one 16x16 tile, one row per image
    assert refusal((2 ** 31, 1, 1, 1), 3, 3, torch.float32) == (
        "N=2147483648 x a 1x1 map is 2147483648 16x16 tiles for its NCHW weight gradient, over its int32 "
        "counters' 2147483647")
    assert "2281701376 rows for its channels_last weight gradient" in refusal((2 ** 27, 1, 17, 1), 3, 3, torch.float32)
    with pytest.raises(RuntimeError, match="shape must be"):
        refusal((8, 16, 16), 7, 7, torch.float32)


def test_auto_passes_the_cuda_backend_over_where_its_kernels_cannot_launch(monkeypatch):
    """With the cuda backend made to look available (CPU tensors standing in for a GPU's, an H200's
    shared-memory limit), a call its kernels would refuse at launch is not runnable for it, so the
    unmeasured default order goes to PyTorch instead of a RuntimeError from inside the op."""
    from lkfast.ops import backends

    if _ext.load_error:
        pytest.skip(f"lkfast._C is not built (it carries the kernels' launch rule): {_ext.load_error}")
    cuda = BACKENDS["cuda"]
    monkeypatch.setattr(cuda, "unavailable_reason", lambda: None)
    monkeypatch.setattr(cuda, "device_types", ("cpu", "cuda"))
    monkeypatch.setattr(backends, "_smem_optin", lambda index: 232448)
    x = torch.empty(1, 2, 40, 40, dtype=torch.float64)
    fits, too_big = torch.empty(2, 1, 63, 63, dtype=torch.float64), torch.empty(2, 1, 101, 101, dtype=torch.float64)
    assert cuda.not_supported_reasons(x, fits) == []
    assert "267712 bytes of shared memory" in " ".join(cuda.not_supported_reasons(x, too_big))
    empty = cuda_table.Table({}, "", "no table")
    usable = lambda w: lambda name: not BACKENDS[name].not_supported_reasons(x, w)  # noqa: E731
    assert cuda_table.choose(x, fits, usable(fits), gpu=H200, table=empty)[0] == Plan.single("cuda")
    assert cuda_table.choose(x, too_big, usable(too_big), gpu=H200, table=empty)[0] == Plan.single("torch")


def test_the_opt_in_shared_memory_is_asked_once_per_device_index(monkeypatch):
    """backends._smem_optin (what not_supported_reasons gives the kernels' launch rule): each device
    index's own limit, asked of torch once (it runs on every call of the op); None where torch's
    properties do not carry it. torch.cuda.get_device_properties is faked: no GPU needed."""
    from types import SimpleNamespace

    from lkfast.ops import backends

    asked = []
    limits = {0: 232448, 1: 166912}

    def properties(index):
        asked.append(index)
        return SimpleNamespace(shared_memory_per_block_optin=limits[index]) if index in limits else SimpleNamespace()
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    backends._smem_optin.cache_clear()
    try:
        assert [backends._smem_optin(i) for i in (0, 1, 0, 1, 2)] == [232448, 166912, 232448, 166912, None]
        assert asked == [0, 1, 2]
    finally:
        backends._smem_optin.cache_clear()  # nothing of the fake left for a real GPU's later calls


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
    ((H200, "half", "nchw", 31, 31, 64, 128, 56, 56), ("cuda",) * 3,
     r"dtype must be one of bfloat16, float16, float32, float64, got 'half'"),
    (("", "float16", "nchw", 31, 31, 64, 128, 56, 56), ("cuda",) * 3, r"gpu must be a GPU name"),
    ((H200, "float16", "nchw", 31, 31, True, 128, 56, 56), ("cuda",) * 3, r"positive integers"),
    ((H200, "float16", "nhwc", 31, 31, 64, 128, 56, 56), ("cuda",) * 3, r"layout must be one of nchw, channels_last"),
    ((H200, "float16", "nchw", 31, 31, 0, 128, 56, 56), ("cuda",) * 3, r"positive integers"),
    ((H200, "float16", "nchw", 31, 31, 64, 128, 56, 56), ("cuda", "cpu", "torch"), r"backends must be among cuda, triton, triton_mma, torch"),
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


def test_auto_keeps_each_cuda_choice_until_the_table_changes(tmp_path, monkeypatch):
    """The op keeps the table's choice per exact call (shape, strides, dtype, device) for as long as
    the table file is the same (lkfast.ops.depthwise._cuda_plan): asked once per call, it is the
    table's own answer; another layout, dtype or shape is asked anew; a file rewritten in place,
    another LKFAST_CUDA_TABLE or none (the shipped table) is seen at the next call."""
    from lkfast.ops import depthwise

    asked = []
    choose = cuda_table.choose
    monkeypatch.setattr(cuda_table, "choose", lambda *a, **k: (asked.append(1), choose(*a, **k))[1])
    monkeypatch.setattr(depthwise, "_usable", lambda name, x, w: True)  # CPU tensors filed as an H200's
    monkeypatch.setattr(depthwise, "_CUDA_PLAN_MEMO", {})
    x, w = _call()
    rows = {cuda_table.key_of(x, w, H200): ("triton", "cuda", "cuda"),
            cuda_table.key_of(x.contiguous(), w, H200): ("cuda", "torch", "triton")}
    first = cuda_table.save_table(rows, "a", tmp_path / "a.json")
    monkeypatch.setenv(cuda_table.ENV_VAR, str(first))
    plan = lambda x, w: depthwise._cuda_plan(x, w, gpu=H200)  # noqa: E731
    assert plan(x, w) == choose(x, w, lambda name: True, gpu=H200)
    assert plan(x, w)[0] == ("triton", "cuda", "cuda") and "(a)" in plan(x, w)[1]
    assert len(asked) == 1  # kept
    assert plan(x.contiguous(), w)[0] == ("cuda", "torch", "triton") and len(asked) == 2  # the strides are the key
    plan(x.to(torch.bfloat16), w.to(torch.bfloat16))
    plan(*_call(N=32))
    assert plan(x, w.clone())[0] == ("triton", "cuda", "cuda") and len(asked) == 4  # equal shapes: kept
    cuda_table.save_table({cuda_table.key_of(x, w, H200): ("torch", "torch", "cuda")}, "b", first)  # in place
    assert plan(x, w)[0] == ("torch", "torch", "cuda") and "(b)" in plan(x, w)[1] and len(asked) == 5
    second = cuda_table.save_table({cuda_table.key_of(x, w, H200): ("cuda",) * 3}, "c", tmp_path / "c.json")
    monkeypatch.setenv(cuda_table.ENV_VAR, str(second))
    assert plan(x, w)[0] == ("cuda",) * 3 and len(asked) == 6
    monkeypatch.delenv(cuda_table.ENV_VAR)
    assert cuda_table.SHIPPED_PATH.name in plan(x, w)[1] and len(asked) == 7
    monkeypatch.setenv(cuda_table.ENV_VAR, str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="named by LKFAST_CUDA_TABLE"):
        plan(x, w)


def test_auto_asks_the_table_once_per_cuda_call_shape(tmp_path, monkeypatch):
    """plan_for on CUDA tensors (FakeTensors on "cuda": no GPU needed) takes the plan from the table
    through the kept choice: asked once for repeated calls, the table's row."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lkfast.ops import depthwise

    asked = []
    choose = cuda_table.choose
    monkeypatch.setattr(cuda_table, "choose", lambda *a, **k: (asked.append(1), choose(*a, **k))[1])
    monkeypatch.setattr(cuda_table, "_gpu_name", lambda index: H200)
    monkeypatch.setattr(depthwise, "_usable", lambda name, x, w: True)
    monkeypatch.setattr(depthwise, "_CUDA_PLAN_MEMO", {})
    with FakeTensorMode():
        x = torch.empty(64, 128, 56, 56, dtype=torch.float16, device="cuda").contiguous(memory_format=torch.channels_last)
        w = torch.empty(128, 1, 31, 31, dtype=torch.float16, device="cuda")
    row = cuda_table.key_of(x, w)
    monkeypatch.setenv(cuda_table.ENV_VAR, str(cuda_table.save_table({row: ("triton", "cuda", "torch")}, "t",
                                                                    tmp_path / "t.json")))
    assert [ops.plan_for(x, w) for _ in range(3)] == [("triton", "cuda", "torch")] * 3 and len(asked) == 1


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
    # triton_mma (tensor cores): never from the default order, even where it is the only lkfast
    # backend that can run; only from a row where it was measured fastest
    assert cuda_table.choose(x, w, lambda name: name in ("triton_mma", "torch"), gpu=H200)[0] == ("torch",) * 3
    x, w = _call(dtype=torch.bfloat16)
    rows[(H200, "bfloat16", "channels_last", 27, 27, 64, 512, 14, 14)] = ("triton_mma", "cuda", "triton_mma")
    cuda_table.save_table(rows, "test", tmp_path / "t.json")
    assert cuda_table.choose(x, w, everything, gpu=H200)[0] == ("triton_mma", "cuda", "triton_mma")
    assert cuda_table.choose(x, w, lambda name: name != "triton_mma", gpu=H200)[0] == ("torch", "cuda", "torch")


def test_cuda_table_choice_is_searched_once_per_key_and_table(tmp_path, monkeypatch):
    """The op asks on every call: the nearest-row search runs once per (key, runnable backends)
    while the table stays the same, and again once the file changes."""
    x, w = _call()
    path = cuda_table.save_table({cuda_table.key_of(x, w, H200): ("triton",) * 3}, "a", tmp_path / "t.json")
    monkeypatch.setenv(cuda_table.ENV_VAR, str(path))
    searches = []
    real = cuda_table._choose_in
    monkeypatch.setattr(cuda_table, "_choose_in", lambda *a: searches.append(a[1:]) or real(*a))
    everything = lambda name: True  # noqa: E731
    for _ in range(3):
        assert cuda_table.choose(x, w, everything, gpu=H200)[0] == ("triton",) * 3
    assert len(searches) == 1
    cuda_table.choose(x, w, lambda name: name != "triton", gpu=H200)  # other backends can run: its own search
    assert len(searches) == 2
    cuda_table.save_table({cuda_table.key_of(x, w, H200): ("cuda",) * 3}, "b", path)
    assert cuda_table.choose(x, w, everything, gpu=H200)[0] == ("cuda",) * 3
    assert len(searches) == 3


def test_cuda_table_key_names_the_layout_the_op_computes_in():
    x, w = _call(N=2, C=8, H=5, W=7, k=3, channels_last=False)
    assert cuda_table.key_of(x, w, H200) == (H200, "float16", "nchw", 3, 3, 2, 8, 5, 7)
    assert cuda_table.key_of(x.contiguous(memory_format=torch.channels_last), w, H200).layout == "channels_last"
    assert cuda_table.key_of(x[..., ::2], w[..., :, :], H200).layout == "nchw"  # strided: computed as NCHW
    with pytest.raises(ValueError, match="not a GPU; pass gpu="):
        cuda_table.key_of(x, w)
    # a rectangular kernel: kh (the weight's dim 2) before kw
    assert cuda_table.key_of(x, torch.empty(8, 1, 3, 5, dtype=torch.float16), H200)[3:5] == (3, 5)


@pytest.mark.parametrize("text, match", [
    ('{"format": 2, "measured_on": "x", "rows": []}', r"expected a JSON object with format 1"),
    ('{"format": 1, "measured_on": "x", "rows": [[["NVIDIA H200", "float16", "nchw", 3, 3, 1, 8, 5, 7], '
     '["cuda", "cuda", "cuda"], "extra"]]}', r"each row must be \[key, value\]"),
    ('{"format": 1, "rows": [', r"is not valid JSON"),
])
def test_cuda_table_refuses_a_file_of_another_format_or_shape(tmp_path, text, match):
    path = tmp_path / "t.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        cuda_table.load_table(path)


def test_cuda_table_sees_a_file_rewritten_in_place_with_the_same_size(tmp_path):
    """A hand edit in place (same inode, same size, another mtime): the next lookup reads it."""
    x, w = _call()
    key = cuda_table.key_of(x, w, H200)
    path = cuda_table.save_table({key: ("cuda", "cuda", "torch")}, "a", tmp_path / "t.json")
    assert cuda_table.load_table(path).rows[key] == ("cuda", "cuda", "torch")
    before = os.stat(path)
    text = path.read_text().replace('"cuda", "cuda", "torch"', '"torch", "cuda", "cuda"')
    with open(path, "r+") as f:  # not save_table's atomic replace: the inode stays
        f.write(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    after = os.stat(path)
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
    assert cuda_table.load_table(path).rows[key] == ("torch", "cuda", "cuda")


def test_cuda_table_nearest_row_weighs_kernel_width_and_map_area_and_prefers_the_own_row():
    """Rows of one GPU, dtype and layout that differ from the call in one thing each."""
    def key(kh, kw, H, W):
        return cuda_table.Key(H200, "float16", "nchw", kh, kw, 8, 64, H, W)

    def found(rows, call):
        return cuda_table.lookup(call, rows)

    rows = {key(7, 7, 32, 32): ("cuda",) * 3, key(7, 31, 32, 32): ("triton",) * 3}
    assert found(rows, key(7, 29, 32, 32)) == (key(7, 31, 32, 32), ("triton",) * 3)
    rows = {key(7, 7, 64, 64): ("cuda",) * 3, key(7, 7, 16, 16): ("triton",) * 3}
    assert found(rows, key(7, 7, 64, 4)) == (key(7, 7, 16, 16), ("triton",) * 3)  # 64x4 has 16x16's area
    # two rows at distance 0 (a 4x16 and a 16x4 map): the call's own row, not the other
    rows = {key(7, 7, 4, 16): ("cuda",) * 3, key(7, 7, 16, 4): ("triton",) * 3}
    assert found(rows, key(7, 7, 16, 4)) == (key(7, 7, 16, 4), ("triton",) * 3)
    assert found(rows, key(7, 7, 4, 16)) == (key(7, 7, 4, 16), ("cuda",) * 3)
