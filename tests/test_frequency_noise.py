"""lkfast.ops.frequency_noise: the added noise is band-limited to the square annulus (checked by its
spectrum), the fused path matches the torch.fft reference draw for draw, and seeds reproduce."""
import math

import pytest
import torch

from lkfast.ops.frequency import band_mask, frequency_noise


def _noise(x, out):
    return (out.double() - x.double())


@pytest.mark.parametrize("method", ["reference", "fused"])
@pytest.mark.parametrize("freq", [0.0, 0.3 * math.pi, 0.5 * math.pi, 0.9 * math.pi, math.pi])
@pytest.mark.parametrize("size", [(32, 32), (33, 20)])
def test_noise_spectrum_is_inside_the_band(method, freq, size):
    h, w = size
    x = torch.full((2, 3, h, w), 0.5)  # no clamping: the added noise is exactly the band-limited noise
    g = torch.Generator().manual_seed(0)
    out = frequency_noise(x, freq, eps=0.05, generator=g, clamp=None, method=method)
    spectrum = torch.fft.fft2(_noise(x, out)).abs() ** 2
    inside = band_mask(h, w, freq)
    total = spectrum.sum()
    assert total > 0, "no noise in the band"
    assert spectrum[..., ~inside].sum() / total < 1e-10


def test_fused_matches_reference_same_seed():
    x = torch.rand(4, 3, 40, 36)
    for freq in (0.1, 1.0, 2.5):
        a = frequency_noise(x, freq, generator=torch.Generator().manual_seed(7), method="reference")
        b = frequency_noise(x, freq, generator=torch.Generator().manual_seed(7), method="fused")
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert a.min() >= 0 and a.max() <= 1


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


def test_band_mask_square_annulus():
    m = band_mask(8, 8, math.pi / 2, width=0.1)  # frequencies are multiples of pi/4
    wy = (2 * math.pi * torch.fft.fftfreq(8)).abs()
    expect = torch.maximum(wy[:, None], wy[None, :]).sub(math.pi / 2).abs() <= 0.05
    assert torch.equal(m, expect) and m.sum() == 16  # the ring at |w|_inf = pi/2 on an 8x8 grid
    assert torch.equal(band_mask(8, 7, 1.0, onesided=True), band_mask(8, 7, 1.0)[:, :4])


def test_refuses_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        frequency_noise(torch.rand(1, 4, 4), 1.0, method="fft")
    with pytest.raises(ValueError, match="floating-point"):
        frequency_noise(torch.zeros(4, 4, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match="clamp"):
        frequency_noise(torch.rand(4, 4), 1.0, clamp=(1, 0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible to torch here)")
def test_fused_matches_reference_on_gpu():
    x = torch.rand(8, 3, 224, 224, device="cuda")
    a = frequency_noise(x, 1.0, generator=torch.Generator("cuda").manual_seed(3), method="reference")
    b = frequency_noise(x, 1.0, generator=torch.Generator("cuda").manual_seed(3), method="fused")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
