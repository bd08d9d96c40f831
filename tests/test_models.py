"""lkfast.models: RepLKNet against an independent reference of the official architecture, checkpoint
loading (official layout, wrappers, re-parameterised form, bad files), named configs, create_model."""
import argparse
import pathlib
import re

import warnings

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

import lkfast.models as models  # noqa: E402
from lkfast.models import CheckpointError, RepLKNet, create_model  # noqa: E402
from lkfast.nn import DepthwiseConv2d  # noqa: E402

# A tiny RepLKNet: every structural feature of the official one (small kernel, dw_ratio, 4 stages).
TINY = dict(large_kernel_sizes=[13, 11, 7, 5], layers=[1, 1, 2, 1], channels=[8, 16, 24, 32], small_kernel=3)
TINY_XL = dict(TINY, small_kernel=None, dw_ratio=1.5)
NUM_CLASSES = 10


# --- the official key layout and forward, written from the architecture description ---------------

def _conv_bn_entries(prefix, cin, cout, k, groups):
    yield prefix + "conv.weight", (cout, cin // groups, k, k)
    yield from _bn_entries(prefix + "bn.", cout)


def _bn_entries(prefix, c):
    for name in ("weight", "bias", "running_mean", "running_var"):
        yield prefix + name, (c,)
    yield prefix + "num_batches_tracked", ()


def official_layout(large_kernel_sizes, layers, channels, small_kernel, dw_ratio=1, ffn_ratio=4, merged=False,
                    num_classes=NUM_CLASSES):
    """(key, shape) of every state_dict entry of the official RepLKNet classifier, in order."""
    c0 = channels[0]
    entries = []
    for i, (cin, cout, k, g) in enumerate([(3, c0, 3, 1), (c0, c0, 3, c0), (c0, c0, 1, 1), (c0, c0, 3, c0)]):
        entries += _conv_bn_entries(f"stem.{i}.", cin, cout, k, g)
    for s, (c, n, k) in enumerate(zip(channels, layers, large_kernel_sizes)):
        dw, ffn = int(c * dw_ratio), int(c * ffn_ratio)
        for b in range(n):
            p = f"stages.{s}.blocks.{2 * b}."
            entries += _conv_bn_entries(p + "pw1.", c, dw, 1, 1)
            entries += _conv_bn_entries(p + "pw2.", dw, c, 1, 1)
            if merged:
                entries += [(p + "large_kernel.lkb_reparam.weight", (dw, 1, k, k)), (p + "large_kernel.lkb_reparam.bias", (dw,))]
            else:
                entries += _conv_bn_entries(p + "large_kernel.lkb_origin.", dw, dw, k, dw)
                if small_kernel is not None:
                    entries += _conv_bn_entries(p + "large_kernel.small_conv.", dw, dw, small_kernel, dw)
            entries += _bn_entries(p + "prelkb_bn.", c)
            p = f"stages.{s}.blocks.{2 * b + 1}."
            entries += _bn_entries(p + "preffn_bn.", c)
            entries += _conv_bn_entries(p + "pw1.", c, ffn, 1, 1)
            entries += _conv_bn_entries(p + "pw2.", ffn, c, 1, 1)
    for s, (c, c_next) in enumerate(zip(channels[:-1], channels[1:])):  # registered after all stages
        entries += _conv_bn_entries(f"transitions.{s}.0.", c, c_next, 1, 1)
        entries += _conv_bn_entries(f"transitions.{s}.1.", c_next, c_next, 3, c_next)
    entries += _bn_entries("norm.", channels[-1])
    entries += [("head.weight", (num_classes, channels[-1])), ("head.bias", (num_classes,))]
    return entries


def official_checkpoint(merged=False, seed=0, **arch):
    """A random state_dict in the official layout, with BN statistics a trained net could have."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_layout(merged=merged, **arch):
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(100)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith("bn.weight") or key.endswith("_bn.weight") or key == "norm.weight":
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
            state[key] = torch.randn(shape, generator=g) / fan_in ** 0.5
    return state


def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"], False, 0.0, 1e-5)


def _conv_bn(x, sd, p, stride=1):
    w = sd[p + "conv.weight"]
    groups = x.shape[1] if w.shape[1] == 1 and x.shape[1] > 1 else 1
    return _bn(F.conv2d(x, w, None, stride, w.shape[-1] // 2, 1, groups), sd, p + "bn.")


def reference_forward(sd, x):
    """Inference forward of the official RepLKNet, walking the official key names with plain F ops."""
    for i, stride in enumerate((2, 1, 1, 2)):
        x = F.relu(_conv_bn(x, sd, f"stem.{i}.", stride))
    s = 0
    while f"stages.{s}.blocks.0.pw1.conv.weight" in sd:
        b = 0
        while f"stages.{s}.blocks.{b}.prelkb_bn.weight" in sd:
            p = f"stages.{s}.blocks.{b}."
            out = F.relu(_conv_bn(_bn(x, sd, p + "prelkb_bn."), sd, p + "pw1."))
            lk = p + "large_kernel."
            if lk + "lkb_reparam.weight" in sd:
                w = sd[lk + "lkb_reparam.weight"]
                big = F.conv2d(out, w, sd[lk + "lkb_reparam.bias"], 1, w.shape[-1] // 2, 1, out.shape[1])
            else:
                big = _conv_bn(out, sd, lk + "lkb_origin.")
                if lk + "small_conv.conv.weight" in sd:
                    big = big + _conv_bn(out, sd, lk + "small_conv.")
            x = x + _conv_bn(F.relu(big), sd, p + "pw2.")
            p = f"stages.{s}.blocks.{b + 1}."
            x = x + _conv_bn(F.gelu(_conv_bn(_bn(x, sd, p + "preffn_bn."), sd, p + "pw1.")), sd, p + "pw2.")
            b += 2
        if f"transitions.{s}.0.conv.weight" in sd:
            x = F.relu(_conv_bn(x, sd, f"transitions.{s}.0."))
            x = F.relu(_conv_bn(x, sd, f"transitions.{s}.1.", stride=2))
        s += 1
    x = _bn(x, sd, "norm.").mean(dim=(2, 3))
    return F.linear(x, sd["head.weight"], sd["head.bias"])


def _close(a, b, rtol=1e-4, atol=1e-5):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# --- official layout and equivalence ---------------------------------------------------------------

@pytest.mark.parametrize("arch", [TINY, TINY_XL], ids=["31B-like", "XL-like"])
@pytest.mark.parametrize("merged", [False, True], ids=["training-time", "reparameterised"])
def test_official_layout_loads_strict_and_matches_reference(arch, merged, images):
    state = official_checkpoint(merged=merged, **arch)
    model = RepLKNet(**arch, num_classes=NUM_CLASSES).eval()
    model.load_state_dict(state, strict=True)
    assert list(model.state_dict()) == list(state)  # same keys, same order as the official module tree
    with torch.no_grad():
        _close(model(images), reference_forward(state, images))


def test_fast_and_plain_models_agree(images):
    state = official_checkpoint(**TINY)
    fast = RepLKNet(**TINY, num_classes=NUM_CLASSES, fast=True)
    plain = RepLKNet(**TINY, num_classes=NUM_CLASSES, fast=False)
    fast.load_state_dict(state)
    plain.load_state_dict(state)
    assert isinstance(fast.stages[0].blocks[0].large_kernel.lkb_origin.conv, DepthwiseConv2d)
    assert not any(isinstance(m, DepthwiseConv2d) for m in plain.modules())
    for mode in ("eval", "train"):
        getattr(fast, mode)()
        getattr(plain, mode)()
        x1, x2 = images.clone().requires_grad_(), images.clone().requires_grad_()
        y1, y2 = fast(x1), plain(x2)
        _close(y1, y2)
        y1.logsumexp(1).sum().backward()
        y2.logsumexp(1).sum().backward()
        _close(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)
        for (name, p), (_, q) in zip(fast.named_parameters(), plain.named_parameters()):
            _close(p.grad, q.grad, rtol=2e-3, atol=1e-5)
        fast.zero_grad()
        plain.zero_grad()


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("arch", [TINY, TINY_XL], ids=["31B-like", "XL-like"])
def test_structural_reparam_equivalence_and_official_merged_keys(arch, fast, images):
    state = official_checkpoint(**arch)
    model = RepLKNet(**arch, num_classes=NUM_CLASSES, fast=fast)
    model.load_state_dict(state)
    model.eval()
    # The unmerged function comes from the reference (separate branches, as the official forward
    # runs them): the fast model's eval forward already uses the merged kernel, so comparing it
    # with itself after the merge would not see a wrong merge.
    before = reference_forward(state, images)
    with torch.no_grad():
        model.structural_reparam()
        after = model(images)
    _close(after, before)
    merged = model.state_dict()
    assert [k for k, _ in official_layout(merged=True, **arch)] == list(merged)
    _close(reference_forward(merged, images), before)  # the merged weights alone carry the function
    # fusing the other conv-BN pairs too: inference only, same outputs
    with torch.no_grad():
        model.structural_reparam(fuse_conv_bn=True)
        _close(model(images), before)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for n, m in model.named_modules() if n.endswith(".bn"))


def _outputs_and_input_grad(model, images):
    x = images.clone().requires_grad_()
    out = model(x)
    (grad,) = torch.autograd.grad(F.cross_entropy(out, torch.arange(len(images)) % NUM_CLASSES), [x])
    return out.detach(), grad


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("arch", [TINY, TINY_XL], ids=["31B-like", "XL-like"])
def test_fold_batchnorms_keeps_outputs_and_input_gradients(arch, fast, images):
    model = RepLKNet(**arch, num_classes=NUM_CLASSES, fast=fast)
    model.load_state_dict(official_checkpoint(**arch))  # BN statistics far from the identity
    model.eval().requires_grad_(False)
    before, grad_before = _outputs_and_input_grad(model, images)
    assert models.fold_batchnorms(model) is model
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    after, grad_after = _outputs_and_input_grad(model, images)
    _close(after, before)
    _close(grad_after, grad_before, rtol=1e-4, atol=1e-7)
    _close(model(images), reference_forward(official_checkpoint(**arch), images))  # the official function


def test_fold_batchnorms_of_a_training_model_gives_the_eval_function(images):
    """fold_batchnorms folds the running statistics: a model in training mode comes back in eval mode,
    every module (the convs, Identities and head it makes were left in training mode), with drop path
    off, computing the official eval-mode function; structural_reparam's new modules follow the mode
    of those they replace."""
    state = official_checkpoint(**TINY)
    model = RepLKNet(**TINY, num_classes=NUM_CLASSES, drop_path_rate=0.3)
    model.load_state_dict(state)
    models.fold_batchnorms(model.train())
    assert not [name for name, m in model.named_modules() if m.training]
    with torch.no_grad():
        _close(model(images), reference_forward(state, images))
    model = RepLKNet(**TINY, num_classes=NUM_CLASSES).eval()  # the new modules of structural_reparam too
    model.structural_reparam(fuse_conv_bn=True)
    assert not [name for name, m in model.named_modules() if m.training]


def test_a_fused_checkpoint_is_named_as_such(tmp_path):
    """A state_dict saved after structural_reparam(fuse_conv_bn=True) was refused as "the weights of
    another architecture"; it is the same one, fused: the error says so and how to load it."""
    fused = RepLKNet(**TINY, num_classes=NUM_CLASSES).eval().structural_reparam(fuse_conv_bn=True)
    path = _save(tmp_path / "fused.pth", fused.state_dict())
    with pytest.raises(CheckpointError, match=r"has conv biases where the model has \d+ BatchNorm entries: it looks like "
                                              r"one saved after structural_reparam\(fuse_conv_bn=True\); build") as raised:
        models.load_checkpoint(RepLKNet(**TINY, num_classes=NUM_CLASSES).eval(), path)
    assert "another architecture" not in str(raised.value)
    target = RepLKNet(**TINY, num_classes=NUM_CLASSES).eval().structural_reparam(fuse_conv_bn=True)
    models.load_checkpoint(target, path)  # as the message says
    for key, value in fused.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_fold_batchnorms_refuses_other_models():
    with pytest.raises(TypeError, match="RepLKNet"):
        models.fold_batchnorms(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3)))


def test_fast_model_traces_as_one_graph_in_eval(images):
    # The on-the-fly BN folding of the fast layers must not break the graph under torch.compile
    # (its cache keys on storage pointers, which dynamo cannot guard on).
    model = RepLKNet(**TINY, num_classes=NUM_CLASSES).eval()
    model.load_state_dict(official_checkpoint(**TINY))
    model.requires_grad_(False)  # frozen weights: the case where the fold is cached in eager mode
    expected = model(images)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    _close(compiled(images), expected)


def test_optimize_for_inference_compiled_matches_eager(images):
    # Inference (no_grad): inductor freezes the folded weights, the fast op inside the graph.
    arch = dict(TINY, layers=[1, 1, 1, 1], channels=[8, 8, 8, 8])
    model = RepLKNet(**arch, num_classes=NUM_CLASSES)
    model.load_state_dict(official_checkpoint(**arch))
    model.eval().requires_grad_(False)
    images = images[:, :, :32, :32]
    with torch.no_grad():
        expected = model(images)
        _close(models.optimize_for_inference(model, compile=True)(images), expected)


def test_small_kernel_merged_constructor_gives_reparameterised_layout():
    model = RepLKNet(**TINY, num_classes=NUM_CLASSES, small_kernel_merged=True)
    assert list(model.state_dict()) == [k for k, _ in official_layout(merged=True, **TINY)]


def test_state_dict_round_trip(images, tmp_path):
    model = RepLKNet(**TINY, num_classes=NUM_CLASSES, drop_path_rate=0.1)
    model.load_state_dict(official_checkpoint(**TINY))
    path = tmp_path / "round_trip.pth"
    torch.save(model.state_dict(), path)
    again = RepLKNet(**TINY, num_classes=NUM_CLASSES)
    again.load_state_dict(torch.load(path, weights_only=True), strict=True)
    with torch.no_grad():
        _close(again.eval()(images), model.eval()(images))


def test_constructor_refuses_what_it_cannot_build():
    """Unknown keyword arguments, per-stage lists of different lengths, and a head together with
    out_indices (backbone use) are refused by name; timm's global_pool is taken and ignored."""
    with pytest.raises(TypeError, match=r"RepLKNet: unexpected arguments \['drop_rate'\]"):
        RepLKNet(**TINY, drop_rate=0.1)
    RepLKNet(**TINY, global_pool="avg")
    with pytest.raises(ValueError, match="need one entry per stage, got 4, 3 and 4"):
        RepLKNet(**dict(TINY, layers=[1, 1, 2]))
    with pytest.raises(ValueError, match="out_indices .* and a classifier head exclude each other"):
        RepLKNet(**TINY, num_classes=NUM_CLASSES, out_indices=(3,))



def test_even_kernel_sizes_are_refused_at_construction():
    """An even large or small kernel was built and failed at the first forward with a tensor-size
    mismatch (k // 2 padding keeps the size for odd k only); now the constructor names it."""
    from lkfast.nn import ReparamLargeKernelConv

    with pytest.raises(ValueError, match=r"RepLKNet: kernel sizes must be odd \(1, 3, 5, ...\), got small_kernel = 4"):
        create_model("replknet_31b", channels=[16, 32, 64, 128], layers=[1, 1, 2, 1], num_classes=10, small_kernel=4)
    with pytest.raises(ValueError, match=r"got large_kernel_sizes\[0\] = 30$"):
        create_model("replknet_31b", channels=[16, 32, 64, 128], layers=[1, 1, 2, 1], num_classes=10,
                     large_kernel_sizes=[30, 29, 27, 13])
    with pytest.raises(ValueError, match=r"got large_kernel_sizes\[1\] = 12, large_kernel_sizes\[3\] = 0"):
        RepLKNet(**dict(TINY, large_kernel_sizes=[13, 12, 7, 0]))
    with pytest.raises(ValueError, match=r"ReparamLargeKernelConv: kernel_size must be an odd kernel size .*got 12"):
        ReparamLargeKernelConv(6, 6, 12, 1, 6, small_kernel=3)
    with pytest.raises(ValueError, match=r"ReparamLargeKernelConv: small_kernel must be an odd kernel size .*got 4"):
        ReparamLargeKernelConv(6, 6, 13, 1, 6, small_kernel=4)
    model = RepLKNet(**dict(TINY, large_kernel_sizes=[13, 11, 7, 5]), num_classes=NUM_CLASSES)  # odd: built
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, NUM_CLASSES)
    for sizes in (30, (7, 7, 8, 7)):  # timm's ConvNeXt, through create_model (the CLI checks --kernel-sizes)
        with pytest.raises(ValueError, match=r"create_model: test_convnext: kernel_sizes must be odd"):
            create_model("test_convnext", kernel_sizes=sizes)
    assert create_model("test_convnext", kernel_sizes=(7, 7, 9, 7))(torch.rand(1, 3, 64, 64)).shape[0] == 1

def _drop_rates(model):
    return [block.drop_path.drop_prob if isinstance(block.drop_path, timm.layers.DropPath) else 0.0
            for stage in model.stages for block in stage.blocks]


def test_drop_path_rises_linearly_over_the_block_pairs_and_is_off_in_eval(images):
    """Stochastic depth as the official code: rate i of torch.linspace(0, drop_path_rate, total
    pairs) for both blocks of pair i, across stages; none at rate 0; eval outputs unchanged."""
    model = RepLKNet(**TINY, num_classes=NUM_CLASSES, drop_path_rate=0.4)  # 5 pairs: 0, 0.1, ..., 0.4
    expected = [0.0, 0.0, 0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.4]
    assert _drop_rates(model) == pytest.approx(expected)
    assert isinstance(model.stages[0].blocks[0].drop_path, torch.nn.Identity)  # rate 0: no module to run
    plain = RepLKNet(**TINY, num_classes=NUM_CLASSES)
    assert _drop_rates(plain) == [0.0] * 10
    state = official_checkpoint(**TINY)
    model.load_state_dict(state)
    plain.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), plain.eval()(images), rtol=0, atol=0)
        model.train()
        torch.manual_seed(0)
        assert not torch.allclose(model(images), plain.train()(images))  # and on in training


def _stage_outputs(model, images):
    """Each stage's output before any stage norm, walked from the stem (independent of forward_features)."""
    x, outs = images, []
    for layer in model.stem:
        x = layer(x)
    for i, stage in enumerate(model.stages):
        for block in stage.blocks:
            x = block(x)
        outs.append(x)
        if i < len(model.transitions):
            x = model.transitions[i](x)
    return outs


def test_backbone_returns_the_stages_asked_for_through_their_norms(images):
    """out_indices: only those stages' maps, each through its own BN with norm_intermediate_features
    (RepLKNet-XL's downstream form); a classifier's forward_intermediates(norm=True) passes the last
    stage alone through the final BN; stop_early returns the last stage asked for as the final map."""
    backbone = RepLKNet(**TINY, num_classes=0, out_indices=(1, 3), norm_intermediate_features=True).eval()
    state = {k: v for k, v in official_checkpoint(**TINY).items() if not k.startswith(("norm.", "head."))}
    g = torch.Generator().manual_seed(3)
    for i, c in ((0, 8), (1, 16), (2, 24), (3, 32)):
        state.update({f"stages.{i}.norm.weight": torch.rand(c, generator=g) + 0.5,
                      f"stages.{i}.norm.bias": torch.randn(c, generator=g),
                      f"stages.{i}.norm.running_mean": torch.randn(c, generator=g),
                      f"stages.{i}.norm.running_var": torch.rand(c, generator=g) + 0.5,
                      f"stages.{i}.norm.num_batches_tracked": torch.tensor(1)})
    backbone.load_state_dict(state, strict=True)
    with torch.no_grad():
        got = backbone(images)
        raw = _stage_outputs(backbone, images)
    assert len(got) == 2
    for out, i in zip(got, (1, 3)):
        _close(out, _bn(raw[i], state, f"stages.{i}.norm."))
    model = RepLKNet(**TINY, num_classes=NUM_CLASSES).eval()
    model.load_state_dict(official_checkpoint(**TINY))
    with torch.no_grad():
        raw = _stage_outputs(model, images)
        maps = model.forward_intermediates(images, norm=True, intermediates_only=True)
        _close(maps[0], raw[0])
        _close(maps[3], model.norm(raw[3]))
        maps = model.forward_intermediates(images, indices=[1, 2], intermediates_only=True)
        assert len(maps) == 2
        _close(maps[0], raw[1])
        _close(maps[1], raw[2])
        final, maps = model.forward_intermediates(images, indices=[1], stop_early=True)
        assert len(maps) == 1 and final is maps[0]
        _close(final, raw[1])
        _close(model.forward_head(raw[3], pre_logits=True), model.norm(raw[3]).mean((2, 3)))  # pooled, no head
    headless = RepLKNet(**TINY, num_classes=0).eval()
    with torch.no_grad():
        assert headless(images).shape == (2, 32) and isinstance(headless.head, torch.nn.Identity)


def test_pruning_keeps_what_the_kept_stages_need(images):
    """prune_intermediate_layers (timm's features_only calls it): the stages after the last index go
    with their transitions, the final BN and the head (the feature width becomes that stage's); with
    every stage kept the final BN stays unless prune_norm, the head unless prune_head."""
    model = RepLKNet(**TINY, num_classes=NUM_CLASSES)
    assert model.prune_intermediate_layers((0, 1, 2, 3), prune_norm=False, prune_head=True) == [0, 1, 2, 3]
    assert isinstance(model.norm, torch.nn.BatchNorm2d) and isinstance(model.head, torch.nn.Identity)
    assert (model.num_classes, model.num_features) == (0, 32)
    model = RepLKNet(**TINY, num_classes=NUM_CLASSES)
    model.prune_intermediate_layers((0, 1, 2, 3), prune_norm=True, prune_head=False)
    assert isinstance(model.norm, torch.nn.Identity) and isinstance(model.head, torch.nn.Linear)
    model = RepLKNet(**TINY, num_classes=NUM_CLASSES).eval()
    assert model.prune_intermediate_layers([1], prune_norm=False, prune_head=False) == [1]
    assert (len(model.stages), len(model.transitions), len(model.feature_info), model.num_stages) == (2, 1, 2, 2)
    assert isinstance(model.norm, torch.nn.Identity) and isinstance(model.head, torch.nn.Identity)
    assert (model.num_classes, model.num_features, model.head_hidden_size) == (0, 16, 16)
    assert not [k for k in model.state_dict() if k.startswith(("stages.2", "transitions.1", "norm.", "head."))]
    with torch.no_grad():
        final, maps = model.forward_intermediates(images)
        assert len(maps) == 2 and final is maps[-1] and final.shape[1] == 16


def test_reset_classifier_builds_a_head_or_none(images):
    """timm's reset_classifier: a Linear head of the new width, or none for 0 (forward then returns
    the pooled features, as with num_classes=0 at construction)."""
    model = RepLKNet(**TINY, num_classes=NUM_CLASSES).eval()
    model.reset_classifier(5)
    assert (model.head.in_features, model.head.out_features, model.num_classes) == (32, 5, 5)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), torch.nn.Identity) and model.num_classes == 0
    with torch.no_grad():
        assert model(images).shape == (2, 32)
    # after pruning took the final BN away (no norm.weight left to read the dtype from), and in bf16
    pruned = RepLKNet(**TINY, num_classes=NUM_CLASSES).to(torch.bfloat16).eval()
    pruned.prune_intermediate_layers([1], prune_norm=True)
    pruned.reset_classifier(5)
    assert (pruned.head.in_features, pruned.head.out_features, pruned.head.weight.dtype) == (16, 5, torch.bfloat16)
    with torch.no_grad():
        assert pruned(images.to(torch.bfloat16)).shape == (2, 5)
    backbone = RepLKNet(**TINY, num_classes=0, out_indices=(1, 3))
    with pytest.raises(ValueError, match=r"backbone \(out_indices=\[1, 3\]\).*no classifier"):
        backbone.reset_classifier(5)


# --- named configurations -------------------------------------------------------------------------

# The configurations of the official factories, create_RepLKNet31B / create_RepLKNet31L /
# create_RepLKNetXL in DingXiaoH/RepLKNet-pytorch replknet.py (ffn_ratio stays at its default 4,
# dw_ratio at 1 except XL; the 22K-pretrained files differ only in num_classes = 21841, the
# maintainers' class count in that repository's issue #3).
OFFICIAL_CONFIGS = {
    "replknet_31b": dict(large_kernel_sizes=[31, 29, 27, 13], layers=[2, 2, 18, 2], channels=[128, 256, 512, 1024],
                         small_kernel=5),
    "replknet_31l": dict(large_kernel_sizes=[31, 29, 27, 13], layers=[2, 2, 18, 2], channels=[192, 384, 768, 1536],
                         small_kernel=5),
    "replknet_xl": dict(large_kernel_sizes=[27, 27, 27, 13], layers=[2, 2, 18, 2], channels=[256, 512, 1024, 2048],
                        small_kernel=None, dw_ratio=1.5),
}

# RepLKNet-31B counted by hand from the official modules (not from lkfast). Keys: a conv-BN pair has
# 6 entries (conv.weight + BN's weight, bias, running_mean, running_var, num_batches_tracked), a
# lone BN 5. A RepLK block: pw1, pw2, lkb_origin, small_conv (4 x 6) + prelkb_bn (5) = 29 (merged:
# lkb_reparam's weight and bias replace lkb_origin and small_conv: 19); a ConvFFN: preffn_bn + pw1 +
# pw2 = 17. 24 (block, ConvFFN) pairs, stem 4 x 6, transitions 3 x 2 x 6, norm 5, head 2.
REPLKNET_31B_KEYS = 24 * (29 + 17) + 24 + 36 + 5 + 2                  # 1171
REPLKNET_31B_MERGED_KEYS = 24 * (19 + 17) + 24 + 36 + 5 + 2           # 931
# Parameters: a pair at width c with kernel k has 10c^2 (1x1 convs: pw1, pw2 c^2 each, the ConvFFN's
# 4c^2 each) + c(k^2 + 5^2) (large and small depthwise) + 22c (BN weight and bias: 2c for each of
# pw1, pw2, lkb_origin, small_conv, prelkb_bn, preffn_bn and the ConvFFN's pw2, 8c for its pw1);
# a transition c -> d: cd + 2d (1x1, BN) + 9d + 2d (3x3 depthwise, BN); the stem 3*128*9 + 128*9 +
# 128^2 + 128*9 + 4 BNs of 256; the final BN 2048; the head 1024*1000 + 1000. The README's "79M".
REPLKNET_31B_PARAMS = (
    sum(n * (10 * c * c + c * (k * k + 25) + 22 * c)
        for n, c, k in [(2, 128, 31), (2, 256, 29), (18, 512, 27), (2, 1024, 13)])
    + sum(c * d + 13 * d for c, d in [(128, 256), (256, 512), (512, 1024)])
    + 3 * 128 * 9 + 128 * 9 + 128 * 128 + 128 * 9 + 4 * 256 + 2048 + 1024 * 1000 + 1000)
# A few rows written out (official shapes: depthwise convs are (C, 1, k, k), 1x1 convs (out, in, 1, 1)).
REPLKNET_31B_ROWS = {
    "stem.0.conv.weight": (128, 3, 3, 3),
    "stem.1.conv.weight": (128, 1, 3, 3),
    "stem.2.conv.weight": (128, 128, 1, 1),
    "stem.3.conv.weight": (128, 1, 3, 3),
    "stages.0.blocks.0.pw1.conv.weight": (128, 128, 1, 1),
    "stages.0.blocks.0.large_kernel.lkb_origin.conv.weight": (128, 1, 31, 31),
    "stages.0.blocks.0.large_kernel.small_conv.conv.weight": (128, 1, 5, 5),
    "stages.0.blocks.0.prelkb_bn.running_var": (128,),
    "stages.0.blocks.1.pw1.conv.weight": (512, 128, 1, 1),
    "stages.0.blocks.1.pw2.conv.weight": (128, 512, 1, 1),
    "stages.1.blocks.2.large_kernel.lkb_origin.conv.weight": (256, 1, 29, 29),
    "stages.2.blocks.34.large_kernel.lkb_origin.conv.weight": (512, 1, 27, 27),
    "stages.2.blocks.35.preffn_bn.weight": (512,),
    "stages.2.blocks.35.pw2.conv.weight": (512, 2048, 1, 1),
    "stages.3.blocks.2.large_kernel.small_conv.bn.num_batches_tracked": (),
    "stages.3.blocks.3.pw1.bn.bias": (4096,),
    "transitions.0.0.conv.weight": (256, 128, 1, 1),
    "transitions.2.1.conv.weight": (1024, 1, 3, 3),
    "norm.weight": (1024,),
    "head.weight": (1000, 1024),
    "head.bias": (1000,),
}


@pytest.mark.parametrize("merged", [False, True], ids=["training-time", "reparameterised"])
@pytest.mark.parametrize("name", sorted(OFFICIAL_CONFIGS))
def test_named_configs_have_the_official_state_dict(name, merged):
    """Full-size models on the meta device (no memory): every key, in order, and every shape the
    official model of that name has, training-time and re-parameterised."""
    with torch.device("meta"):
        model = timm.create_model(name, small_kernel_merged=merged)
    state = model.state_dict()
    expected = official_layout(merged=merged, num_classes=1000, **OFFICIAL_CONFIGS[name])
    assert [(k, tuple(v.shape)) for k, v in state.items()] == expected
    if name == "replknet_31b":
        assert len(state) == (REPLKNET_31B_MERGED_KEYS if merged else REPLKNET_31B_KEYS)
        if not merged:
            assert {k: tuple(state[k].shape) for k in REPLKNET_31B_ROWS} == REPLKNET_31B_ROWS
            assert sum(p.numel() for p in model.parameters()) == REPLKNET_31B_PARAMS


@pytest.mark.parametrize("name, kernels, channels, small, dw_ratio, params_m, size, mean", [
    ("replknet_31b", [31, 29, 27, 13], [128, 256, 512, 1024], 5, 1, 79.9, 224, (0.485, 0.456, 0.406)),
    ("replknet_31b.in22k_ft_in1k_384", [31, 29, 27, 13], [128, 256, 512, 1024], 5, 1, 79.9, 384, (0.485, 0.456, 0.406)),
    ("replknet_31l", [31, 29, 27, 13], [192, 384, 768, 1536], 5, 1, 172.7, 384, (0.485, 0.456, 0.406)),
    ("replknet_xl", [27, 27, 27, 13], [256, 512, 1024, 2048], None, 1.5, 335.4, 320, (0.5, 0.5, 0.5)),
    ("replknet_3b", [3, 3, 3, 3], [128, 256, 512, 1024], None, 1, 71.9, 224, (0.485, 0.456, 0.406)),
])
def test_named_configs_build(name, kernels, channels, small, dw_ratio, params_m, size, mean):
    with torch.device("meta"):  # full size, no memory
        model = timm.create_model(name)
    assert (model.large_kernel_sizes, model.channels, model.layers, model.small_kernel) == (kernels, channels, [2, 2, 18, 2], small)
    assert int(channels[0] * dw_ratio) == model.stages[0].blocks[0].large_kernel.in_channels
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - params_m) < 0.1
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, size, size) and tuple(cfg["mean"]) == mean and cfg["interpolation"] == "bicubic"
    assert cfg["crop_pct"] == (1.0 if size >= 384 else 0.875)


def test_in22k_tags_have_the_22k_head_and_in_chans_is_taken():
    """The 22K-pretrained files' tags build the 21841-class head they hold (the others 1000), and
    timm's in_chans spelling sets the stem's input channels."""
    with torch.device("meta"):
        for name, classes in (("replknet_31b.in22k", 21841), ("replknet_31l.in22k", 21841),
                              ("replknet_31b.in22k_ft_in1k", 1000), ("replknet_xl.megdata73m_ft_in1k", 1000)):
            assert timm.create_model(name).head.out_features == classes, name
    model = timm.create_model("replknet_31b", in_chans=1, num_classes=NUM_CLASSES, **TINY).eval()
    assert model.stem[0].conv.weight.shape == (8, 1, 3, 3)
    assert model(torch.rand(1, 1, 32, 32)).shape == (1, NUM_CLASSES)


def test_small_kernel_none_is_not_dropped():
    """timm.create_model drops keyword arguments that are None: create_model passes None on as 0
    (no small kernel), which timm.create_model also takes directly."""
    arch = dict(TINY, num_classes=NUM_CLASSES)
    arch.pop("small_kernel")
    for name in ("replknet_31b", "replknet_3b"):
        model = create_model(name, small_kernel=None, fast=False, **arch)
        assert model.small_kernel is None, name
        assert not any(hasattr(m, "small_conv") for m in model.modules()), name
    assert create_model("replknet_31b", fast=False, **arch).small_kernel == 5  # the default stays
    assert create_model("replknet_3b", small_kernel=3, fast=False, **arch).small_kernel == 3
    assert timm.create_model("replknet_31b", small_kernel=0, **arch).small_kernel is None
    with pytest.raises(ValueError, match="small_kernel must be a kernel size, or None or 0 for none, got -1"):
        RepLKNet(**dict(TINY, small_kernel=-1))


def test_features_only_gives_each_stage_output(images):
    """timm's features_only wrapper (FeatureGetterNet over forward_intermediates): the stage outputs
    the backbone form (out_indices) returns, with the same weights, and the strides timm reports."""
    features = timm.create_model("replknet_31b", features_only=True, **TINY).eval()
    assert features.feature_info.channels() == [8, 16, 24, 32]
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    backbone = RepLKNet(**TINY, num_classes=0, out_indices=(0, 1, 2, 3)).eval()
    backbone.load_state_dict(features.model.state_dict(), strict=True)  # the head and final BN were pruned
    with torch.no_grad():
        got, expected = features(images), backbone(images)
    assert [tuple(f.shape[1:]) for f in got] == [(8, 16, 16), (16, 8, 8), (24, 4, 4), (32, 2, 2)]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a subset: the stages after the last one asked for are dropped
    two = timm.create_model("replknet_31b", features_only=True, out_indices=(1, -2), **TINY).eval()
    assert two.feature_info.channels() == [16, 24] and len(two.model.stages) == 3
    two.model.load_state_dict({k: v for k, v in features.model.state_dict().items() if k in two.model.state_dict()})
    with torch.no_grad():
        for a, b in zip(two(images), expected[1:3]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the classifier: forward_intermediates' last feature map is what forward_head takes
    model = RepLKNet(**TINY, num_classes=NUM_CLASSES).eval()
    with torch.no_grad():
        final, maps = model.forward_intermediates(images)
        torch.testing.assert_close(model.forward_head(final), model(images), rtol=0, atol=0)
        assert len(maps) == 4 and maps[-1] is final


@pytest.mark.parametrize("merged", [False, True], ids=["training-time", "reparameterised"])
def test_features_only_loads_a_checkpoint(merged, images, tmp_path):
    """create_model(features_only=True, checkpoint=...): the checkpoint fits the plain model, not timm's
    wrapper (its keys gain a "model." prefix and lose the head); the stage outputs are the full model's."""
    path = tmp_path / "official.pth"
    torch.save({"model": official_checkpoint(merged=merged, **TINY)}, path)
    full = create_model("replknet_31b", checkpoint=str(path), num_classes=NUM_CLASSES, **TINY)
    features = create_model("replknet_31b", checkpoint=str(path), num_classes=NUM_CLASSES, features_only=True,
                            out_indices=(1, 3), **TINY)
    assert features.feature_info.channels() == [16, 32]
    with torch.no_grad():
        expected = full.forward_intermediates(images, indices=(1, 3), intermediates_only=True)
        got = features(images)
    assert len(got) == 2
    for a, b in zip(got, expected):
        _close(a, b)
    with pytest.raises(CheckpointError, match="does not fit RepLKNet"):
        create_model("replknet_31b", checkpoint=str(path), features_only=True, **TINY_XL)


def test_features_only_checkpoint_of_a_timm_model_with_more_input_channels(tmp_path):
    """timm's ConvNeXt under FeatureListNet (modules renamed), 5 input channels: the stem is taken as
    the checkpoint has it."""
    plain = timm.create_model("convnext_atto", in_chans=5, num_classes=7)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    torch.save(plain.state_dict(), tmp_path / "convnext.pth")
    features = create_model("convnext_atto", checkpoint=str(tmp_path / "convnext.pth"), in_chans=5, num_classes=7,
                            features_only=True)
    x = torch.randn(1, 5, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = plain.eval().forward_intermediates(x, intermediates_only=True)
        got = features(x)
    assert type(features).__name__ == "FeatureListNet" and len(got) == len(expected) == 4
    for a, b in zip(got, expected):
        _close(a, b)
    # the preprocessing config is the model's, with no second copy of the weights kept in it
    for module in features.modules():
        cfg = getattr(module, "pretrained_cfg", None)
        if cfg is not None:
            assert "state_dict" not in cfg and cfg["first_conv"] == "stem.0" and cfg["input_size"] == (3, 224, 224)


def test_paper_timm_models_are_known():
    for name in ("resnet50", "resnetv2_101x3_bit", "resnetv2_152x4_bit", "vit_base_patch16_224",
                 "vit_large_patch16_224", "convnext_base", "convnext_large", "convnext_tiny"):
        assert timm.is_model(name), name


# --- create_model and checkpoint files ------------------------------------------------------------

def _save(path, obj):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(obj, str(path))
    else:
        torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "module", "state_dict_ema", "module_prefix",
                                  "compiled_ddp", "ddp_of_compiled", "safetensors"])
def test_create_model_reads_checkpoint_wrappings(wrap, tmp_path, images):
    state = official_checkpoint(**TINY)
    obj = {"plain": state, "model": {"model": state, "epoch": 3, "args": argparse.Namespace(lr=1e-3)},
           "state_dict": {"state_dict": state}, "state_dict_ema": {"state_dict_ema": state},
           # RepLKNet-pytorch's fine-tuning loader takes the weights from --model_key model|module
           "module": {"module": state, "epoch": 3},
           "module_prefix": {"model": {"module." + k: v for k, v in state.items()}},
           # torch.compile(DDP(model)) and DDP(torch.compile(model)): the wrappers' prefixes in either order
           "compiled_ddp": {"model": {"_orig_mod.module." + k: v for k, v in state.items()}},
           "ddp_of_compiled": {"model": {"module._orig_mod." + k: v for k, v in state.items()}},
           "safetensors": state}[wrap]
    path = _save(tmp_path / ("ckpt.safetensors" if wrap == "safetensors" else "ckpt.pth"), obj)
    model = create_model("replknet_31b", checkpoint=path, num_classes=NUM_CLASSES, **TINY)
    assert not model.training
    with torch.no_grad():
        _close(model(images), reference_forward(state, images))


def test_create_model_and_timm_load_reparameterised_checkpoint(tmp_path, images):
    state = official_checkpoint(merged=True, **TINY)
    path = _save(tmp_path / "reparam.pth", state)
    expected = reference_forward(state, images)
    model = create_model("replknet_31b", checkpoint=path, num_classes=NUM_CLASSES, **TINY)
    via_timm = timm.create_model("replknet_31b", checkpoint_path=path, num_classes=NUM_CLASSES, **TINY).eval()
    with torch.no_grad():
        _close(model(images), expected)
        _close(via_timm(images), expected)


def test_mismatched_checkpoint_lists_keys_and_shapes(tmp_path):
    state = official_checkpoint(**TINY)
    state.pop("stem.0.conv.weight")
    state["extra.weight"] = torch.zeros(1)
    path = _save(tmp_path / "bad.pth", state)
    with pytest.raises(CheckpointError) as info:
        create_model("replknet_31b", checkpoint=path, num_classes=1000, **TINY)
    message = str(info.value)
    assert "1 missing keys: stem.0.conv.weight" in message
    assert "1 unexpected keys: extra.weight" in message
    assert "2 shape mismatches: head.weight (checkpoint (10, 32), model (1000, 32))" in message
    assert "num_classes=10" in message
    assert "another architecture" not in message  # one key off: not another model's weights


def test_another_architectures_checkpoint_says_so(tmp_path):
    # resnet weights given as convnext's listed the keys only; nothing said what to do
    path = _save(tmp_path / "resnet.pth", timm.create_model("test_resnet").state_dict())
    with pytest.raises(CheckpointError, match=r"does not fit ConvNeXt: .* Only 0 of the model's \d+ keys are in the "
                                              r"checkpoint: it looks like the weights of another architecture") as info:
        create_model("test_convnext", checkpoint=path)
    # the library's words name no command-line option (the eval's once did: a library user has no --models)
    assert str(info.value).endswith("another architecture; build the model the checkpoint was saved from")
    # a caller with other words for it (the eval) replaces that advice and nothing else
    other = info.value.with_advice("architecture", "use --other")
    assert str(other) == str(info.value)[:-len("build the model the checkpoint was saved from")] + "use --other"
    assert isinstance(other, CheckpointError) and other.classes is None
    assert info.value.with_advice("classes", "unused") is info.value  # no advice of that kind: unchanged


def test_a_checkpoint_without_its_classifier_says_so(tmp_path):
    """Weights saved without the head (a feature extractor, a pre-training checkpoint): the error listed
    the two missing keys and said nothing of what they mean or what to do."""
    state = {k: v for k, v in timm.create_model("test_resnet").state_dict().items() if not k.startswith("fc.")}
    path = _save(tmp_path / "headless.pth", state)
    with pytest.raises(CheckpointError) as info:
        create_model("test_resnet", checkpoint=path)
    assert str(info.value) == (f"checkpoint {path!r} does not fit ResNet: 2 missing keys: fc.weight, fc.bias. The "
                               f"checkpoint has no classifier (no fc.* weights): it holds the features alone (saved "
                               f"without the head, or from pre-training); load one saved with its classifier, or "
                               f"build the model with num_classes=0 for its features")
    assert create_model("test_resnet", checkpoint=path, num_classes=0).num_classes == 0  # what it says works
    state.pop("conv1.0.weight")  # more than the head missing: not this case
    with pytest.raises(CheckpointError) as info:
        create_model("test_resnet", checkpoint=_save(tmp_path / "less.pth", state))
    assert "no classifier" not in str(info.value)


def test_checkpoint_error_replaces_its_advice_by_kind():
    error = CheckpointError("bad.", ("classes", " pass num_classes=10."), " Also: ", ("architecture", "build it"),
                            classes=10)
    assert str(error) == "bad. pass num_classes=10. Also: build it" and error.classes == 10
    both = error.with_advice("classes", " ten classes.").with_advice("architecture", "use --models")
    assert str(both) == "bad. ten classes. Also: use --models" and both.classes == 10
    assert str(CheckpointError("plain")) == "plain" and isinstance(CheckpointError("plain"), ValueError)


def test_extract_state_dict_picks_the_plain_weights_and_only_tensors():
    """Plain weights before EMA whichever key comes first in the file; an entry under a wrapper key
    that is no dict (a model name stored as "model") is passed over; non-tensor entries beside flat
    weights are left out; checkpoint_key names an entry or says which keys there are."""
    plain, ema = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    # which of the two is loaded is said (which weights a result is of matters: the eval's user cannot tell)
    with pytest.warns(UserWarning, match="the checkpoint holds both 'model' and 'state_dict_ema' weights: loading "
                                         "'model' \\(checkpoint_key='state_dict_ema' loads the EMA weights"):
        assert models.extract_state_dict({"model_ema": ema, "state_dict_ema": ema, "model": plain})["w"] is plain["w"]
    with pytest.warns(UserWarning, match="both 'state_dict' and 'state_dict_ema'"):
        assert models.extract_state_dict({"state_dict_ema": ema, "state_dict": plain})["w"] is plain["w"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one kind of weights, or the EMA named: nothing to say
        assert models.extract_state_dict({"state_dict_ema": ema})["w"] is ema["w"]
        assert models.extract_state_dict({"state_dict_ema": ema, "state_dict": plain},
                                         checkpoint_key="state_dict_ema")["w"] is ema["w"]
    assert models.extract_state_dict({"model": "replknet_31b", "state_dict": plain})["w"] is plain["w"]
    assert list(models.extract_state_dict({"w": plain["w"], "epoch": 3, "arch": "x"})) == ["w"]
    assert models.extract_state_dict({"model": plain, "ema": ema}, checkpoint_key="ema")["w"] is ema["w"]
    with pytest.raises(CheckpointError, match=r"checkpoint has no key 'emma'; its top-level keys: \['ema', 'model'\]"):
        models.extract_state_dict({"model": plain, "ema": ema}, checkpoint_key="emma")
    with pytest.raises(CheckpointError, match=r"no tensors found in the checkpoint \(top-level keys: \['epoch'\]\); name"):
        models.extract_state_dict({"epoch": 3})


def test_a_mismatch_lists_five_keys_of_each_kind_then_dots(tmp_path):
    """Up to five keys of each kind are listed, '...' only when there are more; the 'another
    architecture' hint starts below half of the model's keys in the checkpoint."""
    def backbone():  # no final BN and head: an even number of keys, so that half of them is a count
        return RepLKNet(**TINY, num_classes=0, out_indices=(3,))

    keys = list(backbone().state_dict())
    assert len(keys) % 2 == 0
    full = {k: v for k, v in official_checkpoint(**TINY).items() if k in keys}

    def message(state):
        with pytest.raises(CheckpointError) as info:
            models.load_checkpoint(backbone(), _save(tmp_path / "c.pth", state))
        return str(info.value)

    five = message({k: v for k, v in full.items() if k not in keys[:5]})
    assert f"5 missing keys: {', '.join(keys[:5])};" not in five  # (the last kind ends with '.')
    assert f"5 missing keys: {', '.join(keys[:5])}." in five
    six = message({k: v for k, v in full.items() if k not in keys[:6]})
    assert f"6 missing keys: {', '.join(keys[:5])}, ...." in six
    half = len(keys) // 2
    assert "another architecture" not in message({k: full[k] for k in keys[:half]})
    assert f"Only {half - 1} of the model's {len(keys)} keys are in the checkpoint" in \
        message({k: full[k] for k in keys[:half - 1]})


def test_a_checkpoint_with_the_models_names_and_other_shapes_is_not_adapted(tmp_path):
    """timm's checkpoint_filter_fn adapts original checkpoints (ViT's resamples pos_embed to the
    model's image size): a file with the model's own key names but other shapes is refused as a
    mismatch instead of being silently resized into a model of another size."""
    path = _save(tmp_path / "vit32.pth", timm.create_model("test_vit", img_size=32).state_dict())
    with pytest.raises(CheckpointError, match=r"1 shape mismatches: pos_embed \(checkpoint \(1, 5, 64\), model \(1, 17, 64\)\)"):
        create_model("test_vit", checkpoint=path, img_size=64, fast=False)


def test_read_checkpoint_missing_file_and_create_model_arguments(tmp_path):
    """A missing checkpoint is FileNotFoundError naming it; checkpoint and pretrained together are
    refused; an error building a model (not fetching weights) is not reworded as a download failure;
    a RepLKNet name with a pretrained tag builds with that tag's config."""
    with pytest.raises(FileNotFoundError, match=r"^checkpoint not found: '.*nope\.pth'$"):
        models.read_checkpoint(str(tmp_path / "nope.pth"))
    state = _save(tmp_path / "w.pth", official_checkpoint(**TINY))
    with pytest.raises(ValueError, match="either checkpoint=PATH or pretrained=True, not both"):
        create_model("replknet_31b", checkpoint=state, pretrained=True, num_classes=NUM_CLASSES, **TINY)
    with pytest.raises(TypeError, match="no_such_argument"):
        create_model("replknet_31b", no_such_argument=1, **TINY)
    model = create_model("replknet_31b.in22k_ft_in1k_384", checkpoint=state, num_classes=NUM_CLASSES, **TINY)
    assert model.pretrained_cfg["input_size"] == (3, 384, 384)


@pytest.mark.skipif(not pathlib.Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
@pytest.mark.parametrize("trust", [False, True])
def test_a_zip_checkpoint_is_mapped_in_either_trust_mode(tmp_path, trust):
    """read_checkpoint maps a torch.save zip archive (the file is in this process's memory maps
    while its tensors live) with or without trust_checkpoint; a legacy pickle cannot be mapped.
    (test_a_zip_checkpoint_is_mapped_not_copied_into_memory measures what mapping saves.)"""
    zipped, legacy = tmp_path / f"zip{trust}.pth", tmp_path / f"legacy{trust}.pth"
    torch.save({"w": torch.ones(1024)}, zipped)
    torch.save({"w": torch.ones(1024)}, legacy, _use_new_zipfile_serialization=False)
    for path, mapped in ((zipped, True), (legacy, False)):
        state = models.read_checkpoint(str(path), trust_checkpoint=trust)
        assert (str(path) in pathlib.Path("/proc/self/maps").read_text()) is mapped, path
        assert torch.equal(state["w"], torch.ones(1024))
        del state


def test_untrusted_pickle_is_refused_unless_opted_in(tmp_path, images):
    state = official_checkpoint(**TINY)
    path = _save(tmp_path / "pickled.pth", {"model": state, "where": pathlib.PurePosixPath("/x")})
    refused = (r"^refusing to unpickle .*\(Unsupported global: GLOBAL pathlib\.PurePosixPath was not an allowed "
               r"global by default\.\)\..*trust_checkpoint=True")
    with pytest.raises(CheckpointError, match=refused):
        create_model("replknet_31b", checkpoint=path, num_classes=NUM_CLASSES, **TINY)
    model = create_model("replknet_31b", checkpoint=path, num_classes=NUM_CLASSES, trust_checkpoint=True, **TINY)
    with torch.no_grad():
        _close(model(images), reference_forward(state, images))


@pytest.mark.parametrize("where", ["__main__", "module"])
def test_a_trusted_pickle_of_a_class_not_importable_here_says_to_save_a_state_dict(tmp_path, monkeypatch, where):
    """{"model": weights, "args": Args()} saved by a training script: trusted, unpickling imports Args,
    and where it cannot (defined in that script, so pickled as __main__.Args; a module not on this
    path) that was a traceback (AttributeError / ModuleNotFoundError). It is one error naming it."""
    import sys

    if where == "__main__":
        Args = type("Args", (), {})
        Args.__module__ = "__main__"
        monkeypatch.setattr(sys.modules["__main__"], "Args", Args, raising=False)
    else:
        (tmp_path / "trainer_config.py").write_text("class Args:\n    pass\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        import trainer_config

        Args = trainer_config.Args
    path = _save(tmp_path / "run.pth", {"model": official_checkpoint(**TINY), "args": Args()})
    monkeypatch.undo()  # Args is no longer importable
    sys.modules.pop("trainer_config", None)
    missing = r"class Args of __main__ \(a class of the script that saved it\), which this Python cannot import " \
        r"\(AttributeError: Can't get attribute 'Args' on <module '[\w.]*__main__'" if where == "__main__" else \
        r"module trainer_config, which this Python cannot import \(ModuleNotFoundError: No module named 'trainer_config'"
    with pytest.raises(CheckpointError, match=rf"^{re.escape(repr(path))} cannot be unpickled here: it holds an object "
                                              rf"of {missing}.*\)\. Save a plain state_dict \(torch\.save\(model\."
                                              r"state_dict\(\), path\)\)"):
        create_model("replknet_31b", checkpoint=path, num_classes=NUM_CLASSES, trust_checkpoint=True, **TINY)


@pytest.mark.parametrize("trust", [False, True])
def test_a_file_that_is_no_checkpoint_is_called_that(tmp_path, trust):
    """Not the "refusing to unpickle ... pass trust_checkpoint=True" advice, which cannot help here."""
    page = tmp_path / "RepLKNet-31B_ImageNet-1K_224.pth"  # what a Google Drive link can hand over instead
    page.write_bytes(b"<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head></html>")
    with pytest.raises(CheckpointError) as info:
        create_model("replknet_31b", checkpoint=str(page), trust_checkpoint=trust, num_classes=NUM_CLASSES, **TINY)
    message = str(info.value)
    assert message.startswith(f"{str(page)!r} is not a readable checkpoint: it is corrupt, truncated or another kind")
    assert "b'<!DOCTYPE html><html><head><titl'" in message and "It is an HTML page, not weights" in message
    assert "trust_checkpoint" not in message and "refusing" not in message
    assert "(neither the zip archive torch.save writes nor a pickle)" in message
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"its first bytes: b''\. The file is empty\.$"):
        models.read_checkpoint(str(empty), trust_checkpoint=trust)
    # bytes that start like a pickle but are none, and a torch.save zip archive cut short
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"\x80\x02garbage")
    whole = tmp_path / "whole.pth"
    torch.save(official_checkpoint(**TINY), whole)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[:-1000])
    for path, reason in ((broken, "unpickling: "), (cut, "PytorchStreamReader failed reading zip archive")):
        expected = f"^{str(path)!r} is not a readable checkpoint: .*\\({reason}"
        with pytest.raises(CheckpointError, match=expected) as info:
            models.read_checkpoint(str(path), trust_checkpoint=trust)
        assert "trust_checkpoint" not in str(info.value) and "Download or save it again" in str(info.value)
    garbage = tmp_path / "w.safetensors"
    garbage.write_bytes(b"<html>")
    with pytest.raises(CheckpointError, match=r"is not a readable checkpoint: .*\(safetensors: .*It is an HTML page"):
        models.read_checkpoint(str(garbage))


@pytest.mark.parametrize("trust", [False, True])
def test_every_prefix_of_a_checkpoint_is_called_a_damaged_checkpoint(tmp_path, trust):
    """A checkpoint cut short anywhere (a partial download or copy) is a CheckpointError naming the
    file, never torch's bare error: a legacy pickle read weights-only raised struct.error ('unpack
    requires a buffer of 4 bytes') or IndexError ('index out of range') at some cuts, a zip archive
    of 4-64 KiB OSError ('[Errno 22] Invalid argument', torch's zip reader seeking before the start)."""
    whole = {"model": {"a.weight": torch.ones(8, 8), "b": torch.zeros(3)}, "epoch": 3}
    legacy, zipped = tmp_path / "legacy.pth", tmp_path / "zip.pth"
    torch.save(whole, legacy, _use_new_zipfile_serialization=False)
    torch.save({"w": torch.ones(1000)}, zipped)  # 5 KiB
    cut = tmp_path / "cut.pth"
    for source, step in ((legacy, 1), (zipped, 7)):
        data = source.read_bytes()
        for end in [*range(0, len(data), step), len(data) - 1]:
            cut.write_bytes(data[:end])
            with pytest.raises(CheckpointError) as info:  # (a legacy pickle cut inside a global's name, e.g.
                models.read_checkpoint(str(cut), trust_checkpoint=trust)  # 'collections.Ord', is refused unread)
            assert repr(str(cut)) in str(info.value) and ("is not a readable checkpoint" in str(info.value)
                                                          or str(info.value).startswith("refusing to unpickle"))


@pytest.mark.parametrize("trust", [False, True])
def test_a_checkpoint_damaged_inside_its_zip_archive_is_refused(tmp_path, trust):
    """Bytes of a tensor damaged after torch.save wrote them (a bad disk, a broken copy) loaded with no
    error and wrong weights (torch.load reads the archive without its CRC-32s): refused, naming the
    record; the intact file loads."""
    import zipfile

    path = tmp_path / "w.pth"
    torch.save(official_checkpoint(**TINY), path)
    assert set(models.read_checkpoint(str(path), trust_checkpoint=trust)) == set(official_checkpoint(**TINY))
    with zipfile.ZipFile(path) as archive:
        record = max((info for info in archive.infolist() if "/data/" in info.filename),
                     key=lambda info: info.file_size)  # the largest tensor's bytes
        start = record.header_offset + 30 + len(record.filename.encode()) + len(record.extra)
    data = bytearray(path.read_bytes())
    assert data[start - 30 - len(record.filename.encode()) - len(record.extra):][:4] == b"PK\x03\x04"
    middle = start + record.compress_size // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(repr(str(damaged)))} is not a readable checkpoint: .*"
                                              rf"\(the zip archive's check: Bad CRC-32 for file '{re.escape(record.filename)}'"
                                              r"; the file was damaged after it was written\).*Download or save it again"):
        models.read_checkpoint(str(damaged), trust_checkpoint=trust)


def test_a_folder_or_a_whole_pickled_model_as_the_checkpoint(tmp_path, images):
    """A folder (a training run's) was 'checkpoint not found'; a whole model saved with torch.save(model)
    and read with trust_checkpoint=True, as the refusal advises, was a dead end ('expected a checkpoint
    holding a dict of tensors, found RepLKNet'): its state_dict loads, at the top or under 'model'."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"^checkpoint '.*run' is a folder, not a weights file: pass the file "
                                              r"itself \(it holds last\.pth\)$"):
        create_model("replknet_31b", checkpoint=str(run), num_classes=NUM_CLASSES, **TINY)
    source = create_model("replknet_31b", num_classes=NUM_CLASSES, **TINY)
    with torch.no_grad():
        expected = source(images)
    for saved in (source, {"model": source, "epoch": 3}):
        path = tmp_path / "whole.pth"
        torch.save(saved, path)
        with pytest.raises(CheckpointError, match="refusing to unpickle .*trust_checkpoint=True"):
            create_model("replknet_31b", checkpoint=str(path), num_classes=NUM_CLASSES, **TINY)
        model = create_model("replknet_31b", checkpoint=str(path), trust_checkpoint=True, num_classes=NUM_CLASSES,
                             **TINY)
        with torch.no_grad():
            _close(model(images), expected)


_RSS_ANON = """
import sys, torch
from lkfast.models import read_checkpoint

def anon_mib():
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("RssAnon:")).split()[1]) / 1024

before = anon_mib()
state = read_checkpoint(sys.argv[1])
total = float(state["w"].sum())
print(anon_mib() - before, total)
state["w"].add_(1.0)  # a write goes to this process's copy of the page, never to the file
"""


@pytest.mark.skipif(not pathlib.Path("/proc/self/status").exists(), reason="reads RssAnon from /proc (Linux)")
def test_a_zip_checkpoint_is_mapped_not_copied_into_memory(tmp_path):
    """A torch.save zip archive is read with mmap: its 128 MiB of weights, read whole, add (almost)
    nothing to the process's anonymous memory, so loading them into a model holds them once, not
    twice; a legacy pickle (which cannot be mapped) adds all of it: the measurement's control. An
    in-place write to a loaded tensor leaves the file as it was (copy-on-write)."""
    import subprocess
    import sys

    weights = {"w": torch.ones(32, 1024, 1024)}  # 128 MiB
    zipped, legacy = tmp_path / "zip.pth", tmp_path / "legacy.pth"
    torch.save(weights, zipped)
    torch.save(weights, legacy, _use_new_zipfile_serialization=False)
    grown = {}
    for path in (zipped, legacy):
        run = subprocess.run([sys.executable, "-c", _RSS_ANON, str(path)], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        grown[path.name], total = map(float, run.stdout.split())
        assert total == 32 * 1024 * 1024
    assert grown["legacy.pth"] >= 120 and grown["zip.pth"] < 16, grown
    assert torch.equal(models.read_checkpoint(str(zipped))["w"], weights["w"])


def test_pretrained_offline_and_replknet_pretrained_say_to_pass_a_checkpoint(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="checkpoint="):
        create_model("resnet10t", pretrained=True)
    with pytest.raises(ValueError, match="RepLKNet-31B_ImageNet-22K-to-1K_224.pth"):
        create_model("replknet_31b", pretrained=True)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("no_such_model")


def test_create_model_patches_timm_convnext_with_large_kernels(images):
    arch = dict(kernel_sizes=31, num_classes=NUM_CLASSES, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), ls_init_value=1.0)
    fast = create_model("convnext_tiny", **arch)
    plain = create_model("convnext_tiny", fast=False, **arch)
    plain.load_state_dict(fast.state_dict())
    assert sum(isinstance(m, DepthwiseConv2d) for m in fast.modules()) == 4
    assert not any(isinstance(m, DepthwiseConv2d) for m in plain.modules())
    with torch.no_grad():
        _close(fast(images), plain(images))


# --- ConvNeXt from facebookresearch/ConvNeXt's own checkpoint files --------------------------------

def _fb_convnext_checkpoint(depths, dims, num_classes, seed=0):
    """A random state_dict with the key names and shapes of facebookresearch/ConvNeXt models/convnext.py
    (downsample_layers: stem conv 4x4/4 + channels-first LayerNorm, then LayerNorm + conv 2x2/2;
    stages.i.j: dwconv 7x7, norm, pwconv1/pwconv2 as nn.Linear, gamma; norm; head), the layout of the
    files that repository releases ({"model": state_dict})."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"downsample_layers.0.0.weight": (dims[0], 3, 4, 4), "downsample_layers.0.0.bias": (dims[0],),
              "downsample_layers.0.1.weight": (dims[0],), "downsample_layers.0.1.bias": (dims[0],)}
    for i in range(1, 4):
        shapes.update({f"downsample_layers.{i}.0.weight": (dims[i - 1],),
                       f"downsample_layers.{i}.0.bias": (dims[i - 1],),
                       f"downsample_layers.{i}.1.weight": (dims[i], dims[i - 1], 2, 2),
                       f"downsample_layers.{i}.1.bias": (dims[i],)})
    for i, (depth, d) in enumerate(zip(depths, dims)):
        for j in range(depth):
            p = f"stages.{i}.{j}."
            shapes.update({p + "gamma": (d,), p + "dwconv.weight": (d, 1, 7, 7), p + "dwconv.bias": (d,),
                           p + "norm.weight": (d,), p + "norm.bias": (d,), p + "pwconv1.weight": (4 * d, d),
                           p + "pwconv1.bias": (4 * d,), p + "pwconv2.weight": (d, 4 * d), p + "pwconv2.bias": (d,)})
    shapes.update({"norm.weight": (dims[-1],), "norm.bias": (dims[-1],), "head.weight": (num_classes, dims[-1]),
                   "head.bias": (num_classes,)})
    state = {}
    for key, shape in shapes.items():
        if key.endswith("norm.weight") or key.endswith("gamma") or (key.startswith("downsample_layers") and
                                                                    len(shape) == 1 and key.endswith("weight")):
            state[key] = 0.5 + torch.rand(shape, generator=g)
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
            state[key] = torch.randn(shape, generator=g) / fan_in ** 0.5
    return state


def _fb_convnext_forward(sd, x):
    """facebookresearch/ConvNeXt's forward, walking its key names with plain F ops."""
    def channels_first_norm(x, p):
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], sd[p + "weight"], sd[p + "bias"], 1e-6)
        return x.permute(0, 3, 1, 2)

    for i in range(4):
        if i == 0:
            x = F.conv2d(x, sd["downsample_layers.0.0.weight"], sd["downsample_layers.0.0.bias"], 4)
            x = channels_first_norm(x, "downsample_layers.0.1.")
        else:
            x = F.conv2d(channels_first_norm(x, f"downsample_layers.{i}.0."), sd[f"downsample_layers.{i}.1.weight"],
                         sd[f"downsample_layers.{i}.1.bias"], 2)
        j = 0
        while f"stages.{i}.{j}.gamma" in sd:
            p = f"stages.{i}.{j}."
            y = F.conv2d(x, sd[p + "dwconv.weight"], sd[p + "dwconv.bias"], 1, 3, 1, x.shape[1]).permute(0, 2, 3, 1)
            y = F.layer_norm(y, y.shape[-1:], sd[p + "norm.weight"], sd[p + "norm.bias"], 1e-6)
            y = F.gelu(F.linear(y, sd[p + "pwconv1.weight"], sd[p + "pwconv1.bias"]))
            y = F.linear(y, sd[p + "pwconv2.weight"], sd[p + "pwconv2.bias"])
            x = x + (sd[p + "gamma"] * y).permute(0, 3, 1, 2)
            j += 1
    x = F.layer_norm(x.mean((-2, -1)), x.shape[1:2], sd["norm.weight"], sd["norm.bias"], 1e-6)
    return F.linear(x, sd["head.weight"], sd["head.bias"])


def test_convnext_loads_the_official_facebookresearch_checkpoint_layout(tmp_path, images):
    """The ConvNeXt authors' files (dl.fbaipublicfiles.com/convnext/*.pth) use their own key names;
    timm renames them for its ConvNeXt (timm's checkpoint_filter_fn), and so must create_model."""
    depths, dims = (1, 2, 1, 1), (8, 16, 24, 32)
    state = _fb_convnext_checkpoint(depths, dims, NUM_CLASSES)
    path = _save(tmp_path / "convnext_fb.pth", {"model": state, "epoch": 299})
    arch = dict(depths=depths, dims=dims, num_classes=NUM_CLASSES)
    model = create_model("convnext_tiny", checkpoint=path, **arch)
    with torch.no_grad():
        expected = _fb_convnext_forward(state, images)
        _close(model(images), expected)
        features = create_model("convnext_tiny", checkpoint=path, features_only=True, out_indices=(3,), **arch)
        _close(features(images)[0], model.forward_intermediates(images, indices=(3,), intermediates_only=True)[0])
    # a checkpoint that fits neither layout still names the file's own keys
    state.pop("stages.0.0.gamma")
    bad = _save(tmp_path / "convnext_bad.pth", {"model": state})
    with pytest.raises(CheckpointError, match=r"does not fit ConvNeXt: .*unexpected keys: downsample_layers"):
        create_model("convnext_tiny", checkpoint=bad, **arch)
