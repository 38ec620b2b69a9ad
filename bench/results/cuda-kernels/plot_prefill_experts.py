"""Plots prefill-experts-history.csv (tests/gpu/cuda_kernel_bench, group prefill_experts, one run per kernel
version on the H200): the prefill routed-expert GEMMs (8192 tokens x 6 experts, w1/w3 stacked and w2) as a
fraction of the cuBLASLt bf16 GEMM rate measured in the same run, for the fused warpgroup-MMA kernel and the
per-expert cuBLASLt lanes it replaces, with x in one bf16 pass and as a hi + lo pair (split). Writes
prefill-experts.png next to the CSV."""
import csv
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

here = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
rows = list(csv.DictReader(open(here / "prefill-experts-history.csv")))
versions = list(dict.fromkeys(r["version"] for r in rows))
ops = list(dict.fromkeys(r["op"] for r in rows))
fig, (left, right) = plt.subplots(1, 2, figsize=(15, 10))
for op in ops:
    points = [next(r for r in rows if r["version"] == v and r["op"] == op) for v in versions]
    style = "-o" if "fused" in op else "--s"
    label = op.replace("prefill_", "").replace("_mxfp4", "")
    left.plot(versions, [100 * float(r["frac_gemm_rate"]) for r in points], style, label=label, markersize=5)
    right.plot(versions, [float(r["time_us"]) / 1e3 for r in points], style, label=label, markersize=5)
left.set_ylabel("% of the cuBLASLt bf16 rate (same run; split: math FLOPs once)")
left.set_ylim(0, 70)
left.axhline(60, color="gray", linestyle=":", linewidth=1)
left.text(0, 61, "goal: 60%", fontsize=8, color="gray")
right.set_ylabel("ms per call")
for ax in (left, right):
    ax.set_xlabel("fused kernel version (the lanes rows are the same code each run)")
    ax.grid(True, alpha=0.3)
    ax.tick_params(axis="x", labelrotation=45)
right.legend(fontsize=8, ncol=2)
descriptions = "\n".join(textwrap.shorten(d, 150) for d in dict.fromkeys(r["description"] for r in rows))
fig.suptitle("Prefill routed experts (MXFP4, 8192 tokens x 6 of 256 experts), H200\n" + descriptions, fontsize=8)
fig.subplots_adjust(left=0.06, right=0.98, bottom=0.12, top=0.68, wspace=0.15)
fig.savefig(here / "prefill-experts.png", dpi=120)
print("wrote", here / "prefill-experts.png")
