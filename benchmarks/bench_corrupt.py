"""Corrupted images per second: lkfast.corrupt (batched torch) against the `imagecorruptions`
reference (numpy / OpenCV / scikit-image, one image at a time), same machine, same run.

    pytest benchmarks/bench_corrupt.py --benchmark-json=benchmarks/results/corrupt_cpu.json
    python benchmarks/bench_corrupt.py benchmarks/results/corrupt_cpu.json benchmarks/results/corrupt_cpu.md

Settings: 224x224 RGB, severity 3; lkfast corrupts a batch of BATCH images at once, the reference
loops over REFERENCE_IMAGES images (its cost is linear in the count; fewer keeps the run short).
On a GPU set LKFAST_BENCH_DEVICE=cuda (images and generator live there).
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import lkfast.corrupt as lc

SIZE = 224
SEVERITY = 3
BATCH = int(os.environ.get("LKFAST_BENCH_BATCH", 32))
REFERENCE_IMAGES = int(os.environ.get("LKFAST_BENCH_REFERENCE_IMAGES", 8))
DEVICE = os.environ.get("LKFAST_BENCH_DEVICE", "cpu")


def photo_like(n, size=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g) * 0.8 + 0.1, size=(size, size),
                                        mode="bicubic", align_corners=False)
    x = x + 0.05 * torch.randn(n, 3, size, size, generator=g)  # some texture, like a photograph
    return (x.clamp(0, 1) * 255).round() / 255


@pytest.fixture(scope="module")
def images():
    return photo_like(BATCH).to(DEVICE)


# lkfast and the reference alternate name by name, so that load from other processes on the
# machine hits both alike
CASES = [(name, implementation) for name in lc.names("all") for implementation in ("lkfast", "reference")]


@pytest.mark.parametrize("name,implementation", CASES)
def test_corrupt(benchmark, images, name, implementation):
    if implementation == "lkfast":
        run_lkfast(benchmark, images, name)
    else:
        run_reference(benchmark, name)


def run_lkfast(benchmark, images, name):
    if name == "frost":
        try:
            lc.frost_directory()
        except lc.FrostPhotosMissing as missing:  # a bare GPU machine: the other corruptions still timed
            pytest.skip(str(missing))
    # a CPU generator on every device, as the dataset writer and the eval draw (the same images on the
    # CPU and a GPU): on CUDA the random numbers are drawn on the CPU and moved
    generator = torch.Generator().manual_seed(0)

    def run():
        out = lc.corrupt(images, name, SEVERITY, generator)
        if out.is_cuda:
            torch.cuda.synchronize()
        return out

    run()  # warm-up: caches (Gaussian matrices, frost photographs), lazy imports
    benchmark.group = name
    benchmark.extra_info.update(images=images.shape[0], implementation="lkfast", device=DEVICE)
    benchmark.pedantic(run, rounds=3, iterations=1)


def run_reference(benchmark, name):
    ic = pytest.importorskip("imagecorruptions", reason="pip install imagecorruptions-imaug for the baseline")
    batch = (photo_like(REFERENCE_IMAGES) * 255).byte().permute(0, 2, 3, 1).numpy()

    def run():
        return [ic.corrupt(image, severity=SEVERITY, corruption_name=name) for image in batch]

    ic.corrupt(batch[0], severity=SEVERITY, corruption_name=name)  # warm-up (numba compiles glass blur)
    benchmark.group = name
    benchmark.extra_info.update(images=len(batch), implementation="imagecorruptions", device="cpu")
    benchmark.pedantic(run, rounds=2, iterations=1)


def markdown_table(results: dict) -> str:
    """Markdown table (images/s of each implementation, ratio) from a pytest-benchmark JSON dict."""
    rates = {}
    for bench in results["benchmarks"]:
        info = bench["extra_info"]
        name = bench["group"]
        rates.setdefault(name, {})[info["implementation"]] = info["images"] / bench["stats"]["mean"]
    from lkfast.tables import markdown_table as table_markdown

    machine = results.get("machine_info", {})
    caption = (f"Corrupted 224x224 images per second, severity {SEVERITY}; lkfast batched (batch {BATCH}, "
               f"device {DEVICE}, torch threads {torch.get_num_threads()}), reference `imagecorruptions` "
               f"one image at a time. CPU: {machine.get('cpu', {}).get('brand_raw', 'unknown')}.")
    rows = []
    ours_time = reference_time = 0.0
    for name in lc.names("all"):
        r = rates.get(name, {})
        ours, ref = r.get("lkfast"), r.get("imagecorruptions")
        rows.append([name, f"{ours or float('nan'):.1f}", f"{ref or float('nan'):.1f}",
                     f"{ours / ref:.1f}x" if ours and ref else "n/a"])
        if ours and ref:
            ours_time += 1 / ours
            reference_time += 1 / ref
    lines = [table_markdown(["corruption", "lkfast img/s", "imagecorruptions img/s", "speed-up"], rows, align="lrrr",
                            caption=caption).rstrip("\n")]
    if ours_time:
        lines += ["", f"**Overall** (time to apply all {len(lc.names('all'))} corruptions to one image): "
                      f"lkfast {ours_time * 1000:.1f} ms, imagecorruptions {reference_time * 1000:.1f} ms, "
                      f"speed-up **{reference_time / ours_time:.2f}x**."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python benchmarks/bench_corrupt.py RESULTS.json OUT.md")
    with open(sys.argv[1]) as f:
        table = markdown_table(json.load(f))
    with open(sys.argv[2], "w") as f:
        f.write(table)
    print(table)
