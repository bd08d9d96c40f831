"""Evaluation throughput: ``python -m lkfast.eval``'s pipeline (lkfast.eval.run_evaluation, task
``clean``) against a plain timm-validate-style loop (ImageFolder + timm's eval transform with
normalisation + DataLoader + model under no_grad + top-1), same model, same folder, same run.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_eval.py            # writes benchmarks/results/eval_cpu.{json,md}
    python benchmarks/bench_eval.py --replknet                          # writes .../eval_replknet_cpu.{json,md}
    python benchmarks/bench_eval.py --device cuda --images 2000 --batch-size 256 --workers 16

Data: a fake ImageNet-sized folder written once (JPEGs of 500x375, like ImageNet's typical photo,
in 10 real wnid folders), under a temporary directory. Model: timm ``mobilenetv3_small_100`` (random
weights: speed only), so that decoding and the data path weigh as much as the network. Both sides
use the same batch size and worker count and include building the model; lkfast writes its
shard cache and results to a fresh folder each round (nothing is reused between rounds).
``--replknet``: RepLKNet-31B images/s through the eval (task ``clean``, channels_last) with lkfast's
layers against the same model with plain ``nn.Conv2d`` (``create_model(fast=False)``), same folder.

Timer: wall clock, the two sides in turn round by round (``lkfast.timing.time_interleaved``), so
load from other processes hits both alike; the ratio is the median of the per-round ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import timm
import torch

from lkfast import data
from lkfast.eval import EvalOptions, ModelSpec, run_evaluation
from lkfast.tables import write_table, write_text_atomic
from lkfast.timing import median, time_interleaved

MODEL = "mobilenetv3_small_100"


def photo(generator: torch.Generator, h: int = 375, w: int = 500) -> torch.Tensor:
    low = torch.rand(1, 3, 6, 8, generator=generator)
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)[0]
    return (x + 0.05 * torch.randn(3, h, w, generator=generator)).clamp(0, 1)


def make_folder(root: Path, images: int) -> Path:
    g = torch.Generator().manual_seed(0)
    wnids = data.imagenet_classes()[:10]
    for i in range(images):
        folder = root / wnids[i % 10]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(data.encode_jpeg(data.to_uint8(photo(g)), quality=90))
    return root


def plain_timm_loop(folder: Path, checkpoint: Path, args) -> float:
    """timm's validate.py in miniature: returns top-1 (%)."""
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    model = timm.create_model(MODEL)
    model.load_state_dict(torch.load(checkpoint))
    model = model.to(args.device).eval()
    config = resolve_data_config(model=model)
    dataset = ImageFolder(str(folder), transform=create_transform(**config, is_training=False))
    # ImageFolder numbers the folders 0..9; map to the 1k indices as the eval does
    to_1k = torch.tensor([data.imagenet_classes().index(c) for c in dataset.classes])
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                                         pin_memory=args.device.startswith("cuda"))
    correct = total = 0
    with torch.no_grad():
        for images, targets in loader:
            logits = model(images.to(args.device, non_blocking=True))
            correct += int((logits.argmax(1).cpu() == to_1k[targets]).sum())
            total += len(targets)
    return 100.0 * correct / total


def lkfast_eval(folder: Path, checkpoint: Path, args, out_root: Path) -> float:
    out = Path(tempfile.mkdtemp(dir=out_root))
    try:
        options = EvalOptions(out=str(out), data={"val": str(folder)}, device=args.device, batch_size=args.batch_size,
                              workers=args.workers, progress=False, write_report=False, shard_size=args.shard_size)
        return run_evaluation([ModelSpec(MODEL, str(checkpoint))], ["clean"], options)[MODEL]["clean"]["top1"]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def write_comparison(out, first_column: str, baseline: str, ours: str, times: dict, top1: dict, images: int,
                     caption: str, extra: dict) -> None:
    """Write the two sides' images/s, seconds and top-1 plus the median per-round speed-up of ``ours``
    over ``baseline`` as OUT.md/.csv (lkfast.tables) and the raw timings as OUT.json."""
    ratios = [b / o for b, o in zip(times[baseline], times[ours])]
    rows = [[name, images / median(times[name]), median(times[name]), top1[name]] for name in (baseline, ours)]
    rows.append([f"speed-up ({ours} / {baseline})", median(ratios), None, None])
    write_table(out, [first_column, "images/s", "seconds", "top-1 (%)"], rows, caption=caption)
    write_text_atomic(Path(out).with_suffix(".json"), json.dumps(
        {"times_s": times, "ratios": ratios, "top1": top1, "images": images, **extra,
         "torch": torch.__version__, "load_average": os.getloadavg()}, indent=1))
    print(Path(out).with_suffix(".md").read_text())


def replknet_through_eval(args) -> int:
    """RepLKNet-31B through lkfast.eval, fast layers against plain nn.Conv2d (random weights)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = make_folder(tmp / "val", args.images)
        checkpoint = tmp / "replknet_31b.pth"
        torch.manual_seed(0)
        from lkfast.models import create_model

        torch.save(create_model("replknet_31b", fast=False).state_dict(), checkpoint)
        top1 = {}

        def run(fast: bool):
            out = Path(tempfile.mkdtemp(dir=tmp))
            options = EvalOptions(out=str(out), data={"val": str(folder)}, device=args.device,
                                  batch_size=args.batch_size, workers=args.workers, progress=False,
                                  write_report=False, channels_last=True)
            spec = ModelSpec("replknet_31b", str(checkpoint), "m", kwargs=(("fast", fast),))
            top1["lkfast layers" if fast else "plain nn.Conv2d"] = run_evaluation([spec], ["clean"], options)["m"]["clean"]["top1"]
            shutil.rmtree(out, ignore_errors=True)

        runs = {"plain nn.Conv2d": lambda: run(False), "lkfast layers": lambda: run(True)}
        times = time_interleaved(runs, args.rounds, warmup=0)
    cpu = platform.processor() or platform.machine()
    caption = (f"RepLKNet-31B (random weights) through python -m lkfast.eval, task clean, {args.images} fake "
               f"ImageNet-sized JPEGs, batch {args.batch_size}, {args.workers} workers, channels_last, device "
               f"{args.device}, torch threads {torch.get_num_threads()}, {args.rounds} interleaved rounds (median), "
               f"wall clock including model build; 1-min load average at the end {os.getloadavg()[0]:.1f}. CPU: {cpu}.")
    write_comparison(str(Path(args.out).with_name("eval_replknet_cpu")), "model layers", "plain nn.Conv2d",
                     "lkfast layers", times, top1, args.images, caption,
                     {"device": args.device, "batch_size": args.batch_size, "cpu": cpu})
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "eval_cpu"))
    p.add_argument("--replknet", action="store_true", help="RepLKNet-31B through the eval, lkfast layers vs nn.Conv2d")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.replknet:
        return replknet_through_eval(args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = make_folder(tmp / "val", args.images)
        checkpoint = tmp / "model.pth"
        torch.manual_seed(0)
        torch.save(timm.create_model(MODEL).state_dict(), checkpoint)
        top1 = {}
        runs = {"timm loop": lambda: top1.__setitem__("timm loop", plain_timm_loop(folder, checkpoint, args)),
                "lkfast.eval": lambda: top1.__setitem__("lkfast.eval", lkfast_eval(folder, checkpoint, args, tmp))}
        times = time_interleaved(runs, args.rounds, warmup=1)
    cpu = platform.processor() or platform.machine()
    caption = (f"Evaluation images/s, {args.images} fake ImageNet-sized JPEGs (500x375), {MODEL}, batch "
               f"{args.batch_size}, {args.workers} workers, device {args.device}, torch threads {torch.get_num_threads()}, "
               f"{args.rounds} interleaved rounds (median), wall clock including model build. CPU: {cpu}. "
               f"Target: speed-up >= 1.0. Top-1 must agree (random weights: it checks both score the same images).")
    write_comparison(args.out, "pipeline", "timm loop", "lkfast.eval", times, top1, args.images, caption,
                     {"model": MODEL, "device": args.device, "batch_size": args.batch_size, "workers": args.workers,
                      "cpu": cpu})
    return 0


if __name__ == "__main__":
    sys.exit(main())
