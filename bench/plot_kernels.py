"""Plots tandem-bench kernels output: kernels-cpu.csv -> kernels-cpu.png.

Usage: plot_kernels.py CSV PNG

One row of panels per model config: milliseconds per call (log scale) and GFLOP/s, one bar per
token count M for every (op, mode). Hatched bars ran once (over the per-call limit); a missing bar
was skipped.
"""

import csv
import sys
from collections import OrderedDict

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit("plot_kernels.py: matplotlib is missing; install it into the project venv (.venv/bin/pip install matplotlib)")

COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]
ROW_HEIGHT = 0.3  # inches per (op, mode) label


def read(path):
    """config -> OrderedDict[(section, op, mode)] -> {tokens: row}, plus the token counts seen."""
    configs = OrderedDict()
    tokens = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            m = int(row["tokens"])
            if m not in tokens:
                tokens.append(m)
            ops = configs.setdefault(row["config"], OrderedDict())
            ops.setdefault((row["section"], row["op"], row["mode"]), {})[m] = row
    return configs, sorted(tokens)


def panel(ax, ops, tokens, field, log):
    labels = list(ops)
    width = 0.8 / len(tokens)
    for j, m in enumerate(tokens):
        ys, xs, hatches = [], [], []
        for i, key in enumerate(labels):
            row = ops[key].get(m)
            if row and row["note"].startswith("skip") and field == "ms":
                ax.text(0.002, i + (j - (len(tokens) - 1) / 2) * width, f"M={m} skipped", fontsize=6,
                        color="0.4", va="center", transform=ax.get_yaxis_transform())
            if not row or not row[field] or float(row[field]) <= 0:
                continue
            ys.append(i + (j - (len(tokens) - 1) / 2) * width)
            xs.append(float(row[field]))
            hatches.append("//" if row["note"].startswith("over") else "")
        bars = ax.barh(ys, xs, height=width, color=COLORS[j % len(COLORS)], label=f"M={m}")
        for bar, hatch in zip(bars, hatches):
            bar.set_hatch(hatch)
    # Section boundaries.
    for i in range(1, len(labels)):
        if labels[i][0] != labels[i - 1][0]:
            ax.axhline(i - 0.5, color="0.6", linewidth=0.8)
    ax.set_yticks(range(len(labels)))
    ax.set_ylim(len(labels) - 0.5, -0.5)
    if log:
        ax.set_xscale("log")
    ax.grid(axis="x", which="both", alpha=0.3)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    configs, tokens = read(sys.argv[1])
    if not configs:
        sys.exit(f"plot_kernels.py: {sys.argv[1]} has no rows")
    heights = [max(3, len(ops) * ROW_HEIGHT) for ops in configs.values()]
    fig, axes = plt.subplots(len(configs), 2, figsize=(18, sum(heights) + 1.5), squeeze=False,
                             gridspec_kw={"height_ratios": heights, "width_ratios": [1.15, 1]})
    for (config, ops), (ax_ms, ax_gf) in zip(configs.items(), axes):
        panel(ax_ms, ops, tokens, "ms", log=True)
        panel(ax_gf, ops, tokens, "gflops", log=True)
        ax_ms.set_yticklabels([f"{op} [{mode}]" for _, op, mode in ops], fontsize=8)
        ax_gf.set_yticklabels([])
        ax_ms.set_title(f"{config}: ms per call (log)")
        ax_gf.set_title(f"{config}: GFLOP/s (log)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=len(labels), fontsize=9)
    fig.suptitle("tandem-bench kernels --device cpu (hatched: one run over the time limit; no bar: skipped)")
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(sys.argv[2], dpi=90)


if __name__ == "__main__":
    main()
