"""lkfast.nn.pointwise: 1x1 convolutions computed as matrix products on small channels_last CPU
maps where this machine measured that faster, against F.conv2d in fp64 (forward, input, weight
and bias gradients) both ways; which inputs are candidates, the calibrated choice (fake timings),
the switch that forces either way, and the RepLKNet layers built on it. Then the other side: NHWC
linears as 1x1 convolutions, against F.linear, asking the same calibration."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lkfast.nn.pointwise import (MAX_AREA, PointwiseConv2d, eligible, linear_choice, linear_eligible, pointwise_choice,
                                 pointwise_conv2d, pointwise_linear, takes_matmul)
from lkfast.ops import cpu_dispatch as cd


@pytest.fixture
def calibrating(tmp_path, monkeypatch):
    """Calibration on, into a cache of this test's own (the tests otherwise run with it off)."""
    monkeypatch.setenv("LKFAST_CACHE", str(tmp_path))
    monkeypatch.setenv("LKFAST_CALIBRATE", "1")
    monkeypatch.setattr(cd, "_calibration", None)


def _measure_by_backward(monkeypatch, forward_winner: str, backward_winner: str) -> list:
    """Fake timings for real candidate runs: ``forward_winner`` is faster when the runs computed no
    gradient, ``backward_winner`` when they did. Returns the backward calls of each measurement."""
    backward_calls, measured = [], []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: backward_calls.append(1) or real_grad(*a, **k))

    def fake_measure(runs):
        before = len(backward_calls)
        for run in runs.values():
            run()
        measured.append(len(backward_calls) - before)
        winner = forward_winner if measured[-1] == 0 else backward_winner
        return {name: 1e-3 if name == winner else 2e-3 for name in runs}

    monkeypatch.setattr(cd, "measure", fake_measure)
    return measured


def _grads(fn, x, w, b, g):
    x, w, b = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    y = fn(x, w, b)
    return (y, *torch.autograd.grad(y, (x, w, b), g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 24, 7, 5), (3, 10, 14, 14), (1, 33, 20, 20), (2, 8, 1, 1)])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("mode", ["matmul", "conv"])
def test_matches_conv2d(dtype, shape, layout, mode, monkeypatch):
    monkeypatch.setenv("LKFAST_POINTWISE", mode)
    gen = torch.Generator().manual_seed(0)
    n, c, h, w_ = shape
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape, generator=gen, dtype=dtype).contiguous(memory_format=fmt)
    w = torch.randn(17, c, 1, 1, generator=gen, dtype=dtype)
    b = torch.randn(17, generator=gen, dtype=dtype)
    g = torch.randn(n, 17, h, w_, generator=gen, dtype=dtype).contiguous(memory_format=fmt)
    expected_path = mode == "matmul" and layout == "channels_last" and h * w_ <= MAX_AREA
    assert takes_matmul(x, w) == expected_path or (h * w_ == 1)  # a 1x1 map is both layouts at once
    got = _grads(pointwise_conv2d, x, w, b, g)
    want = _grads(lambda x, w, b: F.conv2d(x, w, b), x.double(), w.double(), b.double(), g.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for name, a, e in zip(("output", "input grad", "weight grad", "bias grad"), got, want):
        assert a.dtype == dtype and a.shape == e.shape, name
        assert ((a.double() - e).abs().max() / e.abs().max()).item() < tol, name
    if h * w_ > 1:  # the output keeps the input's layout
        assert got[0].is_contiguous(memory_format=fmt)


def test_which_inputs_are_candidates_and_the_switch(monkeypatch):
    small = torch.randn(2, 8, 14, 14).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 8, 1, 1)
    assert eligible(small)
    assert not eligible(torch.randn(2, 8, 15, 14).contiguous(memory_format=torch.channels_last))  # > MAX_AREA
    assert not eligible(small.contiguous())  # NCHW: oneDNN's convolution
    assert not eligible(small.to(torch.bfloat16))  # half precision: not measured, convolution
    assert not eligible(small[:0])  # empty: no matrix product of nothing (and no calibration of it)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not eligible(small)
    # the tests run with LKFAST_CALIBRATE=0 (conftest): uncalibrated, auto is PyTorch's convolution
    assert not takes_matmul(small, w) and "no calibration" in pointwise_choice(small, w).source
    monkeypatch.setenv("LKFAST_POINTWISE", "matmul")
    assert takes_matmul(small, w) and pointwise_choice(small, w).source == "LKFAST_POINTWISE=matmul"
    assert not takes_matmul(small.contiguous(), w)  # forcing never takes an input that is not a candidate
    assert not takes_matmul(small, w.double())  # nor mixed dtypes
    monkeypatch.setenv("LKFAST_POINTWISE", "conv")
    assert not takes_matmul(small, w)
    # and with the switch off the call is F.conv2d's own
    calls = []
    monkeypatch.setattr(F, "linear", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError))
    pointwise_conv2d(small, w)
    assert calls == []
    with pytest.raises(ValueError, match="C_out, C_in, 1, 1"):
        pointwise_conv2d(small, torch.randn(4, 8, 3, 3))
    monkeypatch.setenv("LKFAST_POINTWISE", "fast")
    with pytest.raises(ValueError, match="LKFAST_POINTWISE='fast': expected one of auto, matmul, conv"):
        pointwise_conv2d(small, w)


@pytest.mark.parametrize("seconds, expected", [({"matmul": 1e-3, "conv": 2e-3}, "matmul"),
                                               ({"matmul": 3e-3, "conv": 2e-3}, "conv")])
def test_calibration_picks_the_faster_and_caches_it(tmp_path, monkeypatch, seconds, expected):
    monkeypatch.setenv("LKFAST_CACHE", str(tmp_path))
    monkeypatch.setenv("LKFAST_CALIBRATE", "1")
    monkeypatch.setattr(cd, "_calibration", None)
    measured = []

    def fake_measure(runs):
        assert set(runs) == {"matmul", "conv"}
        for run in runs.values():  # the candidates are real calls on tensors of the input's shape
            run()
        measured.append(1)
        return dict(seconds)

    monkeypatch.setattr(cd, "measure", fake_measure)
    x = torch.randn(2, 8, 7, 7).contiguous(memory_format=torch.channels_last)
    w = torch.randn(12, 8, 1, 1)
    choice = pointwise_choice(x, w)
    assert choice.backend == expected and "calibrated on this machine" in choice.source and len(measured) == 1
    linear_calls = []
    real_linear = F.linear
    monkeypatch.setattr(F, "linear", lambda *a, **k: linear_calls.append(1) or real_linear(*a, **k))
    torch.testing.assert_close(pointwise_conv2d(x, w), F.conv2d(x, w), rtol=1e-5, atol=1e-5)
    assert bool(linear_calls) == (expected == "matmul")  # the call follows the choice
    # remembered: the same shape class (sizes rounded up to powers of two) is not measured again,
    # in this process or the next (a fresh Calibration reads the file)
    pointwise_choice(torch.randn(2, 8, 6, 5).contiguous(memory_format=torch.channels_last), w)
    cd._calibration = None
    assert pointwise_choice(x, w).backend == expected and len(measured) == 1
    entries = json.loads(cd.cache_path().read_text())["entries"]
    assert entries["pointwise|float32|2|8|12|8|8"]["backend"] == expected
    # other channel counts are measured on their own
    pointwise_choice(x, torch.randn(16, 8, 1, 1))
    assert len(measured) == 2


def test_module_is_a_conv2d_with_the_same_state_dict():
    torch.manual_seed(0)
    plain = nn.Conv2d(12, 20, 1, bias=True)
    ours = PointwiseConv2d(12, 20, bias=True)
    assert isinstance(ours, nn.Conv2d) and ours.state_dict().keys() == plain.state_dict().keys()
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(2, 12, 7, 7).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours(x), plain(x), rtol=1e-5, atol=1e-5)


def test_replknet_uses_it_and_folding_keeps_it():
    from lkfast.models import create_model, fold_batchnorms

    torch.manual_seed(0)
    model = create_model("replknet_31b", fast=True, num_classes=10, channels=[16, 16, 16, 16], layers=[1, 1, 1, 1],
                         large_kernel_sizes=[7, 7, 7, 7], small_kernel=3).eval()
    plain = create_model("replknet_31b", fast=False, num_classes=10, channels=[16, 16, 16, 16], layers=[1, 1, 1, 1],
                         large_kernel_sizes=[7, 7, 7, 7], small_kernel=3).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-like BNs: folding them gives the convs non-zero biases
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t, scale, shift in ((m.running_mean, 0.2, 0.0), (m.running_var, 0.5, 0.5), (m.weight, 0.5, 0.75),
                                        (m.bias, 0.2, 0.0)):
                    t.copy_(torch.rand(t.shape, generator=gen) * scale + shift if t is not m.running_mean
                            and t is not m.bias else torch.randn(t.shape, generator=gen) * scale)
    plain.load_state_dict(model.state_dict())
    assert any(isinstance(m, PointwiseConv2d) for m in model.modules())
    assert not any(isinstance(m, PointwiseConv2d) for m in plain.modules())
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    model, plain = model.to(memory_format=torch.channels_last), plain.to(memory_format=torch.channels_last)
    want = plain(x)
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)
    fold_batchnorms(model)
    assert any(isinstance(m, PointwiseConv2d) for m in model.modules())
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)


def test_the_choice_is_remembered_per_shape_until_the_calibration_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("LKFAST_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("LKFAST_CALIBRATE", "1")
    monkeypatch.setattr(cd, "_calibration", None)
    asked = []
    monkeypatch.setattr(cd, "choose_pointwise",
                        lambda x, w, grads="": asked.append(tuple(x.shape)) or cd.Choice("matmul", "fake"))
    x = torch.randn(2, 8, 7, 7).contiguous(memory_format=torch.channels_last)
    w = torch.randn(12, 8, 1, 1)
    assert takes_matmul(x, w) and takes_matmul(x, w)
    assert asked == [(2, 8, 7, 7)]  # asked once for this shape
    takes_matmul(torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last), w)
    assert len(asked) == 2  # another exact shape is asked on its own
    takes_matmul(x, torch.randn(16, 8, 1, 1))
    assert len(asked) == 3  # so is another weight shape (the output channels)
    takes_matmul(x.double(), w.double())
    assert len(asked) == 4  # and another dtype
    monkeypatch.setenv("LKFAST_CACHE", str(tmp_path / "b"))  # another calibration: asked again
    assert takes_matmul(x, w) and len(asked) == 5
    monkeypatch.setenv("LKFAST_POINTWISE", "conv")  # a forced choice needs no asking
    assert not takes_matmul(x, w) and len(asked) == 5


def test_unbatched_and_non_cpu_inputs_take_the_convolution(monkeypatch):
    """Only a batched (N, C, H, W) CPU map is a candidate, even when the matrix product is forced:
    an unbatched (C, H, W) input runs as nn.Conv2d runs it, and a tensor on another device (meta
    here, standing in for CUDA on a CPU-only machine) is never taken."""
    monkeypatch.setenv("LKFAST_POINTWISE", "matmul")
    torch.manual_seed(0)
    ours, plain = PointwiseConv2d(8, 4), nn.Conv2d(8, 4, 1)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(8, 5, 5)
    assert not eligible(x)
    torch.testing.assert_close(ours(x), plain(x), rtol=1e-5, atol=1e-5)
    meta = torch.empty(2, 8, 5, 5, device="meta").contiguous(memory_format=torch.channels_last)
    assert not eligible(meta) and not takes_matmul(meta, torch.empty(4, 8, 1, 1, device="meta"))
    assert eligible(torch.empty(2, 8, 5, 5).contiguous(memory_format=torch.channels_last))  # the same map on the CPU is


@pytest.mark.parametrize("stride, padding, groups", [(1, 0, 1), (2, 0, 1), (1, 1, 1), (1, 0, 2)])
def test_only_a_plain_1x1_conv_is_built_as_one(stride, padding, groups):
    """make_conv2d builds a PointwiseConv2d (which computes stride 1, no padding, one group) for a
    plain 1x1 conv only; a strided, padded or grouped 1x1 stays nn.Conv2d with its arguments."""
    from lkfast.nn import make_conv2d
    from lkfast.nn.pointwise import is_pointwise

    plain = stride == 1 and padding == 0 and groups == 1
    assert is_pointwise(1, stride, padding, groups) == plain
    built = make_conv2d(4, 6, 1, stride, padding, 1, groups, bias=True)
    assert isinstance(built, PointwiseConv2d) == plain
    assert built.weight.shape == (6, 4 // groups, 1, 1)
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(built(x), F.conv2d(x, built.weight, built.bias, stride, padding, 1, groups))


# --- nn.Linear on NHWC activations as the 1x1 convolution of the channels_last view --------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 7, 5, 24), (3, 14, 14, 10), (1, 20, 20, 33), (2, 1, 1, 8), (3, 1, 6, 4),
                                   (3, 9, 24), (2, 1, 8), (1, 5, 1), (6, 24), (1, 8)])
@pytest.mark.parametrize("mode", ["matmul", "conv"])
def test_linear_matches_f_linear(dtype, shape, mode, monkeypatch):
    """pointwise_linear against F.linear in fp64 both ways (output, input, weight and bias
    gradients) on NHWC maps of any size (no area limit for the linear), tokens and features, the
    result a contiguous (..., out) tensor as F.linear's, also where a size-1 dimension leaves the
    convolution's output layout ambiguous; the forced path is the one taken."""
    monkeypatch.setenv("LKFAST_POINTWISE", mode)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    w = torch.randn(17, shape[-1], generator=gen, dtype=dtype)
    b = torch.randn(17, generator=gen, dtype=dtype)
    g = torch.randn(*shape[:-1], 17, generator=gen, dtype=dtype)
    assert linear_eligible(x, w) and linear_choice(x, w).backend == mode
    convs = []
    real_conv = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: convs.append(a[1].shape) or real_conv(*a, **k))
    got = _grads(pointwise_linear, x, w, b, g)
    assert convs == ([(17, shape[-1], 1, 1)] if mode == "conv" else [])
    want = _grads(lambda x, w, b: F.linear(x, w, b), x.double(), w.double(), b.double(), g.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for name, a, e in zip(("output", "input grad", "weight grad", "bias grad"), got, want):
        assert a.dtype == dtype and a.shape == e.shape, name
        assert ((a.double() - e).abs().max() / e.abs().max()).item() < tol, name
    assert got[0].is_contiguous()


@pytest.mark.parametrize("mode", ["auto", "conv"])
def test_a_patched_linear_given_no_rows_or_other_features_is_f_linear(mode, monkeypatch, tmp_path):
    """A patched nn.Linear fed zero rows (a detector head with no proposals, an empty last batch)
    crashed in the 1x1 convolution of a 0-pixel map (and, calibrating, in timing it); one fed the
    wrong number of features said conv2d's "expected input[2, 15, 5, 1] to have 16 channels"."""
    from lkfast.nn import PointwiseLinear, patch_model

    monkeypatch.setenv("LKFAST_POINTWISE", mode)
    monkeypatch.setenv("LKFAST_CALIBRATE", "1")
    monkeypatch.setenv("LKFAST_CACHE", str(tmp_path))
    head = nn.Sequential(nn.Linear(16, 12))
    assert patch_model(head) == 1 and isinstance(head[0], PointwiseLinear)
    for shape in ((0, 16), (2, 0, 16), (0, 3, 3, 16)):
        x = torch.randn(shape, requires_grad=True)
        y = head(x)
        assert y.shape == (*shape[:-1], 12)
        y.sum().backward()
        assert x.grad.shape == x.shape and torch.equal(head[0].weight.grad, torch.zeros(12, 16))
        head.zero_grad()
    with pytest.raises(RuntimeError, match=r"mat1 and mat2 shapes cannot be multiplied \(10x15 and 16x12\)"):
        head(torch.randn(2, 5, 15))


def test_which_linear_inputs_are_candidates(monkeypatch):
    """Only a contiguous 2-D, 3-D or 4-D CPU fp32/fp64 input with a weight of its dtype, autocast
    off, takes the convolution, even when it is forced; everything else is F.linear's own call.
    Uncalibrated, ``auto`` is F.linear (the tests run with LKFAST_CALIBRATE=0). The convolution's
    input is a view of the same memory: features (M, C) as one M x 1 map (as M 1x1 maps oneDNN ran
    ViT-B's linears 2x slower than F.linear), tokens (N, L, C) as N L x 1 maps, NHWC as it is."""
    from lkfast.nn.pointwise import _conv_view

    x = torch.randn(2, 5, 6, 8)
    w, b = torch.randn(4, 8), torch.randn(4)
    assert linear_choice(x, w).backend == "matmul" and "no calibration: PyTorch's matrix product" in linear_choice(x, w).source
    monkeypatch.setenv("LKFAST_POINTWISE", "conv")
    assert linear_choice(x, w).source == "LKFAST_POINTWISE=conv"
    for xi, view_shape in ((x, (2, 8, 5, 6)), (x[:, 0].contiguous(), (2, 8, 6, 1)), (x[:, 0, 0].contiguous(), (1, 8, 2, 1))):
        view = _conv_view(xi)
        assert linear_eligible(xi, w) and view.shape == view_shape and view.data_ptr() == xi.data_ptr()
        assert view.is_contiguous(memory_format=torch.channels_last)
    others = {"1-D": (x[0, 0, 0], w), "5-D": (x[None], w), "not contiguous": (x.transpose(1, 2), w),
              "bf16": (x.bfloat16(), w.bfloat16()), "mixed dtypes": (x, w.double()),
              "meta": (x.to("meta"), w.to("meta")), "empty": (x[:0], w), "no tokens": (x[:, 0, :0], w),
              "other features": (x[..., :7].contiguous(), w[:, :7].contiguous().T.contiguous())}
    for name, (xi, wi) in others.items():
        assert not linear_eligible(xi, wi), name
        choice = linear_choice(xi, wi)
        assert choice.backend == "matmul" and "not a candidate" in choice.source, name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear_choice(x, w).backend == "matmul"
    calls = []
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError))
    assert torch.equal(pointwise_linear(x.transpose(1, 2), w, b), F.linear(x.transpose(1, 2), w, b)) and calls == []
    monkeypatch.setenv("LKFAST_POINTWISE", "fast")
    with pytest.raises(ValueError, match="LKFAST_POINTWISE='fast': expected one of auto, matmul, conv"):
        pointwise_linear(x, w)


@pytest.mark.parametrize("seconds, expected", [({"matmul": 1e-3, "conv": 2e-3}, "matmul"),
                                               ({"matmul": 3e-3, "conv": 2e-3}, "conv")])
def test_a_linear_asks_the_convolutions_calibration(calibrating, monkeypatch, seconds, expected):
    """The linear and the 1x1 convolution of its channels_last view are one product: measured once,
    under one cache entry, whichever layer asks first, and the call follows the answer. The area
    limit is the convolution's only (it guards the move to the matrix product): a linear on a larger
    map is measured, the same map asked as a convolution is not a candidate."""
    measured = []
    monkeypatch.setattr(cd, "measure", lambda runs: measured.append(sorted(runs)) or dict(seconds))
    x, w = torch.randn(2, 7, 7, 8), torch.randn(12, 8)
    choice = linear_choice(x, w)
    assert choice.backend == expected and "calibrated on this machine" in choice.source
    assert pointwise_choice(x.permute(0, 3, 1, 2), w[:, :, None, None]).backend == expected
    assert measured == [["conv", "matmul"]]
    assert list(json.loads(cd.cache_path().read_text())["entries"]) == ["pointwise|float32|2|8|12|8|8"]
    convs = []
    real_conv = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: convs.append(1) or real_conv(*a, **k))
    torch.testing.assert_close(pointwise_linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert bool(convs) == (expected == "conv")
    big = torch.randn(2, 16, 16, 8)  # 256 pixels > MAX_AREA
    assert linear_choice(big, w).backend == expected and len(measured) == 2
    assert "not a candidate" in pointwise_choice(big.permute(0, 3, 1, 2), w[:, :, None, None]).source
    # tokens (N, L, C) are asked as N maps of L x 1, features (M, C) as one map of M x 1
    assert linear_choice(torch.randn(2, 7, 8), w).backend == expected
    assert linear_choice(torch.randn(5, 8), w).backend == expected and len(measured) == 4
    entries = json.loads(cd.cache_path().read_text())["entries"]
    assert {"pointwise|float32|2|8|12|8|1", "pointwise|float32|1|8|12|8|1"} <= set(entries)


def test_a_linear_whose_backward_will_run_is_measured_with_it(calibrating, monkeypatch):
    """The forward's measurement does not speak for the backward (capped to AVX2 on the Zen 5,
    oneDNN's 1x1 convolution ran ViT-B's linears faster forward and 0.75-0.79x in a training step):
    a call that will compute the input's gradient, the weight's, or both is measured with that
    backward, under an entry of its own, and follows it; a call under no_grad asks the forward's."""
    measured = _measure_by_backward(monkeypatch, forward_winner="conv", backward_winner="matmul")
    x, w = torch.randn(2, 7, 7, 8), torch.randn(12, 8)
    with torch.no_grad():
        assert linear_choice(x.requires_grad_(), w).backend == "conv"
    for xg, wg, key in ((True, False, "x"), (False, True, "w"), (True, True, "xw")):
        choice = linear_choice(x.detach().requires_grad_(xg), w.detach().requires_grad_(wg))
        assert choice.backend == "matmul", key
    assert measured == [0, 2, 2, 2]  # each backward measured on both candidates
    base = "pointwise|float32|2|8|12|8|8"
    assert set(json.loads(cd.cache_path().read_text())["entries"]) == {base} | {f"{base}|grad-{k}" for k in ("x", "w", "xw")}
    convs = []
    real_conv = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: convs.append(1) or real_conv(*a, **k))
    b, g = torch.randn(12), torch.randn(2, 7, 7, 12)
    got = _grads(pointwise_linear, x, w, b, g)  # a training step: F.linear, as measured
    with torch.no_grad():
        pointwise_linear(x, w, b)  # inference: the convolution
    assert convs == [1] and len(measured) == 4
    want = _grads(lambda x, w, b: F.linear(x, w, b), x.double(), w.double(), b.double(), g.double())
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5)


def test_a_1x1_conv_whose_backward_will_run_is_measured_with_it(calibrating, monkeypatch):
    """PointwiseConv2d's choice follows the same rule as the linear's: under no_grad the forward's
    entry, with a backward to run an entry measured with it (real candidate runs, fake timings:
    the product faster forward only, the convolution faster with a backward)."""
    _measure_by_backward(monkeypatch, forward_winner="matmul", backward_winner="conv")
    x = torch.randn(2, 8, 7, 7).contiguous(memory_format=torch.channels_last)
    w = torch.randn(12, 8, 1, 1)
    with torch.no_grad():
        assert pointwise_choice(x, w).backend == "matmul"
    assert pointwise_choice(x.requires_grad_(), w).backend == "conv"
    assert pointwise_choice(x, w.requires_grad_()).backend == "conv"
    base = "pointwise|float32|2|8|12|8|8"
    assert set(json.loads(cd.cache_path().read_text())["entries"]) == {base, f"{base}|grad-x", f"{base}|grad-xw"}
