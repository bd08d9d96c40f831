"""The six robustness benchmarks of the paper's Section 3, plus clean accuracy, as registered tasks.

Each task returns a plain dict; the keys users script against (results.json, per model and task):

    clean        top1 (%), images, source
    imagenet-a   top1 (%) on the 200 ImageNet-A logits, images, source
    imagenet-r   top1 (%) on the 200 ImageNet-R logits, images, source
    imagenet-o   aupr, auroc, fpr95 (%, ImageNet-O images are the positives, score = -max softmax
                 over the 200 ImageNet-O logits; ImageNet-val of those classes is the negatives),
                 in_images, out_images, classes, in_classes (those of them val holds; fewer: with
                 in_classes_note), source
    imagenet-c   mce, relative_mce (%, None with relative_mce_note when a clean error is missing),
                 mce_over / mce_complete (the corruptions mCE averages; all 15 there: only then the
                 benchmark's mCE), relative_mce_over / relative_ce_skipped (a measured baseline not hurt
                 by a corruption gives it no relative CE: named with why, left out of relative_mce only),
                 sev5_top1 (mean top-1 % over the corruptions present at severity 5), mean_top1,
                 ce {corruption: %}, top1 {corruption: {severity: %}}, source ("disk" or "generated"),
                 normalised_by (and baseline_model where a baseline model normalises: another class space)
    imagenet-p   fp {perturbation: %}, t5d {perturbation: value} (unnormalised, always: flip
                 probability x 100 and mean top-5 distance at difficulty 1, i.e. the first noise
                 level / frame stride 1), mean_fp, mean_t5d_unnormalised, mfr and mt5d (% of the
                 baseline model's, None with normalisation_note when no baseline could be evaluated)
                 with fr and t5d_normalised {perturbation: % of the baseline's} (the benchmark's flip
                 rate FR is the flip probability normalised so; fp is not), sequences {perturbation:
                 sequences scored}, mfr_over (the perturbations the means are over: the 10 of the
                 benchmark, those scored), mfr_complete (all 10 there: only then the benchmark's
                 mFR), outside_mfr (where present: the release's validation perturbations scored,
                 in fp/t5d/fr but not in the means), source,
                 normalised_by and baseline_model (the baseline's architecture name) with mfr,
                 not_scored (where present: harder-noise folders, e.g. gaussian_noise_2, whose
                 difficulty-1 folder is missing)
    imagenet-9   top1 {variant: %}, original, mixed_same, mixed_rand, bg_gap (%), source

Every task also records skipped_unreadable (items that could not be decoded) and seconds; a part
whose every item was unreadable is left out and listed in unreadable_parts (a task with nothing
readable at all is recorded unavailable).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from lkfast.eval.registry import TaskUnavailable, register_task
from lkfast.eval.runner import EvalError, TaskContext, generated_data_key

from lkfast.metrics import IMAGENET9_VARIANTS


# datasets ------------------------------------------------------------------------------------------
def _memo(ctx: TaskContext, key, build):
    memo = ctx.__dict__.setdefault("_datasets", {})
    if key not in memo:
        memo[key] = build()
    return memo[key]


def selection(ctx: TaskContext) -> Dict[str, Any]:
    """The readers' ``limit``/``spread`` arguments for this run: the first ``--limit`` N images of each
    dataset, or ``--subset`` N spread evenly over it."""
    return {"limit": ctx.options.limit, "spread": ctx.options.spread}


def image_folder(ctx: TaskContext, root, class_index: Dict[str, int], resize: bool = True,
                 classes: Optional[Sequence[str]] = None):
    """``root/<class folder>/*`` as [0, 1] images preprocessed for ``ctx``'s model (no resize for
    ImageNet-C's 224-px images), the images ``--limit``/``--subset`` keeps (``selection``), and of those
    ``--analysis-images`` N spread evenly for a task that reads "images"; ``classes`` keeps only those
    class folders."""
    from lkfast import data

    def build():
        transform = data.transform_for(ctx.config, resize=resize)
        dataset = data.ImageFolderBenchmark(str(root), transform, class_index=class_index, classes=classes,
                                            name=_source_label(ctx, root), **selection(ctx))
        if "images" in ctx.task.reads and ctx.options.analysis_images is not None:  # --analysis-images
            dataset.samples = data.select_items(dataset.samples, ctx.options.analysis_images, spread=True)
        dataset.eval_resize = resize  # lets ctx.records decode its JPEGs on the GPU (same preprocessing)
        return dataset
    return _memo(ctx, ("folder", str(root), resize, tuple(classes or ())), build)


def _source_label(ctx: TaskContext, root) -> str:
    """The benchmark whose folder ``root`` is or is in ("ImageNet-A"), for its errors; "image folder" if none."""
    from lkfast.eval.sources import source_label

    root = Path(root).resolve()
    for key, path in ctx.options.data.items():
        path = Path(path).resolve()
        if root == path or path in root.parents:
            return source_label(key)
    return "image folder"


def class_folders(root) -> List[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _count(records) -> int:
    return int(records["count"].sum()) if len(records.get("count", ())) else 0


def _top1(records) -> Optional[float]:
    """Top-1 (%) from per-batch correct counts (so that shards merge exactly); None when no item
    could be read (callers leave such a part out and say so)."""
    count = _count(records)
    return 100.0 * int(records["correct"].sum()) / count if count else None


def _nothing_readable(ctx: TaskContext, name: str, part: Optional[str] = None, what: str = "",
                      items: str = "images") -> TaskUnavailable:
    """The TaskUnavailable of a task none of whose ``name`` ``items`` could be read (``part``: count the
    unreadable ones of that ``records`` part alone; ``what``: said after the folder)."""
    unreadable = ctx.skipped.get(part, 0) if part is not None else sum(ctx.skipped.values())
    return TaskUnavailable(f"none of the {name} {items} in {ctx.source(name)}{what} could be read "
                           f"({unreadable} unreadable)")


def _scored(ctx: TaskContext, name: str, records) -> float:
    """Top-1 (%) of a one-part task; TaskUnavailable when none of its images could be read."""
    top1 = _top1(records)
    if top1 is None:
        raise _nothing_readable(ctx, name)
    return top1


def _counts(accuracy_percent: float, n: int) -> dict:
    # metrics.accuracy returns 100 * k / n; k recovered exactly
    return {"correct": torch.tensor([round(accuracy_percent * n / 100.0)]), "count": torch.tensor([n])}


def predict(ctx: TaskContext, subset: Optional[Sequence[int]] = None):
    """A ``records`` compute function scoring each batch with ``lkfast.metrics.accuracy`` (arg-max
    over ``subset``'s logits when given, targets indexing the full class space)."""
    from lkfast import metrics

    def compute(images, targets, indices):
        return _counts(metrics.accuracy(ctx.forward(images), targets, class_subset=subset), len(targets))
    return compute


# clean, A, R ---------------------------------------------------------------------------------------
def _val(ctx):
    return image_folder(ctx, ctx.source("val"), ctx.class_space.folder_index())


def clean(ctx: TaskContext) -> dict:
    dataset = _val(ctx)
    records = ctx.records("val", dataset, predict(ctx))
    return {"top1": _scored(ctx, "val", records), "images": _count(records), "source": str(ctx.source("val"))}


def _subset_task(name: str):
    def dataset(ctx):
        root = ctx.source(name)
        subset = ctx.class_space.subset(name, class_folders(root))
        index = ctx.class_space.folder_index()
        wanted = set(subset)
        outside = [f for f in class_folders(root) if f in index and index[f] not in wanted]
        if outside:
            from lkfast.eval.sources import source_label

            label = source_label(name)
            raise EvalError(f"{label}: class folder(s) {', '.join(outside[:5])} in {root} are not among the "
                            f"{len(subset)} {label} classes of {ctx.class_space.name}: give the {label} release's "
                            f"folder as --{name}-dir (or as {name}/ under --data-root), or move these folders out")
        return image_folder(ctx, root, index), subset

    def run(ctx: TaskContext) -> dict:
        data, subset = dataset(ctx)
        records = ctx.records(name, data, predict(ctx, subset))
        return {"top1": _scored(ctx, name, records), "images": _count(records), "classes": len(subset),
                "source": str(ctx.source(name))}
    return run, lambda ctx: len(dataset(ctx)[0])


# ImageNet-O ----------------------------------------------------------------------------------------
def _o_datasets(ctx):
    from lkfast import data

    root = ctx.source("imagenet-o")
    subset = ctx.class_space.subset("imagenet-o", class_folders(root))
    index = ctx.class_space.folder_index()
    out_set = image_folder(ctx, root, index)
    in_set = image_folder(ctx, ctx.source("val"), index, classes=[ctx.class_space.class_names[i] for i in subset])
    return in_set, out_set, subset


def imagenet_o(ctx: TaskContext) -> dict:
    from lkfast import metrics

    in_set, out_set, subset = _o_datasets(ctx)
    index = torch.tensor(list(subset), device=ctx.device)

    def compute(images, targets, indices):
        probabilities = ctx.forward(images)[:, index].softmax(1)
        return {"score": -probabilities.max(1).values}
    classes = sorted(subset)  # the softmax runs over these logits, and val is filtered to them
    # a part none of whose images could be read has no "score" records at all
    in_scores = ctx.records("val-200", in_set, compute, key=classes).get("score", torch.empty(0))
    out_scores = ctx.records("imagenet-o", out_set, compute, key=classes).get("score", torch.empty(0))
    if not len(out_scores):
        raise _nothing_readable(ctx, "imagenet-o", "imagenet-o")
    if not len(in_scores):
        raise _nothing_readable(ctx, "val", "val-200", what=f" of ImageNet-O's {len(subset)} classes (its negatives)")
    scores = metrics.ood_scores(in_scores, out_scores)
    result = {**{k: float(v) for k, v in scores.items()}, "in_images": len(in_scores), "out_images": len(out_scores),
              "classes": len(subset), "in_classes": len(in_set.classes),
              "source": f"{ctx.source('imagenet-o')} vs {ctx.source('val')}"}
    if len(in_set.classes) < len(subset):  # a val subset (ImageNet-100, a partial copy): other negatives
        result["in_classes_note"] = (f"{ctx.source('val')} holds {len(in_set.classes)} of the {len(subset)} "
                                     f"ImageNet-O classes whose val images are the negatives: not the benchmark's "
                                     f"AUPR / AUROC")
    return result


# ImageNet-C ----------------------------------------------------------------------------------------
def _per_image(ctx: TaskContext, part: str, images: torch.Tensor, indices, corrupt_one) -> torch.Tensor:
    """``corrupt_one(image batch of one, generator)`` for each image with the generator of its dataset
    index, concatenated: generated ImageNet-C/-P do not depend on the batch or shard size."""
    # CPU generators on every device: the same corrupted images as on the CPU and as the writer renders
    # (lkfast.corrupt draws on the generator's device and moves the numbers)
    return torch.cat([corrupt_one(image[None], g) for image, g in zip(images, ctx.generators(part, indices, "cpu"))])


def _source_key(ctx: TaskContext, source: str):
    """What a part's cached records depend on beside its images: for generated parts the corruption code
    itself (lkfast.corrupt.VERSION: a rerun into the same --out after an upgrade that changed the
    corruptions computes them again; before, it reused the old ones), the seeding (per batch before
    2026-12, per image since) and --seed (a task's common keys hold the seed of tasks that draw random
    numbers only, and these draw only when generated; seed 0 keeps the keys made before); "disk" keys
    are unchanged (the files' own keys say when they change) and do not depend on --seed."""
    if source == "disk":
        return source
    return [source, "seeded per image", generated_data_key()] + ([ctx.seed] if ctx.seed else [])


def _c_parts(ctx) -> Tuple[str, List[Tuple[str, int, object]]]:
    """("disk" or "generated", [(corruption, severity, dataset)])."""
    from lkfast import corrupt, data

    if ctx.has_source("imagenet-c"):
        root = ctx.source("imagenet-c")
        contents = data.imagenet_c_contents(str(root))
        parts = [(c, int(s), image_folder(ctx, root / c / str(s), ctx.class_space.folder_index(), resize=False))
                 for c in contents for s in sorted(contents[c])]
        if not parts:
            raise EvalError(f"imagenet-c: {root} holds no <corruption>/<severity>/ folders")
        return "disk", parts
    if ctx.has_source("val"):
        try:
            corrupt.frost_directory()  # frost is one of the 19: say so before any is generated
        except corrupt.FrostPhotosMissing as error:
            raise TaskUnavailable(f"ImageNet-C cannot be generated from val: {error}") from None
        val = _val(ctx)
        return "generated", [(c, s, val) for c in corrupt.names("all") for s in corrupt.SEVERITIES]
    raise TaskUnavailable("no ImageNet-C folder and no ImageNet-val to generate it from: pass --imagenet-c-dir "
                          "or --val-dir (or --data-root holding imagenet-c/ or val/)")


def imagenet_c(ctx: TaskContext) -> dict:
    from lkfast import corrupt, metrics

    source, parts = _c_parts(ctx)
    top1: Dict[str, Dict[int, float]] = {}
    unreadable: List[str] = []
    for name, severity, dataset in parts:
        compute = predict(ctx)
        if source == "generated":
            part = f"{name}/{severity}"

            def compute(images, targets, indices, name=name, severity=severity, part=part, base=compute):
                images = _per_image(ctx, part, images.float(), indices,
                                    lambda x, g: corrupt.corrupt(x, name, severity, generator=g))
                return base(images, targets, indices)
        records = ctx.records(f"{name}/{severity}", dataset, compute, key=_source_key(ctx, source))
        score = _top1(records)
        if score is None:  # every image of the part unreadable: left out (CE then needs all 5)
            unreadable.append(f"{name}/{severity}")
        else:
            top1.setdefault(name, {})[severity] = score
    if not top1:
        raise _nothing_readable(ctx, "imagenet-c" if source == "disk" else "val")
    errors = {c: {s: 1.0 - v / 100.0 for s, v in by.items()} for c, by in top1.items()}
    clean_error, note = None, "no ImageNet-val given, so no clean error"
    baseline_lacks_clean = False  # the model has a clean error, the baseline none: no relative mCE, and why
    if ctx.has_source("val"):
        try:
            clean_error = 1.0 - ctx.result_of("clean")["top1"] / 100.0
        except TaskUnavailable as error:
            note = f"no clean error: {error}"
    result = {"source": "disk: " + str(ctx.source("imagenet-c")) if source == "disk" else
              f"generated from {ctx.source('val')} with lkfast.corrupt (seed {ctx.seed})",
              "top1": top1, "clean_error": clean_error}
    if unreadable:
        result["unreadable_parts"] = unreadable  # every image unreadable: not scored
    if ctx.class_space.published_baselines:
        # ImageNet: CE normalised by the release's AlexNet errors, relative mCE by AlexNet's clean error
        scores = metrics.corruption_errors(errors, clean_error=clean_error)
        result["normalised_by"] = "AlexNet (the ImageNet-C release's published errors)"
    else:
        # another class space: the baseline model's measured errors on the same images take AlexNet's place
        base, why = (None, "this is the baseline's own run") if ctx.is_baseline else ctx.baseline_result("imagenet-c")
        if base is not None:
            base_clean = base.get("clean_error")
            use_clean = clean_error if base_clean is not None else None
            if clean_error is not None and use_clean is None:
                note, baseline_lacks_clean = "the baseline has no clean error (no val data for it)", True
            reference = {c: sum(1.0 - v / 100.0 for v in by.values()) / len(by)
                         for c, by in base["top1"].items() if len(by) == 5}
            scores = metrics.corruption_errors(errors, clean_error=use_clean, baseline=reference,
                                               baseline_clean_error=base_clean if use_clean is not None else None)
            result["normalised_by"] = f"the baseline model {_baseline_words(ctx)} on the same images"
            result["baseline_model"] = ctx.options.baseline.name
        else:
            scores = metrics.corruption_errors(errors)  # sev5_top1 and mean_top1; CE needs a baseline
            for key in ("ce", "mce", "relative_mce"):
                scores[key] = None
            result["mce_note"] = note = why
    result.update(json.loads(json.dumps(scores, default=float)))
    if result.get("relative_mce") is None:
        result["relative_mce"] = None
        result["relative_mce_note"] = (
            note if clean_error is None or "mce_note" in result or baseline_lacks_clean else
            "the baseline is not hurt by any corruption of the mCE (see relative_ce_skipped)"
            if result.get("mce_over") and result.get("relative_ce_skipped") else "no corruption with all 5 severities")
    return result


def _baseline_words(ctx) -> str:
    """The baseline model as results and the report name it: label, architecture and weights."""
    spec = ctx.options.baseline
    weights = spec.checkpoint or ("published weights (--pretrained)" if spec.pretrained else "random weights")
    named = spec.display if spec.display == spec.name else f"{spec.display} ({spec.name})"
    return f"{named}, {weights}"


def _c_count(ctx):
    source, parts = _c_parts(ctx)
    return sum(len(d) for _, _, d in parts)


# ImageNet-P ----------------------------------------------------------------------------------------
def _p_parts(ctx):
    """(source "disk" or "generated", [(perturbation, dataset)], the harder-noise folders present
    without their difficulty-1 folder: ``_harder_only``). From disk every perturbation there, the
    release's validation perturbations included; generated from val the 10 of mFR."""
    from lkfast import corrupt, data

    names = corrupt.perturbation_names("all")
    if ctx.has_source("imagenet-p"):
        root = ctx.source("imagenet-p")
        contents = data.imagenet_p_contents(str(root))  # refuses a folder that is not a perturbation
        present = [n for n in names if (root / n).is_dir()]
        if not present:
            raise EvalError(f"imagenet-p: {root} holds none of the perturbation folders {', '.join(names)}"
                            + (f" (only the harder noise levels {', '.join(_harder_only(contents))}: the eval "
                               f"scores difficulty 1, the folders without _2 or _3)" if contents else ""))
        # class folders as the class space names them (ImageNet's wnids by default)
        index = {} if ctx.class_space.published_baselines else {"class_index": ctx.class_space.folder_index()}
        parts = [(n, _memo(ctx, ("p", n), lambda n=n: data.ImageNetP(
            str(root), n, data.transform_for(ctx.config, resize=False), **index, **selection(ctx)))) for n in present]
        return "disk", parts, _harder_only(contents)
    if ctx.has_source("val"):
        val = _val(ctx)
        return "generated", [(n, val) for n in corrupt.perturbation_names("common")], []
    raise TaskUnavailable("no ImageNet-P folder and no ImageNet-val to generate it from: pass --imagenet-p-dir "
                          "or --val-dir (or --data-root holding imagenet-p/ or val/)")


def _harder_only(contents) -> list:
    """The ``<noise>_2`` / ``<noise>_3`` folders of the noise perturbations that lack their difficulty-1
    folder, from ``lkfast.data.imagenet_p_contents``: the release ships each difficulty as its own
    archive, and the eval scores difficulty 1 alone."""
    return [f"{name}_{d}" for name, levels in contents.items() if 1 not in levels for d in levels]


def _is_noise(name: str) -> bool:
    """Noise sequences are scored against their first frame, the others frame to frame."""
    from lkfast import metrics

    return name in metrics.NOISE_PERTURBATIONS


def imagenet_p(ctx: TaskContext) -> dict:
    from lkfast import corrupt, metrics

    source, parts, harder = _p_parts(ctx)
    fp, t5d, scored, unreadable = {}, {}, {}, []
    for name, dataset in parts:
        noise = _is_noise(name)
        frames = corrupt.PERTURBATIONS[name]

        def compute(images, targets, indices, name=name, noise=noise):
            if images.dim() == 4:  # generated: images -> (N, T, 3, H, W) sequences
                images = _per_image(ctx, name, images.float(), indices,
                                    lambda x, g: corrupt.perturbation_sequence(x, name, 1, generator=g))
            n, t = images.shape[:2]
            logits = ctx.forward(images.flatten(0, 1)).view(n, t, -1)
            return {"pred": logits.argmax(2), "t5d": metrics.top5_distance(logits, noise, per_sequence=True)}
        records = ctx.records(name, dataset, compute, batch_size=max(1, ctx.options.batch_size // frames),
                              frames=frames, key=_source_key(ctx, source))
        scored[name] = len(records.get("pred", ()))
        if scored[name]:
            fp[name] = metrics.flip_probability(records["pred"], noise)
            t5d[name] = float(records["t5d"].double().mean())
        elif ctx.skipped.get(name):  # every sequence of the perturbation unreadable: left out
            unreadable.append(name)
    if not fp:
        raise _nothing_readable(ctx, "imagenet-p", items="sequences") if source == "disk" else \
            _nothing_readable(ctx, "val")
    # the means, mFR and mT5D average the 10 of the benchmark; the validation perturbations stand alone
    in_mfr = [p for p in metrics.IMAGENET_P if p in fp]
    result = {"fp": {p: 100.0 * v for p, v in fp.items()}, "t5d": t5d, "mfr": None, "mt5d": None,
              "mean_fp": 100.0 * sum(fp[p] for p in in_mfr) / len(in_mfr) if in_mfr else None,
              "mean_t5d_unnormalised": sum(t5d[p] for p in in_mfr) / len(in_mfr) if in_mfr else None,
              "sequences": scored, "mfr_over": sorted(in_mfr), "mfr_complete": set(in_mfr) >= set(metrics.IMAGENET_P),
              "source": "disk: " + str(ctx.source("imagenet-p")) if source == "disk" else
              f"generated from {ctx.source('val')} with lkfast.corrupt (seed {ctx.seed})"}
    outside = [p for p in fp if p not in metrics.IMAGENET_P]
    if outside:
        result["outside_mfr"] = outside
    if unreadable:
        result["unreadable_parts"] = unreadable
    if harder:  # folders there but not scored: said, not left out silently
        result["not_scored"] = harder
    if ctx.is_baseline:
        return result
    base, why = ctx.baseline_result("imagenet-p")
    if base is None:
        result["normalisation_note"] = why
        return result
    missing = [p for p in fp if not base["fp"].get(p) or not base["t5d"].get(p)]
    if any(p in missing for p in in_mfr):  # one of the means' perturbations cannot be normalised: no mFR
        result["normalisation_note"] = (f"the baseline has no (or zero) flip probability / top-5 distance for "
                                        f"{[p for p in missing if p in in_mfr]}")
        return result
    if missing:  # validation perturbations only: the 10's mFR stands, those have no rates
        result["fr_note"] = (f"the baseline has no (or zero) flip probability / top-5 distance for {missing} "
                             f"(outside mFR): no FR or normalised T5D there")
    rated = [p for p in fp if p not in missing]
    # ratios do not depend on the percent scale, so the baseline's percent values serve as they are
    if rated:
        result["fr"] = metrics.flip_rates({p: result["fp"][p] for p in rated}, base["fp"])
        result["t5d_normalised"] = metrics.top5_distance_rates({p: t5d[p] for p in rated}, base["t5d"])
    if in_mfr:
        result["mfr"] = metrics.mfr({p: result["fp"][p] for p in in_mfr}, base["fp"])
        result["mt5d"] = metrics.mt5d({p: t5d[p] for p in in_mfr}, base["t5d"])
    # the release (and the paper's Table 2) normalise by AlexNet: the report compares only such values
    result["normalised_by"] = f"the baseline model {_baseline_words(ctx)} on the same sequences"
    result["baseline_model"] = ctx.options.baseline.name
    result["baseline"] = {"fp": base["fp"], "t5d": base["t5d"]}
    return result


def _p_count(ctx):
    from lkfast import corrupt

    _, parts, _ = _p_parts(ctx)
    return sum(len(d) * corrupt.PERTURBATIONS[n] for n, d in parts)


# ImageNet-9 ----------------------------------------------------------------------------------------
def _nine_parts(ctx):
    from lkfast import data

    space = ctx.class_space
    if space.nine_map is None:
        raise TaskUnavailable(f"{space.name} has no map to ImageNet-9's nine classes")
    root = ctx.source("imagenet-9")
    variants = [v for v in IMAGENET9_VARIANTS if (root / v / "val").is_dir()]
    if not variants:
        found = ", ".join(class_folders(root)[:8]) or "nothing"
        raise EvalError(f"ImageNet-9: expected <variant>/val/<class>/ folders under {root} (variants "
                        f"{', '.join(IMAGENET9_VARIANTS)}), found {found}: give the folder holding the variants as "
                        f"--imagenet-9-dir (or as imagenet-9/ under --data-root)")
    data.imagenet9_contents(str(root))  # refuses a variant under another name: it would be left out
    # ImageNet9 checks an in_to_in9.json found in root against lkfast.data.imagenet9_class_map().
    # The release's images are 224 x 224 and its in9_eval.py feeds them with ToTensor() alone (no
    # resize, no crop), as ImageNet-C's are fed here
    tf = data.transform_for(ctx.config, resize=False)
    return [(v, _memo(ctx, ("9", v), lambda v=v: data.ImageNet9(str(root), v, tf, **selection(ctx))))
            for v in variants]


def imagenet_9(ctx: TaskContext) -> dict:
    from lkfast import metrics

    nine = torch.tensor(ctx.class_space.nine_map)

    def compute(images, targets, indices):
        return _counts(metrics.imagenet9_accuracy(ctx.forward(images), targets, nine), len(targets))
    top1, unreadable = {}, []
    for variant, dataset in _nine_parts(ctx):
        score = _top1(ctx.records(variant, dataset, compute))
        if score is None:
            unreadable.append(variant)
        else:
            top1[variant] = score
    if not top1:
        raise _nothing_readable(ctx, "imagenet-9")
    result = {"top1": top1, "source": str(ctx.source("imagenet-9"))}
    if unreadable:
        result["unreadable_parts"] = unreadable
    if "mixed_same" in top1 and "mixed_rand" in top1:
        result.update({k: (None if v is None else float(v)) for k, v in metrics.background_gap(top1).items()})
    else:
        result["bg_gap"] = None
        result["bg_gap_note"] = "needs the mixed_same and mixed_rand variants"
    return result


_a_run, _a_count = _subset_task("imagenet-a")
_r_run, _r_count = _subset_task("imagenet-r")
register_task("clean", clean, needs=("val",), count=lambda ctx: len(_val(ctx)),
              description="ImageNet-val top-1")
register_task("imagenet-a", _a_run, needs=("imagenet-a",), count=_a_count,
              description="ImageNet-A top-1 on its 200 logits (Fig. 2a)")
register_task("imagenet-r", _r_run, needs=("imagenet-r",), count=_r_count,
              description="ImageNet-R top-1 on its 200 logits (Fig. 3)")
register_task("imagenet-o", imagenet_o, needs=("imagenet-o", "val"),
              count=lambda ctx: sum(len(d) for d in _o_datasets(ctx)[:2]),
              description="ImageNet-O AUPR / AUROC / FPR95 (Fig. 2c)",
              result_version="2")  # 2: in_classes, in_classes_note
register_task("imagenet-c", imagenet_c, needs=("imagenet-c", "val"), count=_c_count, reads=("baseline",),
              description="ImageNet-C mCE, relative mCE, severity-5 mean top-1 (Table 1, Fig. 2b)",
              result_version="2")  # 2: a baseline's weights in normalised_by, baseline_model
register_task("imagenet-p", imagenet_p, needs=("imagenet-p", "val"), count=_p_count, reads=("baseline",),
              description="ImageNet-P mFR / mT5D (Table 2)",
              result_version="5")  # 2: nothing readable is not run (98974ff; was an empty result, still cached);
# 3: not_scored (harder noise levels without their difficulty-1 folder); 4: normalised_by, baseline_model;
# 5: the unnormalised flip probabilities are fp / mean_fp (were fr / mean_fr_unnormalised: FR is the benchmark's
# normalised flip rate), fr and t5d_normalised per perturbation with a baseline
register_task("imagenet-9", imagenet_9, needs=("imagenet-9",), count=lambda ctx: sum(len(d) for _, d in _nine_parts(ctx)),
              description="ImageNet-9 backgrounds: Original, Mixed-Same, Mixed-Rand, BG-Gap (Table 3)",
              version="2")  # 2: images fed without the model's resize and crop, as the release feeds them
