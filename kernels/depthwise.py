"""Triton kernels of lkfast's depthwise convolution: stride 1, zero "same" padding, odd kernels.

Three kernels, in the style of the Triton tutorials:

* ``_forward_nchw``: one program computes a ``BLOCK_H x BLOCK_W`` output tile of one (image,
  channel). It walks the kernel taps; each tap adds a shifted, masked input tile times one weight.
  Kernel rows and columns that only reach padding from this tile are skipped.
* ``_forward_nhwc``: the same for channels_last inputs, where channels are contiguous: one program
  computes ``BLOCK_W`` pixels of one row for ``BLOCK_C`` channels, so every load is coalesced over C.
* ``_weight_grad``: split-K. Program (c, kernel row i, split s) reduces its share of the
  (image, tile) items into ``BLOCK_KW`` partial sums, one per tap of row i, and stores them once in
  an fp32 workspace ``(S, C, kh, kw)``; a sum over S finishes (no atomics, deterministic).

Passing ``flip=True`` rotates the kernel by 180 degrees: that forward pass is the input gradient.
Block sizes are autotuned on a GPU; under ``TRITON_INTERPRET=1`` (CPU tensors, tests) the first
configuration of each table is used, since there is nothing to time. Launches run on the device of
their tensors (a ``torch.cuda.device`` guard), so a tensor on a second GPU works.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl


def interpreted() -> bool:
    """Whether these kernels run in Triton's interpreter (CPU tensors). Triton decides this when
    the kernels are defined, from TRITON_INTERPRET at the time triton was imported, so this asks
    the kernel object rather than the environment."""
    return not isinstance(_forward_nchw, triton.runtime.JITFunction)


def _autotune() -> bool:
    # LKFAST_TRITON_AUTOTUNE=0 uses the first configuration of each table (tests: fewer compiles).
    return not interpreted() and os.environ.get("LKFAST_TRITON_AUTOTUNE", "1") != "0"


def unavailable_reason() -> str | None:
    """None when the kernels can run here (a CUDA device, or the interpreter); else why not."""
    if interpreted():
        return _interpreter_problem()
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU)"
    return None


@triton.jit
def _interpreter_probe(out_ptr, n):
    # loop bounds computed in the kernel from the program id, as in every kernel below
    acc = 0.0
    for _ in range(tl.maximum(0, n - 2 + tl.program_id(0)), n):
        acc += 1.0
    tl.store(out_ptr, acc)


@functools.lru_cache(maxsize=None)
def _interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run these kernels here, or None. Triton 3.6.0's interpreter
    fails with NumPy 2.5.2 (the GPU machine's pair) on a loop over computed bounds ("only
    0-dimensional arrays can be converted to Python scalars"); 3.6.0 with NumPy 2.3.5 and 3.8.0
    with 2.4.6 ran. One tiny launch on first use tells."""
    import numpy

    out = torch.zeros(1)
    try:
        _interpreter_probe[(1,)](out, 3)
    except Exception as exc:
        return (f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) cannot run these kernels with "
                f"NumPy {numpy.__version__}: {type(exc).__name__}: {exc}; another NumPy or Triton release may")
    if out.item() != 2.0:
        return f"Triton {triton.__version__}'s interpreter miscounted a loop with NumPy {numpy.__version__}"
    return None


def on_device(t: torch.Tensor):
    """A guard that makes ``t``'s GPU the current one for a launch (Triton launches on the current
    device); nothing on the CPU (the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _forward_nchw(x_ptr, w_ptr, b_ptr, y_ptr, C, H, W, KH, KW,
                  sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                  HAS_BIAS: tl.constexpr, FLIP: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    pid_nc = tl.program_id(0)
    n = pid_nc // C
    c = pid_nc % C
    h0 = tl.program_id(1) * BLOCK_H
    w0 = tl.program_id(2) * BLOCK_W
    offs_h = h0 + tl.arange(0, BLOCK_H)
    offs_w = w0 + tl.arange(0, BLOCK_W)
    ph = KH // 2
    pw = KW // 2
    x_base = x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc
    w_base = w_ptr + c * KH * KW

    # Only the kernel rows / columns that reach the image from this tile (skip the padding).
    last_h = tl.minimum(h0 + BLOCK_H, H) - 1
    last_w = tl.minimum(w0 + BLOCK_W, W) - 1
    r_lo = tl.maximum(0, ph - last_h)
    r_hi = tl.minimum(KH, H + ph - h0)
    j_lo = tl.maximum(0, pw - last_w)
    j_hi = tl.minimum(KW, W + pw - w0)

    acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    for r in range(r_lo, r_hi):
        ih = offs_h + (r - ph)
        row_ok = (ih >= 0) & (ih < H)
        for j in range(j_lo, j_hi):
            iw = offs_w + (j - pw)
            mask = row_ok[:, None] & ((iw >= 0) & (iw < W))[None, :]
            xv = tl.load(x_base + ih[:, None] * sxh + iw[None, :] * sxw, mask=mask, other=0.0)
            if FLIP:
                wv = tl.load(w_base + (KH - 1 - r) * KW + (KW - 1 - j))
            else:
                wv = tl.load(w_base + r * KW + j)
            acc += xv.to(tl.float32) * wv.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(tl.float32)
    out_mask = (offs_h < H)[:, None] & (offs_w < W)[None, :]
    y_ptrs = y_ptr + n.to(tl.int64) * syn + c.to(tl.int64) * syc + offs_h[:, None] * syh + offs_w[None, :] * syw
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _forward_nhwc(x_ptr, w_ptr, b_ptr, y_ptr, C, H, W, KH, KW,
                  sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                  HAS_BIAS: tl.constexpr, FLIP: tl.constexpr,
                  BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_nh = tl.program_id(0)
    n = pid_nh // H
    h = pid_nh % H
    w0 = tl.program_id(1) * BLOCK_W
    offs_w = w0 + tl.arange(0, BLOCK_W)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    ph = KH // 2
    pw = KW // 2
    x_base = x_ptr + n.to(tl.int64) * sxn + offs_c[None, :] * sxc
    w_base = w_ptr + offs_c * (KH * KW)

    r_lo = tl.maximum(0, ph - h)
    r_hi = tl.minimum(KH, H + ph - h)
    j_lo = tl.maximum(0, pw - (tl.minimum(w0 + BLOCK_W, W) - 1))
    j_hi = tl.minimum(KW, W + pw - w0)

    acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    for r in range(r_lo, r_hi):
        ih = h + r - ph
        for j in range(j_lo, j_hi):
            iw = offs_w + (j - pw)
            mask = ((iw >= 0) & (iw < W))[:, None] & c_ok[None, :]
            xv = tl.load(x_base + ih * sxh + iw[:, None] * sxw, mask=mask, other=0.0)
            if FLIP:
                wv = tl.load(w_base + (KH - 1 - r) * KW + (KW - 1 - j), mask=c_ok, other=0.0)
            else:
                wv = tl.load(w_base + r * KW + j, mask=c_ok, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = (offs_w < W)[:, None] & c_ok[None, :]
    y_ptrs = y_ptr + n.to(tl.int64) * syn + h * syh + offs_w[:, None] * syw + offs_c[None, :] * syc
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _weight_grad(go_ptr, x_ptr, ws_ptr, N, C, H, W, KH, KW, SPLITS,
                 sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
                 BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_KW: tl.constexpr):
    pid = tl.program_id(0)
    c = pid // KH
    i = pid % KH
    split = tl.program_id(1)
    ph = KH // 2
    pw = KW // 2
    tiles_h = tl.cdiv(H, BLOCK_H)
    tiles_w = tl.cdiv(W, BLOCK_W)
    tiles = tiles_h * tiles_w
    items = N * tiles
    per_split = tl.cdiv(items, SPLITS)
    first = split * per_split
    last = tl.minimum(items, first + per_split)
    offs_j = tl.arange(0, BLOCK_KW)

    acc = tl.zeros((BLOCK_KW,), dtype=tl.float32)
    for item in range(first, last):
        n = item // tiles
        tile = item % tiles
        offs_h = (tile // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_w = (tile % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)
        out_mask = (offs_h < H)[:, None] & (offs_w < W)[None, :]
        go = tl.load(go_ptr + n.to(tl.int64) * sgn + c.to(tl.int64) * sgc
                     + offs_h[:, None] * sgh + offs_w[None, :] * sgw, mask=out_mask, other=0.0).to(tl.float32)
        ih = offs_h + (i - ph)
        row_ok = (ih >= 0) & (ih < H)
        x_base = x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc
        for j in range(0, KW):
            iw = offs_w + (j - pw)
            mask = row_ok[:, None] & ((iw >= 0) & (iw < W))[None, :]
            xv = tl.load(x_base + ih[:, None] * sxh + iw[None, :] * sxw, mask=mask, other=0.0).to(tl.float32)
            partial = tl.sum(tl.sum(go * xv, axis=1), axis=0)
            acc = tl.where(offs_j == j, acc + partial, acc)
    ws = ws_ptr + ((split * C + c) * KH + i) * KW
    tl.store(ws + offs_j, acc, mask=offs_j < KW)


# ---------------------------------------------------------------------------------------------
# Autotuning tables (the first entry is also the interpreter's configuration)

_NCHW_CONFIGS = [
    triton.Config({"BLOCK_H": 8, "BLOCK_W": 16}, num_warps=4),
    triton.Config({"BLOCK_H": 16, "BLOCK_W": 32}, num_warps=4),
    triton.Config({"BLOCK_H": 16, "BLOCK_W": 64}, num_warps=8),
    triton.Config({"BLOCK_H": 32, "BLOCK_W": 32}, num_warps=8),
]
_NHWC_CONFIGS = [
    triton.Config({"BLOCK_W": 8, "BLOCK_C": 16}, num_warps=4),
    triton.Config({"BLOCK_W": 8, "BLOCK_C": 64}, num_warps=4),
    triton.Config({"BLOCK_W": 16, "BLOCK_C": 64}, num_warps=4),
    triton.Config({"BLOCK_W": 16, "BLOCK_C": 128}, num_warps=8),
]
_WGRAD_CONFIGS = [
    triton.Config({"BLOCK_H": 8, "BLOCK_W": 8}, num_warps=2),
    triton.Config({"BLOCK_H": 16, "BLOCK_W": 16}, num_warps=4),
    triton.Config({"BLOCK_H": 16, "BLOCK_W": 32}, num_warps=4),
    triton.Config({"BLOCK_H": 32, "BLOCK_W": 32}, num_warps=8),
]


class _Launcher:
    """``launcher[grid](*args)``: autotuned over ``configs`` on a GPU, the first config in the
    interpreter (``interpreter_config`` there when given) or with LKFAST_TRITON_AUTOTUNE=0 (read at
    each launch). ``grid`` is a function of the chosen block sizes, as in the tutorials."""

    def __init__(self, kernel, configs, key, interpreter_config=None):
        self.kernel = kernel
        self.configs = configs
        self.key = key
        self.interpreter_config = interpreter_config
        self._tuned = None

    def __getitem__(self, grid):
        if _autotune():
            if self._tuned is None:
                self._tuned = triton.autotune(configs=self.configs, key=self.key)(self.kernel)
            return self._tuned[grid]
        first = self.interpreter_config if self.interpreter_config is not None and interpreted() else self.configs[0]
        meta = dict(first.kwargs)
        return lambda *args, **kwargs: self.kernel[grid(meta)](*args, **kwargs, **meta, num_warps=first.num_warps)


_forward_nchw_launch = _Launcher(_forward_nchw, _NCHW_CONFIGS, key=["H", "W", "KH", "KW"])
_forward_nhwc_launch = _Launcher(_forward_nhwc, _NHWC_CONFIGS, key=["C", "H", "W", "KH", "KW"])
_weight_grad_launch = _Launcher(_weight_grad, _WGRAD_CONFIGS, key=["H", "W", "KH", "KW"])


# ---------------------------------------------------------------------------------------------
# Python entry points (the contract of lkfast.ops.backends.TritonBackend)


def _is_channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.stride(1) == 1 and x.shape[1] > 1


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, flip: bool = False) -> torch.Tensor:
    """``F.conv2d(x, weight (rotated 180 degrees if flip), bias, padding=same, groups=C)``; the
    output is channels_last when x is, contiguous otherwise. fp32 accumulation."""
    N, C, H, W = x.shape
    KH, KW = weight.shape[-2:]
    channels_last = _is_channels_last(x)
    y = torch.empty_like(x, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if y.numel() == 0:
        return y
    w = weight.contiguous()
    b = bias.contiguous() if bias is not None else w  # a dummy pointer when there is no bias
    args = (x, w, b, y, C, H, W, KH, KW, *x.stride(), *y.stride())
    flags = dict(HAS_BIAS=bias is not None, FLIP=bool(flip))
    with on_device(x):
        if channels_last:
            grid = lambda meta: (N * H, triton.cdiv(W, meta["BLOCK_W"]), triton.cdiv(C, meta["BLOCK_C"]))
            _forward_nhwc_launch[grid](*args, **flags)
        else:
            grid = lambda meta: (N * C, triton.cdiv(H, meta["BLOCK_H"]), triton.cdiv(W, meta["BLOCK_W"]))
            _forward_nchw_launch[grid](*args, **flags)
    return y


def weight_grad(grad_out: torch.Tensor, x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """dL/dweight ``(C, 1, kh, kw)`` in x's dtype; fp32 partial sums per split, summed once."""
    N, C, H, W = x.shape
    if x.numel() == 0:
        return x.new_zeros((C, 1, kh, kw))
    # Enough splits of the (image, tile) items for about 4 programs per multiprocessor.
    programs = C * kh
    splits = max(1, min(N * 4, triton.cdiv(4 * _multiprocessors(x.device), programs)))
    ws = torch.empty((splits, C, kh, kw), device=x.device, dtype=torch.float32)
    grid = lambda meta: (C * kh, splits)
    with on_device(x):
        _weight_grad_launch[grid](grad_out, x, ws, N, C, H, W, kh, kw, splits,
                                  *grad_out.stride(), *x.stride(), BLOCK_KW=triton.next_power_of_2(kw))
    return ws.sum(0).to(x.dtype).unsqueeze(1)
