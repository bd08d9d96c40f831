"""The paper's Figures 4-10 from the analysis results of several models, one PNG each (matplotlib Agg).

Every function takes ``{model label: result dict}`` (the dicts the analysis and attack functions
return, as stored in results.json) and a path, writes the PNG and returns the path.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import torch  # noqa: E402

from lkfast.analysis.kernels import channel_distances, paper_layers  # noqa: E402
from lkfast.tables import save_figure_atomic  # noqa: E402

MODE_TITLES = {"random": "(a) random drop", "salient": "(b) salient drop", "non_salient": "(c) non-salient drop"}


def _legend_beside(ax, *entries) -> None:
    """The legend to the right of the axes (of ``entries``, handles and labels, if given), for plots
    whose lines and bands fill them (Figs. 7 and 10: inside, it covered curves)."""
    ax.legend(*entries, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def _styles(labels, size: float = 5.0) -> dict:
    """Colour and marker per model (or family), the same in every panel (matplotlib's cycle restarts in
    each panel, so a model missing from one shifted the colours of those after it there); lines that lie
    on each other (two models at one accuracy) stay told apart by their markers."""
    return {label: {"color": f"C{i % 10}", "marker": MARKERS[i % len(MARKERS)], "markersize": size}
            for i, label in enumerate(dict.fromkeys(labels))}


def _shared_legend(axes, order, beside=None) -> None:
    """One legend for all ``axes``, its entries in ``order`` (the labels), beside ``beside`` (default:
    the last of the axes, the rightmost of a row): in a panel it covered lines (Figs. 4 and 6 of the
    default run), and one per panel said the same thing three times."""
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    entries = {label: handles[label] for label in order if label in handles}
    if entries:
        _legend_beside(axes[-1] if beside is None else beside, list(entries.values()), list(entries))


def _save(fig, path) -> Path:
    fig.tight_layout()
    try:
        return save_figure_atomic(fig, path)
    finally:
        plt.close(fig)


# An accuracy or drop axis whose values span less than this (in points) is flat: matplotlib would zoom
# into it (every value 0: -0.055..0.055), showing nothing about accuracy; it gets a readable range instead.
FLAT_SPAN = 1.0


def accuracy_ylim(low: float, high: float) -> Optional[tuple]:
    """The y-limits of an accuracy axis (percent, 0..100) whose plotted values lie in [low, high]:
    ``None`` (keep matplotlib's) when they span at least ``FLAT_SPAN`` points; else from 0 to 100
    when every value is 0, or to a few (5) points above the largest value."""
    if not (math.isfinite(low) and math.isfinite(high)) or high - low >= FLAT_SPAN:  # (inf, -inf): nothing plotted
        return None
    return (0.0, 100.0 if high <= 0 else high + 5.0)


def drop_ylim(low: float, high: float) -> Optional[tuple]:
    """The y-limits of a top-1 drop axis (points; negative when the top-1 rose) whose plotted values
    lie in [low, high]: ``None`` (keep matplotlib's) when they span at least ``FLAT_SPAN`` points;
    else 5 points beyond both 0 and the values (every drop 0: -5..5), so 0 and either sign show."""
    if not (math.isfinite(low) and math.isfinite(high)) or high - low >= FLAT_SPAN:
        return None
    return (min(low, 0.0) - 5.0, max(high, 0.0) + 5.0)


def _set_ylim(axes, rule) -> None:
    """``rule``'s limits for ``axes``: one, or panels that share one y-axis, from what all of them plot
    (one panel's flat values are not the figure's)."""
    limits = rule(min(float(ax.dataLim.y0) for ax in axes), max(float(ax.dataLim.y1) for ax in axes))
    if limits is not None:
        axes[0].set_ylim(*limits)


def set_accuracy_ylim(ax) -> None:
    """Give ``ax`` (an accuracy axis, drawn) the limits of ``accuracy_ylim`` for what it plots."""
    _set_ylim([ax], accuracy_ylim)


def set_drop_ylim(ax) -> None:
    """Give ``ax`` (a top-1 drop axis, drawn) the limits of ``drop_ylim`` for what it plots."""
    _set_ylim([ax], drop_ylim)


def _check(results: Mapping, figure: str) -> None:
    if not results:
        raise ValueError(f"{figure}: no model results to plot")


def plot_occlusion(results: Mapping[str, dict], path) -> Path:
    """Fig. 4: top-1 drop (clean top-1 minus top-1 with the patches dropped, in points, as the
    paper's caption reports it) against the information loss ratio, one panel per occlusion type,
    one line per model."""
    _check(results, "plot_occlusion")
    modes = [m for m in MODE_TITLES if any(m in r["top1"] for r in results.values())]
    styles = _styles(results)
    # one y-range: the panels are read against each other (salient against random drop)
    fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 3.6), squeeze=False, sharey=True)
    for ax, mode in zip(axes[0], modes):
        for label, r in results.items():
            if mode in r["top1"]:
                drop = [r["clean_top1"] - top1 for top1 in r["top1"][mode]]
                ax.plot([100 * q for q in r["ratios"]], drop, label=label, **styles[label])
        ax.set(title=MODE_TITLES[mode], xlabel="information loss (%)", ylabel="top-1 drop (points)")
        ax.grid(alpha=0.3)
    _set_ylim(axes[0], drop_ylim)
    _shared_legend(axes[0], styles)
    return _save(fig, path)


def plot_occlusion_examples(image, masks: Mapping[str, object], path, patch_size: int = 16) -> Path:
    """Fig. 5: one image (C, H, W in [0, 1]) and its occluded versions, ``masks``: title -> patch mask
    (rows, cols) of dropped patches."""
    from lkfast.analysis.occlusion import occlude

    fig, axes = plt.subplots(1, 1 + len(masks), figsize=(3 * (1 + len(masks)), 3.5), squeeze=False)
    panels = [("original", image)] + [(t, occlude(image[None], m[None], patch_size)[0]) for t, m in masks.items()]
    for ax, (title, picture) in zip(axes[0], panels):
        ax.imshow(picture.detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy())
        ax.set_title(title, fontsize=11)
        ax.axis("off")
    return _save(fig, path)


def plot_attacks(fgsm: Mapping[str, dict], pgd: Mapping[str, dict], path) -> Path:
    """Fig. 6: (a) FGSM top-1 over eps, (b) PGD over eps at fixed steps, (c) PGD over steps at fixed eps,
    each line starting at the model's clean top-1 (eps 0, 0 steps) and the panels on one y-range;
    only the panels of the attacks that ran (FGSM without PGD is one panel, not two empty ones)."""
    _check({**fgsm, **pgd}, "plot_attacks")
    any_pgd = next(iter(pgd.values()), None)
    def clean(r, x, top1):  # each line from the model's clean top-1 (no attack: eps 0, 0 steps), where known
        known = isinstance(r.get("clean_top1"), (int, float))
        return ([0] + list(x), [r["clean_top1"]] + list(top1)) if known else (x, top1)

    panels = []  # (title, x label, [(model label, x, top-1)])
    if fgsm:
        panels.append(("(a) FGSM", "perturbation budget ε (pixels in [0, 1])",
                       [(k, *clean(r, r["eps"], r["top1"])) for k, r in fgsm.items()]))
    if pgd:
        panels.append((f"(b) PGD, {any_pgd['num_steps']} steps", "perturbation budget ε (pixels in [0, 1])",
                       [(k, *clean(r, r["eps"], r["top1"])) for k, r in pgd.items()]))
        panels.append((f"(c) PGD, ε = {any_pgd['steps_eps']}", "attack steps",
                       [(k, *clean(r, r["steps"], r["steps_top1"])) for k, r in pgd.items()]))
    styles = _styles([*fgsm, *pgd])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False, sharey=True)
    for ax, (title, xlabel, lines) in zip(axes[0], panels):
        for label, x, top1 in lines:
            ax.plot(x, top1, label=label, **styles[label])
        ax.set(title=title, xlabel=xlabel, ylabel="top-1 accuracy (%)")
        ax.grid(alpha=0.3)
    _set_ylim(axes[0], accuracy_ylim)
    _shared_legend(axes[0], styles)
    return _save(fig, path)


def plot_lesion(results: Mapping[str, dict], path) -> Path:
    """Fig. 7: mean top-1 (line) with the min/max over draws, against the fraction of blocks removed: a
    band for a model measured at three or more counts, bars at its points for one measured at one or two
    (a band from the clean top-1 to one count is drawn between points never measured, and several of
    them covered each other)."""
    _check(results, "plot_lesion")
    styles = _styles(results)
    fig, ax = plt.subplots(figsize=(7.0, 3.8))
    span = max((f for r in results.values() for f in r["fraction"]), default=1.0) or 1.0
    barred = [label for label, r in results.items() if len(r["fraction"]) < 3]
    for label, r in results.items():
        # models with bars at one x side by side (moved by up to 1.5% of the axis each) rather than on each other
        shift = (barred.index(label) - (len(barred) - 1) / 2) * 0.015 * span if label in barred else 0.0
        x = [0.0] + [f + shift for f in r["fraction"]]
        line, = ax.plot(x, [r["clean_top1"]] + r["mean"], label=label, **styles[label])
        if len(r["fraction"]) >= 3:
            ax.fill_between(x, [r["clean_top1"]] + r["min"], [r["clean_top1"]] + r["max"], color=line.get_color(),
                            alpha=0.15)
        else:
            below = [max(m - lo, 0.0) for m, lo in zip(r["mean"], r["min"])]  # (a mean of equal draws can round
            above = [max(hi - m, 0.0) for m, hi in zip(r["mean"], r["max"])]  # a last bit past them: not negative)
            ax.errorbar(x[1:], r["mean"], yerr=[below, above], fmt="none", ecolor=line.get_color(), capsize=4,
                        elinewidth=1.2)
    ax.set(xlabel="proportion of blocks removed", ylabel="top-1 accuracy (%)", title="Lesion study")
    set_accuracy_ylim(ax)
    ax.grid(alpha=0.3)
    _legend_beside(ax)
    return _save(fig, path)


def plot_frequency(results: Mapping[str, dict], path) -> Path:
    """Fig. 8: top-1 drop against the noise band's centre frequency (units of pi)."""
    _check(results, "plot_frequency")
    styles = _styles(results)
    fig, ax = plt.subplots(figsize=(7.0, 3.8))  # as Figs. 7 and 10: room for the legend beside
    for label, r in results.items():
        ax.plot(r["frequencies_over_pi"], r["drop"], label=label, **styles[label])
    ax.set(xlabel="noise frequency (×π)", ylabel="top-1 drop (points)", title="Robustness to noise frequency")
    set_drop_ylim(ax)
    ax.grid(alpha=0.3)
    _legend_beside(ax)
    return _save(fig, path)


def plot_kernel_distance(results: Mapping[str, dict], path, key: str = "normalized",
                         first_stage: Optional[int] = None, last_stage: Optional[int] = None) -> Path:
    """Fig. 9: sorted kernel attention distance against normalised channel index, for the first two
    layers of stage 1 and the last two of stage 3 (``kernels.paper_layers``); one panel per model.
    key: ``"normalized"`` (divided by the kernel's mass; dotted, the level of a kernel of equal |w| at
    every tap, which has no spatial preference, one per kernel size) or ``"distance"`` (the paper's sum)."""
    _check(results, "plot_kernel_distance")
    cols = len(results) if len(results) <= 3 else 2  # four side by side were 2200 px wide, legends unreadable
    rows = -(-len(results) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.8 * rows), squeeze=False,
                             sharey=key == "normalized")  # on one 0..1 scale the kernel sizes compare
    for ax in axes.flat[len(results):]:
        ax.axis("off")
    for ax, (label, r) in zip(axes.flat, results.items()):
        uniform = {}
        for layer in paper_layers(r, first_stage, last_stage):
            values = layer[key]
            n = len(values)
            line, = ax.plot([(i + 0.5) / n for i in range(n)], values, label=layer["name"])
            size = tuple(layer.get("kernel_size") or ())
            if key == "normalized" and len(size) == 2:
                uniform.setdefault(size, line.get_color())
        for (kh, kw), color in uniform.items():  # a kernel of equal |w| everywhere: no spatial preference
            level = float(channel_distances(torch.ones(1, kh, kw))[1][0])
            ax.axhline(level, color=color, linestyle=":", linewidth=1, label=f"uniform |w|, {kh}x{kw}")
        ax.set(title=label, xlabel="normalised channel index",
               ylabel="kernel attention distance" + (" / Σ|w| (0 centre, 1 corners)" if key == "normalized" else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_feature_variance(results: Mapping[str, dict], path) -> Path:
    """Fig. 10: normalised feature-map variance against normalised depth, one line per model."""
    _check(results, "plot_feature_variance")
    styles = _styles(results, 4.0)
    fig, ax = plt.subplots(figsize=(7.0, 3.8))
    for label, r in results.items():
        ax.plot(r["depth"], r["normalized"], label=label, **styles[label])
    ax.set(xlabel="normalised depth", ylabel="feature-map variance / the model's largest", title="Feature-map variance")
    ax.grid(alpha=0.3)
    _legend_beside(ax)
    return _save(fig, path)


# Table 7's short headers, written out on the figure beside Table 5's (one panel said "ImgN-A", the next "ImageNet-C")
PANEL_TITLES = {"ImgN": "ImageNet", "ImgN-A": "ImageNet-A", "ImgN-R": "ImageNet-R"}
# What each metric of the kernel-size ablation is, on its panel's y axis (higher is better for all of them)
ABLATION_YLABELS = {"top1": "top-1 (%)", "sev5_top1": "mean top-1 at severity 5 (%)", "aupr": "AUPR (%)",
                    "salient_drop_50": "top-1 change (points)", "change_at_0_7pi": "top-1 change (points)"}


def top1_interval(entry: Mapping[str, Any], task: str, key: str) -> Optional[float]:
    """Half the width (points) of the 95% interval of a top-1 (``key`` "top1") over the images its
    task scored (normal approximation, 1.96 sqrt(p (1 - p) / n)); None for other metrics and where
    the count is not known."""
    from lkfast.analysis.ablation import _value

    value, r = _value(entry, task, key), entry.get(task)
    images = r.get("images") if key == "top1" and isinstance(r, Mapping) else None
    if value is None or not isinstance(images, int) or isinstance(images, bool) or images <= 0:
        return None
    p = min(max(value / 100.0, 0.0), 1.0)
    return 196.0 * math.sqrt(p * (1 - p) / images)


def plot_ablation(results: Mapping[str, dict], families: Mapping[str, list], columns, path) -> Path:
    """Tables 5 and 7 as a figure: each metric against kernel size, one line per ablation family,
    a top-1 with its 95% interval over the images scored (``top1_interval``), so that a panel's
    own y range does not make sampling noise look like a trend.
    ``results``: label -> task -> metrics (results.json); ``families``: family -> [(kernel, label)]
    (``ablation.ablation_families``); ``columns``: (header, task, key) of the metrics to plot; a
    metric no member measured gets no panel."""
    from lkfast.analysis.ablation import _value

    if not families:
        raise ValueError("plot_ablation: no ablation family (a model measured at two or more kernel sizes)")
    unique = {(task, key): header for header, task, key in reversed(list(columns))}  # one panel per metric
    shown = [(header, task, key) for (task, key), header in reversed(list(unique.items()))
             if any(_value(results[label], task, key) is not None
                    for members in families.values() for _, label in members)]
    if not shown:
        raise ValueError("plot_ablation: none of the columns was measured for the families' models")
    styles = _styles(families)
    cols = min(4, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.1 * rows), squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    for ax, (header, task, key) in zip(axes.flat, shown):
        for family, members in families.items():
            points = [(k, _value(results[label], task, key), top1_interval(results[label], task, key))
                      for k, label in members]
            points = [p for p in points if p[1] is not None]
            if points:
                ks, vs = [k for k, _, _ in points], [v for _, v, _ in points]
                ax.plot(ks, vs, label=family, **styles[family])
                spread = [e if e is not None else 0.0 for _, _, e in points]
                if any(spread):
                    ax.errorbar(ks, vs, yerr=spread, fmt="none", capsize=3, ecolor=styles[family]["color"])
        kernels = sorted({k for members in families.values() for k, _ in members})
        ax.set_xscale("log")
        ax.set_xticks(kernels)
        ax.set_xticklabels([str(k) for k in kernels])
        ax.minorticks_off()
        ax.set(title=PANEL_TITLES.get(header, header), xlabel="kernel size", ylabel=ABLATION_YLABELS.get(key, ""))
        ax.grid(alpha=0.3)
    _shared_legend(list(axes.flat), styles, beside=axes[0][-1])
    return _save(fig, path)
