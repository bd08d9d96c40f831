"""lkfast.data's benchmark readers on tiny fake datasets in every release layout, made here."""
import json
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from lkfast import metrics
from optional_deps import needs_av
from lkfast.data import (DatasetLayoutError, ImageNet9, ImageNetA, ImageNetC, ImageNetO, ImageNetP, ImageNetR,
                         ImageNetVal, check_imagenet9_map, collate_skipping, imagenet9_class_map,
                         imagenet9_contents, imagenet_a_indices, imagenet_c_contents, imagenet_classes,
                         imagenet_o_indices, imagenet_p_contents, imagenet_r_indices, transform_for)
from lkfast.data.imagenet import imagenet_a_wnids, imagenet_r_wnids

WNIDS = imagenet_classes()


def write_image(path, seed, size=(12, 10), suffix_format=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=suffix_format)
    return path


def image_folder(root, wnids, per_class=2, ext=".JPEG"):
    for c, wnid in enumerate(wnids):
        for i in range(per_class):
            write_image(root / wnid / f"img{i}{ext}", seed=100 * c + i)
    return root


# ----------------------------------------------------------------------------- class lists

def test_imagenet9_class_map_is_the_release_map():
    m = imagenet9_class_map()
    assert m.shape == (1000,) and m.dtype == torch.long
    expected = torch.full((1000,), -1)

    def put(ranges, cls):
        for lo, hi in ranges:
            expected[lo:hi + 1] = cls

    put([(151, 170), (173, 268)], 0)                       # dog, 151-268 except 171-172
    put([(7, 24), (87, 100), (127, 146)], 1)               # bird
    put([(33, 68)], 3)                                     # reptile
    put([(269, 280), (286, 299), (356, 362), (387, 388)], 4)  # carnivore
    put([(300, 326)], 5)                                   # insect
    put([(365, 384)], 7)                                   # primate
    put([(0, 6), (389, 397)], 8)                           # fish
    scattered = (m == 2) | (m == 6)                        # vehicle and instrument: scattered indices
    assert torch.equal(m[~scattered], expected[~scattered])
    assert bool((expected[scattered] == -1).all())
    assert int((m == 2).sum()) == 42 and int((m == 6).sum()) == 26 and int((m == -1).sum()) == 630
    # a few members named by ImageNet's lemmas: ambulance, beach wagon / accordion, violin
    assert [int(m[i]) for i in (407, 436, 401, 889)] == [2, 2, 6, 6]


def test_check_imagenet9_map(tmp_path):
    assert check_imagenet9_map(tmp_path) is False
    release = {str(i): int(v) for i, v in enumerate(imagenet9_class_map())}
    (tmp_path / "in_to_in9.json").write_text(json.dumps(release))
    assert check_imagenet9_map(tmp_path) is True
    release["407"] = 5
    (tmp_path / "in_to_in9.json").write_text(json.dumps(release))
    with pytest.raises(DatasetLayoutError, match=r"407: 5 \(release: 2\)"):
        check_imagenet9_map(tmp_path)
    del release["407"]
    (tmp_path / "in_to_in9.json").write_text(json.dumps(release))
    with pytest.raises(DatasetLayoutError, match="no entry for 1"):
        check_imagenet9_map(tmp_path)


def test_imagenet_a_and_r_class_lists():
    a, r = imagenet_a_indices(), imagenet_r_indices()
    assert a.shape == r.shape == (200,) and not torch.equal(a, r)
    for indices, wnids in ((a, imagenet_a_wnids()), (r, imagenet_r_wnids())):
        assert indices.unique().numel() == 200 and bool((indices.diff() > 0).all())
        assert [WNIDS[i] for i in indices] == wnids
    assert WNIDS[0] == "n01440764" and len(WNIDS) == 1000


# ----------------------------------------------------------------------------- image folders

def test_imagenet_val_targets_order_and_limit(tmp_path):
    wnids = [WNIDS[7], WNIDS[3]]
    root = image_folder(tmp_path / "val", wnids, per_class=3)
    write_image(root / WNIDS[3] / "extra.png", seed=9, suffix_format="PNG")
    (root / WNIDS[3] / "notes.txt").write_text("not an image")
    (root / "__MACOSX" / WNIDS[3]).mkdir(parents=True)  # a zip made on macOS: not a class, no warning
    (root / "__MACOSX" / WNIDS[3] / "._img0.JPEG").write_bytes(b"\x00" * 8)
    # a file the reader does not read is neither scored nor counted as unreadable: said, not silent
    with pytest.warns(UserWarning, match=r"ImageNet-val: 1 file\(s\) in the class folders of .* are not read: their "
                                         r"suffixes \(\.txt\) are not \.jpeg, .*\(first: .*notes\.txt\)"):
        ds = ImageNetVal(root)
    assert len(ds) == 7 and ds.classes == [WNIDS[3], WNIDS[7]]   # sorted folders (n01... < n01...)
    assert ds.targets.tolist() == [3] * 4 + [7] * 3
    assert [p.name for p, _ in ds.samples[:4]] == ["extra.png", "img0.JPEG", "img1.JPEG", "img2.JPEG"]
    image, target = ds[1]
    assert target == 3 and image.shape == (3, 10, 12) and image.dtype == torch.float32
    expected = torch.from_numpy(np.array(Image.open(ds.samples[1][0]).convert("RGB"))).permute(2, 0, 1) / 255
    assert torch.equal(image, expected)
    with pytest.warns(UserWarning, match="notes.txt"):
        limited = ImageNetVal(root, limit=5)
    assert limited.samples == ds.samples[:5]
    with pytest.raises(ValueError, match="positive integer"), pytest.warns(UserWarning, match="notes.txt"):
        ImageNetVal(root, limit=0)


def test_a_16_bit_grey_png_is_read_at_its_brightness(tmp_path):
    # Pillow's convert("RGB") clips 16-bit grey at 255: a mid-grey image was read as white
    root = tmp_path / "val" / WNIDS[0]
    root.mkdir(parents=True)
    levels = np.array([[0, 256, 32768, 65535]], dtype=np.uint16).repeat(3, 0)
    Image.fromarray(levels).save(root / "grey16.png")
    assert Image.open(root / "grey16.png").mode.startswith("I")
    image, _ = ImageNetVal(tmp_path / "val")[0]
    assert image.shape == (3, 3, 4) and torch.equal(image[:, 0] * 255, torch.tensor([0.0, 1, 128, 255]).expand(3, 4))


def test_spread_keeps_every_class_share_in_every_reader(tmp_path):
    """limit=N, spread=True keeps the N items at floor(i * n / N): evenly over the sorted order, so
    each class keeps its share, where limit=N alone takes the first class's. Every reader passes it
    on, and the same positions are picked in every corruption and ImageNet-9 variant."""
    wnids = [WNIDS[3], WNIDS[7]]
    root = image_folder(tmp_path / "val", wnids, per_class=4)
    ds = ImageNetVal(root)
    spread = ImageNetVal(root, limit=4, spread=True)
    assert spread.samples == [ds.samples[i] for i in (0, 2, 4, 6)] and spread.targets.tolist() == [3, 3, 7, 7]
    assert ImageNetVal(root, limit=4).targets.tolist() == [3, 3, 3, 3]
    assert ImageNetVal(root, limit=3, spread=True).samples == [ds.samples[i] for i in (0, 2, 5)]
    assert ImageNetVal(root, limit=99, spread=True).samples == ds.samples  # more than there are: all
    with pytest.raises(ValueError, match="positive integer"):
        ImageNetVal(root, limit=0, spread=True)
    picked = ["img0.JPEG", "img2.JPEG", "img0.JPEG", "img2.JPEG"]
    readers = {
        "A": lambda: ImageNetA(image_folder(tmp_path / "a", imagenet_a_wnids()[:2], per_class=4), limit=4, spread=True),
        "R": lambda: ImageNetR(image_folder(tmp_path / "r", imagenet_r_wnids()[:2], per_class=4), limit=4, spread=True),
        "O": lambda: ImageNetO(image_folder(tmp_path / "o", wnids, per_class=4), limit=4, spread=True),
        "val in O's classes": lambda: ImageNetVal(root, classes=wnids, limit=4, spread=True),
    }
    for c in ("snow", "fog"):
        image_folder(tmp_path / "c" / c / "2", wnids, per_class=4)
        readers[f"C {c}"] = lambda c=c: ImageNetC(tmp_path / "c", c, 2, limit=4, spread=True)
    for v in ("mixed_same", "mixed_rand"):
        image_folder(tmp_path / "in9" / v / "val", ["00_dog", "01_bird"], per_class=4)
        readers[f"9 {v}"] = lambda v=v: ImageNet9(tmp_path / "in9", v, limit=4, spread=True)
    for name, make in readers.items():
        got = make()
        assert [p.name for p, _ in got.samples] == picked, name
        assert len(set(got.targets.tolist())) == 2, name
    for k in range(4):
        for wnid in wnids:
            (tmp_path / "p" / "rotate" / wnid).mkdir(parents=True, exist_ok=True)
            np.save(tmp_path / "p" / "rotate" / wnid / f"s{k}.npy", frames_for(k).numpy())
    p = ImageNetP(tmp_path / "p", "rotate", limit=4, spread=True)
    assert [x.name for x, _ in p.samples] == ["s0.npy", "s2.npy"] * 2 and p.targets.tolist() == [3, 3, 7, 7]


def test_layout_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"does not exist.*<root>/<wnid>/<image>"):
        ImageNetVal(tmp_path / "missing")
    loose = tmp_path / "loose"
    write_image(loose / "a.JPEG", 0)
    with pytest.raises(DatasetLayoutError, match=r"1 file\(s\) directly in it \(a.JPEG.*per class$"):
        ImageNetVal(loose)
    write_image(loose / "ILSVRC2012_val_00000001.JPEG", 1)  # the val archive as it unpacks: how to sort it
    with pytest.raises(DatasetLayoutError, match=r"per class \(ImageNet's val archive unpacks flat: its valprep\.sh"):
        ImageNetVal(loose)
    unknown = image_folder(tmp_path / "unknown", [WNIDS[0], "cats", "dogs"], per_class=1)
    with pytest.raises(DatasetLayoutError, match=r"2 of 3 folder\(s\).*cats, dogs.*n01440764"):
        ImageNetVal(unknown)
    c_root = image_folder(tmp_path / "c", ["snow", "fog"], per_class=1)
    with pytest.raises(DatasetLayoutError, match="look like ImageNet-C"):
        ImageNetVal(c_root)
    empty = tmp_path / "empty"
    (empty / WNIDS[0]).mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="no files with suffix"):
        ImageNetVal(empty)


def test_imagenet_a_and_r_subsets(tmp_path):
    a_wnids = imagenet_a_wnids()[:2]
    ds = ImageNetA(image_folder(tmp_path / "a", a_wnids))
    assert torch.equal(ds.class_subset, imagenet_a_indices())
    assert set(ds.targets.tolist()) == {WNIDS.index(w) for w in a_wnids}
    logits = torch.zeros(len(ds), 1000)
    logits[:, 0] = 10.0                                     # class 0 (tench) is outside ImageNet-A's 200
    logits[torch.arange(len(ds)), ds.targets] = 1.0         # the true class is the best of the 200
    assert metrics.accuracy(logits, ds.targets) == 0.0
    assert metrics.accuracy(logits, ds.targets, ds.class_subset) == 100.0
    outside = next(w for w in WNIDS if w not in set(imagenet_a_wnids()))
    image_folder(tmp_path / "a", [outside], per_class=1)
    with pytest.raises(DatasetLayoutError, match=f"{outside}.*ImageNet-A's 200 classes"):
        ImageNetA(tmp_path / "a")
    r = ImageNetR(image_folder(tmp_path / "r", imagenet_r_wnids()[-1:]))
    assert torch.equal(r.class_subset, imagenet_r_indices()) and r.targets.tolist() == [int(imagenet_r_indices()[-1])] * 2


def test_imagenet_o_and_its_in_distribution_set(tmp_path):
    o_wnids = [WNIDS[5], WNIDS[900]]
    o = ImageNetO(image_folder(tmp_path / "o", o_wnids))
    assert o.class_subset.tolist() == [5, 900] and o.classes == o_wnids
    assert torch.equal(imagenet_o_indices(tmp_path / "o"), o.class_subset)
    val = image_folder(tmp_path / "val", [WNIDS[5], WNIDS[6], WNIDS[900]])
    inside = ImageNetVal(val, classes=o.classes)
    assert inside.classes == o_wnids and set(inside.targets.tolist()) == {5, 900}
    with pytest.warns(UserWarning, match="1 of the 2 requested"):
        ImageNetVal(val, classes=[WNIDS[5], WNIDS[7]])
    with pytest.raises(DatasetLayoutError, match="none of the 1 requested"):
        ImageNetVal(val, classes=[WNIDS[8]])


# ----------------------------------------------------------------------------- ImageNet-C

def make_imagenet_c(root):
    for corruption, severities in (("snow", (1, 3)), ("speckle_noise", (5,))):
        for s in severities:
            image_folder(root / corruption / str(s), [WNIDS[1], WNIDS[2]], per_class=1)
    return root


def test_imagenet_c_reader_and_contents(tmp_path):
    root = make_imagenet_c(tmp_path / "c")
    assert imagenet_c_contents(root) == {"snow": [1, 3], "speckle_noise": [5]}
    ds = ImageNetC(root, "snow", 3, transform=transform_for({"input_size": (3, 224, 224)}, resize=False))
    assert len(ds) == 2 and ds.targets.tolist() == [1, 2]
    assert ds[0][0].shape == (3, 10, 12)
    with pytest.raises(DatasetLayoutError, match=r"severities found for snow: \[1, 3\]"):
        ImageNetC(root, "snow", 2)
    with pytest.raises(DatasetLayoutError, match="found: snow, speckle_noise"):
        ImageNetC(root, "fog", 1)
    with pytest.raises(ValueError, match="unknown corruption 'sn0w'"):
        ImageNetC(root, "sn0w", 1)
    write_image(root / "snow" / "1" / "stray.JPEG", 0)
    (root / "snow" / "1" / WNIDS[1]).rename(root / "snow" / "1" / "wrong")
    with pytest.raises(DatasetLayoutError, match="wrong"):
        ImageNetC(root, "snow", 1)


def test_imagenet_c_layout_errors(tmp_path):
    val_like = image_folder(tmp_path / "val", [WNIDS[0]], per_class=1)
    with pytest.raises(DatasetLayoutError, match="not corruption names.*is this ImageNet-val"):
        imagenet_c_contents(val_like)
    flat = tmp_path / "flat"
    write_image(flat / "snow" / "3" / "a.JPEG", 0)
    with pytest.raises(DatasetLayoutError, match=r"1 file\(s\) directly in it"):
        ImageNetC(flat, "snow", 3)
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        ImageNetC(tmp_path / "nothing", "snow", 3)


def test_imagenet_c_and_p_folders_one_level_off_say_which_folder_to_give(tmp_path):
    """The release's per-category ImageNet-C archives extracted each into its own folder
    (imagenet-c/noise/gaussian_noise/...), an extra top folder, or a corruption, severity or
    perturbation folder given instead of the benchmark's: refused as before, now saying which folder
    holds the benchmark (the severity folder was asked whether it was ImageNet-val)."""
    def refused(folder, ending, reader=imagenet_c_contents):
        with pytest.raises(DatasetLayoutError, match=re.escape(ending) + "$"):
            reader(folder)

    c = make_imagenet_c(tmp_path / "c")
    top = tmp_path / "top"
    (top / "imagenet-c").mkdir(parents=True)
    c.rename(top / "imagenet-c" / "imagenet-c")
    c = top / "imagenet-c" / "imagenet-c"
    refused(top / "imagenet-c", f"are not corruption names; expected <root>/<corruption>/<severity 1..5>/<wnid>/"
                                f"<image>.JPEG with corruptions from: gaussian_noise, shot_noise, impulse_noise, "
                                f"defocus_blur, glass_blur, motion_blur, zoom_blur, snow, frost, fog, brightness, "
                                f"contrast, elastic_transform, pixelate, jpeg_compression, speckle_noise, "
                                f"gaussian_blur, spatter, saturate. {c} holds the corruption folders: give that folder.")
    refused(c / "snow", f"{c / 'snow'} is itself one corruption folder: give the folder holding it, {c}.")
    refused(c / "snow" / "3", f"{c / 'snow' / '3'} is inside the corruption folder snow: give {c}.")
    categories = tmp_path / "categories"
    (categories / "weather").mkdir(parents=True)
    (categories / "noise").mkdir()
    (c / "snow").rename(categories / "weather" / "snow")
    (c / "speckle_noise").rename(categories / "noise" / "speckle_noise")
    refused(categories, f"noise, weather hold corruption folders (noise/speckle_noise, weather/snow, ...), as the "
                        f"release's archives extract each into a folder of its own: move the corruption folders out "
                        f"of them into {categories}.")
    p = tmp_path / "p" / "rotate" / WNIDS[0]
    p.mkdir(parents=True)
    np.save(p / "a.npy", frames_for(0, t=4).numpy())
    refused(tmp_path / "p" / "rotate", f"{tmp_path / 'p' / 'rotate'} is itself one perturbation folder: give the "
                                       f"folder holding it, {tmp_path / 'p'}.", imagenet_p_contents)


def test_imagenet_c_corruption_without_severity_folders_is_named(tmp_path):
    """<corruption>/<wnid>/ (severity folders left out) was read as a corruption with no severities:
    alone, the eval said only "holds no <corruption>/<severity>/ folders"; beside a good corruption,
    it vanished from the run unnoticed. Both now name the folder and what it holds."""
    root = make_imagenet_c(tmp_path / "c")
    image_folder(root / "fog", [WNIDS[0], WNIDS[1]], per_class=1)
    message = (r"no severity folders \(1\.\.5\) in fog under .* \(fog holds n01440764, n01443537\); expected "
               r"<root>/<corruption>/<severity 1\.\.5>/<wnid>/<image>\.JPEG")
    with pytest.raises(DatasetLayoutError, match=message):
        imagenet_c_contents(root)
    with pytest.raises(DatasetLayoutError, match=message):
        ImageNetC(root, "snow", 1)


@pytest.mark.parametrize("other", ["0", "6", "sev5"])
def test_imagenet_c_folder_that_is_not_a_severity_is_named(tmp_path, other):
    """Severities laid out 0..4 were read as 1..4 (folder 0 left out, the CE "incomplete"), and a stray
    6/ was dropped: the eval ran on what it found without a word."""
    root = make_imagenet_c(tmp_path / "c")
    image_folder(root / "snow" / other, [WNIDS[1]], per_class=1)
    with pytest.raises(DatasetLayoutError, match=f"ImageNet-C: snow under .* holds folder\\(s\\) {other}, not "
                                                 f"severities; .* severities are the folders 1 to 5"):
        imagenet_c_contents(root)


def test_a_folder_of_other_files_says_what_it_found(tmp_path):
    """ImageNet-P pointed at frames saved as JPEGs (or A at a folder of .txt): the error names the
    files it found instead of only the suffixes it wanted."""
    root = tmp_path / "p"
    image_folder(root / "translate", [WNIDS[0]], per_class=2)
    with pytest.raises(DatasetLayoutError, match=r"no files with suffix \.mp4, \.npy .* \(found only \.jpeg files\)"):
        ImageNetP(root, "translate")
    (root / "translate" / WNIDS[0] / "img0.JPEG").unlink()
    (root / "translate" / WNIDS[0] / "img1.JPEG").unlink()
    with pytest.raises(DatasetLayoutError, match=r"\(they hold no files\)"):
        ImageNetP(root, "translate")
    # ImageNet-A given ImageNet-P's folder: the hint names the eval's option, not only a reader class
    with pytest.raises(DatasetLayoutError, match=r"translate; .* look like ImageNet-C .* --imagenet-p-dir"):
        ImageNetA(root)
    # the release's noise difficulty folders (gaussian_noise_2, shot_noise_3) get the hint too
    image_folder(root / "shot_noise_3", [WNIDS[0]], per_class=1)
    with pytest.raises(DatasetLayoutError, match=r"shot_noise_3, translate; .* look like ImageNet-C .* --imagenet-p-dir"):
        ImageNetA(root)


def test_looks_like_wnids_only_when_every_name_is_one():
    from lkfast.data.imagenet import looks_like_wnids

    assert looks_like_wnids(["n01440764", "n01443537"])
    assert not looks_like_wnids(["n01440764", "fog"]) and not looks_like_wnids(["n0144076"]) and not looks_like_wnids([])


# ----------------------------------------------------------------------------- ImageNet-P

def frames_for(seed, t=4, h=16, w=16):
    # smooth frames, so that H.264 keeps them close
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    out = torch.stack([torch.stack([(xx * 8 + k * 20 + seed * 30) % 256, (yy * 8) % 256,
                                    torch.full_like(xx, 40 * k + 10)]) for k in range(t)])
    return out.to(torch.uint8)                                    # (T, 3, H, W)


@needs_av
def test_imagenet_p_mp4_and_npy(tmp_path):
    from lkfast.data import encode_mp4

    root = tmp_path / "p"
    clip = frames_for(0)
    (root / "rotate" / WNIDS[4]).mkdir(parents=True)
    (root / "rotate" / WNIDS[4] / "a.mp4").write_bytes(encode_mp4(clip, preset="ultrafast"))
    np.save(root / "rotate" / WNIDS[4] / "b.npy", frames_for(1).permute(0, 2, 3, 1).numpy())   # (T, H, W, 3)
    (root / "rotate" / WNIDS[9]).mkdir()
    np.save(root / "rotate" / WNIDS[9] / "c.npy", frames_for(2).numpy())                     # (T, 3, H, W)
    ds = ImageNetP(root, "rotate", difficulty=2)
    assert len(ds) == 3 and ds.targets.tolist() == [4, 4, 9] and ds.stride == 2 and not ds.noise
    video, target = ds[0]
    assert target == 4 and video.shape == (4, 3, 16, 16) and video.dtype == torch.float32
    assert (video - clip.float() / 255).abs().mean() < 0.02
    assert torch.equal(ds[1][0], frames_for(1).float() / 255)
    assert torch.equal(ds[2][0], frames_for(2).float() / 255)
    # a.mp4 with its frames beside it as a.npy (a conversion, a second rendering) is one sequence, read once
    np.save(root / "rotate" / WNIDS[4] / "a.npy", clip.numpy())
    with pytest.warns(UserWarning, match=r"1 sequence\(s\) .* as \.mp4 and as \.npy \(first: .*a\.mp4\); each is read "
                                         r"once, from its \.npy"):
        ds = ImageNetP(root, "rotate")
    assert [p.name for p, _ in ds.samples] == ["a.npy", "b.npy", "c.npy"]
    assert torch.equal(ds[0][0], clip.float() / 255)


def test_imagenet_p_noise_difficulty_folders(tmp_path):
    root = tmp_path / "p"
    for folder in ("gaussian_noise", "gaussian_noise_3"):
        (root / folder / WNIDS[0]).mkdir(parents=True)
        np.save(root / folder / WNIDS[0] / f"{folder}.npy", frames_for(0).numpy())
    (root / "tilt" / WNIDS[0]).mkdir(parents=True)
    assert imagenet_p_contents(root) == {"gaussian_noise": [1, 3], "tilt": [1, 2, 3]}
    hard = ImageNetP(root, "gaussian_noise", difficulty=3)
    assert hard.samples[0][0].name == "gaussian_noise_3.npy" and hard.stride == 1 and hard.noise
    with pytest.raises(DatasetLayoutError, match="no folder 'gaussian_noise_2'.*found: gaussian_noise, gaussian_noise_3"):
        ImageNetP(root, "gaussian_noise", difficulty=2)
    with pytest.raises(ValueError, match="unknown perturbation"):
        ImageNetP(root, "fog")
    (root / "tilt_2").mkdir()
    with pytest.raises(DatasetLayoutError, match="tilt_2.*not perturbation names"):
        imagenet_p_contents(root)



def test_imagenet_p_validation_perturbations(tmp_path):
    """The release's 4 validation perturbations are ImageNet-P folders too (speckle_noise with its
    harder levels as a noise sequence); they were refused as "not perturbation names"."""
    root = tmp_path / "p"
    for folder in ("shear", "speckle_noise", "speckle_noise_2", "translate", "spatter", "gaussian_blur"):
        (root / folder / WNIDS[0]).mkdir(parents=True)
        np.save(root / folder / WNIDS[0] / "a.npy", frames_for(0).numpy())
    assert imagenet_p_contents(root) == {"translate": [1, 2, 3], "speckle_noise": [1, 2], "gaussian_blur": [1, 2, 3],
                                         "spatter": [1, 2, 3], "shear": [1, 2, 3]}
    speckle = ImageNetP(root, "speckle_noise", difficulty=2)
    assert speckle.noise and speckle.stride == 1 and speckle.samples[0][0].parent.parent.name == "speckle_noise_2"
    shear = ImageNetP(root, "shear", difficulty=3)
    assert not shear.noise and shear.stride == 3 and len(shear) == 1


def test_imagenet_p_sequence_of_another_length_is_skipped_and_named(tmp_path):
    # one array cut short (a partly decodable video gives the same) would make the frames of a
    # batch impossible to stack and stop the whole run: it is skipped and counted instead
    root = tmp_path / "p"
    for wnid, name, t in ((WNIDS[0], "a", 6), (WNIDS[0], "b_short", 4), (WNIDS[0], "c", 6), (WNIDS[1], "d", 6)):
        (root / "translate" / wnid).mkdir(parents=True, exist_ok=True)
        np.save(root / "translate" / wnid / f"{name}.npy", frames_for(len(name), t=t).numpy())
    ds = ImageNetP(root, "translate")
    assert ds.frames == 6
    with pytest.warns(UserWarning, match=r"b_short\.npy.*4 frames where the sequences of 'translate' have 6"):
        assert ds[1] == (None, 0)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_skipping)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(loader)
    assert [skipped for _, _, skipped in batches] == [1, 0]
    videos = torch.cat([images for images, _, _ in batches])
    assert videos.shape == (3, 6, 3, 16, 16) and torch.cat([t for _, t, _ in batches]).tolist() == [0, 0, 1]
    assert torch.equal(videos[2], frames_for(1, t=6).float() / 255)
    # an explicit count wins over the probe
    short = ImageNetP(root, "translate", frames=4)
    assert short.frames == 4 and short[1][0].shape == (4, 3, 16, 16)
    with pytest.warns(UserWarning, match=r"a\.npy.*6 frames where the sequences of 'translate' have 4"):
        assert short[0] == (None, 0)
    with pytest.raises(ValueError, match="frames must be an integer >= 2"):
        ImageNetP(root, "translate", frames=1)
    # nothing readable to probe: the release's count (31 for rotate, 41 for translate)
    (root / "rotate" / WNIDS[0]).mkdir(parents=True)
    (root / "rotate" / WNIDS[0] / "bad.mp4").write_bytes(b"\x00" * 64)
    assert ImageNetP(root, "rotate").frames == 31


def test_imagenet_p_frame_count_is_the_majoritys_when_the_probed_sequences_disagree(tmp_path):
    # ten sequences, three short ones where the five probes fall (sorted places 0, 2, 4 of 0, 2, 4, 7, 9):
    # the probes' majority said 4 and every 6-frame sequence, the release-like majority, was skipped
    root = tmp_path / "p"
    for k in range(10):
        folder = root / "translate" / WNIDS[k // 5]
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"s{k}.npy", frames_for(k, t=4 if k in (0, 2, 4) else 6).numpy())
    ds = ImageNetP(root, "translate")
    assert ds.frames == 6 and ds[1][0].shape == (6, 3, 16, 16)
    with pytest.warns(UserWarning, match=r"s0\.npy.*4 frames where the sequences of 'translate' have 6"):
        assert ds[0] == (None, 0)


@needs_av
def test_imagenet_p_mp4_cut_short_is_skipped(tmp_path):
    from lkfast.data import encode_mp4

    folder = tmp_path / "p" / "scale" / WNIDS[0]
    folder.mkdir(parents=True)
    for name, t in (("a", 5), ("b", 3), ("c", 5)):
        (folder / f"{name}.mp4").write_bytes(encode_mp4(frames_for(0, t=t), preset="ultrafast"))
    ds = ImageNetP(tmp_path / "p", "scale")
    assert ds.frames == 5 and ds[0][0].shape == (5, 3, 16, 16)
    with pytest.warns(UserWarning, match=r"b\.mp4.*3 frames where the sequences of 'scale' have 5"):
        assert ds[1] == (None, 0)

# ----------------------------------------------------------------------------- ImageNet-9

def test_imagenet9_reader(tmp_path):
    root = tmp_path / "bg_challenge"
    for variant in ("mixed_same", "mixed_rand"):
        for cls in ("00_dog", "03_reptile", "08_fish"):
            write_image(root / variant / "val" / cls / "x.JPEG", seed=len(cls))
    (root / "no_fg").mkdir()                                 # a variant folder without val/ is not a variant
    write_image(root / "fg_mask" / "val" / "00_dog" / "x.JPEG", seed=1)  # the release's masks: not one either
    assert imagenet9_contents(root) == ["mixed_same", "mixed_rand"]
    for misnamed in ("mixed-next", "Only_FG"):  # a variant under another name was left out without a word
        write_image(root / misnamed / "val" / "00_dog" / "x.JPEG", seed=1)
        with pytest.raises(DatasetLayoutError, match=f"ImageNet-9: folder\\(s\\) {misnamed} in .* hold val/ but "
                                                     f"are not variant names; .*: rename them"):
            imagenet9_contents(root)
        shutil.rmtree(root / misnamed)
    shutil.rmtree(root / "fg_mask")
    with pytest.raises(DatasetLayoutError, match="has no 'val' folder"):
        ImageNet9(root, "no_fg")
    with pytest.raises(DatasetLayoutError, match="no <variant>/val folder"):
        imagenet9_contents(root / "mixed_rand" / "val")
    ds = ImageNet9(root, "mixed_rand")
    assert ds.targets.tolist() == [0, 3, 8] and ds.map_checked is False
    (root / "in_to_in9.json").write_text(json.dumps({str(i): int(v) for i, v in enumerate(imagenet9_class_map())}))
    assert ImageNet9(root, "mixed_same").map_checked is True
    with pytest.raises(DatasetLayoutError, match="variants found: mixed_rand, mixed_same, no_fg"):
        ImageNet9(root, "only_fg")
    with pytest.raises(ValueError, match="unknown ImageNet-9 variant"):
        ImageNet9(root, "mixed")
    (root / "original" / "val" / "dogs").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match=r"1 class folder\(s\) .* not ImageNet-9 classes: dogs; expected .*00_dog"):
        ImageNet9(root, "original")


def test_imagenet9_targets_follow_folder_names_not_sort_order(tmp_path):
    # the nine classes in target order are dog, bird, vehicle, ...; sorted, names start with bird
    # and wnids with n01503061 (bird): a target must come from what the folder says it is
    from lkfast.data.imagenet import IMAGENET9_CLASSES, IMAGENET9_WNIDS

    namings = {"names": list(IMAGENET9_CLASSES), "wnids": list(IMAGENET9_WNIDS),
               "numbered": [f"{i:02d}_{c}" for i, c in enumerate(IMAGENET9_CLASSES)]}
    for naming, folders in namings.items():
        root = tmp_path / naming
        for k, folder in enumerate(folders):
            write_image(root / "original" / "val" / folder / "x.JPEG", seed=k)
        ds = ImageNet9(root, "original")
        assert {p.parent.name: t for p, t in ds.samples} == {f: i for i, f in enumerate(folders)}, naming
    subset = tmp_path / "subset"
    for folder in ("fish", "dog", IMAGENET9_WNIDS[2]):
        write_image(subset / "original" / "val" / folder / "x.JPEG", seed=1)
    assert sorted(ImageNet9(subset, "original").targets.tolist()) == [0, 2, 8]
    # nine folders of another naming: refused, not numbered by sort order
    other = tmp_path / "other"
    for k in range(9):
        write_image(other / "original" / "val" / f"class_{k}" / "x.JPEG", seed=k)
    with pytest.raises(DatasetLayoutError, match=r"9 class folder\(s\) .* are not ImageNet-9 classes: class_0"):
        ImageNet9(other, "original")
    clash = tmp_path / "clash"
    for folder in ("01_dog", "02_vehicle"):
        write_image(clash / "original" / "val" / folder / "x.JPEG", seed=1)
    with pytest.raises(DatasetLayoutError, match=r"number and name disagree: 01_dog \(number 1 is bird"):
        ImageNet9(clash, "original")
    twice = tmp_path / "twice"
    for folder in ("dog", "00_dog"):
        write_image(twice / "original" / "val" / folder / "x.JPEG", seed=1)
    with pytest.raises(DatasetLayoutError, match="both class 0 \\(dog\\)"):
        ImageNet9(twice, "original")


# ----------------------------------------------------------------------------- unreadable files, transforms

def test_unreadable_files_are_skipped_and_counted(tmp_path):
    root = image_folder(tmp_path / "val", [WNIDS[0]], per_class=3)
    (root / WNIDS[0] / "img1.JPEG").write_bytes(b"this is not a JPEG")
    good = (root / WNIDS[0] / "img2.JPEG").read_bytes()
    (root / WNIDS[0] / "img2.JPEG").write_bytes(good[: len(good) // 2])       # truncated
    ds = ImageNetVal(root)
    with pytest.warns(UserWarning, match="img1.JPEG"):
        assert ds[1] == (None, 0)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_skipping)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images, targets, skipped = next(iter(loader))
    assert skipped == 2 and images.shape == (1, 3, 10, 12) and targets.tolist() == [0]
    assert sum("skipping unreadable file" in str(w.message) for w in caught) == 2
    p_root = tmp_path / "p" / "scale" / WNIDS[0]
    p_root.mkdir(parents=True)
    (p_root / "bad.mp4").write_bytes(b"\x00" * 64)
    np.save(p_root / "bad_dtype.npy", np.zeros((2, 4, 4, 3), dtype=np.float32))
    p = ImageNetP(tmp_path / "p", "scale")
    with pytest.warns(UserWarning) as caught:
        batch = [p[0], p[1]]
    assert ["bad.mp4" in str(w.message) for w in caught] == [True, False]
    assert "bad_dtype.npy" in str(caught[1].message) and "float32" in str(caught[1].message)
    images, targets, skipped = collate_skipping(batch)
    assert images is None and targets.numel() == 0 and skipped == 2


def test_transform_for_is_timm_eval_without_normalisation():
    from timm.data import create_transform

    config = {"input_size": (3, 24, 24), "interpolation": "bicubic", "crop_pct": 0.7, "crop_mode": "center",
              "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    ours = transform_for(config)(image)
    assert ours.shape == (3, 24, 24) and ours.dtype == torch.float32 and 0 <= ours.min() and ours.max() <= 1
    normalised = create_transform(**config, is_training=False)(image)
    mean, std = torch.tensor(config["mean"])[:, None, None], torch.tensor(config["std"])[:, None, None]
    assert torch.allclose(ours, normalised * std + mean, atol=1e-5)
    as_is = transform_for(config, resize=False)(image)
    assert as_is.shape == (3, 40, 50)
    with pytest.raises(ValueError, match="resolve_data_config"):
        transform_for({"size": 224})
