"""report.md from results.json: Figure 1's model card, the paper's Section 3 tables (markdown + CSV
through ``lkfast.tables``) and Figures 2 and 3 (PNG), with the paper's value beside the measured one
for the models the paper reports.

    write_report(out_dir, results) -> Path of report.md      (python -m lkfast.eval calls it)
    python -m lkfast.eval.report OUT_DIR                     rebuild the report from OUT_DIR/results.json
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from lkfast.tables import save_figure_atomic, write_table, write_text_atomic

META_KEY = "_meta"
CITATION = ("Chen et al., *Revealing the Dark Secrets of Extremely Large Kernel ConvNets on Robustness*, ICML 2024")

# The paper's numbers (Tables 1-6 of the paper; Table 6 holds the values plotted in Figs. 2a, 2b and 3
# for the models it lists). Keys: clean / imagenet-a / imagenet-r top-1, c_sev5 (ImageNet-C mean top-1 over the 19
# corruptions at severity 5), mce, mfr, mt5d, ImageNet-9 original / mixed_same / mixed_rand / bg_gap, aupr
# (ImageNet-O, Table 5, plotted in Fig. 2c) and taig ({eps: TAIG-R success rate %}, Table 4).
PAPER: Dict[str, Dict[str, float]] = {
    "RepLKNet-31B": {"clean": 85.2, "imagenet-a": 29.4, "imagenet-r": 43.9, "c_sev5": 49.2, "mce": 36.5,
                     "mfr": 29.2, "mt5d": 49.8, "original": 97.3, "mixed_same": 92.3, "mixed_rand": 88.2, "bg_gap": 4.1,
                     "aupr": 78.9, "taig": {0.03: 39.2, 0.06: 56.1, 0.1: 59.3}},
    "RepLKNet-31L": {"clean": 86.6, "imagenet-a": 39.6, "imagenet-r": 49.1, "c_sev5": 52.6},
    "ViT-B": {"clean": 84.0, "imagenet-a": 26.7, "imagenet-r": 38.0, "c_sev5": 42.2, "aupr": 68.0,
              "taig": {0.03: 62.3, 0.06: 73.3, 0.1: 75.6}},
    "ViT-L/16": {"clean": 85.2, "imagenet-a": 28.1, "imagenet-r": 40.6, "c_sev5": 49.9, "mce": 45.5, "mfr": 33.1,
                 "mt5d": 50.2, "original": 96.7, "mixed_same": 88.5, "mixed_rand": 81.7, "bg_gap": 6.8,
                 "taig": {0.03: 54.9, 0.06: 67.9, 0.1: 69.8}},
    "ConvNeXt-B": {"clean": 85.8, "imagenet-a": 33.9, "imagenet-r": 45.5, "c_sev5": 53.2},
    "ConvNeXt-L": {"clean": 86.6, "imagenet-a": 38.7, "imagenet-r": 47.6, "c_sev5": 56.5},
    "BiT-r152x4": {"clean": 85.4, "imagenet-a": 13.2, "imagenet-r": 33.8, "c_sev5": 39.9,
                   "taig": {0.03: 44.6, 0.06: 60.2, 0.1: 63.1}},
    "BiT m-r101x3": {"mce": 58.3, "mfr": 50.0, "mt5d": 76.7, "original": 94.3, "mixed_same": 81.2,
                     "mixed_rand": 76.6, "bg_gap": 4.6},
    "ResNet-50": {"mce": 76.7, "mfr": 58.0, "mt5d": 82.0, "original": 95.6, "mixed_same": 86.2, "mixed_rand": 78.9,
                  "bg_gap": 7.3, "taig": {0.03: 47.7, 0.06: 65.2, 0.1: 67.9}},
}
# timm / lkfast architecture name prefix -> the paper's model name.
PAPER_NAMES = (("replknet_31b", "RepLKNet-31B"), ("replknet_31l", "RepLKNet-31L"), ("vit_base_patch16", "ViT-B"),
               ("vit_large_patch16", "ViT-L/16"), ("convnext_base", "ConvNeXt-B"), ("convnext_large", "ConvNeXt-L"),
               ("resnetv2_152x4_bit", "BiT-r152x4"), ("resnetv2_101x3_bit", "BiT m-r101x3"), ("resnet50", "ResNet-50"))
RANDOM_WEIGHTS = "random (no checkpoint)"  # the _model card's "weights" for a model built without weights
PUBLISHED_WEIGHTS = "published (--pretrained)"  # ... for one given without a checkpoint under --pretrained
TASK_ORDER = ("clean", "imagenet-a", "imagenet-c", "imagenet-o", "imagenet-p", "imagenet-r", "imagenet-9")


def paper_name(label: str, entry: Dict[str, Any]) -> Optional[str]:
    """The paper's name for a model (by label, else by its architecture name), or None; None for
    a model evaluated with random weights (no checkpoint): it is not the paper's trained model."""
    if entry.get("_model", {}).get("weights") == RANDOM_WEIGHTS:
        return None
    if label in PAPER:
        return label
    name = str(entry.get("_model", {}).get("name", "")).split(".")[0]
    for prefix, paper in PAPER_NAMES:
        if name == prefix or name.startswith(prefix + "_"):
            return paper
    return None


def _get(entry, task, key):
    value = entry.get(task, {})
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _classes(results, models, task: str, default: int) -> str:
    """The number of classes ``task`` was scored over in this run (its results' ``classes``), as text: the
    models' numbers where they differ; ``default``, the benchmark's, for results that do not say."""
    counts = sorted({_get(results[m], task, "classes") for m in models} - {None})
    return " / ".join(str(int(c)) for c in counts) if counts else str(default)


def _level_mean(levels):
    """The mean of one corruption's top-1 over its severities ({severity: top-1}); None without any."""
    values = [v for v in (levels or {}).values() if isinstance(v, (int, float)) and not isinstance(v, bool)] \
        if isinstance(levels, dict) else []
    return sum(values) / len(values) if values else None


def _over(entry, task, over_key, total):
    """How many of a benchmark's parts a mean (mCE, mFR) averages, e.g. "15/15"; only a full count
    is the benchmark's number."""
    result = entry.get(task) if isinstance(entry.get(task), dict) else {}
    over = result.get(over_key)
    return None if over is None else f"{len(over)}/{total}"


_GENERATED_TASK = {"c_sev5": "imagenet-c", "mce": "imagenet-c", "mfr": "imagenet-p", "mt5d": "imagenet-p"}


def _generated(result) -> bool:
    """Whether an ImageNet-C/-P result was measured on corruptions lkfast generated from val (its
    ``source`` is "generated from ..."), not on the release's files."""
    return isinstance(result, dict) and str(result.get("source", "disk")).startswith("generated")


def _imagenet(results) -> bool:
    """Whether the run's class space is ImageNet-1k (results before the flag were)."""
    return results.get(META_KEY, {}).get("class_space_is_imagenet", True)


def _paper(results, label, key):
    """The paper's value of ``key`` for the model, or None: none for a model evaluated in a class space
    other than ImageNet-1k (its accuracies and errors are over other classes), none for ImageNet-C/-P
    numbers measured on corruptions generated from val (the paper's are on the releases' files, which
    the generated ones estimate: other draws, another encoder), and for ImageNet-P's mFR / mT5D none
    unless AlexNet normalised them, as the release and the paper's Table 2 do."""
    name = paper_name(label, results[label])
    if not name or not _imagenet(results):
        return None
    if key in _GENERATED_TASK and _generated(results[label].get(_GENERATED_TASK[key])):
        return None
    if key in ("mfr", "mt5d") and results[label].get("imagenet-p", {}).get("baseline_model", "alexnet") != "alexnet":
        return None
    return PAPER.get(name, {}).get(key)


# TAIG's surrogate in the paper (Section 4.2): ViT-B for the ConvNets, RepLKNet-31B for the ViTs
PAPER_TAIG_SURROGATE = {"ResNet-50": "ViT-B", "BiT-r152x4": "ViT-B", "RepLKNet-31B": "ViT-B",
                        "ViT-B": "RepLKNet-31B", "ViT-L/16": "RepLKNet-31B"}


def paper_taig(results, label: str, eps: float) -> Optional[float]:
    """The paper's Table 4 success rate at ``eps`` for the model, or None: also None where this run's
    surrogate is not the one the paper paired with the model (another surrogate, another transfer)."""
    rates = _paper(results, label, "taig")
    surrogate = results[label].get("taig", {}).get("surrogate")
    if not rates or surrogate not in results or \
            paper_name(surrogate, results[surrogate]) != PAPER_TAIG_SURROGATE.get(paper_name(label, results[label])):
        return None
    return next((v for e, v in rates.items() if math.isclose(float(e), float(eps))), None)


PAPER_CLEAN_TOLERANCE = 1.0  # top-1 points beyond which the weights are unlikely to be those the paper evaluated
# The clean top-1 of the weights behind a paper row that does not state it, for _far_from_paper only (not shown as
# a paper value): the paper's ResNet-50 values (mCE 76.7, mFR 58.0, mT5D 82.0) are Hendrycks & Dietterich 2019's,
# for torchvision's ResNet-50, whose model card gives 76.13 (IMAGENET1K_V1). (BiT m-r101x3's is not known here.)
BEHIND_PAPER_ROWS = {"ResNet-50": 76.13}


def _far_from_paper(results, models) -> List[str]:
    """``"<label>: <measured> (the paper's <name>: <value>)"`` for each model whose clean ImageNet
    top-1 is more than PAPER_CLEAN_TOLERANCE points from the paper's value for the model it is
    matched to: the sign that the paper's values beside it are for other weights than these."""
    far = []
    for m in models:
        measured, paper = _get(results[m], "clean", "top1"), _paper(results, m, "clean")
        name = paper_name(m, results[m])
        behind = BEHIND_PAPER_ROWS.get(name) if paper is None and _imagenet(results) else None
        if measured is not None and paper is not None and abs(measured - paper) > PAPER_CLEAN_TOLERANCE:
            far.append(f"{m}: {measured:.2f} (the paper's {name}: {paper:.1f})")
        elif measured is not None and behind is not None and abs(measured - behind) > PAPER_CLEAN_TOLERANCE:
            far.append(f"{m}: {measured:.2f} (the {name} behind the paper's values: {behind:.2f})")
    return far


def _models(results) -> List[str]:
    return [k for k in results if k != META_KEY]


def _has(results, task) -> bool:
    return any(isinstance(results[m].get(task), dict) and "unavailable" not in results[m][task] for m in _models(results))


def models_named(models: List[str], among: List[str]) -> str:
    """``models`` as a note names them: "all models" where they are every one of ``among`` (two or more)."""
    return "all models" if len(models) == len(among) > 1 else ", ".join(models)


def _notes(results, task) -> List[str]:
    """The notes under a benchmark's table: models that did not run it, with why, then each note once,
    naming the models it is about ("all models" where every model that ran says it: the same data
    folder was listed once per model)."""
    lines, noted, ran = [], {}, []
    for m in _models(results):
        r = results[m].get(task)
        if not isinstance(r, dict):
            continue
        if "unavailable" in r:
            lines.append(f"- {m}: not run: {r['unavailable']}")
            continue
        bits = []
        if r.get("source"):
            bits.append(f"data: {r['source']}" + (" (an estimate of the release's files: the paper's values are not "
                                                  "shown beside)" if _generated(r) and paper_name(m, results[m]) and
                                                  _imagenet(results) else ""))
        if r.get("skipped_unreadable"):
            bits.append(f"**{r['skipped_unreadable']} unreadable item(s) skipped** "
                        f"({', '.join(f'{k}: {v}' for k, v in r.get('skipped_by_part', {}).items())})")
        if r.get("mce") is not None and r.get("mce_complete") is False:
            bits.append(f"**mCE over {len(r.get('mce_over') or [])} of the 15 corruptions** "
                        f"({', '.join(r.get('mce_over') or [])}): not the benchmark's mCE")
        if r.get("ce_skipped"):
            bits.append("no CE for " + ", ".join(f"{c} ({why})" for c, why in r["ce_skipped"].items()))
        if r.get("relative_ce_skipped"):
            bits.append(f"**relative mCE over {len(r.get('relative_mce_over') or [])} of the "
                        f"{len(r.get('mce_over') or [])} corruptions of the mCE**: no relative CE for "
                        + ", ".join(f"{c} ({why})" for c, why in r["relative_ce_skipped"].items()))
        if r.get("mean_fp") is not None and r.get("mfr_complete") is False:
            bits.append(f"**mFR/mT5D over {len(r.get('mfr_over') or [])} of the 10 perturbations** "
                        f"({', '.join(r.get('mfr_over') or [])}): not the benchmark's")
        if r.get("outside_mfr"):
            bits.append("the release's validation perturbations " + ", ".join(r["outside_mfr"]) + " scored per "
                        "perturbation, outside the means, mFR and mT5D (the benchmark's 10)")
        if r.get("unreadable_parts"):
            bits.append("**every item unreadable, not scored**: " + ", ".join(r["unreadable_parts"]))
        if r.get("not_scored"):
            bits.append("**not scored** (a harder noise level without its difficulty-1 folder; difficulty 1 is "
                        "scored): " + ", ".join(r["not_scored"]))
        if r.get("in_classes_note"):
            bits.append(f"**negatives from fewer classes**: {r['in_classes_note']}")
        if r.get("baseline_model"):  # a baseline model's values normalise these: which model, which weights
            bits.append(f"normalised by {r['normalised_by']}"
                        + ("" if r["baseline_model"] == "alexnet" or task != "imagenet-p" else
                           " (not AlexNet, as the release and the paper: the paper's values are not shown beside)"))
        for key in ("mce_note", "relative_mce_note", "normalisation_note", "fr_note", "bg_gap_note"):
            if r.get(key):
                bits.append(key.split("_note")[0].replace("_", " ") + " omitted: " + r[key])
        ran.append(m)
        for bit in bits:
            noted.setdefault(bit, []).append(m)
    for bit, models in noted.items():
        lines.append(f"- {models_named(models, ran)}: {bit}")
    return lines


class _Writer:
    def __init__(self, out: Path):
        self.out = out
        self.parts: List[str] = []

    def table(self, stem, header, rows, caption):
        """A table (markdown and CSV) without its "paper" columns where no row has a paper value (a
        class space other than ImageNet-1k's, models the paper does not report)."""
        keep = [i for i, h in enumerate(header)
                if h != "paper" or any(row[i] is not None and str(row[i]).strip() not in ("", "—") for row in rows)]
        header, rows = [header[i] for i in keep], [[row[i] for i in keep] for row in rows]
        md, _ = write_table(self.out / "tables" / stem, header, rows, caption=caption)
        self.parts.append(md.read_text() + f"\n([CSV](tables/{stem}.csv))\n")

    def text(self, text):
        self.parts.append(text)


def _subset_top1(w, results, models, task: str) -> None:
    """ImageNet-A's or -R's table (top-1 on its 200 classes beside the paper's) and its notes."""
    name = "ImageNet-" + task[-1].upper()
    w.table(task.replace("-", "_"), ["Model", "top-1 (%)", "paper", "images"],
            [[m, _get(results[m], task, "top1"), _paper(results, m, task), _get(results[m], task, "images")]
             for m in models],
            f"{name} top-1 on its {_classes(results, models, task, 200)} classes.")
    w.text("\n".join(_notes(results, task)) + "\n")


def bar_decimals(values) -> int:
    """Decimals of a panel's bar labels: three significant digits of its largest value, at least one
    (0.34 and 0.24 M parameters both read "0.2" with one; 80.5 % keeps one, 8.63 % gets two)."""
    largest = max((abs(v) for v in values if v is not None and math.isfinite(v)), default=0.0)
    return 1 if largest == 0 else min(3, max(1, 2 - math.floor(math.log10(largest))))


def _chance(results, models, task: str) -> Optional[float]:
    """A score a guess gets on ``task`` in this run, in percent, where every model's result says the
    same: top-1 over its ``classes`` (ImageNet-A, -R), or ImageNet-O's AUPR (the share of positives);
    None where unknown or different between the models."""
    found = set()
    for m in models:
        r = results[m].get(task)
        if not isinstance(r, dict) or "unavailable" in r:
            continue
        if task == "imagenet-o":
            out, inside = r.get("out_images"), r.get("in_images")
            found.add(100.0 * out / (out + inside) if out and inside else None)
        else:
            classes = r.get("classes")
            found.add(100.0 / classes if isinstance(classes, int) and classes > 0 else None)
    return found.pop() if len(found) == 1 else None


def _bars(ax, labels, values, paper, title, ylabel, chance=None):
    xs = range(len(labels))
    heights = [v if v is not None else 0.0 for v in values]
    bars = ax.bar(xs, heights, color="#4C72B0",
                  label="measured" if any(p is not None for p in paper) else "_measured")  # named beside the paper's
    decimals = bar_decimals(values)
    for bar, v in zip(bars, values):
        if v is not None:
            ax.annotate(f"{v:.{decimals}f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    px = [x for x, p in zip(xs, paper) if p is not None]
    if px:
        ax.scatter(px, [p for p in paper if p is not None], marker="_", s=400, color="#C44E52", zorder=3,
                   label="paper")
    if chance is not None:  # where a guess lands: bars near it measured nothing (ImageNet-R at 10 classes)
        ax.axhline(chance, color="0.35", linestyle="--", linewidth=1, zorder=2, label=f"chance ({chance:.3g}%)")
    if px or chance is not None:
        ax.legend(fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(bottom=0)
    if ylabel.endswith("(%)"):  # top-1, AUPR: percentages (all 0 gave a bar axis 0..0.055)
        from lkfast.analysis.plots import set_accuracy_ylim

        set_accuracy_ylim(ax)
    low, high = ax.get_ylim()
    tallest = max((v for v in values if v is not None and math.isfinite(v)), default=low)
    ax.set_ylim(low, max(high, tallest + 0.1 * (high - low)))  # the tallest bar's label under the frame, not on it
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)


def _figure(path: Path, panels) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        _bars(ax, *panel)
    fig.tight_layout()
    try:
        save_figure_atomic(fig, path)
    finally:
        plt.close(fig)


REPORT_FILES = ".report-files.json"  # what the last report wrote under tables/ and figures/


def write_report(out, results: Dict[str, Any]) -> Path:
    """Write ``out/report.md`` with tables under ``out/tables/`` and figures under ``out/figures/``
    from a results dict (the content of results.json). Sections follow the paper's order; a task no
    model ran is left out, a task a model could not run is listed with the reason. Tables and
    figures an earlier report wrote into ``out`` and this one does not are removed (other files
    there are left alone), so every file in those folders belongs to this report."""
    out = Path(out)
    manifest = out / REPORT_FILES
    try:
        for name in json.loads(manifest.read_text()):  # the last report's own files: this one writes anew
            (out / name).unlink(missing_ok=True)
    except (OSError, ValueError):
        pass
    before = _report_files(out)
    path = _write_report(out, _read_older(results))
    # this report's files: new ones, and those it wrote again (a report killed before it wrote the
    # manifest left them; counted as the user's, a later report would have kept them as if current)
    written = {name for name, stamp in _report_files(out).items() if before.get(name) != stamp}
    write_text_atomic(manifest, json.dumps(sorted(written)))
    return path


def _read_older(results: Dict[str, Any]) -> Dict[str, Any]:
    """``results`` with what older versions stored under other names renamed as today's (a copy where
    any is): ImageNet-P results before version 5 kept the unnormalised flip probabilities under
    ``fr`` / ``mean_fr_unnormalised``, today's ``fp`` / ``mean_fp`` (``fr`` is now the flip rate,
    normalised by a baseline, as the benchmark names it)."""
    older = [m for m in _models(results) if isinstance(results[m].get("imagenet-p"), dict)
             and "fp" not in results[m]["imagenet-p"] and "fr" in results[m]["imagenet-p"]]
    if not older:
        return results
    results = dict(results)
    for m in older:
        p = dict(results[m]["imagenet-p"])
        p["fp"], p["mean_fp"] = p.pop("fr"), p.pop("mean_fr_unnormalised", None)
        results[m] = dict(results[m], **{"imagenet-p": p})
    return results


def _report_files(out: Path) -> dict:
    """{path relative to ``out``: (inode, modification time)} of every file under tables/ and figures/."""
    found = {}
    for folder in ("tables", "figures"):
        for f in (out / folder).rglob("*") if (out / folder).is_dir() else ():
            try:
                st = f.stat()
            except OSError:
                continue
            if f.is_file():
                found[str(f.relative_to(out))] = (st.st_ino, st.st_mtime_ns)
    return found


def _images_chosen(options: Dict[str, Any], results: Dict[str, Any], models: List[str]) -> str:
    """The lines saying that a run read only part of each dataset (--limit / --subset) or of val for
    the analyses (--analysis-images), or ""; for --subset with the clean set evaluated, how far a
    top-1 over that many images may be from the whole set's (95% binomial interval at 50%, the widest)."""
    lines = [line for line in (_datasets_chosen(options, results, models), _analysis_images(options)) if line]
    return "\n\n".join(f"**{line}**" for line in lines)


def _analysis_images(options: Dict[str, Any]) -> str:
    n = options.get("analysis_images")
    return "" if n is None else (f"The per-image analyses (occlusion, FGSM, PGD, TAIG, lesion, frequency) read at most "
                                 f"{n} val images, spread evenly over it (--analysis-images {n}).")


SAMPLING_NOTE_POINTS = 1.0  # a 95% interval this wide or wider (about 9,600 images or fewer) is said at the top


def _fewest_clean_images(results: Dict[str, Any], models: List[str]) -> Optional[int]:
    """The smallest clean-set image count of the models, or None where no model says one."""
    counts = [_get(results[m], "clean", "images") for m in models]
    return min((int(c) for c in counts if c is not None and c > 0), default=None)


def _top1_margin(images: int) -> float:
    """Half-width in points of the 95% binomial interval of a top-1 over ``images`` at 50%, the widest."""
    return 196 * math.sqrt(0.25 / images)


def _sampling_line(results: Dict[str, Any], models: List[str]) -> str:
    """A line on how far a top-1 over the clean set's images may be from the one the same model would get on
    all such images (``_top1_margin``), where that is at least SAMPLING_NOTE_POINTS: on the default's 200
    images about ±6.9 points, so models a few points apart are not told apart."""
    fewest = _fewest_clean_images(results, models)
    if fewest is None or _top1_margin(fewest) < SAMPLING_NOTE_POINTS:
        return ""
    return (f"**Sampling error**: a top-1 over {fewest} images is within about ±{_top1_margin(fewest):.1f} points of "
            f"what the model would score on all such images (95% binomial interval at 50%); differences between "
            f"models smaller than that are not resolved by this data.")


def _datasets_chosen(options: Dict[str, Any], results: Dict[str, Any], models: List[str]) -> str:
    n = options.get("limit")
    if n is None:
        return ""
    if options.get("spread"):
        fewest = _fewest_clean_images(results, models)
        margin = (f" (a top-1 over {fewest} images is within about ±{_top1_margin(fewest):.1f} "
                  f"points of the whole set's, 95% binomial interval at 50%)") if fewest else ""
        return (f"At most {n} images of each dataset (--subset {n}), spread evenly over its sorted order: "
                f"estimates of the whole sets' numbers{margin}, to be compared with the paper's with that in mind.")
    return (f"Only the first {n} images of each dataset in sorted order (--limit {n}), i.e. its first classes: "
            f"a smoke test, not comparable with the paper's numbers.")


def _write_report(out: Path, results: Dict[str, Any]) -> Path:
    w = _Writer(out)
    meta = results.get(META_KEY, {})
    models = _models(results)
    w.text("# lkfast robustness report\n\n"
           f"Models: {', '.join(models) or 'none'}. Run on {meta.get('device', '?')} ({meta.get('device_name', '')}), "
           f"{meta.get('world_size', 1)} process(es), started {meta.get('started', '?')}, "
           + (f"finished {meta['finished']}" if meta.get("finished") else
              "**not finished** (interrupted: this report holds the tasks that had finished; rerunning the "
              "run's command goes on from there and writes the whole report)")
           + f"; lkfast {meta.get('lkfast', '?')}"
           + (f" (commit {meta['lkfast_commit']})" if meta.get("lkfast_commit") else "")
           + f", torch {meta.get('torch', '?')}. "
           f"Options: {json.dumps(meta.get('options', {}), sort_keys=True)}. Class space: {meta.get('class_space', '?')}.\n\n"
           f"Paper values are from {CITATION} (Tables 1 to 6), shown beside the measured value for the "
           f"models the paper reports; \"—\" means not measured or not reported.\n")
    if not meta.get("class_space_is_imagenet", True):
        w.text(f"\n**Not ImageNet-1k**: every number here is over the class space \"{meta.get('class_space', '?')}\" "
               "(the paper's values are not shown beside them)"
               + (f". {meta['class_space_about']}" if meta.get("class_space_about") else ".") + "\n")
    chosen = _images_chosen(meta.get("options", {}), results, models) or _sampling_line(results, models)
    if chosen:  # (--subset's line says the sampling error already)
        w.text(f"\n{chosen}\n")
    far = _far_from_paper(results, models)
    if far:
        w.text("\n**Clean top-1 far from the paper's**: " + "; ".join(far) + ". The paper's values beside these "
               "models are for its checkpoints: these may be other weights (e.g. ImageNet-1K only where the "
               "paper used ImageNet-22K pre-training), another input size, or other validation data; read "
               "their other columns against the paper's with that in mind.\n")
    untrained = [m for m in models if results[m].get("_model", {}).get("weights") == RANDOM_WEIGHTS]
    if untrained:
        w.text(f"\n**Random weights**: {', '.join(untrained)} had no checkpoint and were evaluated untrained "
               "(no paper values beside them); pass NAME:CHECKPOINT to --models, or --pretrained for timm's published "
               "weights, to evaluate trained weights.\n")

    _model_card(w, out, results, models)

    # Table 6 layout: ImageNet, -A, -R, -C (severity 5).
    if any(_has(results, t) for t in ("clean", "imagenet-a", "imagenet-r", "imagenet-c")):
        rows = []
        for m in models:
            e = results[m]
            rows.append([m, _get(e, "clean", "top1"), _paper(results, m, "clean"), _get(e, "imagenet-a", "top1"),
                         _paper(results, m, "imagenet-a"), _get(e, "imagenet-r", "top1"), _paper(results, m, "imagenet-r"),
                         _get(e, "imagenet-c", "sev5_top1"), _paper(results, m, "c_sev5")])
        w.text("\n## Summary (the layout of Table 6)\n")
        w.table("summary", ["Model", "ImageNet", "paper", "ImageNet-A", "paper", "ImageNet-R", "paper",
                            "ImageNet-C sev. 5", "paper"], rows,
                "Top-1 (%). ImageNet-C: mean top-1 over the corruptions present at severity 5 (the paper: all 19).")

    # Figure 2 (a: A top-1, b: C severity-5 mean top-1, c: O AUPR) and Figure 3 (R top-1).
    panels = []
    if _has(results, "imagenet-a"):
        panels.append((models, [_get(results[m], "imagenet-a", "top1") for m in models],
                       [_paper(results, m, "imagenet-a") for m in models], "(a) ImageNet-A", "top-1 (%)",
                       _chance(results, models, "imagenet-a")))
    if _has(results, "imagenet-c"):
        panels.append((models, [_get(results[m], "imagenet-c", "sev5_top1") for m in models],
                       [_paper(results, m, "c_sev5") for m in models], "(b) ImageNet-C, severity 5", "mean top-1 (%)"))
    if _has(results, "imagenet-o"):
        panels.append((models, [_get(results[m], "imagenet-o", "aupr") for m in models],
                       [_paper(results, m, "aupr") for m in models], "(c) ImageNet-O", "AUPR (%)",
                       _chance(results, models, "imagenet-o")))
    if panels:
        _figure(out / "figures" / "figure2.png", panels)
        marks = any(p is not None for panel in panels for p in panel[2])
        w.text("\n## Figure 2: ImageNet-A, ImageNet-C, ImageNet-O\n\n![Figure 2](figures/figure2.png)\n\n"
               "Higher is better." + (" Red marks: the paper's values (Table 6) where it reports the model." if marks
                                      else "") + " Dashed: chance (a guess's top-1; for ImageNet-O's AUPR the share of "
               "anomalies among the images scored).\n")
    if _has(results, "imagenet-a"):
        w.text("\n### ImageNet-A\n")
        _subset_top1(w, results, models, "imagenet-a")

    if _has(results, "imagenet-c"):
        w.text("\n## Table 1: ImageNet-C mCE\n")
        rows = [[m, _get(results[m], "imagenet-c", "mce"), _paper(results, m, "mce"),
                 _get(results[m], "imagenet-c", "relative_mce"), _over(results[m], "imagenet-c", "mce_over", 15),
                 _get(results[m], "imagenet-c", "mean_top1"),
                 _get(results[m], "imagenet-c", "sev5_top1")] for m in models]
        w.table("table1_mce", ["Model", "mCE (%)", "paper", "relative mCE (%)", "corruptions", "mean top-1 (%)",
                               "sev. 5 top-1 (%)"],
                rows, "Lower mCE is better; CE normalised by AlexNet's errors (Hendrycks & Dietterich 2019) on "
                      "ImageNet, by the baseline model's on another class space (see the notes below). "
                      "Corruptions: how many of the 15 the mCEs average (with fewer it is not the benchmark's mCE). "
                      "Mean top-1: over every corruption and severity present (the release: 19 x 5); sev. 5 top-1: "
                      "over the corruptions at severity 5 (the paper's Fig. 2b).")
        corruptions = sorted({c for m in models for c in (results[m].get("imagenet-c", {}).get("ce") or {})})
        if corruptions:
            w.table("imagenet_c_ce", ["Model"] + corruptions,
                    [[m] + [_get(results[m], "imagenet-c", f"ce.{c}") for c in corruptions] for m in models],
                    "Corruption error (%) per corruption.")
        top1 = {m: results[m].get("imagenet-c", {}).get("top1") or {} for m in models}
        named = sorted({c for m in models for c in top1[m]})
        if named:  # the measured numbers behind the means, with or without a baseline for CEs
            w.table("imagenet_c_top1", ["Model"] + named,
                    [[m] + [_level_mean(top1[m].get(c)) for c in named] for m in models],
                    "Top-1 (%) per corruption: the mean over its severities present.")
        w.text("\n".join(_notes(results, "imagenet-c")) + "\n")

    if _has(results, "imagenet-o"):
        w.text("\n## ImageNet-O (Figure 2c)\n")
        w.table("imagenet_o", ["Model", "AUPR (%)", "paper", "AUROC (%)", "FPR95 (%)"],
                [[m, _get(results[m], "imagenet-o", "aupr"), _paper(results, m, "aupr"),
                  _get(results[m], "imagenet-o", "auroc"), _get(results[m], "imagenet-o", "fpr95")] for m in models],
                "ImageNet-O images are the positives; score = -max softmax over the "
                f"{_classes(results, models, 'imagenet-o', 200)} ImageNet-O classes.")
        w.text("\n".join(_notes(results, "imagenet-o")) + "\n")

    if _has(results, "imagenet-p"):
        w.text("\n## Table 2: ImageNet-P mFR and mT5D\n")
        rows = [[m, _get(results[m], "imagenet-p", "mfr"), _paper(results, m, "mfr"), _get(results[m], "imagenet-p", "mt5d"),
                 _paper(results, m, "mt5d"), _over(results[m], "imagenet-p", "mfr_over", 10),
                 _get(results[m], "imagenet-p", "mean_fp"),
                 _get(results[m], "imagenet-p", "mean_t5d_unnormalised")] for m in models]
        w.table("table2_mfr_mt5d", ["Model", "mFR (%)", "paper", "mT5D (%)", "paper", "perturbations",
                                    "mean flip probability (%)", "mean T5D (unnormalised)"], rows,
                "Lower is better. mFR / mT5D are normalised by the baseline model's values on the same sequences "
                "(named in the notes; the paper's, by AlexNet's, are shown beside an AlexNet-normalised value only). "
                "Perturbations: how many of the 10 the means average (with fewer they are not the benchmark's).")
        from lkfast.metrics import IMAGENET_P

        scored = {p for m in models for p in (results[m].get("imagenet-p", {}).get("fp") or {})}
        # the 10 of mFR, then the release's validation perturbations (marked), each part alphabetical
        perturbations = sorted(p for p in scored if p in IMAGENET_P) + sorted(p for p in scored if p not in IMAGENET_P)
        if perturbations:
            w.table("imagenet_p_fp", ["Model"] + [p if p in IMAGENET_P else f"{p} (validation)" for p in perturbations],
                    [[m] + [_get(results[m], "imagenet-p", f"fp.{p}") for p in perturbations] for m in models],
                    "Flip probability (%) per perturbation, unnormalised (the benchmark's flip rate FR divides it by "
                    "the baseline's; FR per perturbation is results.json's fr where a baseline normalised).")
        w.text("\n".join(_notes(results, "imagenet-p")) + "\n")

    if _has(results, "imagenet-r"):
        w.text("\n## Figure 3: ImageNet-R\n")
        _figure(out / "figures" / "figure3.png", [(models, [_get(results[m], "imagenet-r", "top1") for m in models],
                                                   [_paper(results, m, "imagenet-r") for m in models],
                                                   "ImageNet-R", "top-1 (%)", _chance(results, models, "imagenet-r"))])
        w.text("\n![Figure 3](figures/figure3.png)\n")
        _subset_top1(w, results, models, "imagenet-r")

    if _has(results, "imagenet-9"):
        w.text("\n## Table 3: ImageNet-9\n")
        rows = []
        for m in models:
            row = [m]
            for key in ("original", "mixed_same", "mixed_rand"):
                row += [_get(results[m], "imagenet-9", f"top1.{key}"), _paper(results, m, key)]
            row += [_get(results[m], "imagenet-9", "bg_gap"), _paper(results, m, "bg_gap")]
            rows.append(row)
        w.table("table3_imagenet9", ["Model", "Origin", "paper", "Mixed-Same", "paper", "Mixed-Rand", "paper",
                                     "BG-Gap", "paper"], rows,
                "Top-1 (%) over the nine classes (a prediction outside them is wrong); BG-Gap = Mixed-Same - "
                "Mixed-Rand, lower is better (less reliance on the background).")
        w.text("\n".join(_notes(results, "imagenet-9")) + "\n")

    # Section 4: the analyses (Figures 4-10, Tables 4-5), when any ran.
    from lkfast.eval.analysis_tasks import write_analysis_report

    analysis_text = write_analysis_report(out, results)
    if analysis_text:
        w.text("\n" + analysis_text)
    if _has(results, "clean"):
        w.text("\n## Clean ImageNet\n" + "\n".join(_notes(results, "clean")) + "\n")
    missing = [f"- {m}: {t}: {results[m][t]['unavailable']}" for m in models for t in results[m]
               if isinstance(results[m][t], dict) and "unavailable" in results[m][t]]
    if missing:
        w.text("\n## Not run\n\n" + "\n".join(missing) + "\n")
    return write_text_atomic(out / "report.md", "\n".join(w.parts))


def _significant(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def _model_card(w: _Writer, out: Path, results: Dict[str, Any], models: List[str]) -> None:
    """Figure 1 (the paper's model configurations): each model's parameters and clean ImageNet
    top-1, from its ``_model`` card and ``clean`` result, as a figure and a table."""
    cards = {m: results[m].get("_model", {}) for m in models}
    millions = {m: cards[m]["parameters"] / 1e6 if isinstance(cards[m].get("parameters"), int) else None
                for m in models}
    top1 = {m: _get(results[m], "clean", "top1") for m in models}
    panels = []
    if any(v is not None for v in millions.values()):
        panels.append((models, [millions[m] for m in models], [None for _ in models], "(a) model size",
                       "parameters (M)"))
    if any(v is not None for v in top1.values()):
        panels.append((models, [top1[m] for m in models], [_paper(results, m, "clean") for m in models],
                       "(b) ImageNet", "top-1 (%)"))
    if not panels:
        return
    _figure(out / "figures" / "figure1.png", panels)
    w.text("\n## Figure 1: models\n\n![Figure 1](figures/figure1.png)\n")
    # three significant digits: the default set's models have a few million multiply-adds, the paper's billions
    giga_macs = {m: _significant(cards[m]["macs"] / 1e9) if isinstance(cards[m].get("macs"), int) else None
                 for m in models}
    w.table("model_card", ["Model", "architecture", "weights", "parameters (M)", "GMACs", "input size",
                           "ImageNet top-1 (%)", "paper"],
            [[m, cards[m].get("name"), cards[m].get("weights"), millions[m], giga_macs[m],
              "×".join(map(str, cards[m]["input_size"][-2:])) if cards[m].get("input_size") else None, top1[m],
              _paper(results, m, "clean")] for m in models],
            "Parameters as evaluated (re-parameterised or not, as loaded). GMACs: multiply-adds (10^9) of one "
            "forward pass at the input size, counted by torch.utils.flop_counter (convolutions, lkfast's "
            "depthwise op, matrix products, attention; not norms or activations): the \"FLOPs\" of the "
            "RepLKNet and timm model cards.")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m lkfast.eval.report OUT_DIR   (rebuilds OUT_DIR/report.md from OUT_DIR/results.json)",
              file=sys.stderr)
        return 2
    out = Path(argv[0])
    results = json.loads((out / "results.json").read_text())
    print(write_report(out, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
