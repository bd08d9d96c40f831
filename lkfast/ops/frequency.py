"""Band-limited sign noise for the frequency analysis of Chen et al. (ICML 2024).

    frequency_noise(x, freq, width=0.1*pi, eps=0.1, generator=None, *, clamp=(0., 1.), method="auto")

The noise is ``delta = eps * sign(N(0, 1))`` (one draw per element of x), band-limited to the
Fourier components whose frequency lies in the square annulus ``freq - width/2 <= max(|w_y|, |w_x|)
<= freq + width/2`` (radians per pixel, pi is the Nyquist frequency), added to x and clamped to the
valid range. Three paths compute the same noise from the same random draw:

* ``"reference"``: the plain formulation: full complex ``fft2``, mask, ``ifft2``, real part, add, clamp.
* ``"fused"``: the mask is Hermitian-symmetric, so the half spectrum (``rfft2`` / ``irfft2``) is
  enough; ``eps`` and the inverse transform's ``1/(H*W)`` are folded into a cached real mask applied
  in place, so ``irfft2(norm="forward")`` needs no scaling pass of its own; the add, clamp and cast
  are one Triton pass on CUDA (lkfast.kernels.frequency). About half the memory traffic of the
  reference.
* ``"separable"``: no transform at all. The square annulus is a box minus a smaller box, and a box
  ``max(|w_y|, |w_x|) <= r`` is separable: a projection ``P_y`` on the rows' frequencies times one
  ``P_x`` on the columns'. With ``D = P(r1 <= |w| <= r2)`` the 1-D band (rank ~0.1 n for the default
  width) the noise of signs ``s`` (one H x W image) is

      P_y(<= r2) s P_x(<= r2) - P_y(< r1) s P_x(< r1)  =  P_y(< r1) s D_x + D_y s P_x(<= r2)

  and with ``D = Q Q^T`` (Q: an orthonormal real basis of the band's cos/sin vectors) that is six
  matrix products with inner size H, W or ~0.1 n, the last of which adds x in the same pass
  (``baddbmm``). The products read the signs twice and write the result once, where the FFTs and
  the mask make some eight passes over the image; on this project's CPU it ran 2.5x the
  reference and ~1.5x the fused path at batch 64, 224 px, and level with the fused path on one
  64-px image (benchmarks/results/frequency_bench_cpu*.md). With TF32 or bf16 matrix products
  allowed (``torch.set_float32_matmul_precision("high")`` or ``"medium"``) its products round at
  that precision (~1e-3 of the noise) instead of float32's.

``"auto"`` is ``"separable"`` on the CPU (measured there) and ``"fused"`` on a GPU (the separable
path has not been timed on one yet: benchmarks/bench_frequency.py times all three). Every path
draws ``torch.randn(x.shape, generator=generator)`` on x's device in fp32 first, so a generator
with the same seed gives the same noise on every path, to float32 rounding.
"""
from __future__ import annotations

import functools
import numbers
import math

import torch

METHODS = ("auto", "fused", "separable", "reference")


def band_mask(h: int, w: int, freq: float, width: float = 0.1 * math.pi, *, onesided: bool = False,
              device=None) -> torch.Tensor:
    """Boolean ``(h, w)`` mask (``(h, w // 2 + 1)`` when onesided, the ``rfft2`` layout) of the
    frequencies in the square annulus ``|max(|w_y|, |w_x|) - freq| <= width / 2``, in radians per
    pixel in ``torch.fft`` order."""
    wy = (2 * math.pi * torch.fft.fftfreq(h, device=device, dtype=torch.float64)).abs()
    fx = torch.fft.rfftfreq(w, device=device, dtype=torch.float64) if onesided else torch.fft.fftfreq(w, device=device, dtype=torch.float64)
    wx = (2 * math.pi * fx).abs()
    radius = torch.maximum(wy[:, None], wx[None, :])
    return (radius >= freq - width / 2) & (radius <= freq + width / 2)


@functools.lru_cache(maxsize=32)
def _scaled_half_mask(h, w, freq, width, eps, device) -> torch.Tensor:
    """The onesided band mask times eps / (h * w): with it, rfft2 -> mask -> irfft2(norm="forward")
    is the band-limited eps * signal, the inverse transform's 1/(h*w) already applied."""
    return band_mask(h, w, freq, width, onesided=True, device=device).to(torch.float32) * (eps / (h * w))


def _draw(x: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)


def _clamp_range(clamp):
    if clamp is None:
        return None, None
    lo, hi = clamp
    return float(lo), float(hi)


def _reference(x, freq, width, eps, generator, clamp):
    delta = eps * torch.sign(_draw(x, generator))
    h, w = x.shape[-2:]
    spectrum = torch.fft.fft2(delta) * band_mask(h, w, freq, width, device=x.device)
    noise = torch.fft.ifft2(spectrum).real
    out = x.float() + noise
    lo, hi = _clamp_range(clamp)
    if lo is not None:
        out = out.clamp(lo, hi)
    return out.to(x.dtype)


def _fused(x, freq, width, eps, generator, clamp):
    h, w = x.shape[-2:]
    signs = _draw(x, generator).sign_()
    spectrum = torch.fft.rfft2(signs)
    del signs
    spectrum *= _scaled_half_mask(h, w, float(freq), float(width), float(eps), x.device)
    noise = torch.fft.irfft2(spectrum, s=(h, w), norm="forward")
    del spectrum
    lo, hi = _clamp_range(clamp)
    if x.is_cuda and x.is_contiguous():
        try:
            from lkfast.kernels.frequency import add_clamp
        except ImportError:  # no triton: the same pass in two torch ops
            add_clamp = None
        if add_clamp is not None:
            return add_clamp(x, noise, lo, hi)
    return _clamp_and_cast(noise.add_(x), x.dtype, lo, hi)


def _clamp_and_cast(out, dtype, lo, hi):
    """The fp32 noisy images ``out`` (a new tensor) clamped in place, in ``dtype``."""
    if lo is not None:
        out.clamp_(lo, hi)
    return out.to(dtype) if dtype != torch.float32 else out


def _axis_frequencies(n: int) -> torch.Tensor:
    """|angular frequency| of each DFT bin of an n-point axis, as band_mask computes it."""
    return (2 * math.pi * torch.fft.fftfreq(n, dtype=torch.float64)).abs()


def _real_basis(n: int, keep: torch.Tensor) -> torch.Tensor:
    """An orthonormal real basis (n, k) of the n-point signals whose spectrum lies on the bins
    ``keep`` (a mask symmetric under bin j -> n - j, as any mask of |frequency| is): 1/sqrt(n) for
    bin 0, cos and sin times sqrt(2/n) for each pair j, n - j, cos(pi t)/sqrt(n) for the Nyquist bin
    of an even n. ``Q @ Q.T`` is the projection onto those frequencies; float64."""
    bins = torch.arange(n // 2 + 1)[keep[: n // 2 + 1]]  # one of each pair j, n - j
    # exact phase (t * j mod n), then one rounding
    angle = (2 * math.pi / n) * ((torch.arange(n)[:, None] * bins[None, :]) % n).to(torch.float64)
    paired = (bins > 0) & (2 * bins != n)  # bins 0 and n/2 are their own pair: a cosine only
    cos = torch.cos(angle) * torch.where(paired, math.sqrt(2 / n), math.sqrt(1 / n))
    sin = torch.sin(angle[:, paired]) * math.sqrt(2 / n)
    return torch.cat([cos, sin], dim=1)


@functools.lru_cache(maxsize=32)
def _separable_factors(h, w, freq, width, eps, device):
    """(eps * P_y(< r1), Q_x, eps * Q_y, Q_y^T, P_x(<= r2)) in fp32 on ``device``, r1/r2 the band's
    edges: the noise of signs s is eps*P_y(<r1) @ s @ Q_x @ Q_x^T + eps*Q_y @ Q_y^T @ s @ P_x(<=r2)."""
    low, high = freq - width / 2, freq + width / 2
    wy, wx = _axis_frequencies(h), _axis_frequencies(w)
    below_y = _real_basis(h, wy < low)
    band_y = _real_basis(h, (wy >= low) & (wy <= high))
    band_x = _real_basis(w, (wx >= low) & (wx <= high))
    upto_x = _real_basis(w, wx <= high)
    factors = (eps * (below_y @ below_y.T), band_x, eps * band_y, band_y.T.contiguous(), upto_x @ upto_x.T)
    return tuple(f.to(device=device, dtype=torch.float32) for f in factors)


def _separable(x, freq, width, eps, generator, clamp):
    h, w = x.shape[-2:]
    rows_low, band_x, band_y_eps, band_y_t, cols_high = _separable_factors(
        h, w, float(freq), float(width), float(eps), x.device)
    signs = _draw(x, generator).sign_().reshape(-1, h, w)
    n = signs.shape[0]
    # [eps P_y(<r1) s Q_x | eps Q_y] @ [Q_x^T ; Q_y^T s P_x(<=r2)], plus x, in one product per image
    # (torch.matmul of a matrix by a batch multiplies the batch transposed, copying it: fine for the
    # thin s Q_x, not for the signs, which go through bmm with the factor expanded instead)
    left = torch.cat([torch.matmul(rows_low, signs @ band_x), band_y_eps.expand(n, -1, -1)], dim=-1)
    right = torch.cat([band_x.T.expand(n, -1, -1), torch.bmm(band_y_t.expand(n, -1, -1), signs) @ cols_high], dim=-2)
    del signs
    out = torch.baddbmm(x.reshape(-1, h, w).float(), left, right).reshape(x.shape)
    return _clamp_and_cast(out, x.dtype, *_clamp_range(clamp))


def check_band(freq: float, eps: float, name: str = "frequency_noise") -> None:
    """Refuse a band centre outside [0, pi] radians per pixel (outside it the band holds no frequency
    and the noise would be nothing) and eps < 0, as ValueError saying what ``name`` takes."""
    if not isinstance(freq, numbers.Real) or isinstance(freq, bool) or not -1e-12 <= freq <= math.pi + 1e-12:
        raise ValueError(f"{name}: band centres are radians per pixel in [0, pi] (pi is Nyquist), got {freq!r}")
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"{name}: eps (noise amplitude in [0, 1] pixel units) must be >= 0, got {eps!r}")


def frequency_noise(x: torch.Tensor, freq: float, width: float = 0.1 * math.pi, eps: float = 0.1,
                    generator: torch.Generator | None = None, *, clamp=(0.0, 1.0),
                    method: str = "auto") -> torch.Tensor:
    """``clamp(x + band-limited eps * sign(N(0, 1)), *clamp)``, the noise of the paper's frequency analysis.

    x: ``(..., H, W)`` float tensor on any device (images in [0, 1] for the default clamp).
    freq: band centre in radians per pixel, 0..pi (pi is Nyquist); width: band width (0.1*pi).
    eps: amplitude of the sign noise before band-limiting (>= 0). generator: a torch.Generator on x's
    device, an int seed (a generator on x's device seeded with it) or None (the global one). clamp: (lo, hi) valid range, or None for no clamp.
    method: "auto" ("separable" on the CPU, "fused" on a GPU), "fused", "separable" or "reference"; the
    same generator seed gives the same result on every method (to float32 rounding). Returns a new tensor with x's shape and dtype.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError("frequency_noise: x must be a floating-point tensor of shape (..., H, W), got "
                         + (f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__))
    if method not in METHODS:
        raise ValueError(f"frequency_noise: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    check_band(freq, eps)
    if width <= 0:
        raise ValueError(f"frequency_noise: width must be positive, got {width}")
    from lkfast.corrupt.utils import seeded  # the seed rule shared with the corruptions and attacks

    generator = seeded(generator, x.device, "frequency_noise")
    if isinstance(generator, (list, tuple)):
        raise ValueError("frequency_noise: generator must be one torch.Generator, an int seed or None, not a list")
    if clamp is not None and (len(clamp) != 2 or clamp[0] > clamp[1]):
        raise ValueError(f"frequency_noise: clamp must be (lo, hi) with lo <= hi, or None; got {clamp!r}")
    if method == "auto":
        method = "separable" if x.device.type == "cpu" else "fused"
    if method == "reference":
        return _reference(x, freq, width, eps, generator, clamp)
    if method == "separable":
        return _separable(x, freq, width, eps, generator, clamp)
    return _fused(x, freq, width, eps, generator, clamp)
