"""Triton kernel of lkfast's fused frequency noise: the last pass, ``clamp(x + noise, lo, hi)``.

The band-limited noise itself comes from cuFFT (``torch.fft.rfft2`` / ``irfft2``) with the band
mask applied in place on the half spectrum (see lkfast/ops/frequency.py); this kernel fuses the add,
the clamp and the cast back to x's dtype into one read of x and the noise and one write, on x's device.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lkfast.kernels.depthwise import on_device


@triton.jit
def _add_clamp(x_ptr, noise_ptr, out_ptr, numel, lo, hi, CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + tl.load(noise_ptr + offs, mask=mask, other=0.0)
    if CLAMP:
        v = tl.minimum(tl.maximum(v, lo), hi)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


def add_clamp(x: torch.Tensor, noise: torch.Tensor, lo: float | None, hi: float | None) -> torch.Tensor:
    """``clamp(x + noise, lo, hi)`` in x's dtype, for contiguous x and fp32 contiguous noise of the
    same shape, in one pass. ``lo``/``hi`` None: no clamp."""
    out = torch.empty_like(x)
    numel = x.numel()
    block = 2048
    clamp = lo is not None and hi is not None
    with on_device(x):
        _add_clamp[(triton.cdiv(numel, block),)](x, noise, out, numel, float(lo or 0.0), float(hi or 0.0),
                                                 CLAMP=clamp, BLOCK=block, num_warps=8)
    return out
