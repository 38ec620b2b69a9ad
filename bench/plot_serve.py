"""Plots tandem-bench serve output: serve.csv -> serve.png.

Usage: plot_serve.py CSV PNG

Left: output tokens/s against concurrency, each point labelled with its requests/s. Right: TTFT and ITL p50 and p99 (ms, log
scale) against concurrency. Levels with errors are marked with their count; an empty cell (nothing
completed) draws no point.
"""

import csv
import sys

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit("plot_serve.py: matplotlib is missing; install it into the project venv (.venv/bin/pip install matplotlib)")


def number(row, key):
    return float(row[key]) if row.get(key) else None


def series(rows, key):
    """(concurrency, value) pairs where the value was measured."""
    points = [(int(r["concurrency"]), number(r, key)) for r in rows]
    return [c for c, v in points if v is not None], [v for c, v in points if v is not None]


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1], newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: int(r["concurrency"]))
    if not rows:
        sys.exit(f"plot_serve.py: {sys.argv[1]} has no rows")
    levels = [int(r["concurrency"]) for r in rows]

    fig, (ax_rate, ax_lat) = plt.subplots(1, 2, figsize=(12, 4.5))
    # Requests/s label the points: with fixed-length outputs it is tokens/s over a constant, and a
    # second curve would only hide the first.
    x, y = series(rows, "output_tokens_per_s")
    ax_rate.plot(x, y, "o-", color="#4c72b0")
    for r in rows:
        if number(r, "output_tokens_per_s"):
            ax_rate.annotate(f"{float(r['request_throughput']):.3g} req/s", (int(r["concurrency"]), number(r, "output_tokens_per_s")),
                             textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7)
    ax_rate.set_ylabel("output tokens/s")
    ax_rate.set_ylim(bottom=0, top=max(y, default=1) * 1.15)
    ax_rate.set_title("throughput (labels: requests/s)")

    for key, label, style, color in [("ttft_p50_ms", "TTFT p50", "o-", "#55a868"), ("ttft_p99_ms", "TTFT p99", "o:", "#55a868"),
                                     ("itl_p50_ms", "ITL p50", "s-", "#c44e52"), ("itl_p99_ms", "ITL p99", "s:", "#c44e52")]:
        x, y = series(rows, key)
        ax_lat.plot(x, y, style, color=color, label=label)
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("ms (log)")
    ax_lat.set_title("latency, client side")
    ax_lat.legend(fontsize=8)

    for ax in (ax_rate, ax_lat):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels)
        ax.set_xticklabels([str(c) for c in levels])
        ax.set_xlabel("concurrent streams")
        ax.grid(alpha=0.3, which="both")
    for r in rows:
        if int(r["errors"]) > 0:
            ax_rate.annotate(f"{r['errors']} errors", (int(r["concurrency"]), 0), textcoords="offset points",
                             xytext=(0, 8), ha="center", fontsize=7, color="red")
    fig.suptitle("tandem-bench serve (closed loop)")
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=90)


if __name__ == "__main__":
    main()
