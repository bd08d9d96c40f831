"""Tensor-core (``tl.dot``) Triton kernels of lkfast's depthwise convolution: stride 1, zero "same"
padding, odd kernels. Verified in CI on the CPU in Triton's interpreter (``TRITON_INTERPRET=1``)
against fp64 ``F.conv2d`` and compiled ahead of time for sm_90 (Hopper); run on an H200 once
(2026-12-04: the smoke test's fp16/bf16 cases right, timings in benchmarks/results/gpu_h200/).

Formulation
-----------
A depthwise convolution is C independent 2-D convolutions, each too small for a matrix product as it
stands. Per channel ``c`` and kernel row ``i`` it is one, though:

* **Forward** (and the input gradient, which is the forward with the kernel rotated 180 degrees,
  ``flip=True``)::

      out[n, h, w0:w0+BN] += X[n, h+i-ph, w0-pw : w0-pw+BN+kw-1] @ T_i

  ``T_i`` is the banded (Toeplitz) ``(BN + kw - 1) x BN`` matrix with ``T_i[k, col] = w[c, i, k - col]``
  for ``0 <= k - col < kw`` and zero elsewhere. All images and all output rows of the channel share
  ``T_i``, so the M dimension of the product is ``BLOCK_M`` rows drawn from the ``N*H`` rows ``(n, h)``;
  the K dimension (``BN + kw - 1`` input columns) is walked in chunks of ``BLOCK_K``; the kernel rows
  ``i`` are a loop accumulating into the same fp32 tile. ``_forward_banded``, one program per
  (channel, ``BLOCK_M`` rows, ``BLOCK_N`` output columns).

* **Weight gradient** ``dW[c, i, j] = sum_{n,h,w} dY[n,c,h,w] X[n,c,h+i-ph,w+j-pw]``: per (c, i) and
  an output-column tile ``w0:w0+BN``, the matrix product over the rows ``(n, h)``::

      P = dY[rows, w0:w0+BN]^T @ X[rows shifted by i, w0-pw : w0-pw+BN+kw-1]     (BN x (BN+kw-1))

  reduced over all ``N*H`` rows (the long K dimension of the product), and then
  ``dW[c, i, j] = sum_w P[w, w + j]``: the Hankel structure of the shifted input rows becomes a sum
  along the diagonals of ``P``, taken once per program after the whole reduction. ``_weight_grad_banded``,
  one program per (channel * kernel row, column tile * K chunk, split of the rows); each writes its
  ``kw`` partial sums to its own slot of an fp32 workspace that one ``sum`` finishes (deterministic,
  no atomics).

Precision: fp16 and bf16 operands go to the tensor cores with fp32 accumulation
(``tl.dot(..., out_dtype=tl.float32)``); the weights are rounded to the input's dtype for the product.
fp32 inputs are accepted and multiplied with ``input_precision="ieee"`` (no TF32: TF32's 10-bit
mantissa would miss the fp32 tolerance of the tests), i.e. NOT on tensor cores: the fp32 path exists
for completeness and is not expected to beat the CUDA-core kernels of ``depthwise.py``.

What it gains on an H200
------------------------
Measured (fp16, batch 64, 2026-12-04): RepLKNet-31B stage 1 (k = 31, 56 x 56, NCHW) forward 2.03 ms
against 4.65 for the CUDA-core kernels and 8.07 for PyTorch, i.e. ~18 TFLOP/s of useful
multiply-adds, far under the ceiling estimated below; stage 3 (dense, 14 x 14) 0.23 ms against 0.84
and 0.64; stage 4 0.071 against 0.65 and 0.13. The weight gradient wins in NCHW (stage 1: 6.8 ms
against 11.9 and 32.9) but not in channels_last, hence ``NCHW_ROUTE_MIN_PIXELS``. The estimate the
design started from:

bf16/fp16 tensor cores give ~990 TFLOP/s dense against ~134 TFLOP/s for fp16/bf16 on CUDA cores
(~67 fp32), 7.4x. The banded matrix pays for its zeros: a ``BN``-column output tile multiplies
``(BN + kw - 1) x BN`` entries of which ``BN * kw`` are the band, so it wastes
``((BN + kw - 1) * BN - BN * kw) / (BN * kw) = (BN - 1) / kw`` of the band's work. At k = 31 and a W
tile of 64 that is 94 x 64 = 6016 products per row for a band of 64 x 31 = 1984, i.e. 2.03x wasted
(3.03x the useful multiply-adds); with the K chunks padded to multiples of 32 (96 columns) 3.10x.
So the ceiling is ~990 / 3.1 = ~320 TFLOP/s of useful work, ~2.4x the fp16 CUDA-core peak and ~4.8x
the fp32 one, before memory limits (the band of each ``T_i`` is rebuilt from ``kw`` weights by a
gather per kernel row, and each input row is read once per kernel row, from L2). A narrower tile wastes
less ((BN - 1)/kw: 0.48x at BN = 16) but feeds the tensor cores smaller products.

* **Maps no larger than the kernel** (RepLKNet-31B stage 3: 14 x 14 maps, 27 x 27 kernels, 18 of its
  24 blocks; stage 4: 7 x 7 maps, 13 x 13 kernels): a banded tile would be mostly padding, so each
  channel is one dense product over its ``H*W`` pixels, ``Y[n, :] = X[n, :] @ D`` with
  ``D[p, q] = w[c, ih - oh + ph, iw - ow + pw]`` (a 196 x 196 matrix at 14 x 14; the batch is the M
  dimension). When ``2H - 1 <= kh`` and ``2W - 1 <= kw``, as at both those stages, every entry of ``D``
  is a real tap: no wasted products beyond padding the tiles (at 14 x 14: 196 -> 256 output pixels
  in tiles of 64 and 196 -> 224 input pixels in chunks of 32, 1.5x), against the CUDA cores' 7.4x.
  ``_forward_dense``; the weight gradient ``_weight_grad_dense`` forms ``P = dY^T @ X`` (pixels x
  pixels, reduced over the batch) and adds each entry to its tap with fp32 atomics.
  ``choose_method`` picks this when ``H <= kh`` and ``W <= kw`` (``method="auto"``).

The issue's measured figure for bf16 matrix products on an H200 is ~790 TFLOP/s rather than 990;
scale the ceilings above by 0.8 accordingly. Block sizes are one fixed configuration (64 x 64 x 32,
4 warps); the forward kernels are autotuned on a GPU (``_FORWARD_BANDED_CONFIGS``, not timed yet).

Testing (tests/test_triton_mma.py): the interpreter's ``tl.dot`` returns garbage for bf16 operands
(triton 3.8; numpy has no bf16), so in the interpreter bf16 values are widened exactly to fp32 before
the product (``_fp32_dot``); the interpreter therefore checks the bf16 loads, stores and rounding,
the fp16 cases check the half-precision products, and the sm_90 compile checks that fp16/bf16
products become ``wgmma`` instructions.

Inf and NaN: a product multiplies every entry of ``T_i`` (or ``D``) with every input value of its
chunk, so the band's zeros meet the input's Inf and NaN, and the padding's zeros (loaded as 0.0) the
weights' and the output gradient's: 0 * Inf = 0 * NaN = NaN where the convolution has no term. The
results are a superset of the exact masks (as PyTorch's CPU convolutions are:
tests/test_cpu_nonfinite.py): every NaN and Inf of the sum over in-image terms survives (an Inf may
become NaN), extra NaN only in an (image, channel) plane, or a channel of the weight gradient, that
holds a non-finite operand, finite values right; the dense weight gradient adds only in-image pixel
pairs to its taps, so it is exact. An exact variant would need a second, CUDA-core loop in every
kernel (checked on the CPU interpreter only: tests/test_triton_mma.py).

Layouts: any strides are accepted (NCHW, channels_last, strided views); the output is contiguous or
channels_last as ``lkfast.ops.backends.output_memory_format`` says. channels_last loads are strided
gathers here (no coalescing over channels), slower than NCHW on the H200 (forward 2.3x at 56 x 56,
1.0-1.2x on smaller maps; weight gradient 1.4-3.2x), so channels_last maps of at least
``NCHW_ROUTE_MIN_PIXELS`` pixels are copied to NCHW and the result back.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# interpreted / unavailable_reason are re-exported so a backend can use this module like depthwise.py
from lkfast.kernels.depthwise import interpreted, on_device, unavailable_reason  # noqa: F401
from lkfast.kernels.depthwise import _Launcher


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _forward_banded(x_ptr, w_ptr, b_ptr, y_ptr, N, C, H, W, KH, KW,
                    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                    HAS_BIAS: tl.constexpr, FLIP: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    c = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)   # rows (n, h) of the batch
    w0 = tl.program_id(2) * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)                                 # output columns w0 + offs_n
    offs_k = tl.arange(0, BLOCK_K)
    ph = KH // 2
    pw = KW // 2
    m_ok = offs_m < N * H
    n = offs_m // H
    h = offs_m % H
    row_base = x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc
    w_base = w_ptr + c * KH * KW
    span = BLOCK_N + KW - 1  # input columns the band of BLOCK_N output columns reaches

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, KH):
        ih = h + (i - ph)
        row_ok = m_ok & (ih >= 0) & (ih < H)
        if FLIP:
            w_row = w_base + (KH - 1 - i) * KW
        else:
            w_row = w_base + i * KW
        for k0 in range(0, span, BLOCK_K):
            kk = k0 + offs_k                 # position in the band's input window
            iw = w0 - pw + kk
            a_mask = row_ok[:, None] & ((iw >= 0) & (iw < W))[None, :]
            a = tl.load(row_base[:, None] + ih[:, None] * sxh + iw[None, :] * sxw, mask=a_mask, other=0.0)
            # T_i[k, col] = w[c, i, k - col] inside the band, zero outside
            tap = kk[:, None] - offs_n[None, :]
            band = (tap >= 0) & (tap < KW)
            if FLIP:
                t = tl.load(w_row + (KW - 1 - tap), mask=band, other=0.0)
            else:
                t = tl.load(w_row + tap, mask=band, other=0.0)
            if IEEE:
                acc = tl.dot(a.to(tl.float32), t.to(tl.float32), acc, input_precision="ieee", out_dtype=tl.float32)
            else:
                acc = tl.dot(a, t.to(a.dtype), acc, out_dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(tl.float32)
    offs_w = w0 + offs_n
    out_mask = m_ok[:, None] & (offs_w < W)[None, :]
    y_ptrs = (y_ptr + n.to(tl.int64)[:, None] * syn + c.to(tl.int64) * syc + h[:, None] * syh
              + offs_w[None, :] * syw)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _weight_grad_banded(go_ptr, x_ptr, ws_ptr, N, C, H, W, KH, KW, SPLITS,
                        sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
                        IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_KW: tl.constexpr):
    pid = tl.program_id(0)
    c = pid // KH
    i = pid % KH
    chunks = tl.cdiv(BLOCK_N + KW - 1, BLOCK_K)
    w_tile = tl.program_id(1) // chunks
    k0 = (tl.program_id(1) % chunks) * BLOCK_K
    split = tl.program_id(2)
    ph = KH // 2
    pw = KW // 2
    w0 = w_tile * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = w0 + offs_n                    # output columns
    iw = w0 - pw + k0 + offs_k              # input columns of this K chunk
    col_ok = offs_w < W
    in_ok = (iw >= 0) & (iw < W)

    rows = N * H
    blocks = tl.cdiv(rows, BLOCK_M)
    per_split = tl.cdiv(blocks, SPLITS)
    first = split * per_split
    last = tl.minimum(blocks, first + per_split)

    # P[w, k] = sum over rows of dY[row, w0 + w] * X[row + i - ph, w0 - pw + k0 + k]
    P = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for block in range(first, last):
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < rows
        n = offs_m // H
        h = offs_m % H
        ih = h + (i - ph)
        row_ok = m_ok & (ih >= 0) & (ih < H)
        # dY loaded transposed: (BLOCK_N columns) x (BLOCK_M rows)
        g_t = tl.load(go_ptr + n.to(tl.int64)[None, :] * sgn + c.to(tl.int64) * sgc + h[None, :] * sgh
                      + offs_w[:, None] * sgw, mask=col_ok[:, None] & m_ok[None, :], other=0.0)
        xs = tl.load(x_ptr + n.to(tl.int64)[:, None] * sxn + c.to(tl.int64) * sxc + ih[:, None] * sxh
                     + iw[None, :] * sxw, mask=row_ok[:, None] & in_ok[None, :], other=0.0)
        if IEEE:
            P = tl.dot(g_t.to(tl.float32), xs.to(tl.float32), P, input_precision="ieee", out_dtype=tl.float32)
        else:
            P = tl.dot(g_t, xs, P, out_dtype=tl.float32)

    # dW[c, i, j] gets the diagonal k0 + k - w == j of P (the Hankel structure of the input rows).
    tap = (k0 + offs_k)[None, :] - offs_n[:, None]
    offs_j = tl.arange(0, BLOCK_KW)
    acc = tl.zeros((BLOCK_KW,), dtype=tl.float32)
    for j in range(0, KW):
        partial = tl.sum(tl.sum(tl.where(tap == j, P, 0.0), axis=1), axis=0)
        acc = tl.where(offs_j == j, acc + partial, acc)
    slot = split * tl.num_programs(1) + tl.program_id(1)
    ws = ws_ptr + ((slot * C + c) * KH + i) * KW
    tl.store(ws + offs_j, acc, mask=offs_j < KW)


@triton.jit
def _forward_dense(x_ptr, w_ptr, b_ptr, y_ptr, N, C, H, W, KH, KW,
                   sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                   HAS_BIAS: tl.constexpr, FLIP: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # One channel as one dense product: Y[n, q] = sum_p X[n, p] D[p, q] over the H*W pixels, with
    # D[p, q] = w[c, ih - oh + ph, iw - ow + pw] (zero where the offset leaves the kernel).
    c = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)   # images
    offs_q = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)   # output pixels
    ph = KH // 2
    pw = KW // 2
    pixels = H * W
    m_ok = offs_m < N
    q_ok = offs_q < pixels
    oh = offs_q // W
    ow = offs_q % W
    x_base = x_ptr + offs_m.to(tl.int64)[:, None] * sxn + c.to(tl.int64) * sxc
    w_base = w_ptr + c * KH * KW

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(0, pixels, BLOCK_K):
        offs_p = p0 + tl.arange(0, BLOCK_K)                       # input pixels
        p_ok = offs_p < pixels
        ih = offs_p // W
        iw = offs_p % W
        a = tl.load(x_base + ih[None, :] * sxh + iw[None, :] * sxw, mask=m_ok[:, None] & p_ok[None, :], other=0.0)
        r = ih[:, None] - oh[None, :] + ph
        s = iw[:, None] - ow[None, :] + pw
        tap_ok = (r >= 0) & (r < KH) & (s >= 0) & (s < KW) & p_ok[:, None] & q_ok[None, :]
        if FLIP:
            d = tl.load(w_base + (KH - 1 - r) * KW + (KW - 1 - s), mask=tap_ok, other=0.0)
        else:
            d = tl.load(w_base + r * KW + s, mask=tap_ok, other=0.0)
        if IEEE:
            acc = tl.dot(a.to(tl.float32), d.to(tl.float32), acc, input_precision="ieee", out_dtype=tl.float32)
        else:
            acc = tl.dot(a, d.to(a.dtype), acc, out_dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(tl.float32)
    y_ptrs = (y_ptr + offs_m.to(tl.int64)[:, None] * syn + c.to(tl.int64) * syc + oh[None, :] * syh
              + ow[None, :] * syw)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & q_ok[None, :])


@triton.jit
def _weight_grad_dense(go_ptr, x_ptr, dw_ptr, N, C, H, W, KH, KW,
                       sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
                       IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    # P[q, p] = sum_n dY[n, q] X[n, p] (the batch is the reduction), then every (q, p) adds into its
    # tap dW[ih - oh + ph, iw - ow + pw]: fp32 atomics into dw (C, KH, KW).
    c = tl.program_id(0)
    offs_q = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)   # output pixels
    offs_p = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)   # input pixels
    ph = KH // 2
    pw = KW // 2
    pixels = H * W
    q_ok = offs_q < pixels
    p_ok = offs_p < pixels
    oh = offs_q // W
    ow = offs_q % W
    ih = offs_p // W
    iw = offs_p % W
    r = ih[None, :] - oh[:, None] + ph
    s = iw[None, :] - ow[:, None] + pw
    tap_ok = (r >= 0) & (r < KH) & (s >= 0) & (s < KW) & q_ok[:, None] & p_ok[None, :]
    P = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, N, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N
        g_t = tl.load(go_ptr + offs_m.to(tl.int64)[None, :] * sgn + c.to(tl.int64) * sgc + oh[:, None] * sgh
                      + ow[:, None] * sgw, mask=q_ok[:, None] & m_ok[None, :], other=0.0)
        xs = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * sxn + c.to(tl.int64) * sxc + ih[None, :] * sxh
                     + iw[None, :] * sxw, mask=m_ok[:, None] & p_ok[None, :], other=0.0)
        if IEEE:
            P = tl.dot(g_t.to(tl.float32), xs.to(tl.float32), P, input_precision="ieee", out_dtype=tl.float32)
        else:
            P = tl.dot(g_t, xs, P, out_dtype=tl.float32)
    tl.atomic_add(dw_ptr + c * KH * KW + r * KW + s, P, mask=tap_ok)


# ---------------------------------------------------------------------------------------------
# Block sizes: one configuration on a GPU (not autotuned yet: nothing measured), smaller tiles in
# the interpreter so tiny test shapes still cross tile and K-chunk edges. tl.dot needs every
# dimension >= 16.

def _tiles(m, n, k, warps):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps)


_GPU_TILES = _tiles(64, 64, 32, 4)
_INTERPRETER_TILES = _tiles(16, 16, 16, 4)
_GPU_CONFIG = dict(_GPU_TILES.kwargs, num_warps=_GPU_TILES.num_warps)
_INTERPRETER_CONFIG = dict(_INTERPRETER_TILES.kwargs, num_warps=_INTERPRETER_TILES.num_warps)

# The forward kernels (forward and input gradient) are autotuned on a GPU over these, keyed by the
# sizes (and, as Triton does, the dtypes); the first is _GPU_TILES, the one timed on the H200
# (2026-12-04) and the one LKFAST_TRITON_AUTOTUNE=0 takes. Not timed yet. Why these: at stage 1 (W = 56)
# a 64-column tile leaves 8 columns idle and its band spans 94 -> 96 input columns, 1.7x the products
# per useful output of a 32-column tile (62 -> 64); taller row blocks (BLOCK_M 128) rebuild each band
# chunk T_i half as often (with 8 warps: with 4, ptxas spills 104 bytes per thread at 128 x 64 and
# 128 x 32, as at 128 x 128 with 8 and 64 x 64 x 64 with 4; tests/test_triton_mma.py compiles each
# configuration for sm_90 and fails on a spill). The weight gradients keep _GPU_CONFIG: their
# workspace is sized by it.
_FORWARD_BANDED_CONFIGS = [_GPU_TILES, _tiles(128, 64, 32, 8), _tiles(64, 32, 32, 4), _tiles(128, 32, 32, 8),
                           _tiles(64, 128, 32, 8)]
_FORWARD_DENSE_CONFIGS = [_GPU_TILES, _tiles(64, 128, 32, 4), _tiles(64, 128, 64, 8), _tiles(64, 32, 32, 4)]
AUTOTUNE_KEY = ["N", "C", "H", "W", "KH", "KW"]
# launched as the CUDA-core kernels are (lkfast.kernels.depthwise._Launcher): autotuned on a GPU, the
# first configuration with LKFAST_TRITON_AUTOTUNE=0, the interpreter's small tiles in the interpreter
_forward_banded_launch = _Launcher(_forward_banded, _FORWARD_BANDED_CONFIGS, AUTOTUNE_KEY, _INTERPRETER_TILES)
_forward_dense_launch = _Launcher(_forward_dense, _FORWARD_DENSE_CONFIGS, AUTOTUNE_KEY, _INTERPRETER_TILES)


def _config() -> dict:
    return dict(_INTERPRETER_CONFIG if interpreted() else _GPU_CONFIG)


def _fp32_dot(dtype: torch.dtype) -> bool:
    """Whether the products run in fp32 (``input_precision="ieee"``): for fp32 inputs, and for bf16
    in the interpreter, whose ``tl.dot`` on bf16 operands returns garbage (triton 3.8: numpy has no
    bf16), so there the bf16 values are widened exactly to fp32 first. On a GPU bf16 and fp16 go to
    the tensor cores as they are."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreted())


def _check_shapes(x: torch.Tensor, kh: int, kw: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"'same' padding needs odd kernel sizes, got {kh}x{kw}; pad the kernel to odd sizes")


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# channels_last input through an NCHW copy. The kernels read channels_last with strided gathers (no
# coalescing over channels); on an H200 (fp16, batch 64, 2026-12-04, benchmarks/results/gpu_h200/)
# the forward took 2.3x its NCHW time on 56x56 maps (4.70 against 2.03 ms), 1.19x on 28x28, 1.12x on
# 14x14 and 1.0x on 7x7; the weight gradient 3.2x (21.6 against 6.8 ms), 1.5x, 1.4x and 1.4x. A copy
# to NCHW and back costs about four passes over the map (~0.07 ms at 56x56, batch 64, fp16), so maps
# of at least this many pixels take that route. The route as a whole has not been timed yet: the
# shipped table was measured before it (its channels_last triton_mma rows timed the strided path);
# a new bench_gpu.py run times the backend with it, and its table takes triton_mma only where that
# total wins.
NCHW_ROUTE_MIN_PIXELS = 28 * 28


def through_nchw(*tensors: torch.Tensor) -> bool:
    """Whether a call on these (N, C, H, W) tensors goes through NCHW copies: one of them is
    channels-innermost (what ``output_memory_format`` calls channels_last: channels_last tensors and
    their crops, not NCHW-contiguous ones, as C = 1 or 1x1 maps are) and the map has at least
    ``NCHW_ROUTE_MIN_PIXELS`` pixels."""
    from lkfast.ops.backends import output_memory_format

    return any(t.dim() == 4 and t.shape[-2] * t.shape[-1] >= NCHW_ROUTE_MIN_PIXELS
               and output_memory_format(t) == torch.channels_last for t in tensors)


METHODS = ("auto", "banded", "dense")
DENSE_MAX_PIXELS = 4096  # the dense product rebuilds an (H*W) x (H*W) matrix per channel


def choose_method(H: int, W: int, kh: int, kw: int, method: str = "auto") -> str:
    """"banded" or "dense" for an ``H x W`` map and a ``kh x kw`` kernel. "auto" takes the dense
    per-channel product when the map is no larger than the kernel (and at most ``DENSE_MAX_PIXELS``
    pixels), where a banded tile would be mostly padding; an unknown method is a ValueError."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method != "auto":
        return method
    return "dense" if H <= kh and W <= kw and H * W <= DENSE_MAX_PIXELS else "banded"


# ---------------------------------------------------------------------------------------------
# Python entry points (the contract of kernels/depthwise.py's forward and weight_grad)


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, flip: bool = False,
            *, method: str = "auto") -> torch.Tensor:
    """``F.conv2d(x, weight (rotated 180 degrees if flip), bias, padding=same, groups=C)`` as matrix
    products with fp32 accumulation: banded per kernel row, or one dense product per channel on maps
    no larger than the kernel (``method``: "auto", "banded" or "dense"; see ``choose_method``).
    ``x`` is ``(N, C, H, W)`` in any memory format, ``weight`` ``(C, 1, kh, kw)`` with odd kh, kw; the
    result has x's dtype and is channels_last or contiguous as
    ``lkfast.ops.backends.output_memory_format(x)`` says. Even kernel sizes, non-4-D inputs and unknown
    methods are refused with a ValueError."""
    from lkfast.ops.backends import output_memory_format

    N, C, H, W = x.shape
    KH, KW = weight.shape[-2:]
    _check_shapes(x, KH, KW)
    if through_nchw(x):
        return forward(x.contiguous(), weight, bias, flip, method=method).contiguous(memory_format=torch.channels_last)
    y = torch.empty_like(x, memory_format=output_memory_format(x))
    if y.numel() == 0:
        return y
    w = weight.contiguous()
    b = bias.contiguous() if bias is not None else w  # a dummy pointer when there is no bias
    args = (x, w, b, y, N, C, H, W, KH, KW, *x.stride(), *y.stride())
    flags = dict(HAS_BIAS=bias is not None, FLIP=bool(flip), IEEE=_fp32_dot(x.dtype))
    with on_device(x):
        if choose_method(H, W, KH, KW, method) == "dense":
            _forward_dense_launch[lambda m: (C, triton.cdiv(N, m["BLOCK_M"]), triton.cdiv(H * W, m["BLOCK_N"]))](
                *args, **flags)
        else:
            _forward_banded_launch[lambda m: (C, triton.cdiv(N * H, m["BLOCK_M"]), triton.cdiv(W, m["BLOCK_N"]))](
                *args, **flags)
    return y


def weight_grad(grad_out: torch.Tensor, x: torch.Tensor, kh: int, kw: int, *, method: str = "auto") -> torch.Tensor:
    """dL/dweight ``(C, 1, kh, kw)`` in x's dtype, for the output gradient ``grad_out`` (x's shape,
    any memory format). "banded": per (channel, kernel row) a matrix product of output-gradient
    columns with shifted input rows, reduced over all (n, h) rows, then summed along its diagonals;
    fp32 partial sums per program in a workspace, summed once (deterministic). "dense" (maps no larger
    than the kernel, see ``choose_method``): per channel the (H*W) x (H*W) product of output-gradient
    and input pixels reduced over the batch, each entry added to its tap with fp32 atomics (the
    order of those additions, so the last bits, can vary between runs). Even kernel sizes are
    refused with a ValueError."""
    N, C, H, W = x.shape
    _check_shapes(x, kh, kw)
    if grad_out.shape != x.shape:
        raise ValueError(f"grad_out must have x's shape {tuple(x.shape)}, got {tuple(grad_out.shape)}")
    if x.numel() == 0:
        return x.new_zeros((C, 1, kh, kw))
    if through_nchw(grad_out, x):
        return weight_grad(grad_out.contiguous(), x.contiguous(), kh, kw, method=method)
    cfg = _config()
    if choose_method(H, W, kh, kw, method) == "dense":
        dw = torch.zeros((C, kh, kw), device=x.device, dtype=torch.float32)
        grid = (C, triton.cdiv(H * W, cfg["BLOCK_N"]), triton.cdiv(H * W, cfg["BLOCK_K"]))
        with on_device(x):
            _weight_grad_dense[grid](grad_out, x, dw, N, C, H, W, kh, kw, *grad_out.stride(), *x.stride(),
                                     IEEE=_fp32_dot(x.dtype), **cfg)
        return dw.to(x.dtype).unsqueeze(1)
    chunks = triton.cdiv(cfg["BLOCK_N"] + kw - 1, cfg["BLOCK_K"])
    columns = triton.cdiv(W, cfg["BLOCK_N"]) * chunks
    blocks = triton.cdiv(N * H, cfg["BLOCK_M"])
    # Split the rows for about 4 programs per multiprocessor, but never below one row block each.
    programs = C * kh * columns
    splits = max(1, min(blocks, triton.cdiv(4 * _multiprocessors(x.device), programs)))
    ws = torch.empty((splits * columns, C, kh, kw), device=x.device, dtype=torch.float32)
    grid = (C * kh, columns, splits)
    with on_device(x):
        _weight_grad_banded[grid](grad_out, x, ws, N, C, H, W, kh, kw, splits,
                                  *grad_out.stride(), *x.stride(), IEEE=_fp32_dot(x.dtype),
                                  BLOCK_KW=triton.next_power_of_2(kw), **cfg)
    return ws.sum(0).to(x.dtype).unsqueeze(1)
