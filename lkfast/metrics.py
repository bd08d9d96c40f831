"""The robustness benchmarks' metrics: small pure functions on tensors (CPU or any device).

    >>> import torch, lkfast.metrics as M
    >>> M.accuracy(torch.randn(8, 1000), torch.randint(0, 1000, (8,)))            # top-1, percent
    >>> M.corruption_errors({"snow": {1: .5, 2: .6, 3: .7, 4: .8, 5: .9}})["ce"]     # {"snow": ...}
    >>> M.flip_probability(torch.randint(0, 3, (4, 31)), noise=False, stride=2)
    >>> M.ood_scores(torch.rand(100), torch.rand(100) + .5)                        # aupr, auroc, fpr95

Conventions: accuracies, CE and flip rates are in percent (0..100); errors handed in are fractions
in [0, 1]; flip probabilities and top-5 distances are returned as the benchmark defines them
(a probability in [0, 1] and a mean number of rank moves), and become percent only when divided by
a baseline's (mFR, mT5D). Every function checks its inputs and raises ValueError with what it
expected and what it got.

Sources: ImageNet-C/-P (Hendrycks & Dietterich, ICLR 2019, and the release's test scripts),
ImageNet-O (Hendrycks et al., CVPR 2021), ImageNet-9 (Xiao et al., ICLR 2021).
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional

import torch

from lkfast import corrupt as _corrupt

# the benchmarks' names, from the one place that defines them (lkfast.corrupt renders them)
IMAGENET_C_COMMON = tuple(_corrupt.SUBSETS["common"])
"""The 15 corruptions of ImageNet-C's mCE, in the release's order."""
IMAGENET_C_EXTRA = tuple(_corrupt.SUBSETS["extra"])
"""The 4 extra ("validation") corruptions of the ImageNet-C release."""
IMAGENET_C_ALL = IMAGENET_C_COMMON + IMAGENET_C_EXTRA
IMAGENET_P = tuple(_corrupt.PERTURBATION_SUBSETS["common"])
"""The 10 perturbations of ImageNet-P's mFR and mT5D, in the release's order."""
IMAGENET_P_EXTRA = tuple(_corrupt.PERTURBATION_SUBSETS["extra"])
"""The 4 validation perturbations of the ImageNet-P release (speckle_noise, gaussian_blur, spatter,
shear): scored like the others, outside mFR and mT5D."""
IMAGENET_P_ALL = IMAGENET_P + IMAGENET_P_EXTRA
NOISE_PERTURBATIONS = tuple(_corrupt.NOISE_PERTURBATIONS)
"""ImageNet-P perturbations whose frames are compared with the first frame (not the previous one)."""
IMAGENET9_VARIANTS = ("original", "only_fg", "only_bg_b", "only_bg_t", "no_fg", "mixed_same",
                      "mixed_rand", "mixed_next")
"""The variants of the backgrounds-challenge release (ImageNet-9)."""

ALEXNET_ERRORS: Dict[str, float] = {
    # AlexNet's top-1 error on ImageNet-C, mean over severities 1..5: the "Average" column of the
    # table "AlexNet ImageNet-C Error" in the ImageNet-C release's README (hendrycks/robustness),
    # which lists all 19 corruptions, the 4 extra ones included, with their per-severity errors
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
    "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360,
    "snow": 0.866816, "frost": 0.826572, "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204,
    "elastic_transform": 0.646056, "pixelate": 0.717840, "jpeg_compression": 0.606500,
    "speckle_noise": 0.845388, "gaussian_blur": 0.787108, "spatter": 0.717512, "saturate": 0.658248,
}
"""AlexNet's mean top-1 error over the 5 severities of each ImageNet-C corruption (fraction)."""
ALEXNET_CLEAN_ERROR = 0.43478
"""AlexNet's clean ImageNet-val top-1 error: 1 - 56.522 % (torchvision's AlexNet, the model behind
the ImageNet-C normalisation; torchvision.models.AlexNet_Weights.IMAGENET1K_V1, acc@1 56.522,
as torchvision's model documentation lists it). The relative mCE subtracts it from the corrupted
errors."""

SEVERITIES = (1, 2, 3, 4, 5)


def _check_logits(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a (N, classes) tensor; got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if not isinstance(targets, torch.Tensor) or targets.dim() != 1 or targets.numel() != logits.shape[0]:
        raise ValueError(f"targets must be a 1-D tensor with one class index per row of logits "
                         f"({logits.shape[0]}); got "
                         f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__}")
    if logits.shape[0] == 0:
        raise ValueError("accuracy of an empty batch is undefined: logits has 0 rows")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer class indices; got dtype {targets.dtype}")


def accuracy(logits: torch.Tensor, targets: torch.Tensor, class_subset=None) -> float:
    """Top-1 accuracy in percent.

    logits: (N, C) scores; targets: (N,) integer class indices in 0..C-1.
    class_subset: optional 1-D index tensor or list of logit columns (e.g. ImageNet-A's 200
    ImageNet-1k indices). The prediction is then the arg-max over those columns only, and targets
    still index the FULL class space (a 1k index): a target that is not in the subset is an error
    (ValueError naming it), never counted as simply wrong. Ties in the arg-max go to the lowest
    index (torch.argmax).
    """
    _check_logits(logits, targets)
    num_classes = logits.shape[1]
    if targets.min() < 0 or targets.max() >= num_classes:
        raise ValueError(f"targets must be class indices in 0..{num_classes - 1} (the logits' columns); "
                         f"got values in {int(targets.min())}..{int(targets.max())}")
    if class_subset is None:
        predictions = logits.argmax(1)
    else:
        subset = torch.as_tensor(class_subset, dtype=torch.long, device=logits.device).flatten()
        if subset.numel() == 0:
            raise ValueError("class_subset is empty; pass the logit columns to restrict the prediction to")
        if subset.min() < 0 or subset.max() >= num_classes:
            raise ValueError(f"class_subset holds column {int(subset.max()) if subset.max() >= num_classes else int(subset.min())}, "
                             f"outside the {num_classes} logit columns")
        if subset.unique().numel() != subset.numel():
            raise ValueError("class_subset holds repeated columns; each class must appear once")
        inside = (targets.to(subset.device)[:, None] == subset[None, :]).any(1)
        if not bool(inside.all()):
            missing = sorted(set(targets[~inside.to(targets.device)].tolist()))
            raise ValueError(f"{len(missing)} target class(es) are not in class_subset (first: {missing[:5]}); "
                             "targets must index the full class space and belong to the subset "
                             "(e.g. ImageNet-A images are labelled with the 1k index of one of its 200 classes)")
        predictions = subset[logits[:, subset].argmax(1)]
    return 100.0 * (predictions.to(targets.device) == targets).double().mean().item()


def imagenet9_accuracy(logits: torch.Tensor, targets: torch.Tensor, class_map: torch.Tensor) -> float:
    """Top-1 accuracy in percent on ImageNet-9 (targets 0..8) for a 1000-class model: the arg-max
    over all 1000 logits is mapped to its ImageNet-9 class by ``class_map`` (a 1000-long integer
    tensor, -1 outside the nine: ``lkfast.data.imagenet9_class_map()``); a prediction outside the
    nine counts as wrong. A 9-class model (logits with 9 columns) is scored directly."""
    _check_logits(logits, targets)
    if targets.min() < 0 or targets.max() > 8:
        raise ValueError(f"ImageNet-9 targets must be in 0..8; got values in {int(targets.min())}..{int(targets.max())}")
    if logits.shape[1] == 9:
        predictions = logits.argmax(1)
    else:
        class_map = torch.as_tensor(class_map, dtype=torch.long)
        if class_map.dim() != 1 or class_map.numel() != logits.shape[1]:
            raise ValueError(f"class_map must have one entry per logit column ({logits.shape[1]}); "
                             f"got shape {tuple(class_map.shape)}")
        predictions = class_map.to(logits.device)[logits.argmax(1)]
    return 100.0 * (predictions.to(targets.device) == targets).double().mean().item()


def _check_fraction(value, where: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number (a top-1 error in [0, 1]); got {value!r}") from None
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise ValueError(f"{where} must be a top-1 error in [0, 1] (a fraction, not percent); got {value}")
    return value


def corruption_errors(err: Mapping[str, Mapping[int, float]], clean_error: Optional[float] = None,
                      baseline_clean_error: Optional[float] = None,
                      baseline: Mapping[str, float] = ALEXNET_ERRORS) -> dict:
    """ImageNet-C summary from top-1 errors ``err[corruption][severity]`` (fractions in [0, 1];
    severities 1..5, int or str keys; any subset of corruptions and severities).

    Returns a dict:
      - ``ce``: {corruption: CE in percent} = 100 * mean_s E(s, c) / baseline[c], for every
        corruption with all 5 severities and a baseline value (the 19 of ALEXNET_ERRORS by
        default). ``baseline`` holds a model's mean error over the 5 severities, as the ImageNet-C
        release publishes AlexNet's, so CE needs all 5.
      - ``ce_skipped``: {corruption: why} for those left out of ``ce`` (missing severities, no
        baseline value).
      - ``mce``: mean CE over those of the 15 common corruptions (IMAGENET_C_COMMON) that have a
        CE, in percent; None if none has. ``mce_over`` lists the corruptions it averages and
        ``mce_complete`` says whether all 15 were there (only then is it the benchmark's mCE).
      - ``relative_ce`` / ``relative_mce`` (only when ``clean_error`` is given): 100 *
        (mean_s E(s, c) - E_clean) / (baseline[c] - baseline_clean_error), averaged over the
        corruptions of ``mce`` that have one (``relative_mce_over``). A corruption the baseline is not
        hurt by (baseline[c] <= baseline_clean_error: possible with a measured baseline, never with
        AlexNet's published errors) has no relative CE: it is named in ``relative_ce_skipped`` with
        why, and its CE still counts in ``mce``. ``baseline_clean_error`` defaults to AlexNet's
        (ALEXNET_CLEAN_ERROR) when ``baseline`` is ALEXNET_ERRORS; with another baseline it must be given.
      - ``sev5_top1``: mean top-1 accuracy (percent) at severity 5 over every corruption present
        there (the paper's Fig. 2 number, over the 19); ``sev5_over`` lists them; None if no
        severity 5 is present.
      - ``mean_top1``: mean top-1 accuracy (percent) over every (corruption, severity) present.
    """
    if not isinstance(err, Mapping) or not err:
        raise ValueError("err must be a non-empty dict {corruption: {severity: top-1 error in [0, 1]}}")
    table: Dict[str, Dict[int, float]] = {}
    for name, by_severity in err.items():
        if not isinstance(by_severity, Mapping) or not by_severity:
            raise ValueError(f"err[{name!r}] must be a non-empty dict {{severity 1..5: top-1 error}}; got {by_severity!r}")
        row = {}
        for severity, value in by_severity.items():
            try:
                s = int(severity)
            except (TypeError, ValueError):
                s = None
            if s not in SEVERITIES:
                raise ValueError(f"err[{name!r}] has severity {severity!r}; ImageNet-C severities are 1..5")
            row[s] = _check_fraction(value, f"err[{name!r}][{s}]")
        table[str(name)] = row

    if clean_error is not None:
        clean_error = _check_fraction(clean_error, "clean_error")
        if baseline_clean_error is None:
            if baseline is not ALEXNET_ERRORS:
                raise ValueError("relative mCE needs the baseline's clean error: pass baseline_clean_error "
                                 "with a baseline other than ALEXNET_ERRORS")
            baseline_clean_error = ALEXNET_CLEAN_ERROR
        baseline_clean_error = _check_fraction(baseline_clean_error, "baseline_clean_error")

    ce, relative_ce, skipped, relative_skipped = {}, {}, {}, {}
    for name, row in table.items():
        if name not in baseline:
            skipped[name] = "no baseline error for this corruption"
            continue
        if sorted(row) != list(SEVERITIES):
            skipped[name] = f"needs severities 1..5, has {sorted(row)}"
            continue
        mean_error = sum(row.values()) / len(row)
        ce[name] = 100.0 * mean_error / float(baseline[name])
        if clean_error is not None:
            denominator = float(baseline[name]) - baseline_clean_error
            if denominator <= 0:  # the corruption does not hurt the baseline: no scale for this one
                relative_skipped[name] = (f"undefined: the baseline's corruption error ({float(baseline[name]):.4g}) "
                                          f"is not above its clean error ({baseline_clean_error:.4g})")
                continue
            relative_ce[name] = 100.0 * (mean_error - clean_error) / denominator

    over = [name for name in IMAGENET_C_COMMON if name in ce]
    out = {
        "ce": ce,
        "ce_skipped": skipped,
        "mce": sum(ce[n] for n in over) / len(over) if over else None,
        "mce_over": over,
        "mce_complete": len(over) == len(IMAGENET_C_COMMON),
    }
    if clean_error is not None:
        relative_over = [name for name in over if name in relative_ce]
        out["relative_ce"] = relative_ce
        out["relative_ce_skipped"] = relative_skipped
        out["relative_mce"] = sum(relative_ce[n] for n in relative_over) / len(relative_over) if relative_over else None
        out["relative_mce_over"] = relative_over
    sev5 = [name for name, row in table.items() if 5 in row]
    out["sev5_top1"] = 100.0 * sum(1 - table[n][5] for n in sev5) / len(sev5) if sev5 else None
    out["sev5_over"] = sev5
    cells = [1 - v for row in table.values() for v in row.values()]
    out["mean_top1"] = 100.0 * sum(cells) / len(cells)
    return out


def _frame_pairs(frames: int, noise: bool, stride: int):
    """(reference frame, compared frame) index tensors of ImageNet-P's comparison pattern."""
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive integer (ImageNet-P difficulty 1..3); got {stride!r}")
    if noise:
        if frames < 2:
            raise ValueError(f"a sequence needs at least 2 frames; got {frames}")
        b = torch.arange(1, frames)
        return torch.zeros_like(b), b
    if frames <= stride:
        raise ValueError(f"sequences of {frames} frames have no frame pairs at stride {stride}; need more than {stride} frames")
    a = torch.arange(0, frames - stride)
    return a, a + stride


def flip_probability(predictions: torch.Tensor, noise: bool, stride: int = 1,
                     per_sequence: bool = False):
    """ImageNet-P flip probability: the fraction of frame pairs whose top-1 predictions differ,
    averaged within each sequence, then over sequences.

    predictions: (sequences, frames) integer top-1 classes.
    noise: True for the noise perturbations (NOISE_PERTURBATIONS): every frame is compared with
    the first frame, and ``stride`` is ignored (their difficulty is a separate set of sequences,
    as in the release). Otherwise frame t is compared with frame t + stride, i.e. consecutive
    frames of each of the ``stride`` interleaved subsequences (difficulty 1..3).
    Returns a float in [0, 1], or with ``per_sequence`` a (sequences,) float64 tensor (to average
    across batches or shards).
    """
    if not isinstance(predictions, torch.Tensor) or predictions.dim() != 2 or predictions.shape[0] == 0:
        raise ValueError("predictions must be a (sequences, frames) tensor of top-1 classes with at least one "
                         f"sequence; got {tuple(predictions.shape) if isinstance(predictions, torch.Tensor) else type(predictions).__name__}")
    a, b = _frame_pairs(predictions.shape[1], noise, stride)
    a, b = a.to(predictions.device), b.to(predictions.device)
    flips = (predictions[:, a] != predictions[:, b]).double().mean(1)
    return flips if per_sequence else flips.mean().item()


def _ordinal_top5(logits: torch.Tensor) -> torch.Tensor:
    # the 5 best classes per row; equal scores ranked by class index (scipy's rankdata 'ordinal')
    return torch.sort(logits, dim=-1, descending=True, stable=True).indices[..., :5]


def top5_distance(logits: torch.Tensor, noise: bool, stride: int = 1, per_sequence: bool = False):
    """ImageNet-P top-5 distance, with the frame pairs of :func:`flip_probability`.

    logits: (sequences, frames, classes) scores, classes >= 5. For a pair (reference frame a,
    frame b): list the 5 best classes of frame a, best first (j = 0..4), find each one's 0-based
    rank r_j in frame b, and sum |j - min(r_j, 5)| (the release's ``dist(..., mode='top5')``);
    ranks are ordinal, equal scores ranked by class index. The distance is averaged over the pairs
    of a sequence, then over sequences. Returns a float, or with ``per_sequence`` a (sequences,)
    float64 tensor.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[0] == 0 or logits.shape[2] < 5:
        raise ValueError("logits must be a (sequences, frames, classes) tensor with at least one sequence and 5 "
                         f"classes; got {tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    a, b = _frame_pairs(logits.shape[1], noise, stride)
    top5 = _ordinal_top5(logits)                                   # (S, T, 5), computed once per frame
    ref, other = top5[:, a.to(top5.device)], top5[:, b.to(top5.device)]   # (S, P, 5)
    match = ref[..., :, None] == other[..., None, :]               # (S, P, 5 of a, 5 of b)
    positions = torch.arange(5, device=top5.device)
    # rank of a's j-th class in b, clipped at 5 (= not among b's best 5)
    rank = torch.where(match.any(-1), (match.long() * positions).sum(-1), torch.full_like(ref, 5))
    distance = (positions - rank).abs().sum(-1).double().mean(1)
    return distance if per_sequence else distance.mean().item()


def _normalised(values: Mapping[str, float], baseline: Mapping[str, float], what: str) -> Dict[str, float]:
    if not values:
        raise ValueError(f"no {what} values given; pass {{perturbation: value}}")
    missing = [k for k in values if k not in baseline]
    if missing:
        raise ValueError(f"the baseline has no {what} for {missing}; evaluate the baseline model on the same "
                         f"perturbations (it has {sorted(baseline)})")
    out = {}
    for name, value in values.items():
        base = float(baseline[name])
        if base <= 0:
            raise ValueError(f"the baseline's {what} for {name!r} is {base}; a zero baseline cannot normalise")
        out[name] = 100.0 * float(value) / base
    return out


def flip_rates(fp_by_perturbation: Mapping[str, float], baseline_fp_by_perturbation: Mapping[str, float]) -> Dict[str, float]:
    """{perturbation: FR in percent} = 100 * FP / baseline FP, for each perturbation given.
    ValueError if the baseline lacks one of them or has a zero value."""
    return _normalised(fp_by_perturbation, baseline_fp_by_perturbation, "flip probability")


def mfr(fp_by_perturbation: Mapping[str, float], baseline_fp_by_perturbation: Mapping[str, float]) -> float:
    """Mean flip rate in percent: the mean of :func:`flip_rates` over the perturbations given (the
    10 of IMAGENET_P for the benchmark's mFR; the caller decides how difficulties are combined
    into one flip probability per perturbation)."""
    rates = flip_rates(fp_by_perturbation, baseline_fp_by_perturbation)
    return sum(rates.values()) / len(rates)


def top5_distance_rates(t5d_by_perturbation: Mapping[str, float],
                        baseline_t5d_by_perturbation: Mapping[str, float]) -> Dict[str, float]:
    """{perturbation: T5D in percent of the baseline's}, as :func:`flip_rates`."""
    return _normalised(t5d_by_perturbation, baseline_t5d_by_perturbation, "top-5 distance")


def mt5d(t5d_by_perturbation: Mapping[str, float], baseline_t5d_by_perturbation: Mapping[str, float]) -> float:
    """Mean top-5 distance in percent of the baseline's, over the perturbations given (as :func:`mfr`)."""
    rates = top5_distance_rates(t5d_by_perturbation, baseline_t5d_by_perturbation)
    return sum(rates.values()) / len(rates)


def _scores(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x).detach().flatten().to("cpu", torch.float64)
    if x.numel() == 0:
        raise ValueError(f"{name} is empty; each side needs at least one score")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds NaN or infinite scores")
    return x


def ood_scores(in_scores, out_scores) -> Dict[str, float]:
    """Out-of-distribution detection metrics, in percent. A higher score means more anomalous
    (ImageNet-O: minus the max softmax over the 200 classes); ``out_scores`` are the positives.

    Returns {"aupr": average precision (the step-wise sum over thresholds of (recall_k -
    recall_{k-1}) * precision_k, as scikit-learn's average_precision_score), "auroc": area under
    the ROC curve (ties count one half), "fpr95": false-positive rate at the highest threshold
    whose true-positive rate reaches 95 %}. Tied scores form one threshold.
    """
    negatives, positives = _scores(in_scores, "in_scores"), _scores(out_scores, "out_scores")
    scores = torch.cat([positives, negatives])
    labels = torch.cat([torch.ones_like(positives), torch.zeros_like(negatives)])
    order = torch.sort(scores, descending=True, stable=True).indices
    scores, labels = scores[order], labels[order]
    # one threshold per distinct score: the last position of each run of equal scores
    last = torch.cat([torch.nonzero(scores[1:] != scores[:-1]).flatten(), torch.tensor([scores.numel() - 1])])
    tp = torch.cumsum(labels, 0)[last]
    fp = (last + 1).double() - tp
    n_pos, n_neg = float(positives.numel()), float(negatives.numel())
    tpr, fpr = tp / n_pos, fp / n_neg
    precision = tp / (tp + fp)
    recall_steps = torch.diff(tpr, prepend=torch.zeros(1, dtype=torch.float64))
    aupr = float((recall_steps * precision).sum())
    tpr0, fpr0 = torch.cat([torch.zeros(1, dtype=torch.float64), tpr]), torch.cat([torch.zeros(1, dtype=torch.float64), fpr])
    auroc = float(torch.trapezoid(tpr0, fpr0))
    reach = torch.nonzero(tpr >= 0.95 - 1e-12).flatten()
    fpr95 = float(fpr[reach[0]])
    return {"aupr": 100.0 * aupr, "auroc": 100.0 * auroc, "fpr95": 100.0 * fpr95}


def background_gap(acc: Mapping[str, float]) -> Dict[str, Optional[float]]:
    """ImageNet-9 summary from {variant: top-1 percent} (variants as IMAGENET9_VARIANTS).

    Returns {"original", "mixed_same", "mixed_rand": the given accuracies (original None if not
    given), "bg_gap": mixed_same - mixed_rand (percentage points)}. A value None counts as not
    given. ValueError if mixed_same or mixed_rand is missing, or a variant name is unknown."""
    unknown = [k for k in acc if k not in IMAGENET9_VARIANTS]
    if unknown:
        raise ValueError(f"unknown ImageNet-9 variant(s) {unknown}; valid: {', '.join(IMAGENET9_VARIANTS)}")
    acc = {k: v for k, v in acc.items() if v is not None}   # None = not measured
    missing = [k for k in ("mixed_same", "mixed_rand") if k not in acc]
    if missing:
        raise ValueError(f"BG-Gap needs the top-1 of mixed_same and mixed_rand; missing {missing}")
    values = {}
    for key in ("original", "mixed_same", "mixed_rand"):
        if key in acc:
            try:
                value = float(acc[key])
            except (TypeError, ValueError):
                raise ValueError(f"acc[{key!r}] must be a top-1 accuracy in percent; got {acc[key]!r}") from None
            if not 0.0 <= value <= 100.0:
                raise ValueError(f"acc[{key!r}] must be a top-1 accuracy in percent (0..100); got {value}")
            values[key] = value
        else:
            values[key] = None
    values["bg_gap"] = values["mixed_same"] - values["mixed_rand"]
    return values


__all__ = ["IMAGENET_C_COMMON", "IMAGENET_C_EXTRA", "IMAGENET_C_ALL", "IMAGENET_P", "IMAGENET_P_EXTRA", "IMAGENET_P_ALL",
           "NOISE_PERTURBATIONS",
           "IMAGENET9_VARIANTS", "ALEXNET_ERRORS", "ALEXNET_CLEAN_ERROR", "SEVERITIES", "accuracy",
           "imagenet9_accuracy", "corruption_errors", "flip_probability", "top5_distance", "flip_rates",
           "mfr", "top5_distance_rates", "mt5d", "ood_scores", "background_gap"]
