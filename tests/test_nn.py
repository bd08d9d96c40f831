"""lkfast.nn: DepthwiseConv2d, ReparamLargeKernelConv and patch_model against plain PyTorch."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lkfast.nn import DepthwiseConv2d, ReparamLargeKernelConv, is_eligible, patch_model


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
    assert patch_model(model) == 4  # one depthwise 13x13 per block
    conv_dw = model.stages[0].blocks[0].conv_dw
    assert isinstance(conv_dw, DepthwiseConv2d) and conv_dw.weight is weight_before  # same tensors kept
    assert patch_model(model) == 0  # already patched
    x = torch.randn(2, 3, 64, 64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = reference(x1), model(x2)
    _close(y2, y1)
    (g1,) = torch.autograd.grad(y1.square().sum(), x1)
    (g2,) = torch.autograd.grad(y2.square().sum(), x2)
    _close(g2, g1, rtol=1e-4, atol=1e-5)


def test_patch_model_training_step_weight_grads():
    model = _tiny_convnext().train()
    reference = _tiny_convnext().train()
    reference.load_state_dict(model.state_dict())
    patch_model(model)
    x = torch.randn(2, 3, 32, 32)
    model(x).square().sum().backward()
    reference(x).square().sum().backward()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        _close(p.grad, q.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("padding", [3, (3, 3), "same"])
def test_patch_model_padding_forms(padding):
    model = nn.Sequential(nn.Conv2d(4, 4, 7, padding=padding, groups=4))
    x = torch.randn(1, 4, 10, 12)
    y = model(x)
    assert patch_model(model) == 1
    _close(model(x), y)


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


def _reparam_module(small_kernel=5):
    module = ReparamLargeKernelConv(6, 6, 13, stride=1, groups=6, small_kernel=small_kernel)
    _randomize_bn(module)
    return module


def test_reparam_large_kernel_conv_merge_and_eval_fold():
    module = _reparam_module().eval()
    x = torch.randn(2, 6, 15, 17)
    branches = module.lkb_origin(x) + module.small_conv(x)  # what the official code computes
    _close(module(x), branches)  # eval mode: one conv with the equivalent kernel
    module.merge_kernel()
    assert set(module.state_dict()) == {"lkb_reparam.weight", "lkb_reparam.bias"}
    _close(module(x), branches)


def test_reparam_eval_fold_gradients_reach_parameters():
    folded, reference = _reparam_module().eval(), _reparam_module().eval()
    reference.load_state_dict(folded.state_dict())
    x = torch.randn(2, 6, 9, 9)
    folded(x).square().sum().backward()
    (reference.lkb_origin(x) + reference.small_conv(x)).square().sum().backward()
    for (name, p), (_, q) in zip(folded.named_parameters(), reference.named_parameters()):
        _close(p.grad, q.grad, rtol=1e-4, atol=1e-4)


def test_reparam_large_kernel_conv_switches_form_on_load():
    merged = _reparam_module().eval()
    unmerged_state = merged.state_dict()
    x = torch.randn(1, 6, 10, 10)
    y = merged(x)
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
    expected = module.lkb_origin(x) + module.small_conv(x)
    module.requires_grad_(False)
    _close(module(x), expected)
    assert module._fold_cache.key is not None  # frozen: cached
    with torch.no_grad():
        module.lkb_origin.conv.weight.mul_(2)  # in-place change: the cache must notice
    _close(module(x), module.lkb_origin(x) + module.small_conv(x))
    _close(module(x).sub(expected).abs().max() > 0, torch.tensor(True))


def test_switching_form_on_load_keeps_eval_mode():
    module = ReparamLargeKernelConv(6, 6, 13, 1, 6, small_kernel=5, small_kernel_merged=True).eval()
    module.load_state_dict(_reparam_module().state_dict())
    assert not module.merged and not module.lkb_origin.bn.training and not module.small_conv.bn.training
