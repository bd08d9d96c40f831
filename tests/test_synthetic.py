"""The synthetic default benchmark (lkfast.data.synthetic) and the verified cache (lkfast.cache)."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lkfast import cache
from lkfast.data import synthetic as syn

TINY = syn.SyntheticConfig(train_per_class=2, val_per_class=3, c_per_class=1, p_per_class=1, in9_per_class=3,
                           r_per_class=1, ood_per_class=2, a_pool_per_class=4,
                           corruptions=("gaussian_noise", "snow"), perturbations=("translate", "brightness"))


def test_render_is_deterministic_and_prefix_stable():
    a = syn.render(syn.CLASSES, 3, "val", 3)
    b = syn.render(syn.CLASSES, 3, "val", 3)
    for field in ("images", "masks", "foregrounds", "backgrounds", "labels"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    # image k of a class does not depend on how many are drawn
    c = syn.render(syn.CLASSES, 3, "val", 2)
    keep = np.concatenate([np.arange(3 * i, 3 * i + 2) for i in range(len(syn.CLASSES))])
    assert np.array_equal(c.images, a.images[keep])
    other_seed = syn.render(syn.CLASSES, 4, "val", 3)
    other_split = syn.render(syn.CLASSES, 3, "train", 3)
    assert not np.array_equal(other_seed.images, a.images)
    assert not np.array_equal(other_split.images, a.images)


def test_render_pinned_bytes():
    # Same seed, same pixels on every machine: a change here means cached benchmarks (and results)
    # from other machines or versions no longer match. Bump _GENERATOR_VERSION when it is deliberate.
    data = syn.render(syn.CLASSES + syn.OOD_CLASSES, 0, "val", 1)
    sketch = syn.render(syn.CLASSES, 0, "r", 1, style="sketch")
    digest = hashlib.sha256(data.images.tobytes() + data.masks.tobytes() + sketch.images.tobytes()).hexdigest()
    assert digest == PINNED_DIGEST, f"rendering changed: {digest}"


PINNED_DIGEST = "cd7036b438afb2dfa67be4bdafc2e75fd5ebf89ab8005680f989ac50aee4e9c9"


def test_masks_match_images():
    d = syn.render(syn.CLASSES + syn.OOD_CLASSES, 1, "val", 2)
    assert np.array_equal(syn.composite(d.foregrounds, d.masks, d.backgrounds), d.images)
    outside, inside = d.masks == 0, d.masks == 255
    assert np.array_equal(d.images[outside], d.backgrounds[outside])
    assert np.array_equal(d.images[inside], d.foregrounds[inside])
    # every image shows its shape: a solid core and a real background share
    share = (d.masks > 127).mean(axis=(1, 2))
    assert (share > 0.03).all() and (share < 0.9).all(), share
    # the foreground layer is a flat shaded colour, so it differs from the image where the background shows
    differs = np.abs(d.images.astype(int) - d.foregrounds.astype(int)).sum(-1) > 30
    assert differs[outside].mean() > 0.8


def test_backgrounds_correlate_with_class_in_training():
    d = syn.render(syn.CLASSES, 0, "train", 20)
    assert 0.65 < d.home_background.mean() < 0.95
    none = syn.render(syn.CLASSES, 0, "train", 20, background_correlation=0.0)
    assert not none.home_background.any()


def test_imagenet9_variants_have_their_properties():
    d = syn.render(syn.CLASSES, 2, "val", 4)
    variants, partners = syn.imagenet9_variants(d, seed=2)
    outside = d.masks == 0
    assert np.array_equal(variants["original"], d.images)
    assert (variants["only_fg"][outside] == 0).all(), "only_fg must have a blank (black) background"
    assert (variants["only_fg"][d.masks == 255] == d.foregrounds[d.masks == 255]).all()
    assert (variants["no_fg"][d.masks == 255] == 0).all()
    assert np.array_equal(variants["only_bg_t"], d.backgrounds)
    n = len(d.labels)
    assert (d.labels[partners["mixed_rand"]] != d.labels).all(), "mixed_rand backgrounds come from other classes"
    assert (d.labels[partners["mixed_same"]] == d.labels).all()
    assert (partners["mixed_same"] != np.arange(n)).all()
    assert (d.labels[partners["mixed_next"]] == (d.labels + 1) % len(syn.CLASSES)).all()
    for name in ("mixed_same", "mixed_rand", "mixed_next"):
        bg = d.backgrounds[partners[name]]
        assert np.array_equal(variants[name][outside], bg[outside]), name
        assert np.array_equal(variants[name][d.masks == 255], d.foregrounds[d.masks == 255]), name


def test_ood_classes_are_disjoint_from_training_classes(tmp_path):
    assert not set(syn.OOD_CLASSES) & set(syn.CLASSES)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 10))
    syn.build_imagenet_o(tmp_path, TINY, model, (0.5,) * 3, (0.25,) * 3)
    files = sorted(tmp_path.rglob("*.png"))
    assert len(files) == TINY.ood_per_class * len(syn.OOD_CLASSES)
    assert {f.name.rsplit("_", 1)[0] for f in files} == set(syn.OOD_CLASSES)
    assert {f.parent.name for f in files} <= set(syn.CLASSES)  # ImageNet-O's layout: in-distribution folders


class _ColourModel(torch.nn.Module):
    """A fixed 'reference model' that reads only the mean colour: it gets many images wrong."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(10, 3, generator=g) * 4)

    def forward(self, x):
        return x.mean(dim=(2, 3)) @ self.weight.t()


def test_imagenet_a_images_are_misclassified_by_the_reference(tmp_path):
    model = _ColourModel()
    mean, std = (0.5,) * 3, (0.25,) * 3
    kept = syn.build_imagenet_a(tmp_path, TINY, model, mean, std)
    files = sorted(tmp_path.rglob("*.png"))
    assert kept == len(files) > 0
    from PIL import Image

    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    labels = np.array([syn.CLASSES.index(f.parent.name) for f in files])
    pred, conf = syn.reference_predictions(model, images, mean, std)
    assert (pred != labels).all(), "every -A image must be misclassified by the reference model"
    record = json.loads((tmp_path / "selection.json").read_text())
    assert record["pool_size"] == TINY.a_pool_per_class * len(syn.CLASSES)


def test_materialised_layouts_read_by_the_benchmark_readers(tmp_path):
    from lkfast.data import ImageFolderBenchmark, ImageNet9

    parts = syn.build_base(tmp_path, TINY)
    index = syn.class_space()["folder_to_index"]
    train = ImageFolderBenchmark(parts["train"], class_index=index)
    val = ImageFolderBenchmark(parts["val"], class_index=index)
    assert len(train) == 20 and len(val) == 30 and sorted(set(val.targets.tolist())) == list(range(10))
    masks = sorted(p.relative_to(parts["val-masks"]) for p in parts["val-masks"].rglob("*.png"))
    assert masks == sorted(p.relative_to(parts["val"]) for p in parts["val"].rglob("*.png"))
    from lkfast.data import imagenet_c_contents

    assert imagenet_c_contents(parts["imagenet-c"]) == {"gaussian_noise": [1, 2, 3, 4, 5], "snow": [1, 2, 3, 4, 5]}
    c = ImageFolderBenchmark(parts["imagenet-c"] / "snow" / "5", class_index=index)  # the eval's reading of one
    assert len(c) == 10 and c[0][0].shape == (3, 64, 64)
    seq = np.load(next((parts["imagenet-p"] / "translate").rglob("*.npy")))
    assert seq.dtype == np.uint8 and seq.shape == (41, 64, 64, 3)
    nine = ImageNet9(parts["imagenet-9"], "mixed_rand")
    assert len(nine) == 9 * TINY.in9_per_class and sorted(set(nine.targets.tolist())) == list(range(9))
    r = ImageFolderBenchmark(parts["imagenet-r"], class_index=index)
    assert len(r) == 10


def test_cache_entry_rebuilt_when_partial_or_altered(tmp_path):
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "a").mkdir()
        (folder / "a" / "x.bin").write_bytes(b"0123456789")
        (folder / "y.txt").write_text("hello")

    entry = tmp_path / "entry"
    cache.ensure_entry(entry, build, "k1")
    assert len(calls) == 1 and cache.verify_entry(entry, "k1") == (True, "")
    cache.ensure_entry(entry, build, "k1")
    assert len(calls) == 1, "a verified entry is reused"

    (entry / "a" / "x.bin").write_bytes(b"01234")  # truncated
    assert not cache.verify_entry(entry, "k1")[0]
    cache.ensure_entry(entry, build, "k1")
    assert len(calls) == 2 and (entry / "a" / "x.bin").read_bytes() == b"0123456789"

    (entry / "y.txt").write_text("jello")  # same size, other bytes
    assert "SHA-256" in cache.verify_entry(entry, "k1")[1]
    cache.ensure_entry(entry, build, "k1")
    assert len(calls) == 3 and (entry / "y.txt").read_text() == "hello"

    (entry / "a" / "stray.png").write_bytes(b"")  # an extra file a reader would pick up
    assert not cache.verify_entry(entry, "k1")[0]
    cache.ensure_entry(entry, build, "k1")
    assert len(calls) == 4 and not (entry / "a" / "stray.png").exists()

    (entry / cache.MANIFEST).unlink()  # an interrupted build never wrote its manifest
    assert "partial" in cache.verify_entry(entry, "k1")[1]
    cache.ensure_entry(entry, build, "k1")
    assert len(calls) == 5

    cache.ensure_entry(entry, build, "k2")  # other settings
    assert len(calls) == 6 and cache.verify_entry(entry, "k2")[0]


def test_cache_entry_reasons_and_rebuild_log(tmp_path):
    """verify_entry's first reason: a truncated file by its size (before any hashing), a manifest of
    another format version or one that is no JSON; ensure_entry rebuilds each, saying why in ``log``
    (not for an entry that was never built)."""
    def build(folder):
        (folder / "x.bin").write_bytes(b"0123456789")

    entry, lines = tmp_path / "entry", []
    cache.ensure_entry(entry, build, "k", log=lines.append)
    assert lines == []  # a first build is no rebuild
    (entry / "x.bin").write_bytes(b"01234")
    assert cache.verify_entry(entry, "k") == (False, "x.bin: size 5, manifest says 10")
    cache.ensure_entry(entry, build, "k", log=lines.append)
    assert lines == [f"lkfast cache: rebuilding {entry} (x.bin: size 5, manifest says 10)"]
    manifest = entry / cache.MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format": 0}))
    assert cache.verify_entry(entry, "k") == (False, "built for other settings")
    cache.ensure_entry(entry, build, "k")
    assert cache.verify_entry(entry, "k") == (True, "")
    manifest.write_text('{"format": 1, "key": "k", "files": {')  # cut short
    assert cache.verify_entry(entry, "k") == (False, "unreadable manifest")
    cache.ensure_entry(entry, build, "k")
    assert cache.verify_entry(entry, "k") == (True, "")


def test_a_process_that_cannot_be_signalled_is_not_gone(monkeypatch):
    """process_gone: a pid that exists but belongs to another user (os.kill says EPERM) is alive, so
    its temporary files are left alone; one that does not exist is gone."""
    import errno
    import os

    def kill(pid, signal):
        raise PermissionError(errno.EPERM, "Operation not permitted") if pid == 4242 else ProcessLookupError(pid)
    monkeypatch.setattr(os, "kill", kill)
    assert cache.process_gone(4242) is False
    assert cache.process_gone(4243) is True


def test_the_build_lock_is_exclusive_after_its_file_was_replaced(tmp_path):
    """A process that opened the lock file before its holder removed it (on release) must not build
    under the removed file's lock: it locks the file now at the path, so that a third process, which
    opens that path, waits for it."""
    import fcntl
    import threading

    entry, started, release, said, checks = tmp_path / "m", threading.Event(), threading.Event(), [], []
    lock = tmp_path / ".m.lock"

    def slow_build(folder):
        started.set()
        assert release.wait(10)
        (folder / "w").write_text("1")

    def second_build(folder):  # runs while the second holds the lock: a third cannot take it
        with open(lock, "a") as third:
            try:
                fcntl.flock(third, fcntl.LOCK_EX | fcntl.LOCK_NB)
                checks.append("third process locked too")
                fcntl.flock(third, fcntl.LOCK_UN)
            except BlockingIOError:
                checks.append("third waits")
        (folder / "w").write_text("2")

    first = threading.Thread(target=cache.ensure_entry, args=(entry, slow_build, "k1"))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=lambda: cache.ensure_entry(entry, second_build, "k2", log=said.append))
    second.start()
    for _ in range(100):  # the second has opened the old lock file and waits on it
        if said:
            break
        threading.Event().wait(0.05)
    assert said
    release.set()
    first.join(10)
    second.join(10)
    assert checks == ["third waits"] and cache.verify_entry(entry, "k2") == (True, "")


def test_failed_build_leaves_previous_entry(tmp_path):
    entry = tmp_path / "entry"
    cache.ensure_entry(entry, lambda f: (f / "ok.txt").write_text("1"), "k1")

    def broken(folder):
        (folder / "half.txt").write_text("partial")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        cache.ensure_entry(entry, broken, "k2")
    assert cache.verify_entry(entry, "k1")[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LKFAST_CACHE", str(tmp_path / "c"))
    assert cache.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LKFAST_CACHE")
    assert cache.cache_dir() == Path.home() / ".cache" / "lkfast"
