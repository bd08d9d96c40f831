"""Attack benchmark: PGD-5 on RepLKNet-31B on this machine, lkfast against the plain model, same run.

    OMP_WAIT_POLICY=PASSIVE flock /tmp/lkfast-bench.lock python benchmarks/bench_attacks.py \
        [--out benchmarks/results] [--batch 8] [--rounds 3] [--size 224] [--device cpu]

Variants, all in eval mode, channels_last model and input (PyTorch's faster CPU layout), the same
random weights (BN statistics randomised like a trained net), ImageNet normalisation inside:

* ``plain``: ``create_model("replknet_31b", fast=False)``, nn.Conv2d layers and separate BNs, as the
  official code runs;
* ``lkfast``: ``create_model("replknet_31b")``, the fast layers (large kernels through
  ``lkfast.ops.depthwise_conv2d``, BN folded on the fly);
* ``lkfast_reparam``: ``lkfast.attacks.reparameterized_for_attack`` of the lkfast model (small kernels
  merged, every conv-BN pair folded), after checking its logits agree.

Each round runs one ``lkfast.attacks.pgd`` call (5 steps, eps 0.006, alpha eps / 4, seeded random
start) per variant, in turn, in an order shuffled each round (``lkfast.timing.time_interleaved``), so the
ratios come from the same rounds. Writes ``attacks_{cpu,gpu}.json`` and ``.md`` (through
``lkfast.tables.write_table``) under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform

import torch
import torch.nn as nn

from lkfast.attacks import pgd, reparameterized_for_attack
from lkfast.timing import median, time_interleaved
from lkfast.models import create_model
from lkfast.tables import write_table, write_text_atomic

EPS, STEPS = 0.006, 5
VARIANTS = ("plain", "lkfast", "lkfast_reparam")


class Normalized(nn.Module):
    """[0, 1] images in, ImageNet normalisation inside (what the attacks expect)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(net.pretrained_cfg["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(net.pretrained_cfg["std"]).view(1, 3, 1, 1))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def build(fast: bool, device) -> nn.Module:
    torch.manual_seed(0)  # same weights for every variant
    net = create_model("replknet_31b", fast=fast)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return Normalized(net).eval().to(device=device, memory_format=torch.channels_last)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (each runs every variant once)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=g).to(device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), generator=g).to(device)

    models = {"plain": build(False, device), "lkfast": build(True, device)}
    models["lkfast_reparam"] = reparameterized_for_attack(models["lkfast"], x[:2])
    with torch.no_grad():
        reference = models["plain"](x).float()
        agreement = {name: float((m(x).float() - reference).abs().max() / reference.abs().max())
                     for name, m in models.items()}

    def attack(model):
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def run():
            pgd(model, x, y, EPS, EPS / 4, STEPS, generator=torch.Generator(device=device).manual_seed(0))
            sync()
        return run

    times = time_interleaved({name: attack(m) for name, m in models.items()}, args.rounds)
    seconds = {name: median(t) for name, t in times.items()}
    per_round = {name: median([times["plain"][r] / times[name][r] for r in range(args.rounds)]) for name in models}
    tag = "gpu" if device.type == "cuda" else "cpu"
    machine = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    result = {"device": machine, "torch": torch.__version__, "batch": args.batch, "size": args.size, "eps": EPS,
              "steps": STEPS, "rounds": args.rounds, "load_average": load, "times": times, "seconds": seconds,
              "images_per_second": {n: args.batch / s for n, s in seconds.items()},
              "speedup_vs_plain": per_round, "max_rel_logit_diff_vs_plain": agreement}
    os.makedirs(args.out, exist_ok=True)
    write_text_atomic(os.path.join(args.out, f"attacks_{tag}.json"), json.dumps(result, indent=1))
    labels = {"plain": "plain nn.Conv2d model, channels_last", "lkfast": "lkfast layers, channels_last",
              "lkfast_reparam": "lkfast, re-parameterised + BN folded, channels_last"}
    rows = [[labels[n], seconds[n], args.batch / seconds[n], f"{per_round[n]:.2f}×", f"{agreement[n]:.1e}"]
            for n in VARIANTS]
    caption = (f"PGD-{STEPS} (eps {EPS}, alpha eps/4, random start) on RepLKNet-31B, random weights, batch "
               f"{args.batch}, {args.size} px, fp32, {machine}, torch {torch.__version__}; median of {args.rounds} "
               f"interleaved rounds; speed-up = median over rounds of plain / variant in the same round; "
               f"1-min load average at the end: {load[0]:.1f}" if load else "")
    md, _ = write_table(os.path.join(args.out, f"attacks_{tag}"),
                        ["variant", "s per attack", "images/s", "speed-up vs plain", "max rel. logit diff"], rows,
                        caption=caption, digits=3)
    print(open(md).read())
    return result


if __name__ == "__main__":
    main()
