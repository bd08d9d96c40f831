"""Turns a pytest-benchmark JSON of bench_depthwise.py into the README's table and figure.

    python benchmarks/report_depthwise.py benchmarks/results/depthwise_cpu.json
writes depthwise_cpu.md and depthwise_cpu.png beside the JSON.
"""
import json
import os
import sys

from lkfast.bench import SHAPE_SET_TITLES, dtype_label, shape_set_of, speedup, summarize
from lkfast.tables import write_text_atomic
from lkfast.timing import median


def load(path: str):
    data = json.load(open(path))
    rows, peak = [], float("nan")
    for b in data["benchmarks"]:
        info = b["extra_info"]
        if info.get("kind") == "matmul_peak":
            peak = info["flop"] / min(info.get("times") or [b["stats"]["min"]]) / 1e9
        elif info.get("kind") == "depthwise_round":
            for impl, times in info["times"].items():
                rows.append({"impl": impl, "passes": info["passes"], "shape": info["shape"],
                             "dtype": info.get("dtype", "float32"),  # (runs before dtypes were recorded: fp32)
                             "input_layout": info.get("input_layout", "channels_last"),
                             "seconds": median(times), "times": times, "flop": info["flop"]})
    return data, rows, peak


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({tuple(r["shape"]) for r in rows}, key=lambda s: -s[2])
    # lkfast given NCHW tensors (an NCHW model's calls) is compared with PyTorch on the same tensors
    nchw = rows[0]["input_layout"] == "nchw"
    baselines = ("pytorch_nchw",) if nchw else ("pytorch_nchw", "pytorch_channels_last")
    passes = ["forward", "forward+input_grad", "forward+input_grad+weight_grad"]
    fig, axes = plt.subplots(1, len(passes), figsize=(13, 3.8), sharey=True)
    for ax, p in zip(axes, passes):
        sel: dict = {}
        for r in rows:
            if r["passes"] == p:
                sel.setdefault(tuple(r["shape"]), {})[r["impl"]] = r
        xs = range(len(shapes))
        for offset, impl, color in ((-0.2, "lkfast_auto", "tab:blue"), (0.2, "lkfast_cpu", "tab:orange")):
            ratios = [speedup(sel[s], impl, baselines) if impl in sel.get(s, {}) else 0 for s in shapes]
            bars = ax.bar([x + offset for x in xs], ratios, width=0.4, color=color,
                          label={"lkfast_auto": "lkfast auto", "lkfast_cpu": "lkfast C++ kernel only"}[impl])
            ax.bar_label(bars, fmt="%.1f×", fontsize=7)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xticks(list(xs), [f"C{s[1]} {s[2]}²\nk{s[4]}" for s in shapes], fontsize=8)
        ax.set_title(p.replace("+", " + ").replace("_", " "), fontsize=9)
    axes[0].set_ylabel("speed-up vs PyTorch on the same NCHW tensors" if nchw else "speed-up vs PyTorch's faster layout")
    axes[0].legend(fontsize=8, loc="upper left")
    title = SHAPE_SET_TITLES[shape_set_of((s[1], s[2], s[4]) for s in shapes)]
    dtype = dtype_label(rows[0]["dtype"])
    given = ", lkfast given NCHW tensors" if nchw else ""
    fig.suptitle(f"Depthwise conv on this CPU, {dtype}, batch {shapes[0][0]} ({title}{given}); dashed = PyTorch",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(path: str) -> None:
    data, rows, peak = load(path)
    machine = data.get("machine_info", {})
    header = (f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
              f"{machine.get('cpu', {}).get('count', '?')} cores; run {data.get('datetime', '')[:19]}, "
              f"commit {data.get('commit_info', {}).get('id', '')[:8]}")
    base = os.path.splitext(path)[0]
    write_text_atomic(base + ".md", header + "\n\n" + summarize(rows, peak) + "\n")
    plot(rows, base + ".png")
    print(open(base + ".md").read())


if __name__ == "__main__":
    main(sys.argv[1])
