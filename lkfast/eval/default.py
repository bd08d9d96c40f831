"""The embedded default: what ``python -m lkfast.eval`` runs with no models and no data.

``prepare_default(args)`` (the hook ``lkfast.eval.cli`` calls) makes sure that, under the cache
folder (``lkfast.cache.cache_dir()``: ``$LKFAST_CACHE`` or ``~/.cache/lkfast``):

1. the synthetic benchmark is built (``lkfast.data.synthetic``: train/val shape images with masks,
   and imagenet-c/-p/-9/-r in the real benchmarks' layouts);
2. the small models (``lkfast.models.small``: RepLKNet-style at kernel 31/13/7/3, ResNet, ViT) are
   trained on it with ``python -m lkfast.train``'s recipe on this machine, through lkfast's op;
3. imagenet-a (images the trained ResNet, the reference small-kernel model, gets wrong with high
   confidence) and imagenet-o (held-out shapes) are built with that reference model;

and returns the models, data folders, class space and suite for the eval. Unless the user set
``LKFAST_CALIBRATE``, the whole run (training and evaluation) uses fixed kernel choices
(``fix_kernel_choices``), so that its report is the same on every run on a machine. Every piece is a
verified cache entry (``lkfast.cache``): a rerun reuses them, and a partial or altered file is
rebuilt. A training run interrupted mid-way resumes from its last epoch.

Settings live in ``DEFAULT`` (a ``DefaultSettings``); tests shrink it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Optional, Tuple

from lkfast.cache import cache_dir, config_key, ensure_entry
from lkfast.data import synthetic

# (model name, label in the report), in report order; the reference model comes first in training.
DEFAULT_MODELS: Tuple[Tuple[str, str], ...] = (
    ("replknet_tiny_k31", "RepLKNet-tiny-k31"),
    ("replknet_tiny_k13", "RepLKNet-tiny-k13"),
    ("replknet_tiny_k7", "RepLKNet-tiny-k7"),
    ("replknet_tiny_k3", "RepLKNet-tiny-k3"),
    ("resnet_tiny", "ResNet-tiny"),
    ("vit_tiny_p8", "ViT-tiny"),
)
REFERENCE_MODEL = "resnet_tiny"


@dataclass(frozen=True)
class DefaultSettings:
    """What the embedded default builds. ``recipe`` is the argument list given to ``lkfast.train``
    for every model (besides the model name, --data and --out).

    15 epochs, not 5: after 5 the RepLKNet-tiny nets were still far from converged and their clean
    top-1 was mostly noise (RepLKNet-tiny-k31 at 40.0 / 51.0 / 61.0 for seeds 0 / 1 / 2 on the Xeon,
    and 40.0 against 53.0 with PyTorch's kernels instead of lkfast's, same seed); after 15 it was
    75.0 / 78.0 / 76.5 (74.0 with PyTorch's kernels), k13 / k7 / k3 72.5 / 71.0 / 70.0 at seed 0.
    Training costs about 28 s per model there instead of 9."""
    data: synthetic.SyntheticConfig = synthetic.SyntheticConfig()
    models: Tuple[Tuple[str, str], ...] = DEFAULT_MODELS
    recipe: Tuple[str, ...] = ("--epochs", "15", "--batch-size", "64", "--lr", "2e-3", "--weight-decay", "0.05",
                               "--warmup-epochs", "1", "--smoothing", "0.1", "--scale", "0.6", "1.0",
                               "--hflip", "0.5", "--channels-last", "--seed", "0")
    suite: Optional[str] = None   # the suite when the command line names none; None: default_suite()
    # Normalise mCE / mFR by the trained ResNet-tiny (AlexNet's role on ImageNet). Off: see no_baseline()
    # (tried at d089487: mCE 100-146 against its 100, relative mCE -176..100, no mFR).
    baseline: bool = False


def no_baseline(settings: "DefaultSettings") -> str:
    """Why the default's report has no mCE / mFR (the notes of Tables 1 and 2)."""
    n = len(synthetic.CLASSES)
    return (f"the embedded default normalises by no baseline model: its reference ResNet-tiny never flips on several "
            f"perturbations (a zero flip probability cannot normalise), and its ImageNet-C holds "
            f"{settings.data.c_per_class * n} of val's {settings.data.val_per_class * n} images, so a relative CE "
            f"would set their errors against another set's clean error")


DEFAULT = DefaultSettings()


BENCHMARK_TASKS = ("clean", "imagenet-a", "imagenet-c", "imagenet-o", "imagenet-p", "imagenet-r", "imagenet-9")
# The analyses the default run includes when the eval registers them (cheap enough on 64 px images);
# the ablation costs nothing (its tables come from the other tasks: RepLKNet-tiny at 31/13/7/3).
QUICK_ANALYSES = ("occlusion", "fgsm", "pgd", "frequency", "kernel-distance", "feature-variance", "lesion",
                  "ablation")


def default_suite() -> str:
    """The default run's tasks: the clean set, all six benchmarks, and the analyses of
    ``QUICK_ANALYSES`` that ``lkfast.eval`` registers (no TAIG: ``--suite paper`` adds it), as a
    comma list for ``resolve_suite``."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("lkfast.eval.analysis_tasks") is not None:
        importlib.import_module("lkfast.eval.analysis_tasks")  # registers the analyses
    from lkfast.eval.registry import TASKS

    names = [name for name in BENCHMARK_TASKS if name in TASKS]
    names += [name for name in QUICK_ANALYSES if name in TASKS]
    return ",".join(names)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def benchmark_root(settings: DefaultSettings = None) -> Path:
    """Folder of the synthetic benchmark for ``settings`` (default ``DEFAULT``)."""
    settings = settings or DEFAULT
    return cache_dir() / "synthetic" / settings.data.key()


def fix_kernel_choices() -> str:
    """Makes the embedded default give the same report on every run on a machine: unless the user
    set ``LKFAST_CALIBRATE``, it is set to 0 for this process (the shipped per-instruction-set table
    picks the depthwise op's kernels, PyTorch's convolution runs the 1x1s). A calibration measures
    timings that are often within a few percent of each other, so a fresh one (a new cache, another
    load on the machine) can pick the other kernel; the kernels round differently, and a few epochs
    of training turn that into other weights (RepLKNet-tiny-k31 at 52.00 then 49.00 top-1 on one
    machine). Returns the setting in effect (``LKFAST_CALIBRATE``'s value)."""
    if "LKFAST_CALIBRATE" not in os.environ:
        os.environ["LKFAST_CALIBRATE"] = "0"
        _log("lkfast: embedded default: fixed kernel choices (LKFAST_CALIBRATE=0: shipped table, no timing), so "
             "that every run on this machine gives the same report; LKFAST_CALIBRATE=1 measures instead")
    return os.environ["LKFAST_CALIBRATE"]


# Bump when lkfast.train draws or computes otherwise for the same recipe (its Python code is in no
# other part of the key): 2 since b5afb14, each image's augmentation drawn from (seed, epoch, index).
TRAINING_VERSION = 2


def _model_key(name: str, settings: DefaultSettings, device: str = "cpu") -> str:
    import torch

    from lkfast import __version__ as version
    from lkfast import _ext
    from lkfast.ops.cpu_dispatch import calibration_enabled, table_choices_digest

    # the class order is part of what a model's outputs mean: it is part of the key; so is how the
    # kernels were chosen (they round differently: other choices, other weights), and with the
    # shipped table, which choices it holds (a new table retrains; one re-measured to the same
    # choices does not); so is the code that computes the layers: the sources lkfast's kernels were
    # built from (a rebuilt kernel that sums in another order trains other weights, where the
    # version number alone would reuse the old model) and PyTorch's version (its convolutions,
    # products and norms round as that version does)
    choices = "calibrated" if calibration_enabled() else f"table-{table_choices_digest()}"
    parts = ["model", name, list(settings.recipe), settings.data.key(), version, list(synthetic.CLASSES), choices,
             _ext.sources or "unrecorded", torch.__version__, TRAINING_VERSION]
    # so is the device type the models train on: a GPU trains other weights than the CPU (TF32, other
    # kernels, cuDNN's non-deterministic ones). Named only off the CPU, so every key made before devices
    # were part of it (all on the CPU) stays as it was, and its cached models are reused
    kind = torch.device(device).type
    return config_key(*parts, *(() if kind == "cpu" else (f"device-{kind}",)))


@contextlib.contextmanager
def _one_process():
    """lkfast.train as one process, also under torchrun. Each rank prepares the default on its own
    before the eval joins its process group: the cache's lock lets one rank train a model while the
    others wait for it, then they reuse it. Seeing torchrun's WORLD_SIZE, train joined a process group
    that the waiting ranks never joined: every rank waited on another for good."""
    saved = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["WORLD_SIZE"]
        else:
            os.environ["WORLD_SIZE"] = saved


def ensure_model(name: str, settings: DefaultSettings = None, data_root: Optional[Path] = None,
                 progress: bool = True, device: Optional[str] = None) -> Path:
    """Train ``name`` on the synthetic benchmark with ``settings.recipe`` on ``device`` (the eval's
    --device: cpu, cuda or cuda:N; None as the eval's default, cuda when available) unless a verified
    cached copy exists; returns the path of its ``model.safetensors``. Training writes its checkpoints
    to a work folder beside the entry, so an interrupted run resumes where it stopped."""
    from lkfast.train import device_option, train

    settings = settings or DEFAULT
    data_root = data_root or benchmark_root(settings)
    device = str(device_option(device))
    key = _model_key(name, settings, device)
    entry = cache_dir() / "models" / f"{name}-{key}"
    work = entry.with_name(entry.name + ".work")

    def build(folder: Path) -> None:
        _log(f"lkfast: training {name} on the synthetic benchmark (once; cached in {entry})")
        # the model's outputs in the class space's order (synthetic.CLASSES), not sorted folder names
        # on the eval's device (without --device, train picked CUDA wherever there is one: `--device cpu`
        # trained on GPU 0, so did `--device cuda:1`); after the recipe, which it overrides
        with _one_process():
            train([name, "--data", str(data_root), "--out", str(work), "--classes", ",".join(synthetic.CLASSES),
                   *settings.recipe, "--device", device, *(() if progress else ("--no-progress",))])
        for file in ("model.safetensors", "summary.json"):
            shutil.copy2(work / file, folder / file)

    ensure_entry(entry, build, key, log=_log)
    shutil.rmtree(work, ignore_errors=True)
    return entry / "model.safetensors"


def _load_trained(name: str, checkpoint: Path):
    from lkfast.models import create_model

    return create_model(name, checkpoint=str(checkpoint), num_classes=len(synthetic.CLASSES))


def ensure_reference_sets(settings: DefaultSettings, reference_checkpoint: Path) -> Dict[str, Path]:
    """imagenet-a and imagenet-o, selected with the reference model's weights (part of their key)."""
    from lkfast.models import SYNTHETIC_MEAN, SYNTHETIC_STD

    root = benchmark_root(settings)
    weights = json.loads((reference_checkpoint.parent / ".lkfast-manifest.json").read_text())["files"][
        "model.safetensors"]["sha256"]
    key = config_key("reference-sets", settings.data.key(), REFERENCE_MODEL, weights)
    model = None

    def reference():
        nonlocal model
        if model is None:
            model = _load_trained(REFERENCE_MODEL, reference_checkpoint)
        return model

    out = {}
    out["imagenet-a"] = ensure_entry(root / "imagenet-a", lambda d: synthetic.build_imagenet_a(
        d, settings.data, reference(), SYNTHETIC_MEAN, SYNTHETIC_STD), key, log=_log)
    out["imagenet-o"] = ensure_entry(root / "imagenet-o", lambda d: synthetic.build_imagenet_o(
        d, settings.data, reference(), SYNTHETIC_MEAN, SYNTHETIC_STD), key, log=_log)
    return out


def synthetic_class_space():
    """The ``lkfast.eval.ClassSpace`` of the synthetic benchmark (ten shapes; ImageNet-9's nine are
    the first nine, folders 00_circle ... 08_arrow)."""
    from lkfast.eval.classes import ClassSpace

    space = synthetic.class_space()
    all_classes = tuple(range(len(space["classes"])))
    return ClassSpace(name="synthetic shapes", class_names=tuple(space["classes"]),
                      subsets={"imagenet-a": all_classes, "imagenet-r": all_classes},
                      nine_map=tuple(space["in9_map"]), nine_names=tuple(synthetic.IN9_CLASSES), about=ABOUT)


ABOUT = (f"lkfast's embedded default benchmark (lkfast.data.synthetic): {len(synthetic.CLASSES)} classes of synthetic "
         "shapes drawn at 64x64 on textured backgrounds, and small models trained on them here. Each set plays a "
         "benchmark's role in that benchmark's layout: ImageNet-A holds hard images the reference ResNet-tiny "
         "misclassifies (so it scores near 0 there, as ResNet-50 does on ImageNet-A), ImageNet-R the shapes drawn as "
         "sketches, ImageNet-O four shapes never trained on, ImageNet-9 the shapes and backgrounds swapped, "
         "ImageNet-C/-P lkfast.corrupt's corruptions of val. The numbers show the protocol end to end; they are not "
         f"ImageNet numbers and not comparable with the paper's. Chance is {100 / len(synthetic.CLASSES):.0f}% top-1.")


def prepare_default(args, settings: DefaultSettings = None) -> dict:
    """Build (or reuse) the synthetic benchmark and the trained small models; returns the dict
    ``lkfast.eval.cli`` expects: ``models`` (ModelSpecs with cached checkpoints), ``data``
    ({source: folder}, plus ``masks``: val's foreground masks), ``class_space``, ``suite`` and
    ``baseline`` (with ``settings.baseline``, the reference ResNet-tiny normalises mCE and mFR
    as AlexNet does on ImageNet; else None and the report gives unnormalised values) and
    ``workers`` (0: the small images decode in the eval's process unless --workers says otherwise)."""
    from lkfast.eval.models import ModelSpec

    settings = settings or DEFAULT
    planned = planned_run(args, settings)  # the labels and suite the CLI checked its options against
    started = time.time()
    fix_kernel_choices()
    root = benchmark_root(settings)
    progress = not getattr(args, "no_progress", False)
    device = getattr(args, "device", None)  # the eval's --device: its models train there
    parts = synthetic.build_base(root, settings.data, log=_log, progress=progress)
    checkpoints = {REFERENCE_MODEL: ensure_model(REFERENCE_MODEL, settings, root, progress, device)}
    parts.update(ensure_reference_sets(settings, checkpoints[REFERENCE_MODEL]))
    for spec in planned["models"]:
        if spec.name not in checkpoints:
            checkpoints[spec.name] = ensure_model(spec.name, settings, root, progress, device)
    num_classes = (("num_classes", len(synthetic.CLASSES)),)
    models = [replace(spec, checkpoint=str(checkpoints[spec.name]), kwargs=num_classes)
              for spec in planned["models"]]
    baseline = None
    if settings.baseline:
        baseline = ModelSpec(REFERENCE_MODEL, str(checkpoints[REFERENCE_MODEL]), "ResNet-tiny (baseline)",
                             kwargs=num_classes)
    _log(f"lkfast: embedded default ready in {time.time() - started:.0f} s: synthetic benchmark in {root}, "
         f"{len(models)} trained models")
    data = {name: str(parts[name]) for name in ("val", "imagenet-a", "imagenet-r", "imagenet-o", "imagenet-c",
                                                  "imagenet-p", "imagenet-9")}
    data["masks"] = str(parts["val-masks"])
    # Decoding a 64-px image costs less than what a worker process costs the eval: forked (Linux before
    # Python 3.14) every page the eval writes while workers live takes a copy-on-write fault, started
    # afresh (forkserver, spawn) each imports torch. Measured here (Python 3.11, fork) with the models
    # cached: 201 s (6.0M page faults) with 2 workers, 138 s with none.
    return {"models": models, "data": data, "class_space": synthetic_class_space(),
            "suite": planned["suite"], "baseline": baseline, "workers": 0,
            **({} if baseline else {"no_baseline": no_baseline(settings)})}


def planned_run(args, settings: DefaultSettings = None) -> dict:
    """What ``prepare_default(args, settings)`` returns as ``models`` (without their checkpoints: the
    labels) and ``suite``, known before anything is built or trained (``prepare_default`` builds its
    own from these): the CLI checks the options that name a label or a task's file against them,
    once, before the building (a mistake is one line, not one after minutes of training)."""
    from lkfast.eval.models import ModelSpec
    from lkfast.eval.registry import resolve_suite

    settings = settings or DEFAULT
    return {"models": [ModelSpec(name, None, label) for name, label in settings.models],
            "suite": resolve_suite(_suite(args, settings))}


def _suite(args, settings: DefaultSettings) -> str:
    suite = getattr(args, "suite", None)
    if suite is None or (suite == "paper" and not _suite_on_command_line()):
        suite = settings.suite or default_suite()
    return suite


def _suite_on_command_line() -> bool:
    # The CLI's --suite defaults to "paper"; the embedded default runs "quick" unless --suite was typed.
    return any(a == "--suite" or a.startswith("--suite=") for a in sys.argv[1:])
