"""Model-level speed: lkfast against the same model with plain nn.Conv2d, same weights, same run.

    flock /tmp/lkfast-bench.lock pytest benchmarks/bench_models.py --benchmark-json=benchmarks/results/models_cpu.json
    python benchmarks/bench_models.py benchmarks/results/models_cpu.json benchmarks/results/models_cpu.md

Models: RepLKNet-31B and ConvNeXt-T with 31x31 kernels (timm ``convnext_tiny``, ``kernel_sizes=31``).
Variants: ``plain_nchw`` (nn.Conv2d, NCHW: how the official code runs), ``plain_cl`` (nn.Conv2d,
channels_last: oneDNN's fast path), ``lkfast_nchw`` and ``lkfast_cl`` (large depthwise convs through
the fast op, model and input in that layout).
Tasks: ``inference`` (eval, no_grad), ``input_grad`` (eval, frozen weights, gradient of the
cross-entropy with respect to the input: one attack step), ``train_step`` (train mode, forward +
backward with all weight gradients; no optimizer update).
Settings (environment): LKFAST_BENCH_DEVICE (cpu), LKFAST_BENCH_BATCH (8 on the CPU, 64 on CUDA),
LKFAST_BENCH_DTYPE (float32; bfloat16 on CUDA), LKFAST_BENCH_ROUNDS (2), LKFAST_BENCH_SIZE (224).
Each case first checks that the variant's outputs equal plain_nchw's within 1e-4 relative (fp32).
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

DEVICE = os.environ.get("LKFAST_BENCH_DEVICE", "cpu")
ON_CUDA = DEVICE.startswith("cuda")
BATCH = int(os.environ.get("LKFAST_BENCH_BATCH", 64 if ON_CUDA else 8))
DTYPE = getattr(torch, os.environ.get("LKFAST_BENCH_DTYPE", "bfloat16" if ON_CUDA else "float32"))
ROUNDS = int(os.environ.get("LKFAST_BENCH_ROUNDS", 2))
SIZE = int(os.environ.get("LKFAST_BENCH_SIZE", 224))
MODELS = ("replknet_31b", "convnext_tiny_k31")
VARIANTS = ("plain_nchw", "plain_cl", "lkfast_nchw", "lkfast_cl")
TASKS = ("inference", "input_grad", "train_step")
# Agreement of outputs with plain_nchw (fp32); bf16 is checked loosely.
RTOL = 1e-4 if DTYPE == torch.float32 else 5e-2


def _build(model_name: str, fast: bool) -> torch.nn.Module:
    from lkfast.models import create_model

    torch.manual_seed(0)  # same weights for every variant
    if model_name == "replknet_31b":
        return create_model("replknet_31b", fast=fast)
    return create_model("convnext_tiny", kernel_sizes=31, fast=fast)


def _randomize_bn_statistics(model: torch.nn.Module) -> None:
    # Freshly built BNs are identities in eval mode; trained-like statistics exercise the folding.
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


_cache: dict = {}


def _model_and_input(model_name: str, variant: str):
    key = (model_name, variant)
    if key not in _cache:
        _cache.clear()  # one model in memory at a time
        model = _build(model_name, fast=variant.startswith("lkfast"))
        with torch.no_grad():
            _randomize_bn_statistics(model)
        x = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
        model = model.to(device=DEVICE, dtype=DTYPE)
        x = x.to(device=DEVICE, dtype=DTYPE)
        if variant.endswith("_cl"):
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        _cache[key] = (model, x)
    return _cache[key]


_reference_logits: dict = {}


def _logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x).float()


def _sync():
    if ON_CUDA:
        torch.cuda.synchronize()


def _task(model, x, task):
    labels = torch.arange(x.shape[0], device=x.device) % 1000
    if task == "inference":
        model.eval()
        model.requires_grad_(False)

        def run():
            with torch.no_grad():
                model(x)
            _sync()
    elif task == "input_grad":
        model.eval()
        model.requires_grad_(False)

        def run():
            xg = x.detach().requires_grad_()
            (grad,) = torch.autograd.grad(F.cross_entropy(model(xg).float(), labels), [xg])
            _sync()
            return grad
    else:
        model.train()
        model.requires_grad_(True)

        def run():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x).float(), labels).backward()
            _sync()
    return run


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_name", MODELS)
def test_model(benchmark, model_name, variant, task):
    model, x = _model_and_input(model_name, variant)
    logits = _logits(model, x)
    if variant == "plain_nchw":
        _reference_logits[model_name] = logits
    reference = _reference_logits.get(model_name)
    rel_err = None
    if reference is not None:
        rel_err = ((logits - reference).abs().max() / reference.abs().max()).item()
        assert rel_err <= RTOL, f"{model_name}/{variant}: outputs differ from plain_nchw by {rel_err:.2e} (relative)"
    run = _task(model, x, task)
    benchmark.group = f"{model_name} {task}"
    benchmark.extra_info.update(model=model_name, variant=variant, task=task, batch=BATCH, size=SIZE,
                                dtype=str(DTYPE).replace("torch.", ""), device=DEVICE,
                                threads=torch.get_num_threads(), max_rel_err_vs_plain_nchw=rel_err)
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)


def markdown_table(results: dict) -> str:
    """Markdown table (ms per step; ratio against the faster plain layout and against plain NCHW)."""
    times, info = {}, {}
    for bench in results["benchmarks"]:
        e = bench["extra_info"]
        times[(e["model"], e["task"], e["variant"])] = bench["stats"]["median"] * 1000
        info = e
    machine = results.get("machine_info", {})
    lines = [f"{info.get('device', 'cpu')}, {info.get('dtype')}, batch {info.get('batch')}, {info.get('size')} px, "
             f"torch threads {info.get('threads')}, median of {ROUNDS} rounds after 1 warm-up; CPU: "
             f"{machine.get('cpu', {}).get('brand_raw', 'unknown')}. Speed-up = plain time / lkfast time.", "",
             "| model | task | plain NCHW ms | plain channels_last ms | lkfast NCHW ms | lkfast channels_last ms "
             "| best lkfast vs faster plain | best lkfast vs plain NCHW |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for model in MODELS:
        for task in TASKS:
            t = {v: times.get((model, task, v)) for v in VARIANTS}
            if not any(t.values()):
                continue
            plain = [v for v in (t["plain_nchw"], t["plain_cl"]) if v]
            ours = [v for v in (t["lkfast_nchw"], t["lkfast_cl"]) if v]
            vs_best = f"{min(plain) / min(ours):.2f}x" if plain and ours else "n/a"
            vs_nchw = f"{t['plain_nchw'] / min(ours):.2f}x" if t["plain_nchw"] and ours else "n/a"
            cells = " | ".join(f"{t[v]:.0f}" if t[v] else "n/a" for v in VARIANTS)
            lines.append(f"| {model} | {task} | {cells} | {vs_best} | {vs_nchw} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python benchmarks/bench_models.py RESULTS.json OUT.md")
    with open(sys.argv[1]) as f:
        table = markdown_table(json.load(f))
    with open(sys.argv[2], "w") as f:
        f.write(table)
    print(table)
