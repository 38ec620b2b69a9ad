"""Plots moe-decode-history.csv (tests/gpu/cuda_kernel_bench, group moe, on the H200): the decode routed-expert
kernels (GroupedSwiGluLinear over w1/w3 and GroupedQuantizedLinear over w2, MXFP4, T tokens x 6 of 256 experts)
as a fraction of the device-to-device copy bandwidth measured in the same run, one series per kernel version
(runs s2..s13 of 2026-12-02 and s15 of 2026-12-03; a version measured in two runs appears twice). Writes moe-decode.png next to the CSV."""
import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

here = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
rows = list(csv.DictReader(open(here / "moe-decode-history.csv")))
series = list(dict.fromkeys((r["run"], r["version"]) for r in rows))
fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
for ax, op, title in zip(axes, ["grouped_w13_swiglu_mxfp4", "grouped_w2_mxfp4"], ["w1/w3 + SwiGLU", "w2"]):
    for run, version in series:
        points = sorted((int(r["tokens"]), 100 * float(r["frac_copy_bw"])) for r in rows
                        if r["run"] == run and r["version"] == version and r["op"] == op)
        if not points:
            continue
        kept = version in ("d0", "d1", "d1'", "d5", "d6", "d7")
        ax.plot([p[0] for p in points], [p[1] for p in points], "-o" if kept else ":x", markersize=4,
                label=f"{version} ({run})", alpha=1.0 if kept else 0.6)
    ax.axhline(60, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("decode tokens (x 6 experts)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
axes[0].set_ylabel("% of the copy bandwidth measured in the same run")
axes[1].legend(fontsize=7, ncol=2)
fig.suptitle("Decode routed experts (MXFP4 tensor-core unit), H200; dashed line: the 60% goal; dotted: dropped versions",
             fontsize=9)
fig.tight_layout()
fig.savefig(here / "moe-decode.png", dpi=120)
print("wrote", here / "moe-decode.png")
