"""python -m lkfast.eval on a CUDA device against the same run on the CPU: every benchmark task
(test_resnet, a MobileNet baseline) and every analysis (a tiny RepLKNet, whose large depthwise
convs go through lkfast's GPU backends in the forward and the attacks' gradients, and a tiny ViT as
TAIG's surrogate), on the tiny datasets of test_eval.py and test_analysis.py.

The other files run the evaluation on the CPU only. Here the GPU run must finish every task the CPU
run finished, with results of the same shape, the same counts and the same numbers to float32
rounding (predictions, flips, attack outcomes), except where an analysis draws random numbers on the
device (``DRAWN_ON_THE_DEVICE``: another sample there); JPEGs decoded on the GPU (nvJPEG, the eval's
default on CUDA) and fp16 autocast with channels_last must finish every task with finite numbers
where the CPU's are finite; generated ImageNet-C/-P must corrupt images as the CPU does. Skipped
without a CUDA device (CI has none; the comparison itself is checked here);
``benchmarks/gpu_check.sh OUT`` (its full mode) runs this file first.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")

from reference import HAS_CUDA  # noqa: E402
from test_analysis import analysis_data  # noqa: E402,F401  (a fixture)
from test_eval import SIZE, baseline_checkpoint, checkpoint, data_root  # noqa: E402,F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none visible to torch here)")

DEVICE = "cuda"
# what two devices may legitimately differ in: timings, and the run's own description
UNCOMPARED = {"seconds", "_meta"}


def compare(cpu, gpu, path="", numbers=True, rel=1e-4, abs_=1e-4):
    """Lines naming where ``gpu`` differs from ``cpu``: a key present in one only, a value of another
    type, a string, bool or integer not equal, a float finite in one only, and (``numbers``) floats
    further apart than ``rel``/``abs_`` (percentages move by 100/images when one prediction flips)."""
    where = path or "results"
    if isinstance(cpu, dict) and isinstance(gpu, dict):
        lines = [f"{where}: key {k!r} only on the {'CPU' if k in cpu else 'GPU'}"
                 for k in sorted(set(cpu) ^ set(gpu), key=str) if k not in UNCOMPARED]
        for k in sorted(set(cpu) & set(gpu) - UNCOMPARED, key=str):
            lines += compare(cpu[k], gpu[k], f"{path}.{k}" if path else str(k), numbers, rel, abs_)
        return lines
    if isinstance(cpu, list) and isinstance(gpu, list):
        if len(cpu) != len(gpu):
            return [f"{where}: {len(cpu)} items on the CPU, {len(gpu)} on the GPU"]
        return [line for i, (a, b) in enumerate(zip(cpu, gpu)) for line in compare(a, b, f"{where}[{i}]", numbers, rel, abs_)]
    if isinstance(cpu, float) or isinstance(gpu, float):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (cpu, gpu)):
            return [f"{where}: {cpu!r} on the CPU, {gpu!r} on the GPU"]
        if math.isfinite(cpu) != math.isfinite(gpu) or (math.isnan(cpu) != math.isnan(gpu)):
            return [f"{where}: {cpu!r} on the CPU, {gpu!r} on the GPU"]
        if numbers and math.isfinite(cpu) and not math.isclose(cpu, gpu, rel_tol=rel, abs_tol=abs_):
            return [f"{where}: {cpu!r} on the CPU, {gpu!r} on the GPU"]
        return []
    if type(cpu) is not type(gpu) or cpu != gpu:
        return [f"{where}: {cpu!r} on the CPU, {gpu!r} on the GPU"]
    return []


def assert_same(cpu, gpu, **kwargs):
    lines = compare(cpu, gpu, **kwargs)
    assert not lines, f"{len(lines)} differences between the CPU and the GPU run:\n" + "\n".join(lines[:60])


# the analyses whose random draws come from a generator on the evaluation device: a CUDA generator
# draws other numbers than a CPU one for the same seed (their cache keys say which), so on a GPU
# their numbers are another sample; lesion and feature-variance draw on the CPU
DRAWN_ON_THE_DEVICE = ("occlusion", "pgd", "taig", "frequency")


def assert_like_the_cpu(cpu, gpu, numbers=True):
    """Every task of every model as on the CPU (``numbers``: to float32 rounding); the analyses that
    draw on the device with the same shape, counts and finite numbers, and, where nothing is drawn,
    the same numbers: the clean top-1 and the salient/non-salient occlusions."""
    def split(results, drawn):
        return {model: {task: r for task, r in tasks.items() if (task in DRAWN_ON_THE_DEVICE) == drawn}
                for model, tasks in results.items() if model != "_meta"}
    assert_same(split(cpu, False), split(gpu, False), numbers=numbers)
    assert_same(split(cpu, True), split(gpu, True), numbers=False)
    if numbers:
        def undrawn(results):
            return {model: {task: (r.get("clean_top1"), {k: v for k, v in r.get("top1", {}).items() if k != "random"}
                                   if task == "occlusion" else None)
                            for task, r in tasks.items() if isinstance(r, dict) and "unavailable" not in r}
                    for model, tasks in split(results, True).items()}
        assert_same(undrawn(cpu), undrawn(gpu))


def results(out) -> dict:
    return json.loads((Path(out) / "results.json").read_text())


def test_compare_names_every_difference_and_only_those():
    """The check the GPU tests make (they cannot run here, so this is what CI checks of them)."""
    cpu = {"_meta": {"device": "cpu"}, "m": {"t": {"top1": 50.0, "images": 4, "seconds": 1.0, "curve": [1.0, 2.0],
                                                   "note": "a", "ok": True, "nan": float("nan"), "none": None}}}
    same = {"_meta": {"device": "cuda"}, "m": {"t": {"top1": 50.0 + 1e-6, "images": 4, "seconds": 9.0,
                                                     "curve": [1.0, 2.0 - 1e-6], "note": "a", "ok": True,
                                                     "nan": float("nan"), "none": None}}}
    assert compare(cpu, same) == [] and compare(cpu, cpu) == []
    changed = json.loads(json.dumps(same))
    changed["m"]["t"].update(top1=75.0, images=3, curve=[1.0], note="b", ok=1, nan=0.0, none=0.0, extra=1)
    assert compare(cpu, changed) == [
        "m.t: key 'extra' only on the GPU", "m.t.curve: 2 items on the CPU, 1 on the GPU",
        "m.t.images: 4 on the CPU, 3 on the GPU", "m.t.nan: nan on the CPU, 0.0 on the GPU",
        "m.t.none: None on the CPU, 0.0 on the GPU", "m.t.note: 'a' on the CPU, 'b' on the GPU",
        "m.t.ok: True on the CPU, 1 on the GPU", "m.t.top1: 50.0 on the CPU, 75.0 on the GPU"]
    # numbers=False: counts, names, lengths and finiteness still compared, float values not
    assert compare(cpu, changed, numbers=False) == [line for line in compare(cpu, changed) if "top1" not in line]
    del changed["m"]["t"]
    assert compare(cpu, changed) == ["m: key 't' only on the CPU"]


@needs_cuda
def test_generated_corruptions_on_the_gpu_are_the_cpus():
    """Generated ImageNet-C/-P corrupt images on the evaluation device with CPU generators (the eval
    hands lkfast.corrupt one per image; it draws on the generator's device): on the GPU every
    corruption and perturbation must give the CPU's images, up to the kernels' rounding (a mean
    difference under one grey level, where another draw is tens of levels away). The eval's own
    generated ImageNet-C needs frost's photographs, which a bare GPU machine lacks (frost is left out
    here then: the skip says why)."""
    import lkfast.corrupt as lc
    from optional_deps import FROST_MISSING
    from test_corrupt import natural_images

    x = natural_images(4, 64)

    def apart(a, b):
        return 255 * (a.cpu().double() - b.cpu().double()).abs().mean().item()

    seed = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    other = lc.corrupt(x, "gaussian_noise", 1, generator=torch.Generator().manual_seed(8))
    assert apart(lc.corrupt(x, "gaussian_noise", 1, generator=seed()), other) > 10  # what another draw does
    far = []
    for name in [n for n in lc.names("all") if not (n == "frost" and FROST_MISSING)]:
        for severity in (1, 3, 5):
            cpu = lc.corrupt(x, name, severity, generator=seed())
            gpu = lc.corrupt(x.to(DEVICE), name, severity, generator=seed())
            assert gpu.device.type == "cuda" and gpu.shape == cpu.shape
            if apart(cpu, gpu) >= 1:
                far.append(f"{name} severity {severity}: {apart(cpu, gpu):.2f} grey levels apart")
    for name in lc.perturbation_names("all"):
        cpu = lc.perturbation_sequence(x, name, 1, generator=seed())
        gpu = lc.perturbation_sequence(x.to(DEVICE), name, 1, generator=seed())
        assert gpu.device.type == "cuda" and gpu.shape == cpu.shape
        if apart(cpu, gpu) >= 1:
            far.append(f"{name} (ImageNet-P): {apart(cpu, gpu):.2f} grey levels apart")
    assert not far, "\n".join(far)
    if FROST_MISSING:
        pytest.skip(f"frost left out: {FROST_MISSING}")


@needs_cuda
def test_every_benchmark_task_on_the_gpu_gives_the_cpus_results(tmp_path, data_root, checkpoint, baseline_checkpoint):
    from lkfast.eval.cli import main

    def run(out, *extra):
        args = ["--models", f"test_resnet:{checkpoint}=tiny", "--data-root", data_root, "--out", tmp_path / out,
                "--input-size", SIZE, "--workers", 0, "--batch-size", 4, "--no-progress",
                "--baseline-model", f"mobilenet_v3_small:{baseline_checkpoint}", *extra]
        assert main([str(a) for a in args]) == 0
        return results(tmp_path / out)

    cpu = run("cpu", "--device", "cpu")
    tasks = set(cpu["tiny"]) - {"_model"}
    assert {"clean", "imagenet-a", "imagenet-c", "imagenet-o", "imagenet-p", "imagenet-r", "imagenet-9"} <= tasks
    # JPEGs decoded by PIL on the CPU, as in the CPU run: the same numbers
    gpu = run("gpu", "--device", DEVICE, "--no-gpu-decode")
    assert gpu["_meta"]["device"] == DEVICE
    assert_like_the_cpu(cpu, gpu)
    # decoded on the GPU (the default there): pixels differ from PIL's by the decoders' rounding, so
    # every task must finish with the same counts and finite numbers, not the same numbers
    decoded = run("decoded", "--device", DEVICE)
    assert decoded["_meta"]["options"]["gpu_decode"] is True
    assert_like_the_cpu(cpu, decoded, numbers=False)


@needs_cuda
def test_every_analysis_on_the_gpu_gives_the_cpus_results(tmp_path, analysis_data, monkeypatch):
    import dataclasses

    import lkfast.eval.analysis_tasks
    from lkfast.eval import EvalOptions, ModelSpec, run_evaluation
    from lkfast.eval.analysis_tasks import ANALYSIS_TASKS

    root, spec = analysis_data
    vit_arch = dict(img_size=32, depth=1, embed_dim=16, num_heads=2)
    torch.manual_seed(0)
    torch.save(timm.create_model("vit_tiny_patch16_224", **vit_arch).state_dict(), tmp_path / "vit.pth")
    vit = ModelSpec("vit_tiny_patch16_224", str(tmp_path / "vit.pth"), "tiny-vit", kwargs=tuple(vit_arch.items()),
                    input_size=32)
    monkeypatch.setitem(lkfast.eval.analysis_tasks.TAIG, "steps", 2)  # the paper's 20 x 21 passes: too slow here
    monkeypatch.setitem(lkfast.eval.analysis_tasks.TAIG, "path_steps", 2)
    options = EvalOptions(out=str(tmp_path / "cpu"), data={"val": str(root / "val"), "masks": str(root / "masks")},
                          workers=0, progress=False, batch_size=4, shard_size=2, write_report=False)

    def run(out, **changes):
        return run_evaluation([spec, vit], list(ANALYSIS_TASKS), dataclasses.replace(options, out=str(tmp_path / out),
                                                                                   **changes))

    cpu = run("cpu")
    for task in ANALYSIS_TASKS:  # every analysis ran (only the ablation needs kernel sizes it has not got)
        assert task in cpu["tiny"], task
    assert cpu["tiny"]["taig"]["surrogate"] == "tiny-vit" and "unavailable" not in cpu["tiny"]["occlusion"]
    gpu = run("gpu", device=DEVICE)
    assert_like_the_cpu(cpu, gpu)
    # fp16 autocast and channels_last: lkfast's half-precision GPU kernels inside the attacks' gradients
    half = run("half", device=DEVICE, amp=True, channels_last=True)
    assert_like_the_cpu(cpu, half, numbers=False)
