"""Model-level speed: lkfast against the same model with plain nn.Conv2d, same weights, same run.

    OMP_WAIT_POLICY=PASSIVE flock /tmp/lkfast-bench.lock pytest benchmarks/bench_models.py \
        --benchmark-json=benchmarks/results/models_cpu.json
    python benchmarks/bench_models.py benchmarks/results/models_cpu.json benchmarks/results/models_cpu.md

(or one run per model, ``-k replknet`` / ``-k convnext``, each to its own JSON, then all the JSON
files followed by the .md path to the second command).

Models: RepLKNet-31B, ConvNeXt-T with 31x31 kernels (timm ``convnext_tiny``, ``kernel_sizes=31``),
the published ConvNeXt-T with its 7x7 kernels (``convnext_tiny_k7``) and ViT-B/16 (``vit_base``,
timm ``vit_base_patch16_224``: no depthwise conv; what ``patch_model`` changes there is its linears,
``lkfast.nn.PointwiseLinear``, the paper's non-convolutional baseline).
Variants: ``plain_nchw`` (nn.Conv2d, NCHW: how the official code runs), ``plain_cl`` (nn.Conv2d,
channels_last: oneDNN's fast path), ``lkfast_nchw`` and ``lkfast_cl`` (large depthwise convs through
the fast op, model and input in that layout), ``lkfast_folded`` (RepLKNet, channels_last, every BN
folded by ``lkfast.models.optimize_for_inference``: inference and input_grad only). With
LKFAST_BENCH_COMPILE=1 also ``plain_cl_compiled`` and ``lkfast_folded_compiled`` (inference only:
``torch.compile`` with inductor's freezing on both sides, ``optimize_for_inference(compile=True)``
for lkfast); they are reported in a table of their own, so the eager ratios stay eager-to-eager.
With LKFAST_BENCH_AUTOCAST=1 also ``plain_cl_amp``, ``lkfast_cl_amp`` and ``lkfast_folded_amp``
(the same fp32 models run under ``torch.autocast``, bf16 on the CPU, fp16 on CUDA; ``lkfast_folded_amp`` RepLKNet-31B's),
reported in a table of their own against the plain fp32 model and the plain model under autocast.
With LKFAST_BENCH_CEILING=1 also ``lkfast_cl_nodw`` and ``lkfast_folded_nodw``: the lkfast models with
every large depthwise convolution made free (it returns its input; in training its BNs still run),
the ceiling of what any depthwise kernel could give: plain time / their time, in a table of their own
(their outputs differ from the plain model's by construction and are not checked).
Tasks: ``inference`` (eval, no_grad), ``input_grad`` (eval, frozen weights, gradient of the
cross-entropy with respect to the input: one attack step), ``train_step`` (train mode, forward +
backward with all weight gradients; no optimizer update).
Settings (environment): LKFAST_BENCH_DEVICE (cpu), LKFAST_BENCH_BATCH (8 on the CPU, 64 on CUDA),
LKFAST_BENCH_DTYPE (float32; bfloat16 on CUDA), LKFAST_BENCH_ROUNDS (2), LKFAST_BENCH_SIZE (224),
LKFAST_BENCH_COMPILE (unset). Every case records the CPU model, the instruction set the fast op's
CPU kernels run (``lkfast.ops.cpu_dispatch.fingerprint``, honours LKFAST_CPU_ISA), PyTorch's CPU
capability and ONEDNN_MAX_CPU_ISA, so runs capped to AVX2 are told apart from AVX-512 runs.
Each case first checks that the variant's outputs equal those of the first plain fp32 variant run (plain_nchw,
or plain_cl when plain_nchw is deselected) within 1e-4 relative (fp32; 5e-2 for the autocast variants).

Timer: on a CPU shared with other jobs, wall-clock times swing by 2-3x within minutes, which would
compare a plain case timed under load with an lkfast case timed on an idle machine. CPU steps are
therefore timed by ``lkfast.timing.time_interleaved`` with ``time.process_time`` as its clock (CPU
seconds of this process, summed over its threads; with OMP_WAIT_POLICY=PASSIVE idle threads sleep
instead of spinning, so waiting is not counted; LKFAST_BENCH_CLOCK=wall for wall-clock time). The
committed CPU results were taken with pytest-benchmark's ``--benchmark-timer=time.process_time``,
the same clock; the table reads both kinds of JSON. On an idle 2-core machine wall time is about half of that. On CUDA the
project's GPU timer (``lkfast.timing.gpu_time_ms``: CUDA events around back-to-back steps) gives the
time per step; the table reads it from extra_info.

Several models in one process change each other's allocator and page-fault behaviour (see ISOLATED
below): LKFAST_BENCH_ISOLATED=1 runs ``test_isolated``, which times each variant in processes of its
own, started in turn; prefer it for claims about what one user's process sees.
"""
from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from lkfast.tables import markdown_table as table_markdown
from lkfast.timing import gpu_time_ms, median, time_interleaved
from lkfast.ops import dtype_name

DEVICE = os.environ.get("LKFAST_BENCH_DEVICE", "cpu")
ON_CUDA = DEVICE.startswith("cuda")
BATCH = int(os.environ.get("LKFAST_BENCH_BATCH", 64 if ON_CUDA else 8))
DTYPE = getattr(torch, os.environ.get("LKFAST_BENCH_DTYPE", "bfloat16" if ON_CUDA else "float32"))
ROUNDS = int(os.environ.get("LKFAST_BENCH_ROUNDS", 2))
SIZE = int(os.environ.get("LKFAST_BENCH_SIZE", 224))
MODELS = ("replknet_31b", "convnext_tiny_k31", "convnext_tiny_k7", "vit_base")
EAGER_VARIANTS = ("plain_nchw", "plain_cl", "lkfast_nchw", "lkfast_cl", "lkfast_folded")
COMPILED_VARIANTS = ("plain_cl_compiled", "lkfast_folded_compiled")
COMPILE = bool(os.environ.get("LKFAST_BENCH_COMPILE"))
# Mixed precision: the fp32 model run under torch.autocast (bf16 on the CPU, where AMX / AVX512-BF16
# make bf16 matrix products ~7x faster than fp32 ones; fp16 on CUDA). Opt-in, own table.
AUTOCAST_VARIANTS = ("plain_cl_amp", "lkfast_cl_amp", "lkfast_folded_amp")
AUTOCAST = bool(os.environ.get("LKFAST_BENCH_AUTOCAST"))
AMP_DTYPE = torch.float16 if ON_CUDA else torch.bfloat16
if ON_CUDA:  # cuDNN's fastest algorithms for the fixed shapes, as bench_gpu.py times the PyTorch baselines
    torch.backends.cudnn.benchmark = True
# The ceiling (Amdahl's bound on the model step): lkfast's models with the large depthwise convs free.
CEILING_VARIANTS = ("lkfast_cl_nodw", "lkfast_folded_nodw")
CEILING = bool(os.environ.get("LKFAST_BENCH_CEILING"))
VARIANTS = (EAGER_VARIANTS + (COMPILED_VARIANTS if COMPILE else ()) + (AUTOCAST_VARIANTS if AUTOCAST else ())
            + (CEILING_VARIANTS if CEILING else ()))
# LKFAST_BENCH_INTERLEAVED=1: test_interleaved times all variants of a (model, task) round by round in
# one process (the CPU's speed drifts between back-to-back cases); LKFAST_BENCH_VARIANTS=a,b,... picks
# them (default: every selected variant but the NCHW ones, which take minutes per call on the CPU).
INTERLEAVED = bool(os.environ.get("LKFAST_BENCH_INTERLEAVED"))
INTERLEAVED_VARIANTS = os.environ.get("LKFAST_BENCH_VARIANTS")
# LKFAST_BENCH_ISOLATED=1: test_isolated times every variant in processes of its own (one model per
# process, as users run them), LKFAST_BENCH_PROCESSES (2) processes per variant started in turn, each
# timing LKFAST_BENCH_ROUNDS steps after a warm-up. Several models in one process change what the
# allocator and the kernel do for each of them: measured on a Zen 4 EPYC, the plain model's
# input-gradient step spent 4-5 s of system time (490k page faults) per step beside three other
# models, against 0.2-0.9 s alone, which made lkfast look 1.26x faster there and ~1.0x alone.
ISOLATED = bool(os.environ.get("LKFAST_BENCH_ISOLATED"))
PROCESSES = int(os.environ.get("LKFAST_BENCH_PROCESSES", 2))
TASKS = ("inference", "input_grad", "train_step")
# Agreement of outputs with the reference plain fp32 variant (see _checked_model); bf16 and the autocast
# variants are checked loosely.
RTOL = 1e-4 if DTYPE == torch.float32 else 5e-2
AMP_RTOL = 5e-2
GPU_TIMER = "lkfast.timing.gpu_time_ms (CUDA events around back-to-back steps, median of 5 samples)"
# CPU: lkfast.timing.time_interleaved with this process's CPU time (see the module docstring), or
# wall-clock time with LKFAST_BENCH_CLOCK=wall
CPU_CLOCK = time.perf_counter if os.environ.get("LKFAST_BENCH_CLOCK") == "wall" else time.process_time
CPU_TIMER = f"lkfast.timing.time_interleaved, clock time.{CPU_CLOCK.__name__}"


def _machine() -> dict:
    """The CPU and the instruction sets both sides run (the fast op's kernels and PyTorch/oneDNN)."""
    from lkfast.ops.cpu_dispatch import fingerprint

    info = fingerprint()
    return {"cpu_model": info["cpu"], "lkfast_cpu_isa": info["isa"],
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_max_cpu_isa": info["onednn_max_cpu_isa"] or "unset", "lkfast_cpu_isa_env":
            os.environ.get("LKFAST_CPU_ISA", "unset"),
            # F.linear (the head; lkfast's PointwiseConv2d on small maps) runs MKL's SGEMM: capped by this
            "mkl_enable_instructions": os.environ.get("MKL_ENABLE_INSTRUCTIONS", "unset")}


def _build(model_name: str, fast: bool) -> torch.nn.Module:
    from lkfast.models import create_model

    torch.manual_seed(0)  # same weights for every variant
    if model_name == "replknet_31b":
        return create_model("replknet_31b", fast=fast)
    # layer scale 1 instead of timm's 1e-6 init, so the output check sees the blocks (speed is unaffected)
    if model_name == "vit_base":
        return create_model("vit_base_patch16_224", fast=fast)
    if model_name == "convnext_tiny_k7":  # the published model: 7x7 depthwise kernels
        return create_model("convnext_tiny", ls_init_value=1.0, fast=fast)
    return create_model("convnext_tiny", kernel_sizes=31, ls_init_value=1.0, fast=fast)


def _randomize_bn_statistics(model: torch.nn.Module) -> None:
    # Freshly built BNs are identities in eval mode; trained-like statistics exercise the folding.
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


class _FreeDepthwise(torch.nn.Module):
    """Stands in for a large depthwise conv (bare, or RepLKNet's conv+BN branches) at no cost: returns
    its input, after the branches' BNs in training mode (the BNs are not what the fast op speeds up)."""

    def __init__(self, original: torch.nn.Module):
        super().__init__()
        self.bns = torch.nn.ModuleList([branch.bn for name, branch in original.named_children()
                                        if name in ("lkb_origin", "small_conv")])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and len(self.bns):
            out = self.bns[0](x)
            for bn in self.bns[1:]:
                out = out + bn(x)
            return out
        return x


def _free_depthwise(model: torch.nn.Module) -> int:
    """Replaces every large depthwise conv of a fast model (RepLKNet's ReparamLargeKernelConv, a bare
    DepthwiseConv2d) with _FreeDepthwise; returns how many."""
    from lkfast.nn.depthwise import DepthwiseConv2d
    from lkfast.nn.reparam import ReparamLargeKernelConv

    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, (ReparamLargeKernelConv, DepthwiseConv2d))]
    replaced: list = []
    for name, module in targets:
        if any(name.startswith(done + ".") for done in replaced):  # inside an already replaced module
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, _FreeDepthwise(module))
        replaced.append(name)
    return len(replaced)


_cache: dict = {}


def _model_and_input(model_name: str, variant: str):
    key = (model_name, variant)
    if key not in _cache:
        for other in [k for k in _cache if k[0] != model_name]:  # one model family in memory at a time
            del _cache[other]
        model = _build(model_name, fast=variant.startswith("lkfast"))
        with torch.no_grad():
            _randomize_bn_statistics(model)
        if variant.startswith("lkfast_folded"):
            from lkfast.models import fold_batchnorms

            fold_batchnorms(model)
        if variant.endswith("_nodw") and not _free_depthwise(model):
            raise RuntimeError(f"{model_name}: no large depthwise conv found to make free")
        x = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
        model = model.to(device=DEVICE, dtype=DTYPE)
        x = x.to(device=DEVICE, dtype=DTYPE)
        if "_cl" in variant or variant.startswith("lkfast_folded"):
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        if variant.endswith("_compiled"):  # inference only: frozen weights under no_grad
            model = torch.compile(model.eval().requires_grad_(False), options={"freezing": True})
        _cache[key] = (model, x)
    return _cache[key]


_reference_logits: dict = {}
_rel_err: dict = {}
_first_call_s: dict = {}


def _amp(variant: str):
    """The autocast context of a variant: bf16 (CPU) / fp16 (CUDA) for the *_amp ones, else off."""
    return torch.autocast(DEVICE.split(":")[0], dtype=AMP_DTYPE, enabled=variant.endswith("_amp"))


def _logits(model, x, variant=""):
    model.eval()
    with torch.no_grad(), _amp(variant):
        return model(x).float()


def _task(model, x, task, variant=""):
    labels = torch.arange(x.shape[0], device=x.device) % 1000
    amp = lambda: _amp(variant)  # noqa: E731  (a fresh context per call)
    if task == "inference":
        model.eval()
        model.requires_grad_(False)

        def run():
            with torch.no_grad(), amp():
                model(x)
    elif task == "input_grad":
        model.eval()
        model.requires_grad_(False)

        def run():
            xg = x.detach().requires_grad_()
            with amp():
                logits = model(xg)
            (grad,) = torch.autograd.grad(F.cross_entropy(logits.float(), labels), [xg])
            return grad
    else:
        model.train()
        model.requires_grad_(True)

        def run():
            model.zero_grad(set_to_none=True)
            with amp():
                logits = model(x)
            F.cross_entropy(logits.float(), labels).backward()
    return run


def _skip_reason(model_name: str, variant: str, task: str):
    """Why a (model, variant, task) case is not run, or None."""
    if variant == "plain_nchw" and task == "train_step" and not ON_CUDA and not os.environ.get("LKFAST_BENCH_NCHW_TRAIN"):
        return ("plain NCHW training step not timed on the CPU by default: PyTorch's NCHW depthwise weight "
                "gradient takes several seconds per large-kernel layer (>10 min per step); set "
                "LKFAST_BENCH_NCHW_TRAIN=1 to time it")
    if variant.startswith("lkfast_folded") and model_name != "replknet_31b":
        return "BN folding (optimize_for_inference) is RepLKNet's"
    if variant.startswith("lkfast_folded") and task == "train_step":
        return "folded BNs are for inference and input gradients; training needs the BNs"
    if variant.endswith("_compiled") and (model_name != "replknet_31b" or task != "inference"):
        return "compiled variants: RepLKNet-31B inference only (compile time on 2 cores)"
    if variant.endswith("_amp") and DTYPE != torch.float32:
        return "autocast variants: an fp32 model under autocast (LKFAST_BENCH_DTYPE=float32)"
    return None


def _tolerance(variant: str) -> float:
    """Largest relative logit difference from the reference allowed for a variant (none for the
    ceiling variants, whose depthwise convs return their input)."""
    if variant.endswith("_nodw"):
        return float("inf")
    return AMP_RTOL if variant.endswith("_amp") else RTOL


def _relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest logit difference from the reference's, relative to the reference's largest logit."""
    return ((logits - reference).abs().max() / reference.abs().max()).item()


def _checked_model(model_name: str, variant: str):
    """The variant's model and input, its logits checked once against the reference plain model's."""
    model, x = _model_and_input(model_name, variant)
    key = (model_name, variant)
    if key not in _rel_err:  # once per model variant
        start = time.perf_counter()
        logits = _logits(model, x, variant)  # compiles the compiled variants
        _first_call_s[key] = time.perf_counter() - start
        if variant in ("plain_nchw", "plain_cl") and model_name not in _reference_logits:
            _reference_logits[model_name] = logits  # the first plain fp32 variant run (plain_nchw if selected)
        reference = _reference_logits.get(model_name)
        _rel_err[key] = None
        if reference is not None:
            _rel_err[key] = _relative_error(logits, reference)
    rel_err = _rel_err[key]
    if rel_err is not None:
        assert rel_err <= _tolerance(variant), (f"{model_name}/{variant}: outputs differ from the reference plain model's by "
                                f"{rel_err:.2e} (relative)")
    return model, x, rel_err


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("model_name", MODELS)  # variants of one task run back to back
def test_model(benchmark, model_name, variant, task):
    if INTERLEAVED:
        pytest.skip("LKFAST_BENCH_INTERLEAVED is set: the variants are timed together by test_interleaved")
    why = _skip_reason(model_name, variant, task)
    if why:
        pytest.skip(why)
    model, x, rel_err = _checked_model(model_name, variant)
    key = (model_name, variant)
    run = _task(model, x, task, variant)
    benchmark.group = f"{model_name} {task}"
    benchmark.extra_info.update(model=model_name, variant=variant, task=task, batch=BATCH, size=SIZE,
                                dtype=dtype_name(DTYPE), device=DEVICE,
                                threads=torch.get_num_threads(), max_rel_err_vs_plain_nchw=rel_err,
                                load_average=os.getloadavg(), **_machine())
    if variant.endswith("_compiled") and key in _first_call_s:
        benchmark.extra_info.update(compile_and_first_call_wall_s=_first_call_s.pop(key))
    if ON_CUDA:  # the project's GPU timer: CUDA events around back-to-back steps, warm-up excluded
        per_step = []
        benchmark.extra_info.update(timer=GPU_TIMER)
        benchmark.pedantic(lambda: per_step.append(gpu_time_ms(run, warmup=2, samples=5)), rounds=1, warmup_rounds=0)
        benchmark.extra_info.update(ms_per_step=per_step[0])
        return
    if variant == "plain_nchw" or (variant.startswith("plain") and task == "train_step"):
        # PyTorch's CPU depthwise weight gradient (any layout) and NCHW large-kernel conv take minutes
        # per step here: one timed call, no warm-up (its one-time costs are negligible against that),
        # except under autocast: creating oneDNN's bf16 primitives takes seconds on the first call.
        rounds, warmup = 1, int(variant.endswith("_amp"))
    else:
        rounds, warmup = ROUNDS, 1
    seconds = []  # the project's CPU timer, with the clock chosen above (CPU time of this process by default)
    benchmark.extra_info.update(rounds=rounds, warmup_rounds=warmup, timer=CPU_TIMER)
    benchmark.pedantic(lambda: seconds.extend(time_interleaved({"step": run}, rounds, warmup, clock=CPU_CLOCK)["step"]),
                       rounds=1, warmup_rounds=0)
    benchmark.extra_info.update(ms_per_step=median(seconds) * 1e3, seconds=seconds)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("model_name", MODELS)
def test_interleaved(benchmark, model_name, task):
    """Every variant of one (model, task), timed in turn round by round (lkfast.timing.time_interleaved,
    order shuffled per round), so plain and lkfast share the same stretch of machine time."""
    if not INTERLEAVED:
        pytest.skip("set LKFAST_BENCH_INTERLEAVED=1 to time the variants of a task round by round in one process")
    if ON_CUDA:
        pytest.skip("on CUDA every case has the GPU timer to itself (test_model)")
    variants = _variants_of(model_name, task)  # the plain fp32 variant first: the output check's reference
    runs, errs = {}, {}
    for variant in variants:
        model, x, errs[variant] = _checked_model(model_name, variant)
        runs[variant] = _task(model, x, task, variant)
    times: dict = {}
    benchmark.group = f"{model_name} {task} interleaved"
    benchmark.extra_info.update(kind="interleaved", model=model_name, task=task, batch=BATCH, size=SIZE,
                                dtype=dtype_name(DTYPE), device=DEVICE, threads=torch.get_num_threads(),
                                max_rel_err_vs_reference=errs, rounds=ROUNDS, warmup_rounds=1, timer=CPU_TIMER,
                                load_average=os.getloadavg(), **_machine())
    benchmark.pedantic(lambda: times.update(time_interleaved(runs, ROUNDS, 1, clock=CPU_CLOCK)), rounds=1,
                       warmup_rounds=0)
    benchmark.extra_info.update(seconds=times, ms_per_step={v: median(t) * 1e3 for v, t in times.items()},
                                load_average_after=os.getloadavg())


def _variants_of(model_name: str, task: str) -> list:
    """The variants a grouped test (interleaved or isolated) times: LKFAST_BENCH_VARIANTS or every
    selected variant but the NCHW ones, the plain fp32 one first (the output check's reference)."""
    chosen = INTERLEAVED_VARIANTS.split(",") if INTERLEAVED_VARIANTS else [v for v in VARIANTS if "nchw" not in v]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        raise ValueError(f"LKFAST_BENCH_VARIANTS: unknown or not enabled {', '.join(unknown)}; "
                         f"choose from {', '.join(VARIANTS)}")
    return sorted((v for v in chosen if not _skip_reason(model_name, v, task)),
                  key=lambda v: v not in ("plain_nchw", "plain_cl"))


def _worker(model_name: str, task: str, variant: str, rounds: int, logits_path: str) -> dict:
    """One isolated process's measurement: the variant's logits saved to ``logits_path`` (the parent
    checks them), then ``rounds`` steps after a warm-up, with the step's CPU time, system time and
    page faults (getrusage), and wall time."""
    import resource

    model, x = _model_and_input(model_name, variant)
    torch.save(_logits(model, x, variant), logits_path)
    run = _task(model, x, task, variant)
    run()  # warm-up: allocations, oneDNN primitives
    steps = []
    for _ in range(rounds):
        before, wall, cpu = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), CPU_CLOCK()
        run()
        cpu, wall, after = CPU_CLOCK() - cpu, time.perf_counter() - wall, resource.getrusage(resource.RUSAGE_SELF)
        steps.append({"seconds": cpu, "wall_s": wall, "system_s": after.ru_stime - before.ru_stime,
                      "page_faults": after.ru_minflt - before.ru_minflt + after.ru_majflt - before.ru_majflt})
    return {"variant": variant, "steps": steps, "pid": os.getpid()}


def isolated_times(model_name: str, task: str, variants: list, rounds: int, processes: int, workdir: str):
    """Runs every variant in ``processes`` fresh processes each (started one at a time, the variants
    in turn, reversed every other pass so that none always follows the same one) and returns
    ({variant: [seconds per step, ...]}, {variant: [step records]}, {variant: max relative logit error
    against the first variant's logits, which is the plain fp32 reference when it was selected}."""
    import subprocess

    seconds = {v: [] for v in variants}
    records = {v: [] for v in variants}
    errs: dict = {}
    reference = None
    for p in range(processes):
        for variant in (variants if p % 2 == 0 else variants[::-1]):
            logits_path = os.path.join(workdir, f"{variant}-{p}.pt")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", model_name, task, variant, str(rounds),
                   logits_path]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"isolated worker {variant} ({task}) failed with exit code {done.returncode}:\n"
                                   f"{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            records[variant] += result["steps"]
            seconds[variant] += [s["seconds"] for s in result["steps"]]
            logits = torch.load(logits_path)
            if variant == variants[0] and reference is None:
                reference = logits
            errs[variant] = max(errs.get(variant, 0.0),
                                _relative_error(logits, reference) if reference is not None else 0.0)
    return seconds, records, errs


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("model_name", MODELS)
def test_isolated(benchmark, model_name, task, tmp_path):
    """Every variant of one (model, task) in processes of its own (see ISOLATED): the time a user who
    runs one model per process sees, without the other variants' memory in the same process."""
    if not ISOLATED:
        pytest.skip("set LKFAST_BENCH_ISOLATED=1 to time each variant of a task in processes of its own")
    if ON_CUDA:
        pytest.skip("on CUDA every case has the GPU timer to itself (test_model)")
    variants = _variants_of(model_name, task)
    out: dict = {}
    benchmark.group = f"{model_name} {task} isolated"
    benchmark.extra_info.update(kind="isolated", model=model_name, task=task, batch=BATCH, size=SIZE,
                                dtype=dtype_name(DTYPE), device=DEVICE, threads=torch.get_num_threads(),
                                rounds=ROUNDS, processes=PROCESSES, warmup_rounds=1,
                                timer=f"time.{CPU_CLOCK.__name__} around each step in the worker process",
                                load_average=os.getloadavg(), **_machine())
    benchmark.pedantic(lambda: out.update(zip(("seconds", "steps", "errs"), isolated_times(
        model_name, task, variants, ROUNDS, PROCESSES, str(tmp_path)))), rounds=1, warmup_rounds=0)
    for variant, err in out["errs"].items():
        assert err <= _tolerance(variant), f"{model_name}/{variant}: outputs differ from the reference's by {err:.2e} (relative)"
    benchmark.extra_info.update(seconds=out["seconds"], steps=out["steps"], max_rel_err_vs_reference=out["errs"],
                                ms_per_step={v: median(t) * 1e3 for v, t in out["seconds"].items()},
                                load_average_after=os.getloadavg())


def _cases(results: dict):
    """(extra_info, variant, ms per step, relative output error) of every timed variant, whether it
    was a case of its own (test_model) or one of an interleaved group (test_interleaved)."""
    for bench in results["benchmarks"]:
        e = bench["extra_info"]
        if e.get("kind") in ("interleaved", "isolated"):
            for variant, ms in e["ms_per_step"].items():
                yield e, variant, ms, e["max_rel_err_vs_reference"].get(variant)
        else:
            yield e, e["variant"], e.get("ms_per_step", bench["stats"]["median"] * 1000), e.get("max_rel_err_vs_plain_nchw")


def _ms(value: float | None) -> str:
    """A table cell of milliseconds, or "not run"."""
    return f"{value:.0f}" if value else "not run"


def _fastest_variant(times: dict, model: str, task: str, variants) -> str | None:
    """The name of the fastest timed one among ``variants`` of (model, task), or None."""
    timed = [(times[(model, task, v)], v) for v in variants if times.get((model, task, v))]
    return min(timed)[1] if timed else None


def _fastest(times: dict, model: str, task: str, variants) -> float | None:
    """The shortest time among ``variants`` of (model, task) that were timed, or None."""
    variant = _fastest_variant(times, model, task, variants)
    return times[(model, task, variant)] if variant else None


def markdown_table(results: dict) -> str:
    """Markdown tables (ms per step; ratio of the best lkfast variant against the faster plain layout
    and against plain NCHW; compiled variants in a table of their own) and the issue's targets."""
    times, info, loads, kinds = {}, {}, [], set()
    faults = {}  # (model, task, variant): median page faults a step, where the isolated workers counted them
    for e, variant, ms, _ in _cases(results):
        times[(e["model"], e["task"], variant)] = ms
        steps = e.get("steps", {}).get(variant)  # isolated runs: each step's record
        if steps and all("page_faults" in s for s in steps):
            faults[(e["model"], e["task"], variant)] = median([s["page_faults"] for s in steps])
        loads += [e["load_average"][0]] if "load_average" in e else []
        kinds.add(e.get("kind"))
        info = e
    machine = results.get("machine_info", {})
    timer = results["benchmarks"][0].get("options", {}).get("timer", "wall clock") if results["benchmarks"] else ""
    timer = info.get("timer", timer)
    if str(info.get("device", "cpu")).startswith("cuda"):
        how = "ms per step"
    elif "isolated" in kinds:
        how = (f"each variant in {info.get('processes')} processes of its own (one model per process, started in "
               f"turn), median of their {info.get('rounds')} steps each after 1 warm-up step")
    elif "interleaved" in kinds:
        how = (f"median of {info.get('rounds')} rounds after 1 warm-up round; in each round every variant of the "
               "task ran once, in shuffled order, in one process")
    else:
        how = (f"median of {ROUNDS} timed calls after 1 warm-up, except the plain NCHW cases and the plain training "
               f"steps: 1 timed call (minutes each)")
    cpu = info.get("cpu_model", machine.get("cpu", {}).get("brand_raw", "unknown"))
    isa = (f"; instruction sets: lkfast {info['lkfast_cpu_isa']}, PyTorch {info['torch_cpu_capability']}, "
           f"ONEDNN_MAX_CPU_ISA {info['onednn_max_cpu_isa']}, MKL_ENABLE_INSTRUCTIONS "
           f"{info.get('mkl_enable_instructions', 'unset')}" if "lkfast_cpu_isa" in info else "")
    load = f"; load average (1 min) at the cases' start {min(loads):.1f}-{max(loads):.1f}" if loads else ""
    caption = (f"Timer: {timer}. {info.get('device', 'cpu')}, {info.get('dtype')}, batch {info.get('batch')}, "
               f"{info.get('size')} px, torch threads {info.get('threads')}; {how}; CPU: {cpu}{isa}{load}. "
               f"Speed-up = plain time / lkfast time.")
    names = {"plain_nchw": "plain NCHW ms", "plain_cl": "plain channels_last ms", "lkfast_nchw": "lkfast NCHW ms",
             "lkfast_cl": "lkfast channels_last ms", "lkfast_folded": "lkfast BNs folded ms"}
    header = ["model", "task", *(names[v] for v in EAGER_VARIANTS), "best lkfast vs faster plain",
              "best lkfast vs plain NCHW"]
    rows = []

    def best(t, prefix):
        return min([v for k, v in t.items() if k.startswith(prefix) and not k.endswith("_compiled") and v],
                   default=None)

    for model in MODELS:
        for task in TASKS:
            t = {v: times.get((model, task, v)) for v in EAGER_VARIANTS}
            if not any(t.values()):
                continue
            plain, ours = best(t, "plain"), best(t, "lkfast")
            vs_best = f"{plain / ours:.2f}x" if plain and ours else "n/a"
            vs_nchw = f"{t['plain_nchw'] / ours:.2f}x" if t["plain_nchw"] and ours else "n/a"
            rows.append([model, task, *(_ms(t[v]) for v in EAGER_VARIANTS), vs_best,
                         vs_nchw])
    lines = [table_markdown(header, rows, align="ll" + "r" * (len(header) - 2), caption=caption).rstrip("\n")]
    compiled = {v: times.get(("replknet_31b", "inference", v)) for v in COMPILED_VARIANTS + ("plain_cl",)}
    if compiled["plain_cl_compiled"] and compiled["lkfast_folded_compiled"]:
        first = {e["variant"]: e.get("compile_and_first_call_wall_s") for e in
                 (b["extra_info"] for b in results["benchmarks"]) if e.get("variant") in COMPILED_VARIANTS}
        c_plain, c_ours, eager_plain = (compiled["plain_cl_compiled"], compiled["lkfast_folded_compiled"],
                                        compiled["plain_cl"])
        lines += ["", table_markdown(
            ["model", "task", "plain channels_last compiled ms", "lkfast folded compiled ms",
             "lkfast compiled vs plain compiled", "lkfast compiled vs plain eager"],
            [["replknet_31b", "inference", f"{c_plain:.0f}", f"{c_ours:.0f}", f"{c_plain / c_ours:.2f}x",
              f"{eager_plain / c_ours:.2f}x" if eager_plain else "n/a"]], align="llrrrr",
            caption=("torch.compile (inductor, freezing: frozen weights, conv-BN folding and oneDNN post-op fusion "
                     "on the plain side too), same run; compile + first call wall s: plain "
                     f"{first.get('plain_cl_compiled') or 0:.0f}, lkfast {first.get('lkfast_folded_compiled') or 0:.0f}."))]
    errs = {(e.get("model"), variant): err for e, variant, _, err in _cases(results) if variant in AUTOCAST_VARIANTS}
    amp_rows = []
    for model in MODELS:
        amp = {(task, v): times.get((model, task, v)) for task in TASKS for v in AUTOCAST_VARIANTS + ("plain_cl",)}
        for task in TASKS:
            plain32, plain_amp = amp[(task, "plain_cl")], amp[(task, "plain_cl_amp")]
            ours = _fastest(times, model, task, ("lkfast_cl_amp", "lkfast_folded_amp"))
            if not ours:
                continue
            amp_rows.append([model, task, _ms(plain32), _ms(plain_amp), _ms(amp[(task, "lkfast_cl_amp")]),
                             _ms(amp[(task, "lkfast_folded_amp")]), f"{plain32 / ours:.2f}x" if plain32 else "n/a",
                             f"{plain_amp / ours:.2f}x" if plain_amp else "n/a"])
    if amp_rows:
        err_text = ", ".join(f"{m} {v} {e:.1e}" for (m, v), e in errs.items() if e is not None)
        lines += ["", table_markdown(
            ["model", "task", "plain channels_last fp32 ms", "plain autocast ms", "lkfast autocast ms",
             "lkfast BNs folded autocast ms", "best lkfast autocast vs plain fp32", "vs plain autocast"],
            amp_rows, align="llrrrrrr",
            caption=(f"Mixed precision, same run: the fp32 models under torch.autocast({dtype_name(AMP_DTYPE)}); "
                     "weights stay fp32, the convolutions and most activations run in "
                     f"{dtype_name(AMP_DTYPE)}. Largest logit difference from the reference plain fp32 model's, "
                     f"relative to its largest logit: {err_text or 'n/a'}."))]
    ceiling_rows = []
    for model in MODELS:
        for task in TASKS:
            t = {v: times.get((model, task, v)) for v in EAGER_VARIANTS}
            free = _fastest(times, model, task, CEILING_VARIANTS)
            plain, ours = best(t, "plain"), best(t, "lkfast")
            if not (free and plain):
                continue
            # The page faults of the two steps compared: a depthwise-free model allocates less, and
            # where that keeps glibc from returning memory to the system its steps fault far less
            # (Zen 5, inference: 0-12.5k against 125-166k), which the ceiling then counts as depthwise time.
            pair = [faults.get((model, task, _fastest_variant(times, model, task, names)))
                    for names in ([v for v in EAGER_VARIANTS if v.startswith("lkfast")], CEILING_VARIANTS)]
            ceiling_rows.append([model, task, _ms(plain), _ms(ours), _ms(free),
                                 f"{plain / ours:.2f}x" if ours else "n/a", f"{plain / free:.2f}x",
                                 f"{(ours - free) / ours:.0%}" if ours else "n/a",
                                 " / ".join(f"{f / 1000:.0f}k" for f in pair) if None not in pair else "n/a"])
    if ceiling_rows:
        lines += ["", table_markdown(
            ["model", "task", "faster plain ms", "best lkfast ms", "lkfast, depthwise free ms",
             "lkfast vs plain", "ceiling: plain / depthwise free", "depthwise share of lkfast's step",
             "page faults a step: lkfast / depthwise free"],
            ceiling_rows, align="llrrrrrrr",
            caption=("The ceiling, same run: the lkfast models (channels_last, and BNs folded where the task "
                     "allows) with every large depthwise convolution returning its input at no cost (in "
                     "training its BNs still run). No depthwise kernel, however fast, can take a model step "
                     "past the ceiling; what is left is the 1x1 and other dense convolutions, BN and the "
                     "activations. The last column (median page faults a step of the two models compared, "
                     "isolated runs only): where the depthwise-free model faults far less, part of the gap "
                     "is glibc returning and re-faulting memory, not depthwise work."))]
    lines += ["", "Targets (RepLKNet-31B, best eager lkfast variant against the faster eager plain layout):"]
    for task, against, target in TARGETS:
        t = {v: times.get(("replknet_31b", task, v)) for v in EAGER_VARIANTS}
        ours = best(t, "lkfast")
        base = t["plain_nchw"] if against == "plain NCHW" else best(t, "plain")
        got = f"{base / ours:.2f}x" if base and ours else "not measured"
        verdict = "met" if base and ours and base / ours >= target else "MISSED" if base and ours else "n/a"
        free = _fastest(times, "replknet_31b", task, CEILING_VARIANTS)
        ceiling = f"; ceiling with the depthwise convs free {base / free:.2f}x" if free and base else ""
        lines.append(f"- {task} >= {target}x {against}: {got} ({verdict}{ceiling})")
        amp_ours = _fastest(times, "replknet_31b", task, ("lkfast_cl_amp", "lkfast_folded_amp"))
        if amp_ours and base:
            verdict = "met" if base / amp_ours >= target else "MISSED"
            lines.append(f"  - with {dtype_name(AMP_DTYPE)} autocast (against the same fp32 baseline): "
                         f"{base / amp_ours:.2f}x ({verdict})")
    return "\n".join(lines) + "\n"


TARGETS = (("inference", "plain NCHW", 5.0), ("inference", "faster plain layout", 1.0),
           ("input_grad", "faster plain layout", 1.5), ("train_step", "faster plain layout", 5.0))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:  # one isolated measurement (test_isolated starts these)
        _model_name, _task_name, _variant, _rounds, _path = sys.argv[2:7]
        print(json.dumps(_worker(_model_name, _task_name, _variant, int(_rounds), _path)))
        sys.exit(0)
    if len(sys.argv) < 3:
        sys.exit("usage: python benchmarks/bench_models.py RESULTS.json [MORE_RESULTS.json ...] OUT.md")
    merged = None
    for path in sys.argv[1:-1]:  # e.g. one pytest-benchmark run per model, merged into one table
        with open(path) as f:
            results = json.load(f)
        if merged is None:
            merged = results
        else:
            merged["benchmarks"] += results["benchmarks"]
    table = markdown_table(merged)
    with open(sys.argv[-1], "w") as f:
        f.write(table)
    print(table)
