"""lkfast.nn: DepthwiseConv2d, ReparamLargeKernelConv and patch_model against plain PyTorch."""
import re
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lkfast.nn import (DepthwiseConv2d, PointwiseLinear, ReparamLargeKernelConv, is_eligible, is_linear_eligible,
                       make_conv2d, patch_model, unpatch_model)


def _randomize_bn(module: nn.Module) -> None:
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.5, 0.5)


def _close(a, b, rtol=1e-4, atol=1e-5):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kernel_size", [7, (9, 5)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_depthwise_conv2d_matches_conv2d(kernel_size, channels_last):
    conv = nn.Conv2d(6, 6, kernel_size, padding=tuple(k // 2 for k in nn.modules.utils._pair(kernel_size)), groups=6)
    fast = DepthwiseConv2d(6, kernel_size)
    fast.load_state_dict(conv.state_dict())  # same keys and shapes as nn.Conv2d
    x = torch.randn(2, 6, 11, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = conv(x1), fast(x2)
    _close(y2, y1)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    _close(x2.grad, x1.grad)
    _close(fast.weight.grad, conv.weight.grad, rtol=1e-4, atol=1e-4)
    _close(fast.bias.grad, conv.bias.grad, rtol=1e-4, atol=1e-4)
    assert isinstance(fast, nn.Conv2d) and fast.groups == 6 and fast.padding == tuple(k // 2 for k in fast.kernel_size)


def test_depthwise_conv2d_takes_an_unbatched_input_as_conv2d_does():
    conv = nn.Conv2d(4, 4, 7, padding=3, groups=4)
    fast = DepthwiseConv2d.from_conv(conv)
    x = torch.randn(4, 9, 11)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = fast(x1), conv(x2)
    assert y1.shape == (4, 9, 11)
    _close(y1, y2)
    (g1,) = torch.autograd.grad(y1.square().sum(), x1)
    (g2,) = torch.autograd.grad(y2.square().sum(), x2)
    _close(g1, g2)
    with pytest.raises(ValueError, match=r"3-D \(C, H, W\) or 4-D .* got a 5-D"):
        fast(torch.randn(1, 1, 4, 9, 11))


def test_depthwise_conv2d_with_a_bias_of_another_shape_fails_as_conv2d_does():
    """A bias of another shape than (C,) (one assigned by hand, an unsafe parametrization's) goes
    to PyTorch's convolution, which refuses it with its own error, as the plain nn.Conv2d does."""
    conv = DepthwiseConv2d(4, 7)
    conv.bias = nn.Parameter(torch.zeros(1))
    with pytest.raises(RuntimeError, match="expected bias to be 1-dimensional with 4 elements"):
        conv(torch.randn(1, 4, 9, 9))


@pytest.mark.parametrize("attribute, value", [("padding", (0, 0)), ("padding", 1), ("padding", "valid"),
                                              ("stride", (2, 2)), ("dilation", (2, 2)), ("padding_mode", "reflect"),
                                              ("padding_mode", "circular")])
def test_a_geometry_set_after_construction_is_computed_as_conv2d_computes_it(attribute, value):
    """A padding, stride, dilation or padding mode assigned to the module after it was built (on a
    DepthwiseConv2d or a conv patch_model turned into one) is what nn.Conv2d's forward computes; the
    fast op computed the "same" stride-1 zero-padded conv regardless, silently."""
    fast = DepthwiseConv2d(4, 5)
    plain = nn.Conv2d(4, 4, 5, padding=2, groups=4)
    plain.load_state_dict(fast.state_dict())
    setattr(fast, attribute, value)
    setattr(plain, attribute, value)
    x = torch.randn(2, 4, 11, 13)
    expected = plain(x)
    assert fast(x).shape == expected.shape
    _close(fast(x), expected)


@pytest.mark.parametrize("kwargs, says", [(dict(stride=2, padding=3), "stride=(2, 2)"),
                                          (dict(padding=0), "padding=(0, 0)"),
                                          (dict(dilation=2, padding=6), "dilation=(2, 2)"),
                                          (dict(padding=3, padding_mode="reflect"), "padding_mode='reflect'"),
                                          (dict(padding=3, groups=2), "groups=2")])
def test_from_conv_refuses_a_conv_the_fast_op_would_compute_otherwise(kwargs, says):
    """A strided, unpadded, dilated, reflect-padded or grouped conv became a DepthwiseConv2d that
    computed a stride-1 zero-padded depthwise conv: other shapes or other values, silently."""
    conv = nn.Conv2d(6, 6, 7, **kwargs)
    with pytest.raises(ValueError, match=re.escape(says) + ".*keep it an nn.Conv2d"):
        DepthwiseConv2d.from_conv(conv)
    x = torch.randn(1, 6, 16, 16)  # what it still converts computes what the conv computes
    conv = nn.Conv2d(6, 6, (7, 3), padding="same", groups=6)
    _close(DepthwiseConv2d.from_conv(conv)(x), conv(x))


def test_from_conv_keeps_the_convs_mode_and_shares_its_parameters():
    conv = nn.Conv2d(4, 4, 7, padding=3, groups=4, bias=False).eval()
    fast = DepthwiseConv2d.from_conv(conv)
    assert not fast.training and fast.weight is conv.weight and fast.bias is None
    assert DepthwiseConv2d.from_conv(conv.train()).training
    import torch.nn.utils.prune as prune

    pruned = nn.Conv2d(4, 4, 7, padding=3, groups=4)
    prune.l1_unstructured(pruned, "bias", amount=0.5)  # the bias computed by a hook, the weight its own
    with pytest.raises(ValueError, match="the conv's bias is not a parameter of its own"):
        DepthwiseConv2d.from_conv(pruned)


def test_depthwise_conv2d_refuses_even_kernel():
    with pytest.raises(ValueError, match="odd"):
        DepthwiseConv2d(4, 4)


def test_depthwise_conv2d_under_cpu_autocast():
    fast = DepthwiseConv2d(4, 5)
    x = torch.randn(1, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fast(x)
    assert y.dtype == torch.bfloat16
    _close(y.float(), F.conv2d(x, fast.weight, fast.bias, padding=2, groups=4), rtol=3e-2, atol=3e-2)
    # float64 is left alone, as autocast leaves it for nn.Conv2d: exact, not rounded to bfloat16
    double = DepthwiseConv2d(4, 5).double()
    xd = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yd = double(xd)
    assert yd.dtype == torch.float64
    torch.testing.assert_close(yd, F.conv2d(xd, double.weight, double.bias, padding=2, groups=4), rtol=1e-12,
                               atol=1e-12)


def test_a_patched_model_runs_on_the_meta_device():
    """Shape inference on meta tensors (a model built under torch.device("meta")) works through the
    fast layers, as through nn.Conv2d (the autocast check asked about a device type it has not)."""
    with torch.device("meta"):
        model = _tiny_convnext()
    reference = _tiny_convnext().eval()
    assert patch_model(model) == 4 + 9  # 4 depthwise convs; 2 MLP linears per block and the head
    out = model(torch.randn(2, 3, 64, 64, device="meta"))
    assert out.device.type == "meta" and out.shape == reference(torch.randn(2, 3, 64, 64)).shape


def _tiny_convnext():
    timm = pytest.importorskip("timm")
    # ls_init_value=1: timm's default layer scale (1e-6) would hide the blocks, and any error in them
    return timm.models.convnext.ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), kernel_sizes=13, num_classes=10,
                                         drop_path_rate=0.0, ls_init_value=1.0)


def test_patch_model_timm_convnext_forward_and_input_grad():
    model = _tiny_convnext().eval()
    reference = _tiny_convnext().eval()
    reference.load_state_dict(model.state_dict())
    weight_before = model.stages[0].blocks[0].conv_dw.weight
    assert patch_model(model) == 4 + 9  # per block a depthwise 13x13 and two MLP linears; the head
    conv_dw = model.stages[0].blocks[0].conv_dw
    assert isinstance(conv_dw, DepthwiseConv2d) and conv_dw.weight is weight_before  # same tensors kept
    assert type(model.stages[0].blocks[0].mlp.fc1) is PointwiseLinear and type(model.head.fc) is PointwiseLinear
    assert patch_model(model) == 0  # already patched
    x = torch.randn(2, 3, 64, 64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = reference(x1), model(x2)
    _close(y2, y1)
    (g1,) = torch.autograd.grad(y1.square().sum(), x1)
    (g2,) = torch.autograd.grad(y2.square().sum(), x2)
    _close(g2, g1, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("linears", ["auto", "conv"])
def test_patch_model_training_step_weight_grads(linears, monkeypatch):
    """Every parameter's gradient as the plain model's. With LKFAST_POINTWISE=conv the patched MLP
    linears (contiguous NHWC inputs) and the head (2-D features) run as 1x1 convolutions;
    uncalibrated (the tests' default) ``auto`` leaves them all F.linear."""
    import collections

    import lkfast.nn.pointwise as pointwise

    monkeypatch.setenv("LKFAST_POINTWISE", linears)
    taken = collections.Counter()
    real = pointwise.linear_choice
    monkeypatch.setattr(pointwise, "linear_choice",
                        lambda x, w: (choice := real(x, w), taken.update([choice.backend]))[0])
    model = _tiny_convnext().train()
    reference = _tiny_convnext().train()
    reference.load_state_dict(model.state_dict())
    patch_model(model)
    x = torch.randn(2, 3, 32, 32)
    model(x).square().sum().backward()
    reference(x).square().sum().backward()
    assert taken == ({"conv": 9} if linears == "conv" else {"matmul": 9})
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        _close(p.grad, q.grad, rtol=1e-3, atol=1e-4)


def _linears():
    torch.manual_seed(0)
    return nn.ModuleDict(dict(fc=nn.Linear(8, 12), wn=nn.utils.parametrizations.weight_norm(nn.Linear(12, 8)),
                              attn=nn.MultiheadAttention(8, 2, batch_first=True)))


def _run_linears(model):
    x = torch.randn(2, 5, 6, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = model["wn"](F.gelu(model["fc"](x)))
    tokens = y.flatten(1, 2)
    attended, _ = model["attn"](tokens, tokens, tokens)
    (y.square().sum() + attended.square().sum()).backward()
    return y, x.grad


def test_patch_model_swaps_linears_and_unpatch_model_restores_them(monkeypatch):
    """A plain nn.Linear becomes a PointwiseLinear and a parametrized one (weight_norm) a subclass
    keeping its parametrization (same state_dict keys); a subclass of nn.Linear
    (nn.MultiheadAttention's out_proj, whose weight the attention reads itself) stays as it is, and
    ``linear=False`` leaves every linear alone. With the 1x1 convolution forced, the NHWC linears
    take it and outputs and gradients are the plain model's. unpatch_model gives back nn.Linear
    and a parametrized nn.Linear, eligible again."""
    import collections

    import lkfast.nn.pointwise as pointwise

    P = nn.utils.parametrize
    model, reference = _linears(), _linears()
    keys = list(reference.state_dict())
    assert [is_linear_eligible(m) for m in (model.fc, model.wn, model.attn.out_proj)] == [True, True, False]
    assert patch_model(model, linear=False) == 0 and type(model.fc) is nn.Linear
    assert patch_model(model) == 2 and patch_model(model) == 0
    assert type(model.fc) is PointwiseLinear and type(model.wn).__bases__ == (PointwiseLinear,)
    assert type(model.wn).__name__ == "ParametrizedPointwiseLinear" and P.is_parametrized(model.wn, "weight")
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert list(model.state_dict()) == keys

    monkeypatch.setenv("LKFAST_POINTWISE", "conv")
    taken = collections.Counter()
    real = pointwise.linear_choice
    monkeypatch.setattr(pointwise, "linear_choice",
                        lambda x, w: (choice := real(x, w), taken.update([choice.backend]))[0])
    (y, gx), (y_ref, gx_ref) = _run_linears(model), _run_linears(reference)
    assert taken == {"conv": 2}  # fc and wn; the attention's projections are not PointwiseLinear
    _close(y, y_ref)
    _close(gx, gx_ref)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        _close(p.grad, q.grad, rtol=1e-4, atol=1e-5)

    assert unpatch_model(model) == 2 and unpatch_model(model) == 0
    assert type(model.fc) is nn.Linear and type(model.wn).__bases__ == (nn.Linear,)
    assert type(model.wn).__name__ == "ParametrizedLinear" and P.is_parametrized(model.wn, "weight")
    assert is_linear_eligible(model.wn) and list(model.state_dict()) == keys
    P.remove_parametrizations(model.wn, "weight")
    assert type(model.wn) is nn.Linear


@pytest.mark.parametrize("padding", [3, (3, 3), "same"])
def test_patch_model_padding_forms(padding, monkeypatch):
    """Each form of k // 2 is swapped and then computed by the fast op ("same" was swapped and counted,
    and every call went to nn.Conv2d's own forward)."""
    import lkfast.nn.depthwise as depthwise

    model = nn.Sequential(nn.Conv2d(4, 4, 7, padding=padding, groups=4))
    x = torch.randn(1, 4, 10, 12)
    y = model(x)
    assert patch_model(model) == 1
    calls, op = [], depthwise.depthwise_conv2d
    monkeypatch.setattr(depthwise, "depthwise_conv2d", lambda *a, **k: calls.append(1) or op(*a, **k))
    _close(model(x), y)
    assert calls == [1]


def test_a_depthwise_module_given_other_channels_blames_the_input():
    """The op's channel-mismatch message asks for another weight; the module's user has the input wrong."""
    for fast, x in ((DepthwiseConv2d(8, 5), torch.randn(1, 4, 8, 8)), (DepthwiseConv2d(8, 5), torch.randn(4, 8, 8))):
        with pytest.raises(RuntimeError, match=r"DepthwiseConv2d\(8 channels\): expected input\[(1, )?4, 8, 8\] to "
                                               r"have 8 channels, but got 4 channels instead"):
            fast(x)


def test_patch_model_keeps_device_dtype_and_skips_ineligible():
    timm = pytest.importorskip("timm")
    model = nn.Sequential(
        nn.Conv2d(4, 4, 7, padding=3, groups=4).double(),        # eligible, float64
        nn.Conv2d(4, 4, 3, padding=1, groups=4),                 # 3x3: below the default threshold
        nn.Conv2d(4, 4, 7, stride=2, padding=3, groups=4),       # strided
        nn.Conv2d(4, 4, 7, padding=6, dilation=2, groups=4),     # dilated
        nn.Conv2d(4, 8, 7, padding=3, groups=4),                 # not depthwise
        nn.Conv2d(4, 4, 7, padding=2, groups=4),                 # not "same"
        nn.Conv2d(4, 4, 7, padding=3, groups=4, padding_mode="reflect"),
        timm.layers.Conv2dSame(4, 4, 7, groups=4),               # subclass with its own padding
    )
    assert [is_eligible(m) for m in model] == [True] + [False] * 7
    assert patch_model(model) == 1
    assert isinstance(model[0], DepthwiseConv2d) and model[0].weight.dtype == torch.float64
    assert all(type(m) is not DepthwiseConv2d for m in list(model)[1:])
    assert is_eligible(nn.Conv2d(4, 4, 3, padding=1, groups=4), min_kernel_size=3)


def test_patch_model_keeps_hooks_identity_and_shared_convs():
    """patch_model changes the conv's class in place: hooks registered before still fire (and their
    handles still remove them), and a conv used at two places is patched at both."""
    shared = nn.Conv2d(4, 4, 7, padding=3, groups=4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    x = torch.randn(1, 4, 10, 10)
    expected = model(x)
    seen = []
    shared.register_forward_pre_hook(lambda module, args: seen.append(("pre", type(module).__name__)))
    handle = shared.register_forward_hook(lambda module, args, out: seen.append(("post", out.shape)))
    assert patch_model(model) == 1
    assert model[0] is model[2] is shared and type(shared) is DepthwiseConv2d
    _close(model(x), expected)
    assert seen == [("pre", "DepthwiseConv2d"), ("post", x.shape)] * 2
    handle.remove()
    model(x)
    assert seen[-1] == ("pre", "DepthwiseConv2d") and len(seen) == 6


@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm", "prune"])
def test_patch_model_handles_weights_computed_by_hooks(wrap):
    """weight_norm, spectral_norm and pruning replace ``weight`` by a tensor their pre-forward hook
    computes: the patched conv keeps the hook, computes what the plain conv did, and passes
    gradients to the underlying parameters (it used to crash half-way through patching)."""
    import warnings

    import torch.nn.utils.prune as prune

    def build():
        torch.manual_seed(0)  # the same weights (and spectral_norm's random start vector) each time
        conv = nn.Conv2d(4, 4, 7, padding=3, groups=4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the old-style weight_norm is deprecated
            if wrap == "weight_norm":
                conv = nn.utils.weight_norm(conv)
            elif wrap == "spectral_norm":
                conv = nn.utils.spectral_norm(conv)
            else:
                prune.l1_unstructured(conv, "weight", amount=0.5)
        return nn.Sequential(conv, nn.Conv2d(4, 4, 7, padding=3, groups=4)).eval()

    model, reference = build(), build()
    conv = model[0]
    with pytest.raises(ValueError, match="not a parameter of its own.*patch_model"):
        DepthwiseConv2d.from_conv(conv)
    assert patch_model(model) == 2
    assert type(model[0]) is DepthwiseConv2d and type(model[1]) is DepthwiseConv2d
    x = torch.randn(2, 4, 9, 9)
    _close(model(x), reference(x))
    underlying = {"weight_norm": "weight_g", "spectral_norm": "weight_orig", "prune": "weight_orig"}[wrap]
    model(x).square().sum().backward()
    reference(x).square().sum().backward()
    _close(getattr(model[0], underlying).grad, getattr(reference[0], underlying).grad, rtol=1e-4, atol=1e-4)
    if wrap == "weight_norm":  # the hook recomputes weight from g and v on every call
        with torch.no_grad():
            model[0].weight_g.mul_(2)
            reference[0].weight_g.mul_(2)
        _close(model(x), reference(x))


class _Doubled(nn.Module):  # a parametrization of the bias: computed from it on each read
    def forward(self, bias):
        return 2 * bias


class _Cropped(nn.Module):  # an unsafe one: the 7x7 weight computed as a 5x5 kernel
    def forward(self, weight):
        return weight[..., 1:-1, 1:-1]


class _Shifted(nn.Conv2d):  # a subclass with its own forward (and arguments the fast op computes)
    def forward(self, x):
        return super().forward(x) + 1


class _Identity(nn.Module):
    def forward(self, weight):
        return weight


def test_patch_model_leaves_convs_with_integer_weights_alone():
    """nn.Conv2d convolves int64 tensors on the CPU; the fast op takes floating point only, so a
    conv whose weight is an integer tensor is not eligible, nor one whose parametrization computes
    its weight from integer originals (the parametrization is not run to find out: spectral_norm's
    would run a power iteration). Patched, the model would raise where it ran before."""
    P = nn.utils.parametrize
    model = nn.Sequential(nn.Conv2d(4, 4, 7, padding=3, groups=4, bias=False),
                          nn.Conv2d(4, 4, 7, padding=3, groups=4, bias=False))
    for conv in model:
        conv.weight = nn.Parameter(torch.randint(-3, 4, (4, 1, 7, 7)), requires_grad=False)
    P.register_parametrization(model[1], "weight", _Identity())
    x = torch.randint(-3, 4, (1, 4, 9, 9))
    expected = model(x)
    assert [is_eligible(conv) for conv in model] == [False, False]
    assert patch_model(model) == 0 and type(model[0]) is nn.Conv2d
    assert torch.equal(model(x), expected)
    # and a parametrized conv's class holding anything but parametrize's entries and the
    # parametrized tensors' properties is another class: not patched either
    odd = P.register_parametrization(nn.Conv2d(4, 4, 7, padding=3, groups=4), "weight", _Identity())
    assert is_eligible(odd)
    # (a conv with only its bias parametrized has a weight of its own to look at)
    assert is_eligible(P.register_parametrization(nn.Conv2d(4, 4, 7, padding=3, groups=4), "bias", _Identity()))
    type(odd).extra = property(lambda self: 1)
    assert not is_eligible(odd)


def _parametrized_model():
    """Convs under torch.nn.utils.parametrize: the modern weight_norm and spectral_norm (the latter
    with a doubled bias as well), a 5x5 crop of a 7x7 weight (unsafe: another shape than the
    module's), and three that stay as they are: a strided one, timm's Conv2dSame and a subclass."""
    timm = pytest.importorskip("timm")
    P = nn.utils.parametrize
    torch.manual_seed(0)  # the same weights (and spectral_norm's random start vectors) each time
    weight_norm = nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 4, 7, padding=3, groups=4))
    spectral = nn.utils.parametrizations.spectral_norm(nn.Conv2d(4, 4, (9, 5), padding=(4, 2), groups=4))
    P.register_parametrization(spectral, "bias", _Doubled())
    cropped = nn.Conv2d(4, 4, 7, padding=3, groups=4)
    P.register_parametrization(cropped, "weight", _Cropped(), unsafe=True)
    strided = nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 4, 7, stride=2, padding=3, groups=4))
    same = nn.utils.parametrizations.weight_norm(timm.layers.Conv2dSame(4, 4, 7, groups=4))
    shifted = nn.utils.parametrizations.weight_norm(_Shifted(4, 4, 7, padding=3, groups=4))
    return nn.Sequential(weight_norm, nn.GELU(), spectral, nn.GELU(), cropped, nn.GELU(), strided, same, shifted)


def test_patch_model_patches_parametrized_convs_and_keeps_the_parametrization(monkeypatch):
    """A conv under torch.nn.utils.parametrize becomes a DepthwiseConv2d subclass carrying
    parametrize's properties: outputs and the gradients of the original tensors as the unpatched
    model's over two training steps (spectral_norm's power iteration runs in both), the fast op
    computing them, the same state_dict keys; a write to an original tensor is seen by the next
    forward; deepcopy works and pickling refuses as parametrize does; remove_parametrizations
    leaves a DepthwiseConv2d. Other Conv2d subclasses, parametrized too, stay as they are."""
    import copy
    import pickle

    import lkfast.nn.depthwise as depthwise

    P = nn.utils.parametrize
    model, reference = _parametrized_model().train(), _parametrized_model().train()
    keys, untouched = list(reference.state_dict()), [type(m) for m in model[6:]]
    assert [is_eligible(m) for m in model] == [True, False, True, False, True, False, False, False, False]
    assert patch_model(model) == 3 and patch_model(model) == 0
    for conv in (model[0], model[2], model[4]):
        assert isinstance(conv, DepthwiseConv2d) and type(conv).__name__ == "ParametrizedDepthwiseConv2d"
        assert P.is_parametrized(conv)
    assert type(model[0]) is not type(model[2])  # one class per module, as parametrize makes
    assert [type(m) for m in model[6:]] == untouched
    assert list(model.state_dict()) == keys
    fast_calls = []
    real = depthwise.depthwise_conv2d
    monkeypatch.setattr(depthwise, "depthwise_conv2d", lambda *a: fast_calls.append(a[1].shape) or real(*a))
    x = torch.randn(2, 4, 13, 11)
    for _ in range(2):
        for net in (model, reference):
            net.zero_grad()
        y, expected = model(x), reference(x)
        _close(y, expected)
        y.square().sum().backward()
        expected.square().sum().backward()
        for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
            _close(p.grad, q.grad, rtol=1e-4, atol=1e-4)
    assert fast_calls == [(4, 1, 7, 7), (4, 1, 9, 5)] * 2  # the cropped 5x5 weight ran as nn.Conv2d would
    with torch.no_grad():
        for net in (model, reference):
            net[0].parametrizations.weight.original0.mul_(3)
            net[2].parametrizations.bias.original.add_(1)
    _close(model.eval()(x), reference.eval()(x))

    copied = copy.deepcopy(model)
    _close(copied(x), reference(x))
    with pytest.raises(RuntimeError, match="Serialization of parametrized modules"):
        pickle.dumps(reference)
    with pytest.raises(RuntimeError, match="Serialization of parametrized modules"):
        pickle.dumps(model)
    for net in (copied, reference):
        P.remove_parametrizations(net[0], "weight")
        P.remove_parametrizations(net[2], "weight")
        P.remove_parametrizations(net[2], "bias")
    assert type(copied[0]) is DepthwiseConv2d and type(copied[2]) is DepthwiseConv2d
    assert list(copied.state_dict()) == list(reference.state_dict())
    _close(copied(x), reference(x))
    # nothing parametrized left (weight_norm's leaves a state_dict hook that pickle cannot take)
    assert type(pickle.loads(pickle.dumps(copied[2]))) is DepthwiseConv2d


def test_unpatch_model_gives_back_plain_convs_that_script(monkeypatch):
    """unpatch_model turns every DepthwiseConv2d (patched or built as one) into nn.Conv2d in place:
    the same module objects and tensors, hooks still firing, outputs as before, PyTorch's own
    convolution computing them (not the op), torch.jit.script working; a user's subclass stays;
    patch_model swaps them back."""
    import lkfast.nn.depthwise as depthwise

    class Mine(DepthwiseConv2d):
        pass

    shared = nn.Conv2d(4, 4, 7, padding=3, groups=4)
    built = DepthwiseConv2d(4, (9, 5))
    model = nn.Sequential(shared, nn.ReLU(), built, shared, Mine(4, 7))
    x = torch.randn(2, 4, 11, 10)
    expected = model(x)
    params = [id(p) for p in model.parameters()]
    seen = []
    shared.register_forward_hook(lambda module, args, out: seen.append(type(module).__name__))
    assert patch_model(model) == 1
    assert unpatch_model(model) == 2 and unpatch_model(model) == 0
    assert type(shared) is nn.Conv2d and type(built) is nn.Conv2d and type(model[4]) is Mine
    assert model[0] is model[3] is shared and [id(p) for p in model.parameters()] == params
    fast_calls = []
    real = depthwise.depthwise_conv2d
    monkeypatch.setattr(depthwise, "depthwise_conv2d", lambda *a, **k: fast_calls.append(a[1].shape) or real(*a, **k))
    _close(model(x), expected)
    assert seen == ["Conv2d", "Conv2d"] and fast_calls == [(4, 1, 7, 7)]  # only Mine's conv on the op
    scripted = torch.jit.script(nn.Sequential(built, nn.ReLU()))  # (shared's Python hook would not script)
    _close(scripted(x), F.relu(built(x)))
    assert patch_model(model) == 2 and type(shared) is DepthwiseConv2d and type(built) is DepthwiseConv2d
    _close(model(x), expected)


def test_scripting_a_fast_layer_says_how_and_leaves_the_model_fast():
    """torch.jit.script on a patched model failed in a parser error inside the op; it says what to
    do now, and the model keeps its fast layers (TorchScript would have put anything the layer gave
    it into the model)."""
    import copy

    from lkfast.nn import PointwiseConv2d, PointwiseLinear

    model = nn.Sequential(nn.Conv2d(4, 4, 7, padding=3, groups=4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    assert patch_model(model) == 2
    for part in (model, model[2]):
        with pytest.raises(RuntimeError, match=r"torch.jit.script cannot compile lkfast's (DepthwiseConv2d|PointwiseLinear)"
                                               r" .*: call lkfast.nn.unpatch_model\(model\) first"):
            torch.jit.script(part)
    assert [type(m) for m in model] == [DepthwiseConv2d, nn.Flatten, PointwiseLinear]
    with pytest.raises(RuntimeError, match="PointwiseConv2d .*: use torch.compile or torch.export"):
        torch.jit.script(PointwiseConv2d(4, 2))
    plain = copy.deepcopy(model)
    assert unpatch_model(plain) == 2
    x = torch.randn(2, 4, 6, 6)
    _close(torch.jit.script(plain)(x), model(x))


def test_unpatch_model_keeps_parametrizations():
    """A parametrized fast conv goes back to a parametrized nn.Conv2d: still computed from its
    parametrization, eligible for patch_model again, and remove_parametrizations leaves nn.Conv2d."""
    P = nn.utils.parametrize
    model, reference = _parametrized_model().eval(), _parametrized_model().eval()
    x = torch.randn(2, 4, 13, 11)
    assert patch_model(model) == 3 and unpatch_model(model) == 3
    for conv in (model[0], model[2], model[4]):
        assert type(conv).__bases__ == (nn.Conv2d,) and type(conv).__name__ == "ParametrizedConv2d"
        assert P.is_parametrized(conv) and is_eligible(conv)
    assert [is_eligible(m) for m in model] == [is_eligible(m) for m in reference]
    assert list(model.state_dict()) == list(reference.state_dict())
    _close(model(x), reference(x))
    with torch.no_grad():
        for net in (model, reference):
            net[0].parametrizations.weight.original0.mul_(3)
    _close(model(x), reference(x))
    P.remove_parametrizations(model[0], "weight")
    assert type(model[0]) is nn.Conv2d
    _close(model(x), reference(x))


def _reparam_module(small_kernel=5):
    module = ReparamLargeKernelConv(6, 6, 13, stride=1, groups=6, small_kernel=small_kernel)
    _randomize_bn(module)
    return module


def _reference_branches(tensors: dict, x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """What the official training-time module computes in eval mode, from its state_dict tensors
    alone: each branch a plain F.conv2d then F.batch_norm with the running statistics, summed.
    Shares no code with lkfast's BN folding (fuse_conv_bn), so a wrong fold cannot match it."""
    out = 0
    for prefix in ("lkb_origin.", "small_conv."):
        weight = tensors[prefix + "conv.weight"]
        kh, kw = weight.shape[-2:]
        y = F.conv2d(x, weight, None, padding=(kh // 2, kw // 2), groups=x.shape[1])
        out = out + F.batch_norm(y, tensors[prefix + "bn.running_mean"], tensors[prefix + "bn.running_var"],
                                 tensors[prefix + "bn.weight"], tensors[prefix + "bn.bias"], training=False, eps=eps)
    return out


def test_reparam_large_kernel_conv_merge_and_eval_fold():
    module = _reparam_module().eval()
    x = torch.randn(2, 6, 15, 17)
    expected = _reference_branches(module.state_dict(), x)
    _close(module(x), expected)  # eval mode: one conv with the equivalent kernel
    module.merge_kernel()
    assert set(module.state_dict()) == {"lkb_reparam.weight", "lkb_reparam.bias"}
    _close(module(x), expected)


def test_folds_keep_the_bn_eps_for_a_channel_with_no_variance():
    """A channel whose running variance is 0 (a dead channel of a trained net): BN divides by
    sqrt(eps), and so must every fold (the merged large kernel, the eval-mode fold of a conv-BN
    pair and of a pre-BN into the 1x1 conv after it); without eps the kernel is inf and the output NaN."""
    from lkfast.nn import conv_bn

    module = _reparam_module().eval()
    with torch.no_grad():
        for bn in (module.lkb_origin.bn, module.small_conv.bn):
            bn.running_var[0] = 0.0
    x = torch.randn(1, 6, 9, 9)
    expected = _reference_branches(module.state_dict(), x)
    assert expected[0, 0].abs().max() > 10  # the channel scaled by 1/sqrt(eps), about 316
    _close(module(x), expected)
    module.merge_kernel()
    _close(module(x), expected)
    pair, pre = conv_bn(6, 4, 1), torch.nn.BatchNorm2d(6)
    _randomize_bn(pair)
    _randomize_bn(pre)
    pair.eval(), pre.eval()
    with torch.no_grad():
        pair.bn.running_var[0] = 0.0
        pre.running_var[0] = 0.0
    ref = F.batch_norm(F.conv2d(F.batch_norm(x, pre.running_mean, pre.running_var, pre.weight, pre.bias, False, 0.0, 1e-5),
                                pair.conv.weight), pair.bn.running_mean, pair.bn.running_var, pair.bn.weight,
                       pair.bn.bias, False, 0.0, 1e-5)
    _close(pair.forward_after_bn(x, pre), ref, rtol=1e-4, atol=1e-3)


def test_reparam_eval_fold_gradients_reach_parameters():
    folded = _reparam_module().eval()
    x = torch.randn(2, 6, 9, 9)
    folded(x).square().sum().backward()
    params = {name: p.detach().clone().requires_grad_() for name, p in folded.named_parameters()}
    tensors = {**{name: b for name, b in folded.named_buffers()}, **params}
    _reference_branches(tensors, x).square().sum().backward()
    for name, p in folded.named_parameters():
        _close(p.grad, params[name].grad, rtol=1e-4, atol=1e-4)


def test_reparam_large_kernel_conv_switches_form_on_load():
    merged = _reparam_module().eval()
    unmerged_state = merged.state_dict()
    x = torch.randn(1, 6, 10, 10)
    y = _reference_branches(unmerged_state, x)
    merged.merge_kernel()
    fresh = ReparamLargeKernelConv(6, 6, 13, 1, 6, small_kernel=5)
    fresh.load_state_dict(merged.state_dict(), strict=True)  # unmerged module, merged weights
    assert fresh.merged
    _close(fresh.eval()(x), y)
    back = ReparamLargeKernelConv(6, 6, 13, 1, 6, small_kernel=5, small_kernel_merged=True)
    back.load_state_dict(unmerged_state, strict=True)  # merged module, training-time weights
    assert not back.merged
    _close(back.eval()(x), y)


def test_folded_kernels_are_cached_only_for_frozen_weights_and_refreshed_on_change():
    module = _reparam_module().eval()
    x = torch.randn(1, 6, 9, 9)
    expected = _reference_branches(module.state_dict(), x)
    module.requires_grad_(False)
    _close(module(x), expected)
    assert module._fold_cache.key is not None  # frozen: cached
    with torch.no_grad():
        module.lkb_origin.conv.weight.mul_(2)  # in-place change: the cache must notice
    changed = _reference_branches(module.state_dict(), x)
    assert (changed - expected).abs().max() > 1e-2
    _close(module(x), changed)


def _frozen_pair():
    """A frozen ReparamLargeKernelConv and a frozen 1x1 ConvBN (both fold their BNs when cached)."""
    from lkfast.nn import conv_bn

    pointwise = conv_bn(6, 4, 1)
    _randomize_bn(pointwise)
    return _reparam_module().eval().requires_grad_(False), pointwise.eval().requires_grad_(False)


def _pointwise_reference(block, x):
    return F.batch_norm(F.conv2d(x, block.conv.weight), block.bn.running_mean, block.bn.running_var,
                        block.bn.weight, block.bn.bias, training=False, eps=block.bn.eps)


def test_a_write_through_data_is_folded_again_after_eval():
    """``.data`` writes do not bump the version counter the fold cache watches (a documented
    limitation); ``eval()`` (or ``train()``) makes the modules fold again."""
    module, pointwise = _frozen_pair()
    x = torch.randn(1, 6, 9, 9)
    before, pointwise_before = module(x), pointwise(x)  # fills both caches
    module.lkb_origin.conv.weight.data.mul_(3)
    pointwise.conv.weight.data.zero_()
    nn.Sequential(module, pointwise).eval()  # eval() on a parent reaches both
    changed = _reference_branches(module.state_dict(), x)
    assert (changed - before).abs().max() > 1e-1
    _close(module(x), changed)
    expected = _pointwise_reference(pointwise, x)  # zero kernel: the BN's shift alone
    assert (expected - pointwise_before).abs().max() > 1e-1
    _close(pointwise(x), expected)


def test_a_fold_cached_under_inference_mode_serves_a_later_input_gradient():
    """A frozen model first run under torch.inference_mode, then differentiated in its input (an
    attack): the cached fold must not be an inference tensor, which backward cannot save."""
    module, pointwise = _frozen_pair()
    x = torch.randn(1, 6, 9, 9)
    with torch.inference_mode():
        module(x), pointwise(x)
    for block, reference in ((module, lambda x: _reference_branches(module.state_dict(), x)),
                             (pointwise, lambda x: _pointwise_reference(pointwise, x))):
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        (g1,) = torch.autograd.grad(block(x1).square().sum(), x1)
        (g2,) = torch.autograd.grad(reference(x2).square().sum(), x2)
        _close(g1, g2, rtol=1e-4, atol=1e-4)


def test_a_frozen_module_built_under_inference_mode_runs():
    """Inference tensors have no version counter for the fold cache to watch: folded every call."""
    with torch.inference_mode():
        module, pointwise = _frozen_pair()
        x = torch.randn(1, 6, 9, 9)
        _close(module(x), _reference_branches(module.state_dict(), x))
        with torch.no_grad():
            module.lkb_origin.conv.weight.mul_(2)
        _close(module(x), _reference_branches(module.state_dict(), x))
        _close(pointwise(x), _pointwise_reference(pointwise, x))


def test_folded_modules_under_torch_func_transforms():
    """vmap over stacked weights (functional_call, as for a model ensemble) through the frozen,
    folding modules: the fold cache must not ask a batched tensor for its storage; each model's
    output equals its own call. jvp in the input as well."""
    module, pointwise = _frozen_pair()
    model = nn.Sequential(module, pointwise)
    x = torch.randn(1, 6, 9, 9)
    buffers = dict(model.named_buffers())
    params = [{k: v * scale for k, v in model.named_parameters()} for scale in (1.0, 0.5)]
    stacked = {k: torch.stack([p[k] for p in params]) for k in params[0]}
    y = torch.func.vmap(lambda p: torch.func.functional_call(model, (p, buffers), (x,)))(stacked)
    for i, p in enumerate(params):
        _close(y[i], torch.func.functional_call(model, (p, buffers), (x,)))
    assert (y[0] - y[1]).abs().max() > 1e-2
    tangent = torch.randn_like(x)
    _, jvp = torch.func.jvp(model, (x,), (tangent,))
    _close(jvp, model(x + tangent) - model(x), rtol=1e-3, atol=1e-4)  # linear up to the BNs' shift


def test_a_fold_is_served_only_to_the_tensors_it_was_made_from():
    """The fold cache must tell the weights it folded from other tensors at the same address with the
    same version counter and dtype: a view of the same memory read another way (a transposed
    kernel, passed by functional_call), and a fresh copy allocated where a freed one lay (perturbed
    copies of frozen weights, one functional_call each, freed when the call returns: the next copy
    often lands at the address of the one before). Keyed on pointer, version and dtype alone, the
    cache gave both the previous fold back (outputs off by up to ~20)."""
    from torch.func import functional_call

    from lkfast.nn import conv_bn

    torch.manual_seed(0)
    pointwise = conv_bn(64, 64, 1)
    large = _reparam_module(small_kernel=3)
    for module in (pointwise, large):
        _randomize_bn(module)
        module.eval().requires_grad_(False)

    def pointwise_reference(t, x):
        return F.batch_norm(F.conv2d(x, t["conv.weight"]), t["bn.running_mean"], t["bn.running_var"],
                            t["bn.weight"], t["bn.bias"], training=False, eps=pointwise.bn.eps)

    def error(module, reference, x, replace):
        params = {**dict(module.named_parameters()), **replace}
        return (functional_call(module, params, (x,)) - reference({**dict(module.named_buffers()), **params}, x)).abs().max()

    # the same memory read as another kernel: same pointer, version and dtype
    for module, reference, x, name, dims in ((pointwise, pointwise_reference, torch.randn(1, 64, 5, 5), "conv.weight", (0, 1)),
                                             (large, _reference_branches, torch.randn(1, 6, 9, 9), "lkb_origin.conv.weight", (2, 3))):
        weight = dict(module.named_parameters())[name]
        assert error(module, reference, x, {}) < 1e-4 and module._fold_cache.key is not None  # folded and cached
        transposed = weight.transpose(*dims)
        assert transposed.data_ptr() == weight.data_ptr() and not torch.equal(transposed, weight)
        assert error(module, reference, x, {name: transposed}) < 1e-4
    # a fresh copy where the freed one lay
    x = torch.randn(1, 64, 5, 5)

    def error_of_a_copy(scale):  # the copy lives for this call only
        return error(pointwise, pointwise_reference, x, {n: p * scale for n, p in pointwise.named_parameters()}).item()

    errors = [error_of_a_copy(1 + i / 8) for i in range(64)]
    assert max(errors) < 1e-3, [round(e, 3) for e in errors]
    # a module holding a fold still pickles and deep-copies (the cache's weak references are not carried)
    import copy
    import pickle

    for module, x in ((pointwise, x), (large, torch.randn(1, 6, 9, 9))):
        module(x)
        assert module._fold_cache.key is not None
        for twin in (pickle.loads(pickle.dumps(module)), copy.deepcopy(module)):
            _close(twin(x), module(x))


def test_switching_form_on_load_keeps_eval_mode():
    module = ReparamLargeKernelConv(6, 6, 13, 1, 6, small_kernel=5, small_kernel_merged=True).eval()
    module.load_state_dict(_reparam_module().state_dict())
    assert not module.merged and not module.lkb_origin.bn.training and not module.small_conv.bn.training


def _plain(block, x):
    """A ConvBN's children run one after the other, as nn.Sequential runs them (no folding)."""
    return nn.Sequential(*block.children())(x)


def test_conv_bn_folds_what_the_plain_pair_computes_or_does_not_fold():
    """ConvBN in eval against its children run in turn: the fold keeps the conv's bias (scaled by
    the BN), a BN without affine parameters, and the BN's eps (a channel with zero running variance,
    as dead channels of trained nets have); it does not fold a BN without running statistics (which
    normalises with the batch's even in eval), nor a conv whose padding is not zeros (the folded
    conv pads with zeros)."""
    from lkfast.nn import ConvBN

    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 9)
    blocks = {
        "conv bias": ConvBN(nn.Conv2d(4, 6, 3, padding=1, bias=True), nn.BatchNorm2d(6)),
        "no affine": ConvBN(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6, affine=False)),
        "zero variance": ConvBN(nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6)),
        "no running stats": ConvBN(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6, track_running_stats=False)),
        "reflect padding": ConvBN(nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(6)),
        "strided": ConvBN(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6)),
        "dilated": ConvBN(nn.Conv2d(4, 6, 3, padding=2, dilation=2), nn.BatchNorm2d(6)),
    }
    for name, block in blocks.items():
        bn = block.bn
        with torch.no_grad():
            for t, low, high in ((bn.running_mean, -0.5, 0.5), (bn.running_var, 0.5, 2.0), (bn.weight, 0.5, 1.5),
                                 (bn.bias, -0.5, 0.5)):
                if t is not None:
                    t.uniform_(low, high)
        if name == "zero variance":
            block.bn.running_var[:3] = 0
        block.eval()
        want = _plain(block, x)
        assert want.isfinite().all()
        _close(block(x), want, rtol=1e-4, atol=1e-4)
        with torch.no_grad():  # and frozen (the cached fold)
            _close(block.requires_grad_(False)(x), want, rtol=1e-4, atol=1e-4)
    # conv_bn(fast=False) is the plain pair: its BN runs in eval too (a hook on it fires)
    from lkfast.nn import conv_bn

    for fast in (False, True):
        block, seen = conv_bn(4, 6, 3, fast=fast).eval(), []
        block.bn.register_forward_hook(lambda *args: seen.append(1))
        block(x)
        assert seen == ([] if fast else [1]), fast


def test_forward_after_bn_folds_the_bn_before_only_into_a_plain_1x1_conv():
    """``block.forward_after_bn(x, pre_bn) == block(pre_bn(x))``: the BN before is folded into a
    plain 1x1 conv only (into a padded 3x3 its shift would leak into the border; a grouped 1x1 mixes
    no channels across groups), only while it is in eval (in training it normalises with the
    batch's statistics), and a cached fold follows in-place changes of the BN before."""
    from lkfast.nn import conv_bn

    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 7)
    for args in ((4, 6, 1), (4, 6, 3), (4, 4, 1, 1, None, 2)):
        block, pre_bn = conv_bn(*args), nn.BatchNorm2d(4)
        _randomize_bn(block)
        _randomize_bn(pre_bn)
        block.eval(), pre_bn.eval()
        _close(block.forward_after_bn(x, pre_bn), block(pre_bn(x)), rtol=1e-4, atol=1e-4)
        pre_bn.train()
        want = block(pre_bn(x))
        _close(block.forward_after_bn(x, pre_bn), want, rtol=1e-4, atol=1e-4)
    block, pre_bn = conv_bn(4, 6, 1), nn.BatchNorm2d(4)
    _randomize_bn(block)
    _randomize_bn(pre_bn)
    block.eval().requires_grad_(False), pre_bn.eval().requires_grad_(False)
    _close(block.forward_after_bn(x, pre_bn), block(pre_bn(x)), rtol=1e-4, atol=1e-4)
    assert block._fold_cache.key is not None
    for t in (pre_bn.running_mean, pre_bn.running_var, pre_bn.weight, pre_bn.bias):
        with torch.no_grad():
            t.mul_(1.5).add_(0.25)  # in place: the cached fold must notice
        _close(block.forward_after_bn(x, pre_bn), block(pre_bn(x)), rtol=1e-4, atol=1e-4)


def test_reparam_fold_follows_the_small_branch_and_keeps_dtype_through_merge_and_load():
    """The large-kernel module's fold takes the small branch into account: only while its BN is in
    eval too (a small BN left in training normalises with the batch's statistics), and a cached fold
    follows in-place changes of the small branch. merge_kernel and switching form on load keep a
    float64 module float64; a state_dict holding both forms leaves the module's form as it is."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 9, 9)
    module = _reparam_module(small_kernel=3).eval()
    module.small_conv.bn.train()
    _close(module(x), module.lkb_origin(x) + module.small_conv(x))
    frozen = _reparam_module(small_kernel=3).eval().requires_grad_(False)
    _close(frozen(x), _reference_branches(frozen.state_dict(), x))
    for t in (frozen.small_conv.conv.weight, frozen.small_conv.bn.running_var, frozen.small_conv.bn.bias):
        with torch.no_grad():
            t.mul_(1.5).add_(0.25)  # in place: the cached fold must notice
        _close(frozen(x), _reference_branches(frozen.state_dict(), x))
    double = _reparam_module(small_kernel=3).double().eval()
    want = _reference_branches(double.state_dict(), x.double())
    unmerged_state = double.state_dict()
    double.merge_kernel()
    assert double.lkb_reparam.weight.dtype == torch.float64
    _close(double(x.double()), want)
    double.merge_kernel()  # merging a merged module changes nothing
    _close(double(x.double()), want)
    back = ReparamLargeKernelConv(6, 6, 13, 1, 6, small_kernel=3, small_kernel_merged=True).double().eval()
    back.load_state_dict(unmerged_state)  # switches form: the new branches are float64 too
    assert {p.dtype for p in back.state_dict().values() if p.is_floating_point()} == {torch.float64}
    _close(back(x.double()), want)
    both = {**unmerged_state, **double.state_dict()}
    for merged in (False, True):
        target = ReparamLargeKernelConv(6, 6, 13, 1, 6, small_kernel=3, small_kernel_merged=merged).double()
        result = target.load_state_dict(both, strict=False)
        assert target.merged == merged and result.missing_keys == []


CONV_ARGUMENTS = [  # (in, out, kernel, stride, padding, dilation, groups)
    (4, 4, 7, 1, 3, 1, 4), (4, 4, (7, 5), 1, (3, 2), 1, 4), (4, 4, 7, 1, "same", 1, 4), (4, 4, 5, 1, 2, 1, 4),
    (4, 4, 3, 1, 1, 1, 4), (4, 4, (3, 9), 1, (1, 4), 1, 4), (4, 4, 7, 2, 3, 1, 4), (4, 4, 7, 1, 6, 2, 4),
    (4, 8, 7, 1, 3, 1, 4), (4, 4, 7, 1, 2, 1, 4), (4, 4, 6, 1, 3, 1, 4), (4, 4, 7, 1, 3, 1, 1), (4, 4, 7, 1, 0, 1, 4),
]


# which of CONV_ARGUMENTS the rule takes: depthwise, stride 1, dilation 1, an odd kernel whose
# larger side is at least 5, padding k // 2 per side (kh's first)
ELIGIBLE = [True, True, True, True, False, True, False, False, False, False, False, False, False]


def test_the_rule_takes_exactly_the_eligible_convs():
    """fast_op_computes on its own (test_module_factory_and_patch_model_apply_one_rule only checks
    that make_conv2d and patch_model agree): the larger kernel side counts (a 3x9 kernel is taken),
    5 itself is enough, the padding is (kh // 2, kw // 2) in that order."""
    from lkfast.nn.depthwise import fast_op_computes

    assert len(ELIGIBLE) == len(CONV_ARGUMENTS)
    for (cin, cout, k, stride, padding, dilation, groups), want in zip(CONV_ARGUMENTS, ELIGIBLE):
        assert fast_op_computes(cin, cout, k, stride, padding, dilation, groups) is want, (cin, cout, k, stride, padding)
        assert is_eligible(nn.Conv2d(cin, cout, k, stride, padding, dilation, groups)) is want
    assert not fast_op_computes(4, 4, (3, 9), 1, (4, 1), 1, 4)  # the padding of a 9x3 kernel
    assert fast_op_computes(4, 4, (3, 9), 1, None, 1, 4) and fast_op_computes(4, 4, 7, 1, "same", 1, 4)
    assert not fast_op_computes(4, 4, 7, 1, 3, 1, 4, padding_mode="reflect")
    assert not fast_op_computes(4, 4, 7, 1, 3, 2, 4)  # dilated, with the undilated kernel's padding
    assert not is_eligible(nn.Conv2d(4, 4, 7, padding=3, dilation=2, groups=4))  # the module's dilation counts
    assert not fast_op_computes(4, 4, (7, 6), 1, (3, 3), 1, 4)  # even width
    assert fast_op_computes(4, 4, 3, 1, 1, 1, 4, min_kernel_size=3) and not fast_op_computes(4, 4, 5, 1, 2, 1, 4, min_kernel_size=7)
    # make_conv2d's default padding is (kh // 2, kw // 2) too
    built = make_conv2d(4, 4, (3, 9), groups=4, bias=True)
    assert isinstance(built, DepthwiseConv2d) and built.padding == (1, 4)
    assert make_conv2d(4, 4, (3, 9), groups=4, fast=False).padding == (1, 4)


@pytest.mark.parametrize("args", CONV_ARGUMENTS, ids=str)
def test_module_factory_and_patch_model_apply_one_rule(args):
    """make_conv2d builds the fast module exactly where patch_model would swap the same nn.Conv2d,
    and the swapped model computes what the plain conv does."""
    cin, cout, k, stride, padding, dilation, groups = args
    plain = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups)
    built = make_conv2d(cin, cout, k, stride, padding, dilation, groups, bias=True)
    model = nn.Sequential(plain)
    eligible = is_eligible(plain)
    swapped = patch_model(model)  # patches ``plain`` itself: ask is_eligible first
    assert isinstance(built, DepthwiseConv2d) == eligible == (swapped == 1)
    assert type(make_conv2d(cin, cout, k, stride, padding, dilation, groups, fast=False)) is nn.Conv2d
    x = torch.randn(1, cin, 11, 12)
    _close(model(x), F.conv2d(x, plain.weight, plain.bias, stride, padding, dilation, groups))


@pytest.mark.parametrize("size", [(7,), (7, 7, 7), 7.0, (7, 5.0), 6, (7, 4), 0])
def test_depthwise_module_refuses_a_kernel_size_that_is_no_odd_pair(size):
    """An int or a pair of odd ints; anything else is one ValueError naming what was given."""
    with pytest.raises(ValueError, match=r"^DepthwiseConv2d: kernel"):
        DepthwiseConv2d(4, size)


def test_depthwise_module_takes_an_int_or_a_pair():
    assert DepthwiseConv2d(4, 7).kernel_size == (7, 7)
    assert DepthwiseConv2d(4, (7, 5)).kernel_size == (7, 5)
    assert DepthwiseConv2d(4, [3, 9]).kernel_size == (3, 9)
    import numpy as np

    assert DepthwiseConv2d(4, np.int64(5)).kernel_size == (5, 5)
