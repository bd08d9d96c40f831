"""lkfast.ops.frequency_noise against its definition (Chen et al., ICML 2024): noise
delta = eps * sign(N(0, 1)), only its Fourier components with max(|w_y|, |w_x|) in
[freq - width/2, freq + width/2] kept, added to x and clamped. The band is computed here from that
definition (not with the implementation's band_mask), on grids fine enough that the band's width
shows (several frequency rings inside it, none on its edges). The noise is checked twice: its
spectrum lies inside the band and fills it, and, redrawing the documented sign draw
(``torch.randn(x.shape, generator)`` in fp32), it equals eps times the band-passed signs exactly,
which pins the amplitude. The fused and separable paths match the torch.fft reference draw for
draw, on band edges too."""
import math

import pytest
import torch

from lkfast.ops.frequency import band_mask, frequency_noise
from reference import DEVICES, device_or_skip


def ring(n: int) -> torch.Tensor:
    """|angular frequency| of each DFT bin of an n-point signal, in radians per pixel: bin k is
    2*pi*k/n for k <= n/2 and 2*pi*(n-k)/n above (the negative frequencies)."""
    return torch.tensor([2 * math.pi * min(k, n - k) / n for k in range(n)], dtype=torch.float64)


def band_by_definition(h: int, w: int, freq: float, width: float) -> torch.Tensor:
    radius = torch.maximum(ring(h)[:, None], ring(w)[None, :])
    return (radius - freq).abs() <= width / 2


def _noise(x, out):
    return out.double() - x.double()


# (size, freq): grids with 3-4 frequency rings inside the default 0.1*pi band, none within 1e-3 of
# an edge, so a band of twice the width (or half) contains other rings.
BAND_CASES = [((64, 64), 0.5 * math.pi), ((64, 48), 0.35 * math.pi), ((48, 56), 0.85 * math.pi),
              ((64, 64), 0.0), ((56, 64), math.pi)]


def test_band_cases_show_the_width():
    for (h, w), freq in BAND_CASES:
        for n in (h, w):
            edges = ring(n).sub(freq).abs().sub(0.05 * math.pi).abs()
            assert edges.min() > 1e-3, (n, freq)
        full = band_by_definition(h, w, freq, 0.1 * math.pi).sum()
        assert full > 0 and band_by_definition(h, w, freq, 0.2 * math.pi).sum() > full
        assert band_by_definition(h, w, freq, 0.05 * math.pi).sum() < full or freq in (0.0,)


@pytest.mark.parametrize("method", ["reference", "fused", "separable"])
@pytest.mark.parametrize("size, freq", BAND_CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"{v:.2f}")
def test_noise_spectrum_fills_the_band_and_nothing_else(method, size, freq):
    h, w = size
    x = torch.full((2, 3, h, w), 0.5)  # no clamping: the added noise is exactly the band-limited noise
    out = frequency_noise(x, freq, eps=0.05, generator=torch.Generator().manual_seed(0), clamp=None, method=method)
    power = (torch.fft.fft2(_noise(x, out)).abs() ** 2).sum(dim=(0, 1))
    inside = band_by_definition(h, w, freq, 0.1 * math.pi)
    assert power[~inside].sum() / power.sum() < 1e-10, "noise outside the band"
    # every ring of the band carries noise (a band narrower than its definition leaves one empty)
    radius = torch.maximum(ring(h)[:, None], ring(w)[None, :])
    for r in radius[inside].unique():
        assert power[(radius == r) & inside].sum() > 1e-6 * power.sum(), f"ring {r:.3f} rad empty"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["reference", "fused", "separable"])
@pytest.mark.parametrize("eps", [0.02, 0.1])
@pytest.mark.parametrize("size, freq", BAND_CASES[:3], ids=["64x64-0.5pi", "64x48-0.35pi", "48x56-0.85pi"])
def test_noise_is_eps_times_the_band_passed_signs(device, method, eps, size, freq):
    device_or_skip(device)  # on a GPU, "fused" adds with the Triton kernel
    h, w = size
    x = torch.full((2, 3, h, w), 0.5, device=device)
    out = frequency_noise(x, freq, eps=eps, generator=torch.Generator(device).manual_seed(5), clamp=None, method=method)
    draw = torch.randn(x.shape, generator=torch.Generator(device).manual_seed(5), dtype=torch.float32, device=device)
    signs = draw.sign().double().cpu()
    expected = eps * torch.fft.ifft2(torch.fft.fft2(signs) * band_by_definition(h, w, freq, 0.1 * math.pi)).real
    assert expected.abs().max() > 0.1 * eps
    torch.testing.assert_close(_noise(x, out).cpu(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("method", ["fused", "separable"])
def test_every_path_matches_reference_same_seed(method):
    x = torch.rand(4, 3, 40, 36)
    for freq in (0.0, 0.1, 1.0, 2.5, math.pi):
        a = frequency_noise(x, freq, generator=torch.Generator().manual_seed(7), method="reference")
        b = frequency_noise(x, freq, generator=torch.Generator().manual_seed(7), method=method)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert a.min() >= 0 and a.max() <= 1


@pytest.mark.parametrize("method", ["fused", "separable"])
@pytest.mark.parametrize("width", [0.3 * math.pi, 0.5 * math.pi], ids=["0.3pi", "0.5pi-on-ring-edges"])
@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (3, 16, 17), (1, 2, 9, 16), (16, 1), (1, 1)], ids=str)
def test_every_path_matches_reference_on_band_edges_and_odd_sizes(method, width, shape):
    """Around pi/2 with width pi/2 the annulus ends exactly on the rings pi/4 and 3pi/4 of a 16-px
    grid (closed: they belong to it, test_band_mask_counts_on_a_small_grid), odd and one-pixel
    sides, no leading dimensions: each path draws the same signs and keeps the same bins."""
    x = torch.full(shape, 0.5)
    a = frequency_noise(x, math.pi / 2, width=width, eps=0.5, generator=3, clamp=None, method="reference")
    b = frequency_noise(x, math.pi / 2, width=width, eps=0.5, generator=3, clamp=None, method=method)
    torch.testing.assert_close(a, b, rtol=0, atol=2e-6)


def test_auto_is_the_separable_path_on_the_cpu():
    """(The paths round differently, so bit-for-bit equality tells them apart.)"""
    x = torch.rand(2, 3, 24, 20)
    auto = frequency_noise(x, 1.0, generator=2)
    assert torch.equal(auto, frequency_noise(x, 1.0, generator=2, method="separable"))
    assert not torch.equal(auto, frequency_noise(x, 1.0, generator=2, method="fused"))


def test_same_seed_same_noise_other_seed_other_noise():
    x = torch.rand(2, 3, 16, 16)
    freq = math.pi / 2  # a 16-px grid has frequencies at multiples of pi/8; 1.0 +- 0.05 pi has none
    a = frequency_noise(x, freq, generator=torch.Generator().manual_seed(1))
    b = frequency_noise(x, freq, generator=torch.Generator().manual_seed(1))
    c = frequency_noise(x, freq, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dtype_and_clamp_range():
    x = torch.rand(2, 3, 16, 16).to(torch.bfloat16)
    out = frequency_noise(x, 0.5 * math.pi, eps=1.0, clamp=(0.2, 0.8))
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert out.min() >= 0.2 and out.max() <= 0.8


@pytest.mark.parametrize("size, freq", BAND_CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"{v:.2f}")
def test_band_mask_is_the_definition(size, freq):
    h, w = size
    assert torch.equal(band_mask(h, w, freq), band_by_definition(h, w, freq, 0.1 * math.pi))
    assert torch.equal(band_mask(h, w, freq, onesided=True), band_by_definition(h, w, freq, 0.1 * math.pi)[:, : w // 2 + 1])


def test_band_mask_counts_on_a_small_grid():
    # 16x16: rings at multiples of pi/8; width 0.3*pi around pi/2 holds the rings 3pi/8, pi/2, 5pi/8,
    # of 4*(2k) bins each for ring index k (square annuli): 24 + 32 + 40
    assert band_mask(16, 16, math.pi / 2, width=0.3 * math.pi).sum() == 96
    # the annulus is closed: width pi/2 around pi/2 ends exactly on the rings pi/4 and 3pi/4 (exact
    # in floating point), which belong to it: rings 2..6, 16 + 24 + 32 + 40 + 48 bins
    assert band_mask(16, 16, math.pi / 2, width=math.pi / 2).sum() == 160


def test_int_seed_is_a_generator_on_the_images_device():
    """generator=0 raised torch's "randn() received an invalid combination of arguments"."""
    np = pytest.importorskip("numpy")
    x = torch.rand(2, 3, 16, 16)
    expected = frequency_noise(x, math.pi / 2, generator=torch.Generator().manual_seed(4))
    assert torch.equal(frequency_noise(x, math.pi / 2, generator=4), expected)
    torch.testing.assert_close(frequency_noise(x, math.pi / 2, generator=np.int64(4), method="reference"), expected,
                               atol=1e-6, rtol=0)  # the same noise; the two methods round differently
    with pytest.raises(ValueError, match="generator must be a torch.Generator, an int seed"):
        frequency_noise(x, 1.0, generator="4")


@pytest.mark.parametrize("freq", [5.0, -1.0, 2 * math.pi, float("nan")])
def test_a_band_centre_outside_zero_to_pi_is_refused(freq):
    """Outside [0, pi] the band holds no frequency: the call returned x unchanged, no noise at all."""
    with pytest.raises(ValueError, match=r"frequency_noise: band centres are radians per pixel in \[0, pi\]"):
        frequency_noise(torch.rand(1, 3, 16, 16), freq)
    with pytest.raises(ValueError, match=r"frequency_noise: eps .* must be >= 0, got -0.1"):
        frequency_noise(torch.rand(1, 3, 16, 16), 1.0, eps=-0.1)
    for edge in (0.0, math.pi):  # the ends are bands: the DC term, Nyquist
        assert not torch.equal(frequency_noise(torch.full((1, 3, 16, 16), 0.5), edge, generator=0),
                               torch.full((1, 3, 16, 16), 0.5))


def test_refuses_bad_arguments():
    with pytest.raises(ValueError, match="unknown method 'fft'; choose one of auto, fused, separable, reference"):
        frequency_noise(torch.rand(1, 4, 4), 1.0, method="fft")
    with pytest.raises(ValueError, match="width must be positive, got 0"):
        frequency_noise(torch.rand(4, 4), 1.0, width=0)
    with pytest.raises(ValueError, match="floating-point"):
        frequency_noise(torch.zeros(4, 4, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match="clamp"):
        frequency_noise(torch.rand(4, 4), 1.0, clamp=(1, 0))
    for method in ("fused", "separable", "reference"):  # lo == hi is a valid (if degenerate) range
        assert torch.equal(frequency_noise(torch.rand(4, 4), 1.0, clamp=(0.5, 0.5), method=method), torch.full((4, 4), 0.5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible to torch here)")
def test_fused_matches_reference_on_gpu():
    x = torch.rand(8, 3, 224, 224, device="cuda")
    a = frequency_noise(x, 1.0, generator=torch.Generator("cuda").manual_seed(3), method="reference")
    b = frequency_noise(x, 1.0, generator=torch.Generator("cuda").manual_seed(3), method="fused")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
