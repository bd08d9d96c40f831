"""lkfast.analysis: occlusion (exact drop counts, salient/non-salient on hand-made maps, DINO
attention), lesion (what is removed, restoration), frequency sweep, kernel attention distance on
hand-made kernels, feature variance (hooks), figures, bad input."""
import math

import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm")

from lkfast.analysis import (blocks_removed, channel_distances, dino_attention, dino_saliency, drop_masks,  # noqa: E402
                             feature_map_variance, frequency_sweep, kernel_attention_distance, lesion_candidates,
                             lesion_sweep, mask_saliency, occlude, occlusion_sweep, random_patch_mask,
                             residual_blocks, saliency_patch_mask)
from lkfast.analysis import plots  # noqa: E402
from lkfast.models import RepLKNet  # noqa: E402
from lkfast.ops import frequency_noise  # noqa: E402
from nets import register_fixed_size_vit, trained_like_replknet  # noqa: E402

CLASSES = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
TINY = dict(large_kernel_sizes=[7, 5, 5, 3], layers=[1, 1, 3, 1], channels=[8, 8, 8, 8], small_kernel=3,
            num_classes=CLASSES)


def tiny_replknet(**kwargs):
    return trained_like_replknet(dict(TINY, **kwargs), bn_weight=True)


def batch(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


# --- occlusion ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("tenths", range(11))
def test_random_drop_removes_the_papers_count(tenths):
    # the paper's script drops drop_count * 196 // 10 patches at ratio drop_count / 10 (19 at 10%; 20 rounded)
    mask = random_patch_mask(3, (14, 14), tenths / 10, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (3, 14, 14)
    assert mask.flatten(1).sum(1).tolist() == [tenths * 196 // 10] * 3


def test_occlusion_ratios_are_the_papers():
    """Fig. 4: "information loss ratios, ranging from 10% to 90%" (the paper, Sec. 4.1), in steps of 10%;
    the sweep's default ratios are these nine (without 0.9 the most extreme occlusion went missing)."""
    from lkfast.analysis import RATIOS

    assert RATIOS == pytest.approx(tuple(i / 10 for i in range(1, 10)))


def test_int_seeds_draw_as_a_cpu_generator_seeded_once_per_call():
    """generator=0 (an int seed, as lkfast.corrupt takes it) failed in the occlusion and frequency
    functions ("object of type 'int' has no len()"); it is one generator per call, so the modes, ratios
    and bands of a call continue one stream, as with a torch.Generator passed in."""
    from lkfast.analysis.frequency import frequency_outcomes
    from lkfast.analysis.occlusion import occlusion_outcomes

    assert torch.equal(random_patch_mask(3, (14, 14), 0.3, generator=5),
                       random_patch_mask(3, (14, 14), 0.3, generator=torch.Generator().manual_seed(5)))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 5)).eval()
    x, y = torch.rand(6, 3, 32, 32), torch.randint(0, 5, (6,))
    for run in (lambda g: occlusion_outcomes(model, x, y, ratios=(0.3, 0.6), modes=("random",), patch_size=8,
                                             generator=g)["correct"],
                lambda g: frequency_outcomes(model, x, y, frequencies=(0.5, 2.0), eps=1.0, generator=g)["correct"]):
        with torch.no_grad():
            assert torch.equal(run(7), run(torch.Generator().manual_seed(7)))
    with pytest.raises(ValueError, match="generator must be a torch.Generator, an int seed"):
        random_patch_mask(3, (14, 14), 0.3, generator="5")


def test_occlude_zeroes_exactly_the_marked_patches():
    x = torch.rand(2, 3, 32, 48) + 0.01
    mask = torch.zeros(2, 2, 3, dtype=torch.bool)
    mask[0, 1, 2] = True
    mask[1, 0, 0] = True
    out = occlude(x, mask, 16)
    assert (out[0, :, 16:, 32:] == 0).all() and (out[1, :, :16, :16] == 0).all()
    assert int((out == 0).sum()) == 2 * 3 * 16 * 16
    assert torch.equal(out[0, :, :16], x[0, :, :16])


def test_salient_and_non_salient_pick_the_right_patches():
    # a 2x3 map with known shares; salient drops the top K of the mass, non-salient the bottom K
    attention = torch.tensor([[0.05, 0.30, 0.10], [0.40, 0.00, 0.15]])[None]
    def dropped(ratio, mode):
        return sorted(tuple(i) for i in saliency_patch_mask(attention, ratio, mode)[0].nonzero().tolist())
    assert dropped(0.4, "salient") == [(1, 0)]
    assert dropped(0.7, "salient") == [(0, 1), (1, 0)]
    assert dropped(0.3, "non_salient") == [(0, 0), (0, 2), (1, 1), (1, 2)]
    assert dropped(0.1, "non_salient") == [(0, 0), (1, 1)]
    assert dropped(0.0, "salient") == [] and len(dropped(1.0, "non_salient")) == 6
    # scale does not matter (normalised), order does
    torch.testing.assert_close(saliency_patch_mask(attention * 7, 0.7, "salient"), saliency_patch_mask(attention, 0.7, "salient"))


def test_ground_truth_masks_drop_foreground_or_background():
    masks = torch.zeros(1, 32, 32)
    masks[0, :16, :16] = 1  # foreground = top-left patch (of 2x2), half of the top-right one
    masks[0, :8, 16:] = 1
    saliency = mask_saliency(masks, 16)
    torch.testing.assert_close(saliency, torch.tensor([[[1.0, 0.5], [0.0, 0.0]]]))
    x = torch.rand(1, 3, 32, 32)
    salient = drop_masks(x, 0.6, "salient", saliency, from_masks=True, patch_size=16)
    background = drop_masks(x, 0.8, "non_salient", saliency, from_masks=True, patch_size=16)
    assert salient[0].tolist() == [[True, False], [False, False]]
    assert background[0].tolist() == [[False, False], [True, True]]  # 2 of 2.5 background shares


def test_masks_without_foreground_or_background_drop_nothing_of_that_kind():
    # image 0: the usual mask; image 1: no foreground; image 2: all foreground. One such image used to
    # stop the whole batch (a ValueError); it now keeps the patches of the kind it lacks
    masks = torch.zeros(3, 32, 32)
    masks[0, :16, :16] = 1
    masks[2] = 1
    saliency = mask_saliency(masks, 16)
    x = torch.rand(3, 3, 32, 32)
    salient = drop_masks(x, 0.5, "salient", saliency, from_masks=True, patch_size=16)
    background = drop_masks(x, 0.5, "non_salient", saliency, from_masks=True, patch_size=16)
    assert salient.flatten(1).sum(1).tolist() == [1, 0, 2]  # image 1 has no foreground to drop
    assert background.flatten(1).sum(1).tolist() == [2, 2, 0]  # image 2 has no background to drop
    assert salient[0].tolist() == [[True, False], [False, False]]
    assert saliency_patch_mask(torch.zeros(1, 2, 2), 1.0, "non_salient").sum() == 0
    with pytest.raises(ValueError, match="non-negative"):
        saliency_patch_mask(-torch.ones(1, 2, 2), 0.5, "salient")
    # through the sweep: image 1 keeps its clean prediction under every salient drop
    model = tiny_replknet()
    y = torch.tensor([0, 1, 2])
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    for ratio in (0.5, 1.0):
        result = occlusion_sweep(model, [(x[1:2], y[1:2], masks[1:2])], ratios=(ratio,), modes=("salient",),
                                 saliency="masks", patch_size=16)
        assert result["dropped_fraction"]["salient"] == [0.0]
        assert result["top1"]["salient"] == [100.0 * int(clean[1])]


def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, embed_dim=32, num_heads=2,
                             num_classes=CLASSES).eval()


def test_dino_attention_matches_the_attention_weights():
    vit = tiny_vit()
    x = torch.rand(2, 3, 64, 64)
    got = dino_attention(vit, x)
    assert got.shape == (2, 4, 4)
    captured = {}
    attn = vit.blocks[-1].attn
    attn.fused_attn = False  # timm's explicit path applies attn_drop to the softmax weights
    handle = attn.attn_drop.register_forward_hook(lambda m, a, out: captured.__setitem__("w", out))
    mean, std = torch.tensor(vit.pretrained_cfg["mean"]), torch.tensor(vit.pretrained_cfg["std"])
    with torch.no_grad():
        vit((x - mean[:, None, None]) / std[:, None, None])
    handle.remove()
    expected = captured["w"][:, :, 0, 1:].mean(1).reshape(2, 4, 4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # one head: the authors' script takes head 1 (LKRobust occlusion_invariance/evaluate.py), the
    # saliency the eval uses
    head_1 = captured["w"][:, 1, 0, 1:].reshape(2, 4, 4)
    assert not torch.allclose(head_1, expected, atol=1e-4)
    torch.testing.assert_close(dino_attention(vit, x, head=1), head_1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dino_saliency(vit)(x), head_1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dino_saliency(vit, head=None)(x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="head 2 of a ViT with 2 heads"):
        dino_attention(vit, x, head=2)


def test_dino_attention_keeps_no_graph_and_load_dino_refuses_a_random_vit():
    """The attention recomputed from the captured tokens ran with gradients: the map came back with a
    grad_fn, holding the qkv weights' graph per batch. load_dino(None) without pretrained returned a
    randomly initialised ViT whose "salient" patches are noise."""
    from lkfast.analysis import load_dino

    vit = tiny_vit()
    x = torch.rand(2, 3, 64, 64)
    for got in (dino_attention(vit, x), dino_attention(vit, x, head=1), dino_saliency(vit)(x)):
        assert not got.requires_grad and got.grad_fn is None
    assert all(p.grad is None for p in vit.parameters())
    for checkpoint in (None, ""):
        with pytest.raises(ValueError, match="load_dino: no checkpoint and pretrained=False would give a randomly "
                                             "initialised"):
            load_dino(checkpoint)


def test_load_dino_takes_any_size_on_the_occlusion_grid(tmp_path, monkeypatch):
    """DINO ViT-S/16 is built for 224 px and the eval fed it the evaluated model's size (160 px: timm
    refused it). load_dino's ViT takes any multiple of 16 px, its map one value per 16-px patch the
    occlusion drops; at the size it was built for the map is the fixed-size ViT's, bit for bit. A small
    timm ViT built for 160 px stands in for DINO."""
    from lkfast.analysis import load_dino, occlusion

    monkeypatch.setattr(occlusion, "DINO_MODEL", register_fixed_size_vit())
    torch.manual_seed(0)
    fixed = timm.create_model(occlusion.DINO_MODEL).eval()
    path = tmp_path / "dino.pth"
    torch.save(fixed.state_dict(), path)
    dino = load_dino(str(path))
    x = torch.rand(2, 3, 160, 160)
    assert torch.equal(dino_attention(dino, x), dino_attention(fixed, x))
    assert torch.equal(dino_saliency(dino)(x), dino_saliency(fixed)(x))
    for height, width in ((64, 64), (96, 224), (224, 224)):
        x = torch.rand(2, 3, height, width)
        saliency = dino_saliency(dino)(x)
        assert saliency.shape == (2, height // 16, width // 16)
        assert drop_masks(x, 0.5, "salient", saliency).any()
    with pytest.raises(ValueError, match=r"built for 160x160 images and takes no other size; these are 64x64: "
                                         r"build it with dynamic_img_size=True"):
        dino_attention(fixed, torch.rand(1, 3, 64, 64))


def test_occlusion_sweep_with_masks_and_attention():
    model = tiny_replknet()
    x, y = batch(4, 32)
    masks = torch.zeros(4, 32, 32)
    masks[:, 4:20, 4:28] = 1
    result = occlusion_sweep(model, [(x, y, masks)], ratios=(0.25, 0.75), saliency="masks", patch_size=16)
    assert result["dropped_fraction"]["random"] == [0.25, 0.75]
    assert set(result["top1"]) == {"random", "salient", "non_salient"} and result["images"] == 4
    with torch.no_grad():
        mask = drop_masks(x, 0.75, "salient", mask_saliency(masks, 16), from_masks=True, patch_size=16)
        expected = 100.0 * float((model(occlude(x, mask, 16)).argmax(1) == y).float().mean())
    assert result["top1"]["salient"][1] == pytest.approx(expected)
    vit = tiny_vit()
    result = occlusion_sweep(model, [(torch.rand(2, 3, 64, 64), y[:2])], ratios=(0.5,), saliency=dino_saliency(vit))
    assert result["grid"] == [4, 4] and result["saliency"] == "function"


@pytest.mark.parametrize("kwargs, message", [
    (dict(ratios=(1.5,)), r"\[0, 1\]"),
    (dict(ratios=(-0.1,)), r"\[0, 1\]"),
    (dict(modes=("salient",)), "saliency"),
    (dict(modes=("sideways",)), "unknown modes"),
    (dict(patch_size=7), "multiple"),
    (dict(patch_size=0), "patch_size is the side of a square patch in pixels, an integer >= 1, got 0"),
    (dict(patch_size=16.0), "patch_size is the side of a square patch in pixels, an integer >= 1, got 16.0"),
    (dict(modes=("salient",), saliency="dino"), r"saliency must be None, 'masks' .* or a function .*got 'dino'"),
])
def test_occlusion_bad_input(kwargs, message):
    x, y = batch(2, 32)
    with pytest.raises(ValueError, match=message):
        occlusion_sweep(tiny_replknet(), [(x, y)], **{"modes": ("random",), **kwargs})


def test_occlusion_refuses_images_outside_zero_to_one_and_a_bad_saliency_before_any_pass():
    """Images scaled to 0-255 or normalised (ToTensor + Normalize) were occluded and scored without a
    word; saliency="dino" (a string) and patch_size=0 failed only after the clean pass (or with a
    ZeroDivisionError). Refused as the attacks refuse them."""
    x, y = batch(2, 32)
    calls = []

    class Counting(nn.Module):
        def forward(self, images):
            calls.append(len(images))
            return torch.zeros(len(images), CLASSES)
    for bad in (x * 255, (x - 0.5) / 0.25):
        with pytest.raises(ValueError, match=r"occlusion_sweep: x must hold pixel values in \[0, 1\] \(normalisation "
                                             r"belongs inside the model\)"):
            occlusion_sweep(Counting(), [(bad, y)], ratios=(0.5,), modes=("random",))
    for kwargs in (dict(saliency="dino", modes=("salient",)), dict(saliency="dino", modes=("random",)),
                   dict(patch_size=0, modes=("random",))):
        with pytest.raises(ValueError, match="saliency must be|patch_size"):
            occlusion_sweep(Counting(), [(x, y)], ratios=(0.5,), **kwargs)
    assert calls == []


# --- lesion ------------------------------------------------------------------------------------------

def test_block_discovery_across_families():
    assert [b.name for b in residual_blocks(tiny_replknet())] == [
        "stages.0.pair0", "stages.1.pair0", "stages.2.pair0", "stages.2.pair1", "stages.2.pair2", "stages.3.pair0"]
    assert residual_blocks(tiny_replknet())[0].modules == ("stages.0.blocks.0", "stages.0.blocks.1")
    assert [b.stage for b in lesion_candidates(tiny_replknet(), "paper")] == [2, 2, 2]  # the widest stage
    assert len(residual_blocks(tiny_vit())) == 2
    assert len(residual_blocks(timm.create_model("test_convnext"))) == 9
    resnet = timm.create_model("resnet18", num_classes=CLASSES)
    assert [b.name for b in residual_blocks(resnet)] == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    with pytest.raises(ValueError, match="no residual blocks"):
        residual_blocks(nn.Sequential(nn.Conv2d(3, 3, 3)))


def tiny_resnetv2():
    import functools

    from timm.layers import GroupNormAct
    from timm.models.resnetv2 import ResNetV2

    torch.manual_seed(0)
    return ResNetV2(layers=(2, 2), channels=(16, 32), stem_chs=8, num_classes=CLASSES,
                    norm_layer=functools.partial(GroupNormAct, num_groups=4)).eval()


def tiny_swin():
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2),
                           num_classes=CLASSES).eval()


def test_blocks_of_bit_swin_and_efficientnet():
    # BiT (timm ResNetV2, the paper's Table 6) and Swin: removable blocks for the lesion, every block
    # for the feature variance; removing a block leaves only its skip connection
    from lkfast.analysis import output_modules
    from lkfast.eval.models import Normalized

    bit = tiny_resnetv2()
    assert [b.name for b in residual_blocks(bit)] == ["stages.0.blocks.1", "stages.1.blocks.1"]  # no downsample
    assert [n for n, _ in output_modules(bit)] == ["stages.0.blocks.0", "stages.0.blocks.1", "stages.1.blocks.0",
                                                   "stages.1.blocks.1"]
    assert [b.stage for b in lesion_candidates(bit, "paper")] == [1]
    swin = tiny_swin()
    assert [b.name for b in residual_blocks(swin)] == ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0",
                                                       "layers.1.blocks.1"]
    wrapped = Normalized(swin, (0.5,) * 3, (0.5,) * 3)
    assert [b.modules for b in residual_blocks(wrapped)][0] == ("model.layers.0.blocks.0",)
    x = torch.rand(2, 3, 32, 32)
    for model, block in ((bit, residual_blocks(bit)[0]), (swin, residual_blocks(swin)[1])):
        named = dict(model.named_modules())
        seen = {}
        module = named[block.modules[0]]
        module.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0]))
        with torch.no_grad():
            model(x)
            with blocks_removed(model, [block]):
                identity = model.get_submodule(block.modules[0])
                identity.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))
                model(x)
        assert model.get_submodule(block.modules[0]) is module and torch.equal(seen["in"], seen["out"])
    efficientnet = timm.create_model("test_efficientnet", num_classes=CLASSES)
    assert residual_blocks(efficientnet) == []  # no block of it has a skip connection
    assert [n for n, _ in output_modules(efficientnet)] == ["blocks.0.0", "blocks.1.0", "blocks.2.0", "blocks.3.0",
                                                            "blocks.4.0"]


def test_feature_variance_of_swin_reads_its_maps_as_nhwc():
    swin = tiny_swin()
    x = torch.rand(2, 3, 32, 32)
    result = feature_map_variance(swin, x)
    assert result["layers"] == ["layers.0.blocks.0:in", "layers.0.blocks.0:attn", "layers.0.blocks.0",
                                "layers.0.blocks.1:attn", "layers.0.blocks.1", "layers.1.blocks.0:in",
                                "layers.1.blocks.0:attn", "layers.1.blocks.0", "layers.1.blocks.1:attn", "layers.1.blocks.1"]
    with torch.no_grad():
        h = swin.layers[0](swin.patch_embed(x))  # (N, H, W, C) after stage 0
    assert h.shape == (2, 8, 8, 16)
    assert result["variance"][4] == pytest.approx(float(h.var(dim=(1, 2), unbiased=False).mean()), rel=1e-5)


def test_feature_variance_points_are_the_stem_transitions_and_every_residual():
    """The paper's Fig. 10 script records ViT's embedding and each attention and MLP residual, RepLKNet's
    stem, blocks and transitions: one point per ViT block hid the attention/MLP alternation that
    RepLKNet's RepLK-block/ConvFFN points show. A map reached twice (ResNet's stage input is the
    previous block's output) is one point."""
    vit = tiny_vit().eval()
    x = torch.rand(2, 3, 64, 64)
    result = feature_map_variance(vit, x)
    assert result["layers"] == ["blocks.0:in", "blocks.0:attn", "blocks.0", "blocks.1:attn", "blocks.1"]
    with torch.no_grad():
        h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        block = vit.blocks[0]
        after_attn = h + block.ls1(block.attn(block.norm1(h)))
        out = block(h)
    p = vit.num_prefix_tokens
    for i, features in enumerate((h, after_attn, out)):
        assert result["variance"][i] == pytest.approx(float(features[:, p:].var(dim=1, unbiased=False).mean()), rel=1e-5)
    model = tiny_replknet().eval()
    x, _ = batch(2, 32)
    result = feature_map_variance(model, x)
    assert result["layers"][:4] == ["stages.0.blocks.0:in", "stages.0.blocks.0", "stages.0.blocks.1", "stages.1.blocks.0:in"]
    with torch.no_grad():
        h = x
        for layer in model.stem:
            h = layer(h)
        stem = h
        transition = model.transitions[0](model.stages[0](h))
    for i, features in ((0, stem), (3, transition)):
        assert result["variance"][i] == pytest.approx(float(features.var(dim=(2, 3), unbiased=False).mean()), rel=1e-5)
    resnet = timm.create_model("resnet10t", num_classes=CLASSES).eval()
    layers = feature_map_variance(resnet, torch.rand(2, 3, 32, 32))["layers"]
    assert layers == ["layer1.0:in", "layer1.0", "layer2.0", "layer3.0", "layer4.0"]


def test_feature_variance_task_draws_seeded_random_val_images(monkeypatch):
    # the paper's script draws random validation images; the first 64 of ImageNet-val in folder order
    # are about two classes. Unreadable images (None) are passed over.
    import types

    import lkfast.eval.analysis_tasks as analysis_tasks

    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 32, 32, generator=g) * (1 + i) for i in range(10)]

    class Val(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, index):
            return (None if index == 7 else images[index]), 0

    monkeypatch.setattr(analysis_tasks, "_val_dataset", lambda ctx, masks=False: Val())
    monkeypatch.setattr(analysis_tasks, "VARIANCE_BATCH", 3)
    model = tiny_replknet()
    results = {}
    for seed in (0, 1):
        ctx = types.SimpleNamespace(model=model, device="cpu", seed=seed)
        results[seed] = analysis_tasks.feature_variance(ctx)
        order = [i for i in torch.randperm(10, generator=torch.Generator().manual_seed(seed)).tolist() if i != 7]
        assert results[seed]["indices"] == order[:3] and results[seed]["images"] == 3
        expected = feature_map_variance(model, torch.stack([images[i] for i in order[:3]]))
        assert results[seed]["variance"] == pytest.approx(expected["variance"], rel=1e-6)
    assert results[0]["indices"] != [0, 1, 2] and results[0]["indices"] != results[1]["indices"]
    assert analysis_tasks.feature_variance(ctx)["indices"] == results[1]["indices"]  # seeded


def test_feature_variance_task_of_an_unknown_family_is_unavailable():
    # the run goes on (TaskUnavailable, a line in the report), as lesion and kernel-distance already do
    import types

    from lkfast.eval.analysis_tasks import feature_variance
    from lkfast.eval.registry import TaskUnavailable

    ctx = types.SimpleNamespace(model=nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    with pytest.raises(TaskUnavailable, match="no residual blocks found in Sequential: known families"):
        feature_variance(ctx)


def test_blocks_removed_removes_those_blocks_and_restores_them():
    model = tiny_replknet()
    x, _ = batch(2, 32)
    before = dict(model.named_modules())
    with torch.no_grad():
        reference = model(x)
    block = residual_blocks(model)[3]
    with blocks_removed(model, [block]):
        assert all(isinstance(model.get_submodule(n), nn.Identity) for n in block.modules)
        with torch.no_grad():
            lesioned = model(x)
            # the same as running the stage with that block's modules skipped by hand
            h = x
            for layer in model.stem:
                h = layer(h)
            for i, stage in enumerate(model.stages):
                h = stage(h)
                if i < 3:
                    h = model.transitions[i](h)
            assert torch.equal(model.forward_head(h), lesioned)
    assert not torch.allclose(lesioned, reference)
    with pytest.raises(RuntimeError):
        with blocks_removed(model, residual_blocks(model)[:2]):
            raise RuntimeError("failure inside")
    after = dict(model.named_modules())
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    with torch.no_grad():
        assert torch.equal(model(x), reference)


def test_lesion_sweep_runs_exactly_the_blocks_it_reports():
    # every block's modules count their calls: a removed block is not called in that draw
    model = tiny_replknet()
    data = [batch(2, 32, seed=s) for s in range(2)]
    blocks = residual_blocks(model)
    calls = {name: 0 for b in blocks for name in b.modules}
    for name in calls:
        model.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(name, calls[name] + 1))
    result = lesion_sweep(model, data, counts=[2, 4], draws=3, seed=1)
    removed = [set(names) for per_count in result["removed"] for names in per_count]
    for b in blocks:
        kept_draws = sum(b.name not in r for r in removed)
        assert all(calls[name] == len(data) * (1 + kept_draws) for name in b.modules), (b.name, calls, removed)


def spread_head(model, x, scale=10.0):
    """Makes ``model``'s head (in place) give logits that vary from image to image of ``x``: the tiny
    random RepLKNet's pooled features differ across images by 1e-4 of their size or less, so its own head
    predicts one class for every image (and for every set of blocks removed). The head is re-centred
    on the features' mean and scaled by their spread, so predictions follow the features."""
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        head = model.head
        head.weight.mul_(scale / head.weight.norm(dim=1, keepdim=True) / features.std(0).mean())
        head.bias.copy_(-(head.weight @ features.mean(0)))
    return model


def test_lesion_sweep_reports_what_it_removed():
    """Each draw's top-1 is that draw's blocks removed; mean/min/max summarise the draws of a count.

    The images are flat colours and the head spread (``spread_head``): with the tiny model's own
    head every draw scored the same (33.3 %), so mean = min = max = median and their assertions could
    not fail. The precondition keeps it so: each count's draws differ, and their mean is not their median."""
    model = tiny_replknet()
    g = torch.Generator().manual_seed(0)
    x = torch.stack([_flat_image(g) for _ in range(12)])
    y = torch.randint(0, CLASSES, (12,), generator=g)
    spread_head(model, x)
    data = [(x[:6], y[:6]), (x[6:], y[6:])]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = lesion_sweep(model, data, counts=[1, 3], draws=3, seed=0)
    assert result["fraction"] == [1 / 6, 3 / 6]
    assert [len(r) for r in result["removed"][1]] == [3, 3, 3]
    blocks = {b.name: b for b in residual_blocks(model)}
    for c in range(2):
        for draw, names in enumerate(result["removed"][c]):
            assert len(set(names)) == [1, 3][c]
            with blocks_removed(model, [blocks[n] for n in names]), torch.no_grad():
                correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in data)
            assert result["draws"][c][draw] == pytest.approx(100.0 * correct / 12)
    for c, draws in enumerate(result["draws"]):
        assert len(set(draws)) > 1 and sorted(draws)[1] != pytest.approx(sum(draws) / 3)  # precondition
        assert result["mean"][c] == pytest.approx(sum(draws) / 3)
        assert result["min"][c] == min(draws) and result["max"][c] == max(draws)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # same weights, same keys
    assert lesion_sweep(model, data[:1], counts=[1, 3], draws=3, seed=0)["removed"] == result["removed"]  # seeded
    with pytest.raises(ValueError, match="0..6"):
        lesion_sweep(model, data, counts=[7])
    with pytest.raises(ValueError, match="draws"):
        lesion_sweep(model, data, counts=[1], draws=0)


def test_lesion_summary_mean_min_max_of_hand_made_draws():
    """Fig. 7's curve is the mean top-1 over a count's draws, its band the min and max: hand-made
    outcomes of 3 images, one count, 3 draws; draw 0 gets image 0 right, draw 1 none, draw 2 all three:
    top-1 per draw 100/3, 0, 100; mean 400/9 = 44.4 (the median would be 33.3), min 0, max 100 (neither
    is the first draw's)."""
    from lkfast.analysis.lesion import LesionPlan, lesion_summary

    plan = LesionPlan(tiny_replknet(), counts=[2], draws=3, seed=0)
    correct = torch.zeros(3, 1, 3, dtype=torch.bool)
    correct[0, 0, 0] = True
    correct[:, 0, 2] = True
    summary = lesion_summary({"clean": torch.ones(3, dtype=torch.bool), "correct": correct}, plan)
    assert summary["draws"] == [[pytest.approx(100 / 3), 0.0, 100.0]]
    assert summary["mean"] == [pytest.approx(400 / 9)]
    assert summary["min"] == [0.0] and summary["max"] == [100.0] and summary["clean_top1"] == 100.0


def test_lesion_sweep_takes_numpy_integers():
    """counts=np.array([1, 2]) was refused as "each count must be an integer ..., got np.int64(1)";
    NumPy integers (counts, draws, seed) now work as Python's, and the result holds Python ints."""
    np = pytest.importorskip("numpy")
    model = tiny_replknet()
    data = [batch(4, 32)]
    result = lesion_sweep(model, data, counts=np.array([1, 2]), draws=np.int64(2), seed=np.int64(3))
    assert result == lesion_sweep(model, data, counts=[1, 2], draws=2, seed=3)
    assert [type(n) for n in result["counts"]] == [int, int] and type(result["seed"]) is int
    with pytest.raises(ValueError, match="each count must be an integer"):
        lesion_sweep(model, data, counts=[1.0])


def test_lesion_fraction_is_the_proportion_of_the_model_blocks():
    # Fig. 7's x-axis (the paper: "the number of blocks in ViT-B is only half of that in RepLKNet"):
    # RepLKNet-31B's layout has 24 blocks, the paper's scope draws among its 18 third-stage ones
    from lkfast.analysis import all_blocks
    from lkfast.analysis.lesion import LesionPlan, lesion_summary

    layout_31b = RepLKNet(large_kernel_sizes=[3, 3, 3, 3], layers=[2, 2, 18, 2], channels=[4, 4, 4, 4],
                          small_kernel=None, num_classes=CLASSES)
    plan = LesionPlan(layout_31b, draws=1, scope="paper")
    assert len(plan.candidates) == 18 and plan.model_blocks == 24 and plan.counts == [2, 4, 5, 7, 9, 11, 13, 14, 16]
    records = {"clean": torch.ones(2, dtype=torch.bool), "correct": torch.zeros(2, 9, 1, dtype=torch.bool)}
    summary = lesion_summary(records, plan)
    assert summary["fraction"] == [n / 24 for n in plan.counts] and summary["fraction"][4] == 0.375
    assert summary["candidate_fraction"] == [n / 18 for n in plan.counts] and summary["model_blocks"] == 24
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=12, embed_dim=16, num_heads=1)
    assert lesion_summary({"clean": records["clean"], "correct": torch.zeros(2, 1, 1, dtype=torch.bool)},
                          LesionPlan(vit, counts=[6], draws=1, scope="paper"))["fraction"] == [0.5]
    # a ResNet's blocks with a downsample shortcut count too, though they are never removed
    resnet = timm.create_model("resnet18", num_classes=CLASSES).eval()
    assert len(all_blocks(resnet)) == 8 and len(residual_blocks(resnet)) == 5
    result = lesion_sweep(resnet, [batch(2, 32)], counts=[1, 2], draws=2, scope="all")
    assert result["fraction"] == [1 / 8, 2 / 8] and result["candidate_fraction"] == [1 / 5, 2 / 5]


# --- frequency -----------------------------------------------------------------------------------------

class HighFrequencyDetector(nn.Module):
    """Class 1 when the image holds high-frequency energy (mean |Laplacian| above a threshold), else 0."""

    def __init__(self, threshold=0.02):
        super().__init__()
        self.threshold = threshold
        laplacian = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
        self.register_buffer("kernel", laplacian.expand(3, 1, 3, 3).clone())

    def forward(self, x):
        energy = torch.nn.functional.conv2d(x, self.kernel, groups=3)[..., 1:-1, 1:-1].abs().mean((1, 2, 3))
        return torch.stack([self.threshold - energy, energy - self.threshold], 1) * 100


def test_frequency_sweep_drop_grows_with_frequency_for_a_high_frequency_detector():
    x = torch.rand(6, 3, 1, 1).expand(6, 3, 32, 32) * 0.5 + 0.25  # flat images: class 0, no high frequencies
    y = torch.zeros(6, dtype=torch.long)
    result = frequency_sweep(HighFrequencyDetector(), [(x, y)], frequencies=(0.0, 0.9 * math.pi), eps=0.2)
    assert result["clean_top1"] == 100.0
    assert result["drop"] == [0.0, 100.0] and result["top1"] == [100.0, 0.0]


def test_frequency_sweep_matches_direct_evaluation():
    model = tiny_replknet()
    x, y = batch(4, 32)
    frequencies = (0.0, 0.5 * math.pi, math.pi)
    result = frequency_sweep(model, [(x, y)], frequencies=frequencies, eps=0.2, seed=3)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        clean = 100.0 * float((model(x).argmax(1) == y).float().mean())
        for j, f in enumerate(frequencies):
            noisy = frequency_noise(x, f, eps=0.2, generator=generator)
            top1 = 100.0 * float((model(noisy).argmax(1) == y).float().mean())
            assert result["top1"][j] == pytest.approx(top1)
            assert result["drop"][j] == pytest.approx(clean - top1)
    assert result["frequencies_over_pi"] == [0.0, 0.5, 1.0]
    assert frequency_sweep(model, [(x, y)], frequencies=(0.5,), eps=0.0)["drop"] == [0.0]
    with pytest.raises(ValueError, match=r"\[0, pi\]"):
        frequency_sweep(model, [(x, y)], frequencies=(4.0,))
    with pytest.raises(ValueError, match="eps"):
        frequency_sweep(model, [(x, y)], eps=-0.1)


def test_frequency_sweep_settings_are_the_papers():
    """Fig. 8's bands and Table 5's Noise-0.7π: the paper (Sec. 4.4) normalises frequency from 0.0π (centre)
    to 1.0π (boundary) with a window of 0.1π, and plots 0, 0.1π, ..., π; the noise amplitude 0.1 is
    lkfast's stated choice (frequency.NOISE_EPS: the paper gives no number). The sweep's defaults are
    these: a 0.05π window or eps 0.05 changes Noise-0.7π with every other test passing."""
    from lkfast.analysis import frequency

    assert frequency.FREQUENCIES == pytest.approx(tuple(i * math.pi / 10 for i in range(11)))
    assert frequency.WIDTH == pytest.approx(0.1 * math.pi) and frequency.NOISE_EPS == pytest.approx(0.1)
    model = tiny_replknet()
    result = frequency_sweep(model, [batch(2, 32)])
    assert result["frequencies_over_pi"] == pytest.approx([i / 10 for i in range(11)])
    assert result["width"] == pytest.approx(0.1 * math.pi) and result["eps"] == pytest.approx(0.1)


def test_frequency_sweep_refuses_images_outside_zero_to_one_and_an_eps_in_grey_levels():
    """Normalised images (ToTensor + Normalize) were clamped to [0, 1] by the noise, a 25-point "drop"
    at eps=0; eps=8 (meant as 8/255) was taken as 8. Both refused, with the attacks' messages."""
    model = tiny_replknet()
    x, y = batch(4, 32)
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    for bad in ((x - mean) / std, x * 255):
        with pytest.raises(ValueError, match=r"frequency_sweep: x must hold pixel values in \[0, 1\] \(normalisation "
                                             r"belongs inside the model\)"):
            frequency_sweep(model, [(bad, y)], frequencies=(0.0,), eps=0.0)
    with pytest.raises(ValueError, match=r"frequency_sweep: eps is the noise amplitude in \[0, 1\] pixel units, got 8: "
                                         r"a budget of 8 grey levels is 8/255 = 0.03137"):
        frequency_sweep(model, [(x, y)], frequencies=(0.0,), eps=8)
    with pytest.raises(ValueError, match="x holds NaN pixel values"):
        frequency_sweep(model, [(x.index_fill(0, torch.tensor([1]), torch.nan), y)], frequencies=(0.0,))
    assert frequency_sweep(model, [(x, y)], frequencies=(0.0,), eps=1.0)["eps"] == 1.0  # the whole range: allowed


# --- kernel attention distance ---------------------------------------------------------------------------

def test_kernel_distance_on_hand_made_kernels():
    k = 7
    kernels = torch.zeros(4, 1, k, k)
    kernels[0, 0, 3, 3] = 2.0          # all mass at the centre
    kernels[1, 0, 0, 6] = -3.0         # all at a corner: the largest distance
    kernels[2, 0, 3, 6] = 1.0          # at the middle of an edge: 1 / sqrt(2) of the corner's
    kernels[3, 0, 3, 3] = kernels[3, 0, 6, 6] = 1.0  # half and half
    distance, normalised = channel_distances(kernels)
    torch.testing.assert_close(normalised, torch.tensor([0.0, 1.0, 1 / math.sqrt(2), 0.5], dtype=torch.float64))
    torch.testing.assert_close(distance, torch.tensor([0.0, 3.0, 1 / math.sqrt(2), 1.0], dtype=torch.float64))
    assert channel_distances(torch.zeros(1, 1, 5, 5))[1].tolist() == [0.0]
    with pytest.raises(ValueError, match="odd"):
        channel_distances(torch.ones(1, 1, 4, 4))


def test_kernel_distance_on_models():
    model = tiny_replknet()
    result = kernel_attention_distance(model)
    names = [layer["name"] for layer in result["layers"]]
    assert names == ["stages.0.blocks.0.large_kernel", "stages.1.blocks.0.large_kernel", "stages.2.blocks.0.large_kernel",
                     "stages.2.blocks.2.large_kernel", "stages.2.blocks.4.large_kernel", "stages.3.blocks.0.large_kernel"]
    first = result["layers"][0]
    assert first["stage"] == 0 and first["kernel_size"] == [7, 7] and len(first["normalized"]) == 8
    assert first["normalized"] == sorted(first["normalized"])
    # as the paper's script: the large kernel's own weights, not the BN-scaled sum with the small kernel
    assert result["weights"] == ["lkb_origin.conv.weight"] and "note" not in result
    large = model.stages[0].blocks[0].large_kernel
    distance, normalised = channel_distances(large.lkb_origin.conv.weight)
    assert first["weights"] == "lkb_origin.conv.weight"
    assert first["distance"] == pytest.approx(distance.sort().values.tolist(), rel=1e-12)
    assert first["normalized"] == pytest.approx(normalised.sort().values.tolist(), rel=1e-12)
    with torch.no_grad():
        equivalent = channel_distances(large.get_equivalent_kernel_bias()[0])[0].sort().values.tolist()
    assert first["distance"] != pytest.approx(equivalent, rel=1e-2)  # the tiny model's BNs scale the channels
    # a merged checkpoint holds only the merged kernel: measured on it, and the result says so
    merged = kernel_attention_distance(tiny_replknet().structural_reparam())
    assert merged["weights"] == ["lkb_reparam.weight"] and "merged kernel" in merged["note"]
    assert merged["layers"][0]["weights"] == "lkb_reparam.weight"
    assert merged["layers"][0]["distance"] == pytest.approx(equivalent, rel=1e-5)
    convnext = kernel_attention_distance(timm.create_model("test_convnext"))
    assert len(convnext["layers"]) == 9 and convnext["layers"][0]["kernel_size"] == [7, 7]
    assert convnext["weights"] == ["weight"]
    with pytest.raises(ValueError, match="no stride-1 depthwise"):
        kernel_attention_distance(tiny_vit())


def test_kernel_distance_min_kernel_size_filters_replknet_layers_and_nan_kernels_are_nan():
    """min_kernel_size was ignored for RepLKNet's ReparamLargeKernelConv (its 3x3 layers were
    returned at min_kernel_size=5, and no ValueError where none reached it); a NaN kernel got the
    normalised distance 0.0 ("all mass at the centre") instead of NaN."""
    model = tiny_replknet()  # large kernels 7, 5, 5, 3 by stage
    sizes = [layer["kernel_size"] for layer in kernel_attention_distance(model, min_kernel_size=5)["layers"]]
    assert sizes == [[7, 7], [5, 5], [5, 5], [5, 5], [5, 5]]
    merged = kernel_attention_distance(tiny_replknet().structural_reparam(), min_kernel_size=7)
    assert [layer["kernel_size"] for layer in merged["layers"]] == [[7, 7]]
    with pytest.raises(ValueError, match="at least 9x9"):
        kernel_attention_distance(model, min_kernel_size=9)
    kernels = torch.zeros(3, 1, 5, 5)
    kernels[0, 0, 0, 0] = float("nan")
    kernels[1, 0, 2, 2] = float("inf")
    distance, normalised = channel_distances(kernels)
    assert math.isnan(normalised[0]) and math.isnan(normalised[1]) and normalised[2] == 0.0


def test_kernel_distance_figure_takes_the_first_two_of_stage_1_and_the_last_two_of_stage_3():
    # the paper's Fig. 9: "the first two layers of stage-1 and the last two layers of stage-3"; stage-1 is
    # RepLKNet's stages.0, stage-3 its stages.2 (the 18-block stage of RepLKNet-31B), not the last stage
    from lkfast.analysis import paper_layers

    model = tiny_replknet(layers=[3, 2, 4, 2])
    picked = [layer["name"] for layer in paper_layers(kernel_attention_distance(model))]
    assert picked == ["stages.0.blocks.0.large_kernel", "stages.0.blocks.2.large_kernel",
                      "stages.2.blocks.4.large_kernel", "stages.2.blocks.6.large_kernel"]


# --- feature-map variance ---------------------------------------------------------------------------------

def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_feature_variance_values_and_no_hook_left():
    model = tiny_replknet()
    x, _ = batch(2, 32)
    result = feature_map_variance(model, x)
    assert _hook_count(model) == 0
    assert len(result["layers"]) == 12 + 4 and result["depth"][-1] == 1.0 and max(result["normalized"]) == 1.0
    # Fig. 10's x-axis: point i of L at normalised depth (i + 1) / L (the function's contract): 1/16 first
    assert result["depth"] == pytest.approx([(i + 1) / 16 for i in range(16)]) and result["depth"][0] == 0.0625
    with torch.no_grad():
        h = x
        for layer in model.stem:
            h = layer(h)
        h = model.stages[0].blocks[0](h)
    assert result["variance"][1] == pytest.approx(float(h.var(dim=(2, 3), unbiased=False).mean()), rel=1e-5)
    vit = tiny_vit()
    result = feature_map_variance(vit, torch.rand(2, 3, 64, 64))
    assert len(result["layers"]) == 5 and _hook_count(vit) == 0
    # an empty batch gave all-NaN variances
    with pytest.raises(ValueError, match=r"feature_map_variance: x must be a batch of at least one image, got shape "
                                         r"\(0, 3, 32, 32\)"):
        feature_map_variance(model, x[:0])
    assert _hook_count(model) == 0


def test_feature_variance_hooks_removed_after_an_error():
    model = tiny_replknet()
    broken = model.stages[3].blocks[1].register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(RuntimeError("broken")))
    with pytest.raises(RuntimeError, match="broken"):
        feature_map_variance(model, batch(2, 32)[0])
    broken.remove()
    assert _hook_count(model) == 0


# --- figures --------------------------------------------------------------------------------------------

def test_figures_are_written(tmp_path):
    model = tiny_replknet()
    x, y = batch(4, 32)
    data = [(x, y, (x[:, 0] > 0.5).float())]
    occ = occlusion_sweep(model, data, ratios=(0.5,), saliency="masks")
    lesion = lesion_sweep(model, data, counts=[1], draws=2)
    freq = frequency_sweep(model, data, frequencies=(0.0, math.pi))
    kernels = kernel_attention_distance(model)
    variance = feature_map_variance(model, x)
    fgsm = {"eps": [0.1], "top1": [10.0]}
    pgd = {"eps": [0.002], "top1": [20.0], "steps": [1, 5], "steps_top1": [30.0, 20.0], "num_steps": 5, "steps_eps": 0.006}
    written = [
        plots.plot_occlusion({"a": occ, "b": occ}, tmp_path / "fig4.png"),
        plots.plot_occlusion_examples(x[0], {"random": drop_masks(x[:1], 0.5, "random")[0]}, tmp_path / "fig5.png"),
        plots.plot_attacks({"a": fgsm}, {"a": pgd}, tmp_path / "fig6.png"),
        plots.plot_lesion({"a": lesion}, tmp_path / "fig7.png"),
        plots.plot_frequency({"a": freq}, tmp_path / "fig8.png"),
        plots.plot_kernel_distance({"a": kernels}, tmp_path / "fig9.png"),
        plots.plot_feature_variance({"a": variance}, tmp_path / "fig10.png"),
    ]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    with pytest.raises(ValueError, match="no model results"):
        plots.plot_lesion({}, tmp_path / "empty.png")


def test_occlusion_figure_plots_the_drop_from_clean(tmp_path, monkeypatch):
    # Fig. 4 reports the top-1 drop (the paper's caption; DESIGN.md), not the absolute top-1
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    occ = {"ratios": [0.1, 0.5], "clean_top1": 80.0, "top1": {"random": [70.0, 30.0], "salient": [60.0, 5.0]}}
    other = {"ratios": [0.1, 0.5], "clean_top1": 50.0, "top1": {"random": [50.0, 45.0]}}
    plots.plot_occlusion({"a": occ, "b": other}, tmp_path / "fig4.png")
    (fig,) = drawn
    panels = {ax.get_title(): {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()} for ax in fig.axes}
    assert panels == {plots.MODE_TITLES["random"]: {"a": [10.0, 50.0], "b": [0.0, 5.0]},
                      plots.MODE_TITLES["salient"]: {"a": [20.0, 75.0]}}
    assert all(list(line.get_xdata()) == [10.0, 50.0] for ax in fig.axes for line in ax.get_lines())


def test_attack_figure_has_only_the_panels_of_the_attacks_that_ran(tmp_path, monkeypatch):
    # a run with fgsm and not pgd drew two empty PGD panels (axes 0..1, no note) beside FGSM's
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    fgsm = {"eps": [0.1, 0.2], "top1": [10.0, 5.0]}
    pgd = {"eps": [0.002], "top1": [20.0], "steps": [1, 5], "steps_top1": [30.0, 20.0], "num_steps": 5,
           "steps_eps": 0.006}

    def panels(fig):
        return {ax.get_title(): {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()} for ax in fig.axes}
    plots.plot_attacks({"a": fgsm}, {}, tmp_path / "fig6.png")
    assert panels(drawn.pop()) == {"(a) FGSM": {"a": [10.0, 5.0]}}
    plots.plot_attacks({}, {"a": pgd}, tmp_path / "fig6.png")
    assert panels(drawn.pop()) == {"(b) PGD, 5 steps": {"a": [20.0]}, "(c) PGD, ε = 0.006": {"a": [30.0, 20.0]}}
    plots.plot_attacks({"a": fgsm, "b": fgsm}, {"a": pgd}, tmp_path / "fig6.png")
    assert panels(drawn.pop()) == {"(a) FGSM": {"a": [10.0, 5.0], "b": [10.0, 5.0]}, "(b) PGD, 5 steps": {"a": [20.0]},
                                   "(c) PGD, ε = 0.006": {"a": [30.0, 20.0]}}


def test_multi_model_figures_have_one_legend_outside_the_panels_and_one_colour_per_model(tmp_path, monkeypatch):
    """Figs. 4 and 6 of the default run drew their legend inside a panel, over the lines (Fig. 6 once
    per panel), Fig. 8 over its lines; the panels' colour cycles restarted, so a model missing from
    one panel took another's colour there. Now: one legend per figure, every model once, outside
    every panel; a model has the same colour in every panel."""
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    occ = {"ratios": [0.1, 0.5], "clean_top1": 80.0, "top1": {"random": [70.0, 30.0], "salient": [60.0, 5.0]}}
    only_salient = dict(occ, top1={"salient": [50.0, 45.0]})
    fgsm = {"eps": [0.1, 0.2], "top1": [10.0, 5.0]}
    pgd = {"eps": [0.002], "top1": [20.0], "steps": [1, 5], "steps_top1": [30.0, 20.0], "num_steps": 5,
           "steps_eps": 0.006}
    freq = {"frequencies_over_pi": [0.0, 0.5, 1.0], "drop": [1.0, 40.0, 3.0]}
    ablation = {"k3": {"imagenet_a": {"top1": 5.0}}, "k31": {"imagenet_a": {"top1": 9.0}, "imagenet_r": {"top1": 4.0}},
                "c7": {"imagenet_r": {"top1": 2.0}}, "c51": {"imagenet_r": {"top1": 3.0}}}
    plots.plot_occlusion({"a": occ, "b": only_salient, "c": occ}, tmp_path / "fig4.png")
    plots.plot_attacks({"a": fgsm, "b": fgsm}, {"c": pgd, "a": pgd}, tmp_path / "fig6.png")
    plots.plot_frequency({"a": freq, "b": freq}, tmp_path / "fig8.png")
    plots.plot_ablation(ablation, {"replknet": [(3, "k3"), (31, "k31")], "convnext": [(7, "c7"), (51, "c51")]},
                        [("ImageNet-A", "imagenet_a", "top1"), ("ImageNet-R", "imagenet_r", "top1")],
                        tmp_path / "ablation.png")
    expected = [["a", "b", "c"], ["a", "b", "c"], ["a", "b"], ["replknet", "convnext"]]
    for fig, labels in zip(drawn, expected):
        fig.canvas.draw()
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        assert len(legends) == 1, fig.axes[0].get_title()
        (legend,) = legends
        assert [t.get_text() for t in legend.get_texts()] == labels
        box = legend.get_window_extent()
        assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes if ax.axison), labels
        colours = {}
        for ax in fig.axes:
            for line in ax.get_lines():
                colours.setdefault(line.get_label(), set()).add(line.get_color())
        assert sorted(colours) == sorted(labels) and all(len(c) == 1 for c in colours.values()), colours
        assert len({c.pop() for c in colours.values()}) == len(labels)


def test_accuracy_axes_of_flat_values_start_at_zero(tmp_path, monkeypatch):
    """Every plotted top-1 at 0 (PGD on the default run's tiny nets) got matplotlib's flat-line range,
    about -0.05..0.05: an accuracy axis of flat values now runs from 0 (to 100 when all are 0, else a
    few points above the largest); one whose values vary keeps matplotlib's range."""
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    zero = {"eps": [0.001, 0.002], "top1": [0.0, 0.0], "steps": [1, 5], "steps_top1": [0.0, 0.0], "num_steps": 5,
            "steps_eps": 0.006}
    fgsm = {"eps": [0.1, 0.2], "top1": [40.0, 10.0]}
    plots.plot_attacks({"a": zero}, {"a": zero}, tmp_path / "fig6.png")
    assert {tuple(ax.get_ylim()) for ax in drawn.pop().axes} == {(0.0, 100.0)}  # one axis for the three panels
    # the panels share one y-axis (they are read against each other): its range is from all of them, so (c)'s
    # zeros beside (a)'s 10..40 get matplotlib's range over 0..40, not one of their own
    plots.plot_attacks({"a": fgsm}, {"a": zero, "b": dict(zero, top1=[30.0, 30.0])}, tmp_path / "fig6.png")
    limits = {tuple(ax.get_ylim()) for ax in drawn.pop().axes if ax.get_title()}
    assert len(limits) == 1
    low, high = limits.pop()
    assert low < 0 and 40 < high < 43
    lesion = {"fraction": [0.5, 1.0], "clean_top1": 50.0, "mean": [50.0, 50.0], "min": [50.0, 50.0], "max": [50.0, 50.0]}
    plots.plot_lesion({"a": lesion}, tmp_path / "fig7.png")
    assert drawn.pop().axes[0].get_ylim() == (0.0, 55.0)
    assert plots.accuracy_ylim(0.0, 0.0) == (0.0, 100.0) and plots.accuracy_ylim(0.0, 0.5) == (0.0, 5.5)
    assert plots.accuracy_ylim(0.0, 30.0) is None and plots.accuracy_ylim(float("inf"), float("-inf")) is None
    assert plots.accuracy_ylim(40.0, 41.0) is None and plots.accuracy_ylim(40.0, 40.9) == (0.0, 45.9)  # span >= 1: not flat


def test_figures_say_what_a_reader_compares_against(tmp_path, monkeypatch):
    """From a review of the default run's figures: Fig. 6's lines started at the first budget (where
    FGSM had already removed 60 points), nothing showed the clean top-1; Fig. 9 had no level to read its
    distances against (the default's kernels sit at the uniform kernel's) and a y-range per panel."""
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    fgsm = {"eps": [0.1, 0.2], "top1": [40.0, 10.0], "clean_top1": 70.0}
    pgd = {"eps": [0.002], "top1": [30.0], "steps": [1, 5], "steps_top1": [50.0, 20.0], "num_steps": 5,
           "steps_eps": 0.006, "clean_top1": 70.0}
    plots.plot_attacks({"a": fgsm}, {"a": pgd}, tmp_path / "fig6.png")
    lines = [ax.get_lines()[0] for ax in drawn.pop().axes if ax.get_title()]
    assert [(list(line.get_xdata()), list(line.get_ydata())) for line in lines] == [
        ([0, 0.1, 0.2], [70.0, 40.0, 10.0]), ([0, 0.002], [70.0, 30.0]), ([0, 1, 5], [70.0, 50.0, 20.0])]
    from lkfast.analysis import paper_layers

    result = kernel_attention_distance(tiny_replknet())
    plots.plot_kernel_distance({"a": result, "b": result}, tmp_path / "fig9.png")
    axes = [ax for ax in drawn.pop().axes if ax.get_title()]
    assert len({tuple(ax.get_ylim()) for ax in axes}) == 1  # one scale: the kernel sizes compare
    sizes = sorted({tuple(layer["kernel_size"]) for layer in paper_layers(result)})
    levels = {line.get_label(): line.get_ydata()[0] for line in axes[0].get_lines() if "uniform" in line.get_label()}
    assert sorted(levels) == sorted(f"uniform |w|, {kh}x{kw}" for kh, kw in sizes)
    for kh, kw in sizes:  # the mean over the taps of the distance from the centre, 1 at the corners
        r = ((torch.arange(kh) - kh // 2)[:, None] ** 2 / (kh // 2) ** 2 + (torch.arange(kw) - kw // 2) ** 2 / (kw // 2) ** 2
             ).sqrt() / 2 ** 0.5
        assert levels[f"uniform |w|, {kh}x{kw}"] == pytest.approx(float(r.mean()))


def test_lesion_of_one_or_two_counts_draws_bars_and_models_differ_by_marker(tmp_path, monkeypatch):
    """From the review of the default run's Fig. 7: four RepLKNet-tiny bands from the clean top-1 to their one
    count covered each other (a band between points never measured); lines on each other looked like one."""
    from matplotlib.collections import PolyCollection

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    one = {"fraction": [0.2], "clean_top1": 70.0, "mean": [55.0], "min": [15.0], "max": [65.0]}
    equal = {"fraction": [0.2], "clean_top1": 70.0, "mean": [55.00000000000001], "min": [55.0 + 2e-14], "max": [55.0]}
    plots.plot_lesion({"a": equal}, tmp_path / "fig7.png")  # ten equal draws whose mean rounds past them: no error
    drawn.pop()
    three = {"fraction": [0.25, 0.5, 0.75], "clean_top1": 70.0, "mean": [60.0, 50.0, 30.0], "min": [50.0, 40.0, 20.0],
             "max": [65.0, 55.0, 40.0]}
    plots.plot_lesion({"a": one, "b": dict(one), "c": three}, tmp_path / "fig7.png")
    ax = drawn.pop().axes[0]
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1  # c's band only
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    xa, xb = lines["a"].get_xdata()[1], lines["b"].get_xdata()[1]
    assert xa != xb and abs(xa - 0.2) < 0.02 and abs(xb - 0.2) < 0.02  # side by side at 0.2
    assert len({line.get_marker() for line in lines.values()}) == 3


def test_ablation_panels_say_what_they_plot(tmp_path, monkeypatch):
    """The ablation figure's panels had no y-label (top-1, AUPR and top-1 changes side by side) and Table 7's
    short names beside Table 5's ("ImgN-A" next to "ImageNet-C")."""
    from lkfast.analysis.ablation import TABLE5_COLUMNS, TABLE7_COLUMNS

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    one = {"clean": {"top1": 70.0}, "imagenet-a": {"top1": 5.0}, "imagenet-c": {"sev5_top1": 40.0},
           "imagenet-o": {"aupr": 60.0}, "occlusion": {"salient_drop_50": -20.0}}
    results = {"k3": one, "k31": one}
    plots.plot_ablation(results, {"replknet": [(3, "k3"), (31, "k31")]}, TABLE7_COLUMNS + TABLE5_COLUMNS,
                        tmp_path / "ablation.png")
    panels = {ax.get_title(): ax.get_ylabel() for ax in drawn.pop().axes if ax.axison and ax.get_title()}
    assert panels == {"ImageNet": "top-1 (%)", "ImageNet-A": "top-1 (%)", "ImageNet-C": "mean top-1 at severity 5 (%)",
                      "ImageNet-O": "AUPR (%)", "Salient-Drop-50%": "top-1 change (points)"}


def test_ablation_top1_panels_show_their_sampling_interval(tmp_path, monkeypatch):
    """Each ablation panel zooms to its own values: the default run's 71-73.5% clean top-1 over 200
    images filled the ImageNet panel like a trend, inside a +-6 point sampling error. A top-1 with its
    image count now carries its 95% interval (1.96 sqrt(p (1 - p) / n)); metrics without one (AUPR,
    top-1 changes, a top-1 whose count is not known) get none."""
    from matplotlib.container import ErrorbarContainer

    from lkfast.analysis.ablation import TABLE5_COLUMNS, TABLE7_COLUMNS

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    results = {"k3": {"clean": {"top1": 50.0, "images": 100}, "imagenet-a": {"top1": 2.0},
                      "imagenet-o": {"aupr": 60.0, "in_images": 100}},
               "k31": {"clean": {"top1": 90.0, "images": 400}, "imagenet-a": {"top1": 3.0},
                       "imagenet-o": {"aupr": 62.0, "in_images": 100}}}
    assert plots.top1_interval(results["k3"], "clean", "top1") == pytest.approx(9.8)
    assert plots.top1_interval(results["k31"], "clean", "top1") == pytest.approx(2.94)
    assert plots.top1_interval(results["k3"], "imagenet-a", "top1") is None  # no count
    assert plots.top1_interval(results["k3"], "imagenet-o", "aupr") is None
    plots.plot_ablation(results, {"replknet": [(3, "k3"), (31, "k31")]}, TABLE7_COLUMNS + TABLE5_COLUMNS,
                        tmp_path / "ablation.png")
    panels = {ax.get_title(): ax for ax in drawn.pop().axes if ax.axison and ax.get_title()}

    def bars(ax):  # half-lengths of the drawn error bars
        found = [c for c in ax.containers if isinstance(c, ErrorbarContainer) and c.lines[2]]
        return [round(float(seg[1][1] - seg[0][1]) / 2, 6) for c in found for seg in c.lines[2][0].get_segments()]

    assert bars(panels["ImageNet"]) == [pytest.approx(9.8), pytest.approx(2.94)]
    assert bars(panels["ImageNet-A"]) == [] and bars(panels["ImageNet-O"]) == []


def test_drop_axes_of_flat_values_show_zero_and_both_signs(tmp_path, monkeypatch):
    """Figs. 4 and 8 plot the top-1 drop: every drop 0 (tiny nets, or nothing the noise changed) got
    matplotlib's flat-line range, about -0.055..0.055; a flat drop axis now runs 5 points beyond 0 and
    the values, and negative drops (top-1 rose) stay inside the axis."""
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)

    def occlusion_ylim(top1):
        occ = {"ratios": [0.1, 0.5], "clean_top1": 50.0, "top1": {"random": top1}}
        plots.plot_occlusion({"a": occ}, tmp_path / "fig4.png")
        return tuple(drawn.pop().axes[0].get_ylim())

    def frequency_ylim(drop):
        plots.plot_frequency({"a": {"frequencies_over_pi": [0.0, 0.5, 1.0], "drop": drop}}, tmp_path / "fig8.png")
        return tuple(drawn.pop().axes[0].get_ylim())

    assert occlusion_ylim([50.0, 50.0]) == (-5.0, 5.0)
    assert frequency_ylim([0.0, 0.0, 0.0]) == (-5.0, 5.0)
    assert occlusion_ylim([50.25, 49.75]) == (-5.25, 5.25)  # drops -0.25 and 0.25: flat, both signs
    low, high = frequency_ylim([-0.3, 0.0, 0.2])
    assert low <= -5.3 and high >= 5.2
    low, high = frequency_ylim([-3.0, 0.0, 10.0])  # values that vary keep matplotlib's range, both signs in
    assert -4 < low < -3 and 10 < high < 11
    low, high = occlusion_ylim([53.0, 40.0])
    assert -4 < low < -3 and 10 < high < 11
    assert plots.drop_ylim(2.0, 2.5) == (-5.0, 7.5) and plots.drop_ylim(0.0, 30.0) is None
    assert plots.drop_ylim(float("inf"), float("-inf")) is None


def test_table5_analysis_columns_only_with_a_value_and_no_negative_zero(tmp_path):
    """A run whose occlusion had no saliency (random drops only) and no frequency task wrote a Table 5
    of dashes; a frequency sweep that changed nothing showed its Noise-0.7π change as "-0.00"."""
    from lkfast.eval.analysis_tasks import write_analysis_report

    occlusion = {"ratios": [0.1, 0.5], "clean_top1": 50.0, "top1": {"random": [50.0, 40.0]}}
    text = write_analysis_report(tmp_path, {"A": {"occlusion": occlusion}})
    assert "Figure 4" in text and "Table 5" not in text
    frequency = {"frequencies_over_pi": [0.0, 0.7], "drop": [0.0, 0.0], "change_at_0_7pi": -0.0}
    text = write_analysis_report(tmp_path, {"A": {"occlusion": occlusion, "frequency": frequency}})
    assert "| A | — | 0.00 |" in text


# --- the eval tasks (lkfast.eval.analysis_tasks) ------------------------------------------------------

def test_eval_tasks_run_end_to_end_and_report(tmp_path):
    from lkfast import data
    from lkfast.eval import EvalOptions, ModelSpec, run_evaluation
    from lkfast.eval.analysis_tasks import ANALYSIS_TASKS, write_analysis_report

    classes = data.imagenet_classes()
    g = torch.Generator().manual_seed(0)
    for wnid in (classes[1], classes[2]):
        for i in range(3):
            image = (torch.rand(3, 1, 1, generator=g) * 0.8 + 0.2 * torch.rand(3, 32, 32, generator=g))
            mask = torch.zeros(3, 32, 32)
            mask[:, 4:20, 8:28] = 1.0
            for folder, picture in (("val", image), ("masks", mask)):
                path = tmp_path / folder / wnid / f"img{i}.JPEG"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data.encode_jpeg(data.to_uint8(picture), quality=95))
    arch = dict(large_kernel_sizes=(7, 5, 5, 3), layers=(1, 1, 2, 1), channels=(8, 8, 8, 8), small_kernel=3)
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.pth"
    torch.save(RepLKNet(**arch).state_dict(), checkpoint)
    spec = ModelSpec("replknet_31b", str(checkpoint), "tiny-lk", kwargs=tuple(arch.items()), input_size=32)
    options = EvalOptions(out=str(tmp_path / "out"), data={"val": str(tmp_path / "val"), "masks": str(tmp_path / "masks")},
                          workers=0, progress=False, batch_size=8, write_report=False)
    results = run_evaluation([spec], list(ANALYSIS_TASKS), options)["tiny-lk"]
    assert results["occlusion"]["saliency"] == "masks" and results["occlusion"]["images"] == 6
    assert set(results["occlusion"]["top1"]) == {"random", "salient", "non_salient"}
    assert results["fgsm"]["clean_top1"] == results["pgd"]["clean_top1"] == results["occlusion"]["clean_top1"]
    assert len(results["pgd"]["steps_top1"]) == 6 and results["frequency"]["frequencies_over_pi"][-1] == 1.0
    assert "surrogate" in results["taig"]["unavailable"]  # one model: no surrogate of the other family
    assert results["lesion"]["candidates"] == ["stages.2.pair0", "stages.2.pair1"]  # the paper's scope
    assert [layer["kernel_size"] for layer in results["kernel-distance"]["layers"]] == [[7, 7], [5, 5], [5, 5], [5, 5], [3, 3]]
    assert results["feature-variance"]["images"] == 6 and len(results["feature-variance"]["layers"]) == 10 + 4  # + the stem, 3 transitions
    text = write_analysis_report(tmp_path / "out", {"tiny-lk": results})
    for figure in ("figure4_occlusion", "figure6_attacks", "figure7_lesion", "figure8_frequency",
                   "figure9_kernel_distance", "figure10_feature_variance"):
        assert f"figures/{figure}.png" in text and (tmp_path / "out" / "figures" / f"{figure}.png").stat().st_size > 0
    assert "Salient-Drop-50%" in text  # Table 5's analysis columns (no ablation family in this run)
    assert "Weights measured: tiny-lk: the large kernels' own weights (lkb_origin.conv.weight" in text
    # what each figure drew from (a reader cannot compare lesion curves over other candidates, or read Fig. 8
    # without the noise's size)
    lesion = results["lesion"]
    assert (f"Candidates: tiny-lk: 2 of {lesion['model_blocks']} blocks." in text
            and f"min to max over {lesion['draws_per_count']} draws per count" in text)
    frequency = results["frequency"]
    assert f"ε = {frequency['eps']:g}, band 0.1π wide, {frequency['images']} val images." in text
    assert "each model's curve divided by its own largest value; 6 random val images." in text
    # Fig. 5: one val image and its three occlusions at 50%, written once by the task, shown by the report
    assert "figures/figure5_occlusion_examples.png" in text
    assert (tmp_path / "out" / "figures" / "figure5_occlusion_examples.png").stat().st_size > 0
    assert results["ablation"]["kernel_size"] == 7 and "No family was measured at two or more kernel sizes" in text
    # the protocol's settings reach the results (the paper; DESIGN): Fig. 4 drops 10%..90%; Fig. 6 FGSM eps
    # 0.1..0.4, PGD-5 eps 0.002..0.008 with alpha = eps/4, PGD at eps 0.006 over steps; Fig. 8 bands 0..pi,
    # 0.1 pi wide, noise eps 0.1 (lkfast's stated choice: the paper gives the band, not the amplitude)
    assert results["occlusion"]["ratios"] == pytest.approx([i / 10 for i in range(1, 10)])
    assert results["fgsm"]["eps"] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    pgd = results["pgd"]
    assert pgd["eps"] == pytest.approx([0.002, 0.004, 0.006, 0.008]) and pgd["num_steps"] == 5
    assert pgd["steps_eps"] == pytest.approx(0.006) and pgd["alpha_ratio"] == pytest.approx(0.25)
    assert frequency["frequencies_over_pi"] == pytest.approx([i / 10 for i in range(11)])
    assert frequency["width"] == pytest.approx(0.1 * math.pi) and frequency["eps"] == pytest.approx(0.1)


def write_val_folder(root):
    """A tiny ImageNet-val layout: two classes, two random 32-px JPEGs each."""
    from lkfast import data

    classes = data.imagenet_classes()
    g = torch.Generator().manual_seed(0)
    for wnid in (classes[1], classes[2]):
        for i in range(2):
            path = root / wnid / f"img{i}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data.encode_jpeg(data.to_uint8(torch.rand(3, 32, 32, generator=g)), quality=95))


def test_eval_occlusion_of_an_input_size_not_a_multiple_of_16_is_unavailable(tmp_path):
    # --input-size 40: no 16-px patch grid; the occlusion says so and the run's other tasks go on
    from lkfast.eval import EvalOptions, ModelSpec, run_evaluation

    write_val_folder(tmp_path / "val")
    arch = dict(large_kernel_sizes=(7, 5, 5, 3), layers=(1, 1, 1, 1), channels=(8, 8, 8, 8), small_kernel=3)
    torch.manual_seed(0)
    torch.save(RepLKNet(**arch).state_dict(), tmp_path / "lk.pth")
    spec = ModelSpec("replknet_31b", str(tmp_path / "lk.pth"), "tiny-lk", kwargs=tuple(arch.items()), input_size=40)
    options = EvalOptions(out=str(tmp_path / "out"), data={"val": str(tmp_path / "val")}, workers=0, progress=False,
                          write_report=False)
    results = run_evaluation([spec], ["occlusion", "feature-variance"], options)["tiny-lk"]
    assert "image size 40x40 is not a multiple of the patch size 16" in results["occlusion"]["unavailable"]
    assert results["feature-variance"]["images"] == 4


def test_figure5_example_of_a_photo_is_small(tmp_path):
    """Fig. 5's image is stored in every model's occlusion result: as a PNG a 224-px photo took ~100 KB
    (base64) per model in results.json and the cache; it is kept at full size and within a few grey
    levels of what the model saw, under 50 KB."""
    import base64
    import io

    import matplotlib.cbook
    from PIL import Image

    from lkfast import data
    from lkfast.eval.analysis_tasks import _occlusion_example

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f, Image.open(f) as im:  # a photo shipped with matplotlib
        photo = data.transform_for({"input_size": (3, 224, 224), "crop_pct": 0.875})(im.convert("RGB"))
    example = _occlusion_example([(photo, 0)], None, ("random",), seed=0)
    assert len(example["image"]) < 50_000
    stored = data.load_image(io.BytesIO(base64.b64decode(example["image"])))
    assert stored.shape == (3, 224, 224) and (stored - data.to_uint8(photo) / 255).abs().mean() < 3 / 255


def test_eval_figure5_is_drawn_from_the_cached_result_and_listed_as_a_report_file(tmp_path, monkeypatch):
    # Fig. 5 comes from the occlusion result (its example), not from the run that computed it: a rerun
    # whose occlusion comes from the cache, and a report rebuilt in a new folder, draw it and list it
    # in the report's manifest (a later report with fewer tasks removes it)
    import base64
    import io
    import json
    import shutil

    import lkfast.analysis.occlusion
    from lkfast import data
    from PIL import Image

    from lkfast.eval import EvalOptions, ModelSpec, run_evaluation
    from lkfast.eval.models import load_model
    from lkfast.eval.report import REPORT_FILES, write_report

    write_val_folder(tmp_path / "val")
    for path in (tmp_path / "val").rglob("*.JPEG"):  # a foreground square in every image's mask
        mask = torch.zeros(3, 32, 32)
        mask[:, 0:16, 0:16] = 1.0
        target = tmp_path / "masks" / path.relative_to(tmp_path / "val")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data.encode_jpeg(data.to_uint8(mask), quality=95))
    arch = dict(large_kernel_sizes=(7, 5, 5, 3), layers=(1, 1, 1, 1), channels=(8, 8, 8, 8), small_kernel=3)
    torch.manual_seed(0)
    torch.save(RepLKNet(**arch).state_dict(), tmp_path / "lk.pth")
    spec = ModelSpec("replknet_31b", str(tmp_path / "lk.pth"), "tiny-lk", kwargs=tuple(arch.items()), input_size=32)
    out = tmp_path / "out"
    options = EvalOptions(out=str(out), data={"val": str(tmp_path / "val"), "masks": str(tmp_path / "masks")},
                          workers=0, progress=False)
    figure5 = "figures/figure5_occlusion_examples.png"

    def drawn(folder):
        return (figure5 in json.loads((folder / REPORT_FILES).read_text())
                and (folder / figure5).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
                and f"![Figure 5]({figure5})" in (folder / "report.md").read_text())

    result = run_evaluation([spec], ["occlusion"], options)["tiny-lk"]["occlusion"]
    assert drawn(out)
    picture = (out / figure5).read_bytes()
    example = result["example"]
    assert example["index"] == 0 and example["file"].endswith("img0.JPEG") and list(example["drops"]) == \
        ["random", "salient", "non_salient"]
    assert sum(row.count("1") for row in example["drops"]["random"]) == 2  # 50% of the 2x2 grid
    assert example["drops"]["salient"] == ["10", "00"]  # the mask's foreground patch
    _, config = load_model(spec, "cpu", False)  # the image as the model sees it: resized and cropped
    with Image.open(sorted((tmp_path / "val").rglob("*.JPEG"))[0]) as im:
        first = data.transform_for(config)(im.convert("RGB"))
    stored = data.load_image(io.BytesIO(base64.b64decode(example["image"])))  # a JPEG of noise: close, not equal
    assert stored.shape == first.shape and (stored - data.to_uint8(first) / 255).abs().mean() < 10 / 255

    # a resumed run into the same folder, its figures gone: the occlusion is read from the cache
    shutil.rmtree(out / "figures")
    monkeypatch.setattr(lkfast.analysis.occlusion, "occlusion_outcomes", lambda *a, **k: pytest.fail("recomputed"))
    again = run_evaluation([spec], ["occlusion"], options)["tiny-lk"]["occlusion"]
    assert again["example"] == example and drawn(out)
    assert (out / figure5).read_bytes() == picture  # the same figure (the cache stores the drops' keys sorted)
    # the report rebuilt from results.json alone in another folder
    write_report(tmp_path / "elsewhere", json.loads((out / "results.json").read_text()))
    assert drawn(tmp_path / "elsewhere")
    # a later report into the same folder without the occlusion: Fig. 5 was the report's file, it goes
    results = json.loads((out / "results.json").read_text())
    del results["tiny-lk"]["occlusion"]
    write_report(out, results)
    assert not (out / figure5).exists()


def test_eval_taig_pairs_convnets_with_a_vit_surrogate_and_back(tmp_path, monkeypatch):
    import lkfast.eval.analysis_tasks
    from lkfast.eval import EvalOptions, ModelSpec, run_evaluation

    write_val_folder(tmp_path / "val")
    arch = dict(large_kernel_sizes=(7, 5, 5, 3), layers=(1, 1, 1, 1), channels=(8, 8, 8, 8), small_kernel=3)
    vit_arch = dict(img_size=32, depth=1, embed_dim=16, num_heads=2)
    torch.manual_seed(0)
    torch.save(RepLKNet(**arch).state_dict(), tmp_path / "lk.pth")
    torch.save(timm.create_model("vit_tiny_patch16_224", **vit_arch).state_dict(), tmp_path / "vit.pth")
    specs = [ModelSpec("replknet_31b", str(tmp_path / "lk.pth"), "tiny-lk", kwargs=tuple(arch.items()), input_size=32),
             ModelSpec("vit_tiny_patch16_224", str(tmp_path / "vit.pth"), "tiny-vit", kwargs=tuple(vit_arch.items()),
                       input_size=32)]
    options = EvalOptions(out=str(tmp_path / "out"), data={"val": str(tmp_path / "val")}, workers=0, progress=False,
                          write_report=False)
    # the paper's 20 x 21 passes per step are too slow for a test
    monkeypatch.setitem(lkfast.eval.analysis_tasks.TAIG, "steps", 2)
    monkeypatch.setitem(lkfast.eval.analysis_tasks.TAIG, "path_steps", 2)
    results = run_evaluation(specs, ["taig"], options)
    assert results["tiny-lk"]["taig"]["surrogate"] == "tiny-vit"
    assert results["tiny-vit"]["taig"]["surrogate"] == "tiny-lk"
    for label in ("tiny-lk", "tiny-vit"):
        r = results[label]["taig"]
        assert r["eps"] == [0.03, 0.06, 0.1] and r["images"] == 4 and r["random_path"] is True
        assert r["note"].startswith("at eps 0.03, 0.06, 0.1 the attack never uses")  # 2 steps of 1/255
        assert all(v is None or 0.0 <= v <= 100.0 for v in r["success_rate"])
    # the run interrupted after its last shard, before the task results were written: the rerun finds
    # every shard cached and gives the same results without loading a surrogate
    import lkfast.eval.models

    written = list((tmp_path / "out").glob("cache/*/taig/result.*.json"))
    assert len(written) == 2 and list((tmp_path / "out").glob("cache/*/taig/*/*.pt"))
    for path in written:
        path.unlink()

    loads = []
    real_load = lkfast.eval.models.load_model
    monkeypatch.setattr(lkfast.eval.models, "load_model", lambda *a, **k: loads.append(a[0].display) or real_load(*a, **k))
    again = run_evaluation(specs, ["taig"], options)
    assert loads == []
    for label in ("tiny-lk", "tiny-vit"):
        assert {k: v for k, v in again[label]["taig"].items() if k != "seconds"} == \
            {k: v for k, v in results[label]["taig"].items() if k != "seconds"}


def test_eval_taig_targets_of_one_surrogate_share_its_images(tmp_path, monkeypatch):
    """Two ConvNet targets of the ViT surrogate: its TAIG images are made once per batch and shown to
    both, with the same results as making them for each target."""
    import lkfast.attacks
    import lkfast.eval.analysis_tasks as tasks
    from lkfast.eval import EvalOptions, ModelSpec, run_evaluation

    write_val_folder(tmp_path / "val")
    arch = dict(large_kernel_sizes=(7, 5, 5, 3), layers=(1, 1, 1, 1), channels=(8, 8, 8, 8), small_kernel=3)
    vit_arch = dict(img_size=32, depth=1, embed_dim=16, num_heads=2)
    torch.manual_seed(0)
    for name in ("lk1", "lk2"):
        torch.save(RepLKNet(**arch).state_dict(), tmp_path / f"{name}.pth")
    torch.save(timm.create_model("vit_tiny_patch16_224", **vit_arch).state_dict(), tmp_path / "vit.pth")
    specs = [ModelSpec("replknet_31b", str(tmp_path / f"{n}.pth"), n, kwargs=tuple(arch.items()), input_size=32)
             for n in ("lk1", "lk2")]
    specs.append(ModelSpec("vit_tiny_patch16_224", str(tmp_path / "vit.pth"), "vit", kwargs=tuple(vit_arch.items()),
                           input_size=32))
    monkeypatch.setitem(tasks.TAIG, "steps", 2)
    monkeypatch.setitem(tasks.TAIG, "path_steps", 2)
    calls, shown = [], []
    real = lkfast.attacks.transfer_adversarials
    monkeypatch.setattr(lkfast.attacks, "transfer_adversarials", lambda *a, **k: calls.append(1) or real(*a, **k))
    real_outcomes = lkfast.attacks.transfer_outcomes

    def outcomes(surrogate, targets, x, y, adversarials=None, **kwargs):  # what each target is shown
        shown.append((list(targets), x.clone(), [a.clone() for a in adversarials]))
        return real_outcomes(surrogate, targets, x, y, adversarials=adversarials, **kwargs)
    monkeypatch.setattr(lkfast.attacks, "transfer_outcomes", outcomes)

    def run(out, budget):
        monkeypatch.setattr(tasks, "_ADVERSARIALS", tasks._Memo(budget))
        calls.clear()
        shown.clear()
        options = EvalOptions(out=str(tmp_path / out), data={"val": str(tmp_path / "val")}, workers=0, progress=False,
                              write_report=False, batch_size=2)
        results = run_evaluation(specs, ["taig"], options)
        return {m: {k: v for k, v in results[m]["taig"].items() if k != "seconds"} for m in ("lk1", "lk2", "vit")}, \
            len(calls), list(shown)

    shared, made, shown_shared = run("shared", 2 ** 30)
    alone, made_alone, shown_alone = run("alone", 0)  # nothing kept: every target's images are made again
    assert made_alone == 3 * 2 and made == 2 * 2  # 2 batches; lk1 and lk2 share the ViT's images
    assert shared == alone
    assert len(shown_shared) == len(shown_alone) == 3 * 2
    for (names, x, adv), (names_alone, x_alone, adv_alone) in zip(shown_shared, shown_alone):
        assert names == names_alone and torch.equal(x, x_alone)
        assert all(torch.equal(a, b) for a, b in zip(adv, adv_alone))  # the kept images are this batch's
    assert shared["lk1"]["surrogate"] == shared["lk2"]["surrogate"] == "vit" and shared["vit"]["surrogate"] == "lk1"


def test_cli_runs_the_analyses_into_the_report_with_their_options(tmp_path):
    """`python -m lkfast.eval` knows the analysis tasks, passes --taig-surrogate to TAIG (and keys
    the cache by it), and report.md gets the Section 4 sections and tables."""
    import json

    from lkfast.eval.cli import main

    write_val_folder(tmp_path / "val")
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.pth"
    torch.save(timm.create_model("test_convnext").state_dict(), checkpoint)  # depthwise 7x7 kernels, 1000 classes
    out = tmp_path / "out"
    common = ["--models", f"test_convnext:{checkpoint}=tiny-cn", "--val-dir", str(tmp_path / "val"), "--out", str(out),
              "--input-size", "32", "--workers", "0", "--no-progress", "--suite", "kernel-distance,taig"]
    assert main(common + ["--taig-surrogate", "tiny-cn"]) == 0
    results = json.loads((out / "results.json").read_text())["tiny-cn"]
    assert "unavailable" not in results["taig"] and results["taig"]["surrogate"] == "tiny-cn"
    assert "## Table 4: TAIG" in (out / "report.md").read_text() and (out / "tables" / "table4_taig.csv").exists()
    # the surrogate is the model itself: its row says the attack was white-box, not a transfer
    assert "| tiny-cn | tiny-cn (itself: white-box, not a transfer) |" in (out / "report.md").read_text()
    # a surrogate that is no label of the run: the command refuses it before anything runs; through the
    # API (or a label cached under another surrogate) TAIG runs again, is not run, and says why
    assert main(common + ["--taig-surrogate", "nobody"]) == 2
    from lkfast.eval import EvalOptions, ModelSpec, run_evaluation

    run_evaluation([ModelSpec("test_convnext", str(checkpoint), "tiny-cn", input_size=32)], ["kernel-distance", "taig"],
                   EvalOptions(out=str(out), data={"val": str(tmp_path / "val")}, workers=0, progress=False,
                               analysis={"taig_surrogate": "nobody"}))
    results = json.loads((out / "results.json").read_text())["tiny-cn"]
    assert "'nobody' is not a model label" in results["taig"]["unavailable"]
    report = (out / "report.md").read_text()
    assert "## Figure 9: kernel attention distance" in report and (out / "figures" / "figure9_kernel_distance.png").exists()
    assert "nobody" in report  # the reason TAIG did not run is listed


def test_lesion_of_a_model_without_removable_blocks_says_so():
    from lkfast.analysis import lesion_candidates

    from timm.models.resnet import BasicBlock, ResNet

    # one block per stage, each with a projection shortcut (the deep stem's 32 channels != 64)
    resnet = ResNet(BasicBlock, [1, 1, 1, 1], stem_type="deep", stem_width=16, num_classes=2)
    with pytest.raises(ValueError, match="no residual block whose removal keeps every shape"):
        lesion_candidates(resnet, "paper")


# --- the analysis tasks through ctx.records: independent of the sharding, resumable, torchrun -----------

SHARD_ARCH = dict(large_kernel_sizes=(7, 5, 5, 3), layers=(1, 1, 4, 1), channels=(8, 8, 8, 8), small_kernel=3)


def _flat_image(g):
    return torch.rand(3, 1, 1, generator=g) * 0.8 + 0.2 * torch.rand(3, 32, 32, generator=g)


def varied_replknet_state():
    """A tiny 1000-class RepLKNet whose head only predicts classes 1, 2 (the val folders' classes)
    and 10, along the main directions in which its features of flat-colour images differ: the
    predictions vary from image to image, so the accuracies are not all 0 or 100."""
    model = tiny_replknet(**SHARD_ARCH, num_classes=1000)  # random BN statistics: every block matters
    g = torch.Generator().manual_seed(1)
    x = torch.stack([_flat_image(g) for _ in range(64)])
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        features = model.forward_head(model.forward_features((x - mean) / std), pre_logits=True)
        centre = features.mean(0)
        directions = torch.pca_lowrank(features - centre, q=3)[2].T
        active = [1, 2, 10]
        model.head.weight.zero_()
        model.head.weight[active] = 50 * directions / directions.norm(dim=1, keepdim=True)
        model.head.bias.fill_(-1000.0)
        model.head.bias[active] = -(model.head.weight[active] @ centre)
    return model.state_dict()


@pytest.fixture(scope="module")
def analysis_data(tmp_path_factory):
    """(data folder with val/ and masks/, ModelSpec): five flat-colour 32-px JPEGs (an odd count:
    2-image shards leave a short last one) with a foreground box of its own each, filed so that the
    model gets four right (two of class 1, two of class 2) and one wrong: attacks and occlusions
    have correct predictions to turn."""
    import shutil

    from lkfast import data
    from lkfast.eval import ModelSpec

    root = tmp_path_factory.mktemp("analysis-data")
    checkpoint = root / "tiny.pth"
    torch.save(varied_replknet_state(), checkpoint)
    spec = ModelSpec("replknet_31b", str(checkpoint), "tiny", kwargs=tuple(SHARD_ARCH.items()), input_size=32)
    classes = data.imagenet_classes()
    g = torch.Generator().manual_seed(0)
    staging = root / "staging"
    for i in range(24):
        mask = torch.zeros(3, 32, 32)
        top, left = torch.randint(0, 16, (2,), generator=g).tolist()
        mask[:, top:top + 16, left:left + 12] = 1.0
        for folder, picture in (("val", _flat_image(g)), ("masks", mask)):
            path = staging / folder / classes[1] / f"img{i:02d}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data.encode_jpeg(data.to_uint8(picture), quality=95))
    model, x, _, _ = eval_inputs(staging, spec)
    with torch.no_grad():
        predicted = model(x).argmax(1).tolist()
    chosen = {1: [], 2: [], "wrong": []}
    for i, c in enumerate(predicted):
        key = c if c in (1, 2) else "wrong"
        if len(chosen[key]) < (1 if key == "wrong" else 2):
            chosen[key].append((i, classes[1] if key == "wrong" else classes[c]))
    assert [len(v) for v in chosen.values()] == [2, 2, 1], predicted
    for i, wnid in (item for items in chosen.values() for item in items):
        for folder in ("val", "masks"):
            (root / folder / wnid).mkdir(parents=True, exist_ok=True)
            shutil.copy(staging / folder / classes[1] / f"img{i:02d}.JPEG", root / folder / wnid)
    return root, spec


def analysis_options(root, out, shard_size, **kwargs):
    from lkfast.eval import EvalOptions

    return EvalOptions(out=str(out), data={"val": str(root / "val"), "masks": str(root / "masks")}, workers=0,
                       progress=False, batch_size=4, shard_size=shard_size, write_report=False, **kwargs)


def eval_inputs(root, spec):
    """The model and the val images, labels and foreground masks as the evaluation builds them."""
    from lkfast import data
    from lkfast.eval.classes import imagenet_class_space
    from lkfast.eval.models import load_model

    model, config = load_model(spec, "cpu")
    index, transform = imagenet_class_space().folder_index(), data.transform_for(config)
    images = data.ImageFolderBenchmark(str(root / "val"), transform, class_index=index)
    masks = data.ImageFolderBenchmark(str(root / "masks"), transform, class_index=index)
    x = torch.stack([images[i][0] for i in range(len(images))])
    y = torch.tensor([images[i][1] for i in range(len(images))])
    return model, x, y, torch.stack([masks[i][0][0] > 0.5 for i in range(len(masks))])


def image_generators(count, seed=0):
    """The evaluation's per-image seeding rebuilt: ``ctx.generator("val", i)`` for images 0..count-1."""
    from lkfast.eval.cache import stable_hash

    return [torch.Generator().manual_seed(int(stable_hash([seed, "val", i], 12), 16)) for i in range(count)]


def top1_columns(correct):
    """Percent correct of every column of per-image outcomes (N, ...)."""
    return (100.0 * correct.double().sum(0) / len(correct)).tolist()


def without_timing(results):
    return {task: {k: v for k, v in r.items() if k != "seconds"} for task, r in results.items() if task != "_model"}


NOISY = 0.5  # frequency noise amplitude in these tests: at the paper's 0.1 the tiny model's predictions never change


def test_eval_analyses_do_not_depend_on_the_sharding_and_match_the_library(tmp_path, analysis_data, monkeypatch):
    import lkfast.analysis.frequency
    from lkfast.analysis.frequency import frequency_outcomes
    from lkfast.analysis.occlusion import occlusion_outcomes
    from lkfast.eval import run_evaluation

    monkeypatch.setattr(lkfast.analysis.frequency, "NOISE_EPS", NOISY)
    root, spec = analysis_data
    tasks = ["occlusion", "lesion", "frequency"]
    small = run_evaluation([spec], tasks, analysis_options(root, tmp_path / "small", 2))["tiny"]
    large = run_evaluation([spec], tasks, analysis_options(root, tmp_path / "large", 100))["tiny"]
    assert without_timing(small) == without_timing(large)
    shards = sorted(p.name for p in (tmp_path / "small" / "cache").glob("*/occlusion/val/*.pt"))
    assert len(shards) == 3  # 2 + 2 + 1 images
    model, x, y, masks = eval_inputs(root, spec)
    generators = image_generators(len(y))
    # occlusion: clean and saliency-driven drops exactly as the library sweep; random drops as the core
    # with the evaluation's per-image generators
    occ = small["occlusion"]
    reference = occlusion_sweep(model, [(x, y, masks)], saliency="masks")
    assert occ["images"] == 5 and 0 < occ["clean_top1"] < 100
    for key in ("ratios", "clean_top1", "dropped_fraction", "grid", "patch_size", "saliency"):
        assert occ[key] == reference[key], key
    for mode in ("salient", "non_salient"):
        assert occ["top1"][mode] == reference["top1"][mode], mode
    random_rows = occlusion_outcomes(model, x, y, modes=("random",), generator=generators)
    assert occ["top1"]["random"] == pytest.approx(top1_columns(random_rows["correct"][:, 0]), abs=1e-9)
    assert occ["salient_drop_50"] == occ["top1"]["salient"][4] - occ["clean_top1"]
    # lesion: no random draw inside a batch, so everything as the library sweep
    reference = lesion_sweep(model, [(x, y)], seed=0, scope="paper")
    assert {k: small["lesion"][k] for k in reference} == reference
    assert len({a for draws in reference["draws"] for a in draws}) > 1  # the draws tell removals apart
    # frequency: clean exactly, the noisy top-1 as the core with the per-image generators
    freq = small["frequency"]
    reference = frequency_sweep(model, [(x, y)], eps=NOISY)
    for key in ("frequencies", "frequencies_over_pi", "clean_top1", "eps", "width", "images"):
        assert freq[key] == reference[key], key
    rows = frequency_outcomes(model, x, y, eps=NOISY, generator=image_generators(len(y)))
    assert freq["top1"] == pytest.approx(top1_columns(rows["correct"]), abs=1e-9)
    assert freq["drop"] == pytest.approx([freq["clean_top1"] - t for t in freq["top1"]])
    assert all(0.0 <= t <= 100.0 for t in freq["top1"]) and len(freq["top1"]) == 11 and len(set(freq["top1"])) > 1
    # Table 5's Noise-0.7π: the top-1 change (noisy - clean) in the band centred at 0.7π
    assert freq["frequencies_over_pi"][7] == pytest.approx(0.7)
    assert freq["change_at_0_7pi"] == pytest.approx(freq["top1"][7] - freq["clean_top1"])


def interrupted_and_resumed(monkeypatch, owner, core, task, root, spec, tmp_path):
    """Run ``task`` with ``owner.core`` raising while the second 2-image shard is computed (a killed
    run), rerun it into the same folder, and run it once uninterrupted. Returns (the batches the
    core saw: the killed run's, then the resumed run's; the val images; the resumed result; the
    uninterrupted result)."""
    from lkfast.eval import run_evaluation

    real = getattr(owner, core)
    seen = []

    def interrupted(model, x, *args, **kwargs):
        if seen:
            raise KeyboardInterrupt  # the run is killed while computing its second shard
        seen.append(x)
        return real(model, x, *args, **kwargs)
    monkeypatch.setattr(owner, core, interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation([spec], [task], analysis_options(root, tmp_path / "run", 2))
    monkeypatch.setattr(owner, core, lambda model, x, *args, **kwargs: seen.append(x) or real(model, x, *args, **kwargs))
    resumed = run_evaluation([spec], [task], analysis_options(root, tmp_path / "run", 2))["tiny"]
    monkeypatch.setattr(owner, core, real)
    uninterrupted = run_evaluation([spec], [task], analysis_options(root, tmp_path / "whole", 2))["tiny"]
    _, images, _, _ = eval_inputs(root, spec)
    return seen, images, resumed, uninterrupted


def test_eval_occlusion_without_a_saliency_source_says_so_where_the_run_is_watched(tmp_path, analysis_data, capsys):
    """With no masks and no DINO the salient and non-salient drops are skipped: that was said only in
    results.json's saliency_note and the report, not on the terminal of the run."""
    from lkfast.eval import EvalOptions, run_evaluation

    root, spec = analysis_data
    options = EvalOptions(out=str(tmp_path), data={"val": str(root / "val")}, workers=0, progress=False,
                          write_report=False, limit=2)
    result = run_evaluation([spec], ["occlusion"], options)[spec.display]["occlusion"]
    assert result["saliency"] is None and "salient/non-salient drops skipped" in result["saliency_note"]
    assert f"lkfast.eval: {spec.display}: occlusion: {result['saliency_note']}" in capsys.readouterr().err


def test_eval_occlusion_resumes_after_an_interruption(tmp_path, analysis_data, monkeypatch):
    import lkfast.analysis.occlusion as occlusion_module

    root, spec = analysis_data
    seen, images, resumed, uninterrupted = interrupted_and_resumed(monkeypatch, occlusion_module, "occlusion_outcomes",
                                                                   "occlusion", root, spec, tmp_path)
    # seen: the interrupted run's first shard (images 0-1), then the resumed run's calls: it loaded
    # that shard from the cache and computed only shards 2-3 and 4
    assert len(seen) == 3 and torch.equal(seen[0], images[:2])
    assert torch.equal(seen[1], images[2:4]) and torch.equal(seen[2], images[4:])
    assert without_timing(resumed) == without_timing(uninterrupted)


def test_eval_analyses_torchrun_two_processes_equal_one(tmp_path, analysis_data, monkeypatch):
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import lkfast.analysis.frequency
    from lkfast.eval import run_evaluation

    monkeypatch.setattr(lkfast.analysis.frequency, "NOISE_EPS", NOISY)
    root, spec = analysis_data
    tasks = ["occlusion", "frequency"]
    script = tmp_path / "run.py"
    script.write_text(
        "from pathlib import Path\n"
        "import lkfast.analysis.frequency\n"
        "from lkfast.eval import ModelSpec, distributed, run_evaluation\n"
        "from test_analysis import NOISY, analysis_options\n"
        "lkfast.analysis.frequency.NOISE_EPS = NOISY\n"
        "distributed.init('cpu')\n"
        "try:\n"
        f"    spec = ModelSpec('replknet_31b', {spec.checkpoint!r}, 'tiny', kwargs={spec.kwargs!r}, input_size=32)\n"
        f"    run_evaluation([spec], {tasks!r}, analysis_options(Path({str(root)!r}), {str(tmp_path / 'two')!r}, 1))\n"
        "finally:\n"
        "    distributed.shutdown()\n")
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests)]))
    with socket.socket() as probe:  # a free port: other test files start process groups too
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(script)]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["_meta"]["world_size"] == 2
    one = run_evaluation([spec], tasks, analysis_options(root, tmp_path / "one", 100))["tiny"]
    assert without_timing(two["tiny"]) == without_timing(one)


def test_taig_report_says_which_eps_its_steps_cannot_reach(tmp_path):
    # the paper's 20 steps of 1/255 reach at most 20/255 = 0.0784 < 0.1: kept, and said beside Table 4
    from lkfast.eval.analysis_tasks import taig_budget_note, write_analysis_report

    note = taig_budget_note((0.03, 0.06, 0.1), 20, 1 / 255)
    assert note.startswith("at eps 0.1 the attack never uses") and "20 steps of 1/255" in note and "0.0784" in note
    assert taig_budget_note((0.03, 0.06), 20, 1 / 255) is None
    assert taig_budget_note((0.03, 0.06, 0.1), 2, 0.01).startswith("at eps 0.03, 0.06, 0.1 ")
    result = {"surrogate": "vit", "eps": [0.03, 0.06, 0.1], "success_rate": [10.0, 20.0, 30.0], "steps": 20,
              "alpha": 1 / 255}
    text = write_analysis_report(tmp_path, {"lk": {"taig": result}, "lk2": {"taig": dict(result)}})
    assert text.count("Note: At eps 0.1 the attack never uses its whole budget: 20 steps of 1/255 move a pixel by "
                      "at most 0.0784") == 1


def test_table4_shows_the_success_rate_over_all_attacked_images(tmp_path):
    # Table 4 is the paper's number as its script counts it (success_rate); the clean-correct rate
    # stays in results.json only
    from lkfast.eval.analysis_tasks import write_analysis_report

    result = {"surrogate": "vit", "eps": [0.03, 0.06], "success_rate": [12.5, 37.5],
              "success_rate_clean_correct": [20.0, 60.0], "steps": 2, "alpha": 0.05}
    write_analysis_report(tmp_path, {"lk": {"taig": result}})
    assert "| lk | vit | 12.50 | 37.50 |" in (tmp_path / "tables" / "table4_taig.md").read_text()
    assert (tmp_path / "tables" / "table4_taig.csv").read_text().splitlines()[1] == "lk,vit,12.5,37.5"


def test_table4_and_imagenet_o_show_the_papers_values_where_comparable(tmp_path):
    """The paper's Table 4 (TAIG) and ImageNet-O AUPRs (Table 5, Fig. 2c) had no paper column: its values
    now stand beside a model the paper reports, for TAIG only where the surrogate is the one the paper
    paired with it (ViT-B for RepLKNet-31B, RepLKNet-31B for ViT-B)."""
    from lkfast.eval.analysis_tasks import write_analysis_report
    from lkfast.eval.report import write_report

    def taig(surrogate):
        return {"surrogate": surrogate, "eps": [0.03, 0.06, 0.1], "success_rate": [10.0, 20.0, 30.0], "steps": 20,
                "alpha": 1 / 255}

    results = {"RepLKNet-31B": {"_model": {"name": "replknet_31b"}, "taig": taig("ViT-B"), "imagenet-o": {"aupr": 70.0}},
               "ViT-B": {"_model": {"name": "vit_base_patch16_224"}, "taig": taig("RepLKNet-31B"),
                         "imagenet-o": {"aupr": 60.0}},
               "ResNet-50": {"_model": {"name": "resnet50"}, "taig": taig("RepLKNet-31B")}}  # not the paper's pairing
    write_analysis_report(tmp_path, results)
    table = (tmp_path / "tables" / "table4_taig.md").read_text()
    assert "| Model | surrogate | eps = 0.03 | paper | eps = 0.06 | paper | eps = 0.1 | paper |" in table
    assert "| RepLKNet-31B | ViT-B | 10.00 | 39.20 | 20.00 | 56.10 | 30.00 | 59.30 |" in table
    assert "| ViT-B | RepLKNet-31B | 10.00 | 62.30 | 20.00 | 73.30 | 30.00 | 75.60 |" in table
    assert "| ResNet-50 | RepLKNet-31B | 10.00 | — | 20.00 | — | 30.00 | — |" in table
    report = write_report(tmp_path / "full", results).read_text()
    assert "| RepLKNet-31B | 70.00 | 78.90 |" in report and "| ViT-B | 60.00 | 68.00 |" in report


def test_taig_memo_keeps_the_most_recent_within_its_budget():
    from lkfast.eval.analysis_tasks import _Memo

    memo = _Memo(budget_bytes=3 * 400)  # three 100-float tensors
    for key in "abc":
        memo.put(key, [torch.zeros(100)])
    assert memo.get("a") is not None  # a is now the most recently used
    memo.put("d", [torch.zeros(100)])  # over budget: b, the least recently used, goes
    assert memo.get("b") is None and all(memo.get(k) is not None for k in "acd")
    memo.put("d", [torch.zeros(100)])  # replacing an entry does not count it twice
    assert memo.held == 3 * 400 and all(memo.get(k) is not None for k in "acd")
    memo.put("big", [torch.zeros(301)])  # larger than the whole budget: not kept, nothing dropped
    assert memo.get("big") is None and memo.held == 3 * 400
    memo.put("e", [torch.zeros(200)])  # needs two entries' room
    assert memo.held <= 3 * 400 and memo.get("e") is not None and memo.get("a") is None


def test_salient_drop_50_is_the_top1_change_at_the_50_percent_salient_drop():
    """Table 5's Salient-Drop-50%: dropped minus clean top-1 (negative when accuracy falls) at ratio 0.5
    of the salient type, not a neighbouring ratio's or another type's."""
    from lkfast.eval.analysis_tasks import _with_salient_drop_50

    ratios = [0.1 * i for i in range(1, 10)]
    assert ratios[4] == 0.5
    result = {"ratios": ratios, "clean_top1": 90.0,
              "top1": {"random": [85.0 - i for i in range(9)], "salient": [80.0 - 5 * i for i in range(9)],
                       "non_salient": [88.0 - 2 * i for i in range(9)]}}
    assert _with_salient_drop_50(result)["salient_drop_50"] == pytest.approx(60.0 - 90.0)
    assert "salient_drop_50" not in _with_salient_drop_50({"ratios": ratios, "clean_top1": 90.0,
                                                           "top1": {"random": result["top1"]["random"]}})
    assert "salient_drop_50" not in _with_salient_drop_50({"ratios": [0.1, 0.9], "clean_top1": 90.0,
                                                           "top1": {"salient": [80.0, 10.0]}})


def test_figure5_draws_the_stored_drops_in_the_papers_order(tmp_path, monkeypatch):
    # the example's rows of "0"/"1" ("1" dropped) become the masks Fig. 5 occludes, titled by type and
    # ratio, in the paper's order (random, salient, non-salient) whatever order the result holds them in
    import base64

    from lkfast import data
    from lkfast.eval import analysis_tasks

    drawn = {}
    monkeypatch.setattr(analysis_tasks.plots, "plot_occlusion_examples",
                        lambda image, masks, path, patch_size: drawn.update(image=image, masks=masks, patch=patch_size))
    image = torch.rand(3, 32, 32)
    example = {"index": 3, "file": "/val/n01/img3.JPEG", "ratio": 0.5, "patch_size": 16,
               "image": base64.b64encode(data.encode_jpeg(data.to_uint8(image), quality=95)).decode("ascii"),
               "drops": {"salient": ["10", "00"], "non_salient": ["01", "10"], "random": ["00", "11"]}}
    text = analysis_tasks._figure5_section(tmp_path, {"a": {}, "b": {"example": example}})
    assert list(drawn["masks"]) == ["random drop 50%", "salient drop 50%", "non-salient drop 50%"]
    assert drawn["masks"]["salient drop 50%"].tolist() == [[True, False], [False, False]]
    assert drawn["masks"]["non-salient drop 50%"].tolist() == [[False, True], [True, False]]
    assert drawn["masks"]["random drop 50%"].tolist() == [[False, False], [True, True]]
    assert drawn["patch"] == 16 and drawn["image"].shape == (3, 32, 32)
    assert "Val image 3 (img3.JPEG) as b sees it" in text


def test_noise_0_7pi_is_the_top1_change_in_the_band_at_0_7pi():
    """Table 5's Noise-0.7π: noisy minus clean top-1 (negative when accuracy falls) in the 0.7π band,
    not a neighbouring band's."""
    from lkfast.eval.analysis_tasks import _with_noise_0_7pi

    clean = 90.0
    top1 = [89.0 - 3 * i for i in range(11)]
    result = {"frequencies_over_pi": [i / 10 for i in range(11)], "drop": [clean - t for t in top1]}
    assert _with_noise_0_7pi(result)["change_at_0_7pi"] == pytest.approx(top1[7] - clean) == pytest.approx(-22.0)
    assert "change_at_0_7pi" not in _with_noise_0_7pi({"frequencies_over_pi": [0.0, 0.5, 1.0], "drop": [1, 2, 3]})
