"""``python -m lkfast.eval``: evaluate models on the paper's robustness benchmarks and write
results.json, report.md, tables (markdown + CSV) and figures.

With no ``--models`` and no data, the embedded default runs when ``lkfast.eval.default`` exists:
``planned_run(args)`` gives its "models" (labels, no checkpoints) and "suite" before anything is built
(the analysis options are checked against these, once), then ``prepare_default(args)`` builds that
run and returns a dict with
    "models":      list of ``lkfast.eval.ModelSpec`` to evaluate (planned_run's, with checkpoints),
    "data":        {source name: folder} in the layouts of ``lkfast.eval.sources``,
    "class_space": a ``lkfast.eval.ClassSpace`` (None: ImageNet-1k),
    "suite":       optional task names (default: the --suite given),
    "baseline":    optional ``ModelSpec`` for ImageNet-P normalisation (default: none),
    "workers":     optional data-loading workers when --workers is not given.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import sys
from pathlib import Path
from typing import List, Optional

from lkfast.corrupt import FrostPhotosMissing
from lkfast.data.imagenet import looks_like_wnids
from lkfast.eval import distributed as dist
from lkfast.eval.models import ModelSpec, hub_unavailable, with_training_run
from lkfast.eval.registry import SUITES, TASKS, resolve_suite, suites_in_list
from lkfast.tables import is_storage_error
from lkfast.eval.sources import SOURCE_NAMES, resolve_sources, source_label
from lkfast.metrics import IMAGENET9_VARIANTS

EXAMPLE = """examples:
  python -m lkfast.eval --models replknet_31b:/ckpt/RepLKNet-31B_ImageNet-22K-to-1K_224.pth=RepLKNet-31B \\
      --models resnet50:/ckpt/resnet50.pth --data-root /data/robustness --out runs/paper
  python -m lkfast.eval --models replknet_31b:/ckpt/31b.pth,replknet_3b:runs/replknet_3b --suite ablation --data-root /data
  python -m lkfast.eval --models convnext_tiny:/ckpt/ct.pth --suite clean,imagenet-a --imagenet-a-dir /data/imagenet-a \\
      --val-dir /data/imagenet/val --limit 500 --dry-run
  torchrun --nproc_per_node 8 -m lkfast.eval --models replknet_31b:/ckpt/31b.pth --data-root /data --device cuda --amp

--data-root DIR holds any of: val/ imagenet-a/ imagenet-r/ imagenet-o/ imagenet-c/ imagenet-p/ imagenet-9/
(each in its official layout; see lkfast/eval/sources.py). A task whose data is absent is skipped and the
report says why; ImageNet-C/-P are generated from val/ with lkfast.corrupt when their folders are absent.
"""


def build_parser() -> argparse.ArgumentParser:
    import lkfast.eval.tasks  # noqa: F401  (task names for --help)
    import lkfast.eval.analysis_tasks  # noqa: F401

    p = argparse.ArgumentParser(prog="python -m lkfast.eval", description=__doc__.split("\n\n")[0],
                                epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", action="append", default=[], metavar="NAME[:CKPT][=LABEL],...",
                   help="models to evaluate: a RepLKNet or timm name, an optional local checkpoint after ':', an "
                        "optional label after '='; comma list or repeated (e.g. replknet_31b:31b.pth=RepLKNet-31B). A "
                        "checkpoint path may hold '=' (runs/lr=0.1/model.pth): text after the last '=' is the label "
                        "only if it has no '/' and the path with it does not exist; a ',' belongs to a path that "
                        "exists with it (runs/a,b/model.pth). A "
                        "python -m lkfast.train output folder (or its model.safetensors) as the checkpoint also "
                        "gives the kernel size, class count and input size it was trained with")
    p.add_argument("--input-size", type=int, default=None, metavar="N",
                   help="evaluate the --models at N x N pixels instead of their own input size (or a training "
                        "folder's; resize/crop scale with it; the baseline keeps its own)")
    p.add_argument("--suite", default="paper",
                   help="a suite: " + "; ".join(f"'{k}' ({', '.join(v)})" for k, v in SUITES.items())
                        + f"; or a comma list of task names from: {', '.join(TASKS)} (default: paper)")
    p.add_argument("--data-root", metavar="DIR", help="folder holding val/, imagenet-a/, ... (see below)")
    for name in SOURCE_NAMES:
        p.add_argument(f"--{name}-dir", metavar="DIR", help=f"the {name} folder (overrides --data-root/{name})")
    p.add_argument("--out", default="lkfast-report", metavar="DIR",
                   help="output folder: results.json, report.md, tables/, figures/, cache/ (default: lkfast-report)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    p.add_argument("--workers", type=int, default=None,
                   help="data-loading worker processes (default: min(8, CPU cores), and 0 for the embedded "
                        "default's small images; 0 decodes in the main process)")
    p.add_argument("--amp", action="store_true", help="autocast: fp16 on CUDA, bf16 on the CPU")
    p.add_argument("--channels-last", action="store_true", help="run the model in the channels_last memory format")
    chosen = p.add_mutually_exclusive_group()
    chosen.add_argument("--limit", type=int, default=None, metavar="N",
                        help="evaluate only the first N images (sorted order) of each dataset, e.g. for a smoke test "
                             "(ImageNet-val's first N are its first classes)")
    chosen.add_argument("--subset", type=int, default=None, metavar="N",
                        help="evaluate N images of each dataset spread evenly over its sorted order (every class keeps "
                             "its share): an estimate of the whole set's numbers in a fraction of the time, the same "
                             "images for every model, corruption and ImageNet-9 variant")
    p.add_argument("--analysis-images", type=int, default=None, metavar="N",
                   help="the per-image analyses (occlusion, FGSM, PGD, TAIG, lesion, frequency) read N val images "
                        "spread evenly over it (after --limit/--subset), the benchmarks all of it: the attacks take "
                        "tens to hundreds of passes per image")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random draws: generated ImageNet-C/-P corruptions, occlusion's random drop, "
                        "PGD's start, TAIG-R's paths, lesion, frequency noise, feature-variance's images (default: 0); "
                        "only those are computed again for another seed")
    p.add_argument("--shard-size", type=int, default=1000, metavar="N",
                   help="images per cached shard: an interrupted run loses at most one shard (default: 1000)")
    p.add_argument("--pretrained", action="store_true",
                   help="models given without a checkpoint load their published weights (timm's hub; torchvision's "
                        "for --baseline-model) from the local cache (HF_HOME, TORCH_HOME) or the network, instead of "
                        "random weights, and so does the occlusion's DINO without --dino-checkpoint; RepLKNet's "
                        "official weights are not on a hub: give their file as NAME:PATH")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow checkpoints that pickle arbitrary Python objects (only for files you trust)")
    p.add_argument("--baseline-model", default="alexnet", metavar="NAME[:CKPT]|none",
                   help="torchvision model ImageNet-P's mFR/mT5D are normalised by (default: alexnet; without a "
                        "local checkpoint the normalised values are omitted and the report says why), e.g. "
                        "alexnet:/ckpt/alexnet-owt-7be5be79.pth; 'none' to skip. ImageNet-C's mCE and relative mCE "
                        "use the release's published AlexNet errors on ImageNet, this model's on another class space")
    p.add_argument("--dino-checkpoint", default=None, metavar="FILE",
                   help="local timm vit_small_patch16_224.dino weights: the saliency of the occlusion task's salient "
                        "and non-salient drops where the data has no foreground masks (else only random drops run), "
                        "e.g. dino_vits16.pth")
    p.add_argument("--taig-surrogate", default=None, metavar="LABEL",
                   help="the model (a label of --models) that generates the TAIG transfer attacks for every other "
                        "model (default: the paper's pairing: a vit_base model attacks ConvNets, a replknet_31b "
                        "model attacks ViTs)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (model x task, images, estimated time from a short measured throughput) "
                        "and exit without evaluating")
    p.add_argument("--no-gpu-decode", action="store_true",
                   help="on CUDA, decode JPEGs with PIL in the workers instead of batched on the GPU (torchvision's "
                        "decode_jpeg(device='cuda'), the default there; its pixels differ by rounding, so results cached "
                        "under one are not reused under the other)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _existing_checkpoint(spec: ModelSpec, option: str) -> ModelSpec:
    """``spec`` if its name is a model (ValueError naming the closest otherwise) and it has no checkpoint
    or its checkpoint exists; otherwise FileNotFoundError naming the option and the model, before
    anything is built or hashed."""
    spec.check_name()
    if spec.checkpoint is None or os.path.exists(spec.checkpoint):
        return spec
    label = "" if spec.label is None else f" (label {spec.label!r})"
    hint = ("" if spec.label is None else f"; the text after the last '=' was read as the label, and "
            f"{spec.checkpoint + '=' + spec.label!r} does not exist either")
    raise FileNotFoundError(f"{option} {spec.name}{label}: checkpoint {spec.checkpoint!r} not found{hint}. "
                            "Give the path of a local weights file"
                            + (" or of a python -m lkfast.train output folder" if option == "--models" else ""))


def _models(values: List[str]) -> List[ModelSpec]:
    return [with_training_run(_existing_checkpoint(ModelSpec.parse(item), "--models"))
            for value in values for item in _split_models(value)]


def _split_models(value: str) -> List[str]:
    """The models of a comma list. A ',' belongs to a checkpoint path where the path with it exists
    (runs/a,b/model.pth), as '=' does for labels; the longest such path is taken. Only a ',' after the
    item's ':' can be in a path: before it, it ends a model name (a,b:runs/b.pth is two models)."""
    pieces, items, i = value.split(","), [], 0
    while i < len(pieces):
        end = next((end for end in range(len(pieces), i + 1, -1)
                    if ":" in pieces[i] and _names_existing_path(",".join(pieces[i:end]))), i + 1)
        items.append(",".join(pieces[i:end]))
        i = end
    return [item for item in items if item.strip()]


def _names_existing_path(text: str) -> bool:
    try:
        checkpoint = ModelSpec.parse(text).checkpoint
    except ValueError:
        return False
    return checkpoint is not None and os.path.exists(checkpoint)


def _with_input_size(specs: List[ModelSpec], size: Optional[int]) -> List[ModelSpec]:
    import dataclasses

    if size is None:
        return specs
    if size < 8:
        raise ValueError(f"--input-size must be at least 8 pixels, got {size}")
    return [dataclasses.replace(s, input_size=size) for s in specs]


def _no_input_message() -> str:
    return ("lkfast.eval: nothing to evaluate: give --models and data, for example\n"
            "  python -m lkfast.eval --models resnet50:/path/resnet50.pth --val-dir /path/imagenet/val "
            "--suite clean --subset 1000\n"
            "  python -m lkfast.eval --models replknet_31b:/path/31b.pth --data-root /path/robustness-data\n"
            "See python -m lkfast.eval --help for the expected folder names.")


def _corruptions_or_perturbations(root: Path, found: List[str]) -> Optional[str]:
    """"imagenet-c" where ``found`` (the folders in ``root``) holds ImageNet-C's corruptions,
    "imagenet-p" where it holds ImageNet-P's perturbations (``<perturbation>[_<difficulty>]``), else
    None. Some names are both (gaussian_noise): ImageNet-C's hold the severities 1 to 5."""
    from lkfast.metrics import IMAGENET_C_ALL, IMAGENET_P_ALL

    corruptions = [f for f in found if f in IMAGENET_C_ALL]
    perturbations = [f for f in found if f in IMAGENET_P_ALL or
                     (f.rsplit("_", 1)[-1].isdigit() and f.rsplit("_", 1)[0] in IMAGENET_P_ALL)]
    if corruptions and (not perturbations or any((root / f / str(s)).is_dir() for f in corruptions for s in range(1, 6))):
        return "imagenet-c"
    return "imagenet-p" if perturbations else None


def _no_data_message(data_root: Optional[str]) -> str:
    """Why no data source was found, with a hint when --data-root looks like one dataset's folder."""
    if data_root is None:
        return "no data: pass --data-root DIR (holding val/, imagenet-a/, ...) or a --<name>-dir option"
    found = sorted(p.name for p in Path(data_root).iterdir() if p.is_dir() and not p.name.startswith("."))
    hint = ""
    if looks_like_wnids(found[:20]):
        hint = (f"; it holds class folders ({', '.join(found[:3])}, ...): if it is one dataset, name it with "
                f"--val-dir {data_root} (or --imagenet-a-dir, --imagenet-r-dir, --imagenet-o-dir)")
    elif set(found) & set(IMAGENET9_VARIANTS):
        hint = f"; it looks like ImageNet-9: pass --imagenet-9-dir {data_root}"
    else:
        benchmark = _corruptions_or_perturbations(Path(data_root), found)
        if benchmark:
            hint = (f"; it looks like an {source_label(benchmark)} folder (its folders are "
                    f"{'corruptions' if benchmark == 'imagenet-c' else 'perturbations'}): pass it as --{benchmark}-dir "
                    f"{data_root} (or its parent as --data-root)")
    return (f"--data-root {data_root} holds none of the benchmark folders {', '.join(SOURCE_NAMES)} (found: "
            f"{', '.join(found[:8]) or 'nothing'}){hint}")


def _check_writable(folder: str) -> None:
    """EvalError naming ``folder`` (``--out``) when it cannot be created or a file cannot be written
    in it (read-only, no permission, a full disk), before any model is trained or evaluated."""
    from lkfast.eval.runner import EvalError
    from lkfast.tables import check_writable

    try:
        check_writable(folder)
    except OSError as error:
        raise EvalError(f"--out {folder} cannot be written ({error.strerror or error}): give a folder this user "
                        "can write, with free space, for results.json, report.md and the cache") from None


def _partial_note(out: str) -> str:
    """For the interrupted run's last line: where its results.json (written after each task) is newer
    than report.md, that the report is still an earlier run's and how to get one of what finished."""
    from lkfast.eval.runner import RESULTS_FILE

    results, report = os.path.join(out, RESULTS_FILE), os.path.join(out, "report.md")
    try:
        written = os.path.getmtime(results)
    except OSError:  # no results.json: this run finished no task
        return ""
    if os.path.isfile(report) and os.path.getmtime(report) >= written:
        return ""
    return (f"; {results} holds the tasks that finished" + (f", {report} is still an earlier run's" if
                                                              os.path.isfile(report) else "") +
            f" (python -m lkfast.eval.report {out} writes a report of what finished)")


def _needs_dino(options, tasks) -> bool:
    """Whether the occlusion task runs on data without foreground masks and no DINO checkpoint is given
    (its salient and non-salient drops then need DINO's saliency)."""
    return "occlusion" in tasks and "masks" not in options.data and not options.analysis_option("dino_checkpoint")


def _default_tag_note(spec: ModelSpec, num_classes: int) -> str:
    """The line saying which published weights --pretrained takes for a timm name given without a tag
    (timm's default for the name, e.g. ImageNet-12k fine-tuned for convnext_tiny) and the others it could
    evaluate (those with a ``num_classes`` head)."""
    from lkfast.eval.models import published_with_head

    return (f"lkfast.eval: note: model {spec.display!r}: --pretrained loads {spec.published_weights()}, timm's "
            f"default for {spec.name!r}; to evaluate other published weights name their tag "
            f"({', '.join(published_with_head(spec.name, num_classes))})")


def _published_dino() -> str:
    """Under --pretrained, the DINO whose published weights give the occlusion's saliency (timm's name),
    once they are found in the local cache or fetched; an error line before anything runs where they
    cannot be, as for the models' own."""
    from lkfast.analysis.occlusion import DINO_MODEL, load_dino
    from lkfast.eval.runner import EvalError

    try:
        load_dino(None, pretrained=True)
    except RuntimeError as error:
        raise EvalError(hub_unavailable(
            f"--pretrained: the occlusion's salient drops need DINO's published weights (timm {DINO_MODEL}), which",
            error, "pass --dino-checkpoint FILE, or leave occlusion out of --suite")) from None
    return DINO_MODEL


def _check_analysis_options(options, tasks, models: List[ModelSpec]) -> None:
    """A --dino-checkpoint that is not a file, or a --taig-surrogate that is no label of the run (either
    from ``options``, an EvalOptions, or its environment variable), or an LKFAST_TAIG_MEMORY_MB that is
    no number >= 0 with TAIG in the run, as one error line before anything runs: they were found at
    the occlusion's or TAIG's turn, after the benchmarks (the missing file stopped the run there, the
    label left TAIG not run)."""
    from lkfast.eval.runner import EvalError

    dino = options.analysis_option("dino_checkpoint")
    if dino and "occlusion" in tasks and not os.path.isfile(dino):
        raise FileNotFoundError(f"--dino-checkpoint {dino}: no such file (from the option or LKFAST_DINO_CHECKPOINT); "
                                "give the local timm vit_small_patch16_224.dino weights, or leave it out to run "
                                "the random drops only")
    if "taig" in tasks:
        from lkfast.eval.analysis_tasks import taig_memory_bytes

        taig_memory_bytes()  # LKFAST_TAIG_MEMORY_MB: a ValueError naming it, now rather than at TAIG's turn
    surrogate = options.analysis_option("taig_surrogate")
    labels = [spec.display for spec in models]
    if surrogate and "taig" in tasks and surrogate not in labels:
        raise EvalError(f"--taig-surrogate {surrogate!r} (from the option or LKFAST_TAIG_SURROGATE) is not a model "
                        f"label of this run: give one of {', '.join(labels)}")


PER_IMAGE_ANALYSES = ("occlusion", "fgsm", "pgd", "taig", "lesion", "frequency")  # what --analysis-images reads


def _unused_options(args, tasks) -> List[str]:
    """Options given on the command line for a task that is not in the run (they were ignored without
    a word: a --dino-checkpoint with --suite clean looked like it had been used)."""
    notes = []
    for option, value, used_by in (("--dino-checkpoint", args.dino_checkpoint, ("occlusion",)),
                                   ("--taig-surrogate", args.taig_surrogate, ("taig",)),
                                   ("--analysis-images", args.analysis_images, PER_IMAGE_ANALYSES)):
        if value is not None and not any(task in tasks for task in used_by):
            notes.append(f"{option} is for {' / '.join(used_by)}, which this run does not have (--suite "
                         f"{','.join(tasks)}): it is ignored")
    return notes


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m lkfast.eval``: the exit status. Warnings are printed as the command's other lines,
    one line each (``lkfast.eval: warning: ...``, without Python's file and source line), while it runs."""
    import warnings

    from lkfast.interrupt import sigterm_as_interrupt

    saved = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        with sigterm_as_interrupt() as terminated:  # SIGTERM stops the run as Ctrl-C does
            return _main(argv, terminated)
    finally:
        warnings.formatwarning = saved


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"lkfast.eval: warning: {message}\n"


def _main(argv: Optional[List[str]], terminated: List[int]) -> int:
    from lkfast.eval.runner import EvalError, EvalOptions, _out_lock, plan, run_evaluation
    from lkfast.tables import markdown_table

    held = contextlib.ExitStack()  # the --out lock, where taken before the evaluation takes it
    args = None
    try:
        parser = build_parser()  # in the try: a Ctrl-C or SIGTERM while it imports the tasks is the one line below
        args = parser.parse_args(argv)
        from lkfast.memory import keep_freed_memory

        keep_freed_memory()  # fewer page faults per step (see lkfast.memory; LKFAST_MALLOC=default: glibc's own)

        from lkfast.train import device_option

        device = str(device_option(args.device))  # "cpu", "cuda", "cuda:1": the runner's device names
        tasks = resolve_suite(args.suite)
        for suite, added in suites_in_list(args.suite):
            if dist.is_main():
                print(f"lkfast.eval: note: --suite: {suite!r} is a suite and adds its tasks: {', '.join(added)}",
                      file=sys.stderr)
        models = _with_input_size(_models(args.models), args.input_size)
        dirs = {name: getattr(args, name.replace("-", "_") + "_dir") for name in SOURCE_NAMES}
        data = resolve_sources(args.data_root, dirs)
        class_space, baseline, default_workers = None, None, min(8, os.cpu_count() or 1)
        no_baseline = EvalOptions.no_baseline
        if args.baseline_model and args.baseline_model.lower() != "none":
            baseline = _existing_checkpoint(ModelSpec.parse(args.baseline_model, source="torchvision",
                                                            option="--baseline-model"), "--baseline-model")
        if args.pretrained:
            models = [dataclasses.replace(s, pretrained=True) for s in models]
            baseline = baseline and dataclasses.replace(baseline, pretrained=True)
            from lkfast.data import imagenet_classes

            classes = len(imagenet_classes())  # the benchmarks score ImageNet-1k's (the embedded default refuses below)
            for spec in models:
                spec.check_published_weights(num_classes=classes)
            for spec in models:  # once every model passed: a refused list is its error line alone
                if spec.hub_weights and "." not in spec.name and dist.is_main():
                    print(_default_tag_note(spec, classes), file=sys.stderr)
        analysis = {k: v for k, v in (("dino_checkpoint", args.dino_checkpoint),
                                      ("taig_surrogate", args.taig_surrogate)) if v}
        data_given = args.data_root is not None or any(v is not None for v in dirs.values())
        if not models and data_given:
            raise EvalError("no --models given: name the models to evaluate on this data, e.g. --models "
                            "resnet50:/path/resnet50.pth (the embedded default runs only with no --models and no data)")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise EvalError(f"--out {args.out} is a file: give a folder for results.json, report.md and the cache")
        default_run = not models and not data
        if default_run and args.pretrained:
            raise EvalError("--pretrained loads the published weights of --models; the embedded default (no --models, "
                            "no data) trains its own models: name the --models and their --data-root")
        if default_run:
            if args.dry_run:
                raise EvalError("--dry-run plans an evaluation of --models on your data; the embedded default (no "
                                "--models, no data) builds its benchmark and trains its models first: run "
                                "python -m lkfast.eval without --dry-run")
            if importlib.util.find_spec("lkfast.eval.default") is None:
                print(_no_input_message(), file=sys.stderr)
                return 2
            from lkfast.eval.default import planned_run, prepare_default

            planned = planned_run(args)  # the default's labels and tasks, known before it trains its models
            _check_analysis_options(EvalOptions(analysis=analysis), planned["suite"], planned["models"])
            _check_writable(args.out)  # before training the models
            if dist.is_main():  # a second default run into this --out stops now, not after waiting on the training
                held.enter_context(_out_lock(Path(args.out)))
            prepared = prepare_default(args)
            models, data = list(prepared["models"]), dict(prepared["data"])
            class_space = prepared.get("class_space")
            if prepared.get("suite"):
                tasks = tuple(prepared["suite"])
            baseline = prepared.get("baseline")
            no_baseline = prepared.get("no_baseline", no_baseline)
            default_workers = prepared.get("workers", default_workers)
        if not models:
            raise EvalError("no --models given (e.g. --models resnet50:/path/resnet50.pth)")
        if not data:
            raise EvalError(_no_data_message(args.data_root))
        if not default_run:  # the default's were checked on its planned run: the labels and suite it built
            _check_analysis_options(EvalOptions(analysis=analysis), tasks, models)
            if args.pretrained and _needs_dino(EvalOptions(analysis=analysis, data=data), tasks):
                analysis["dino_pretrained"] = _published_dino()
        if not args.dry_run:
            _check_writable(args.out)
        for note in _unused_options(args, tasks):
            if dist.is_main():
                print(f"lkfast.eval: warning: {note}", file=sys.stderr)
        for spec in models:
            if spec.checkpoint is None and not spec.pretrained and dist.is_main():
                print(f"lkfast.eval: warning: model {spec.display!r} has no checkpoint: it is evaluated with random "
                      f"weights (pass {spec.name}:CHECKPOINT, or --pretrained for its published weights)",
                      file=sys.stderr)
        options = EvalOptions(out=args.out, data=data, device=device, batch_size=args.batch_size,
                              workers=default_workers if args.workers is None else args.workers,
                              amp=args.amp, channels_last=args.channels_last,
                              limit=args.limit if args.subset is None else args.subset,
                              spread=args.subset is not None, analysis_images=args.analysis_images, seed=args.seed,
                              shard_size=args.shard_size, trust_checkpoint=args.trust_checkpoint, baseline=baseline,
                              no_baseline=no_baseline,
                              class_space=class_space, progress=not args.no_progress,
                              gpu_decode=not args.no_gpu_decode,
                              analysis=analysis)
        dist.init(device)
        if args.dry_run:
            rows = plan(models, tasks, options)
            if dist.is_main():
                print(markdown_table(["model", "task", "images", "passes per image", "estimated minutes", "note"], rows,
                                     caption=f"Plan ({dist.world_size()} process(es), device {device}); "
                                             f"results go to {args.out}"))
            failing = [f"{row[0]}: {row[1]}" for row in rows if str(row[5]).startswith("fails: ")]
            if failing and dist.is_main():
                print(f"lkfast.eval: error: {len(failing)} task(s) would fail on their data ({', '.join(failing)}): "
                      "see 'fails:' in the plan above", file=sys.stderr)
            return 2 if failing else 0
        results = run_evaluation(models, tasks, options)
        ran = [t for m in models for t, r in results.get(m.display, {}).items()
               if not t.startswith("_") and isinstance(r, dict) and "unavailable" not in r]
        if not ran:  # every rank exits 2; rank 0 printed the reasons, so it alone says so
            if dist.is_main():
                print(f"lkfast.eval: error: no task could run (the reasons are above and in "
                      f"{os.path.join(args.out, 'report.md')})", file=sys.stderr)
            return 2
        if dist.is_main():
            summary = os.path.join(args.out, "tables", "summary.md")
            if os.path.exists(summary):  # the Table 6 summary, as in report.md
                with open(summary) as f:
                    print(f.read())
            print(f"lkfast.eval: wrote {os.path.join(args.out, 'results.json')} and "
                  f"{os.path.join(args.out, 'report.md')} ({len(models)} model(s), {len(tasks)} task(s))")
        return 0
    except (EvalError, ValueError, FileNotFoundError, FrostPhotosMissing) as error:  # CheckpointError is a ValueError
        print(f"lkfast.eval: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a folder it may not write (FileNotFoundError is handled above)
        if not is_storage_error(error):
            raise
        # (an error from a write, a full disk's, names no file: then the folder is --out's)
        what = "free space or fix that folder's permissions" if error.filename or args is None else \
            f"free space under {args.out} or fix its permissions"
        print(f"lkfast.eval: error: {error} ({what}, then rerun the same command: finished work is cached)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (lkfast.interrupt)
        from lkfast.interrupt import how_stopped, ignore_further_interrupts

        ignore_further_interrupts()  # a second Ctrl-C while this one is handled: no traceback after the line
        stopped, status = how_stopped(terminated)
        if args is None:  # while it was starting (imports, the command line)
            print(f"\nlkfast.eval: {stopped} while starting, before anything was written: rerun the command",
                  file=sys.stderr)
            return status
        cache = os.path.join(args.out, "cache")
        if os.path.isdir(cache):
            print(f"\nlkfast.eval: {stopped}; finished shards are kept under {cache}: rerun the same command to go "
                  f"on from there{_partial_note(args.out)}", file=sys.stderr)
        else:  # stopped before the first model was evaluated (the embedded default's preparation, say)
            print(f"\nlkfast.eval: {stopped} before any result was written to {args.out}: rerun the same command to "
                  "start again", file=sys.stderr)
        return status
    finally:
        held.close()
        dist.shutdown()


if __name__ == "__main__":
    sys.exit(main())
