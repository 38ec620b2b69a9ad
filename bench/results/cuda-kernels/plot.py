"""Plots kernels.csv from tests/gpu/cuda_kernel_bench: per op, the fraction of the run's own ceiling
(the larger of bytes/copy-bandwidth and FLOPs/cuBLAS-rate over the measured time) against tokens."""
import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

here = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
rows = list(csv.DictReader(open(here / "kernels.csv")))
ceil = next(csv.DictReader(open(here / "ceilings.csv")))
ops = [op for op in dict.fromkeys(r["op"] for r in rows) if any(int(r["tokens"]) > 0 for r in rows if r["op"] == op)]
fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6))
for op in ops:
    points = sorted((int(r["tokens"]), float(r["frac_of_floor"]), float(r["time_us"])) for r in rows if r["op"] == op)
    style = "-o" if op.startswith("gemm") else "--s"
    left.plot([p[0] for p in points], [100 * p[1] for p in points], style, label=op, markersize=4)
    right.plot([p[0] for p in points], [p[2] for p in points], style, label=op, markersize=4)
for ax in (left, right):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens in the step (8192 = prefill)")
    ax.grid(True, which="both", alpha=0.3)
left.set_ylabel("% of the floor time (max of bytes/BW, FLOPs/GEMM rate)")
left.set_ylim(0, 105)
right.set_yscale("log")
right.set_ylabel("time per launch (us, CUDA-graph replay median)")
right.legend(fontsize=7, ncol=2)
fig.suptitle(f"Tandem CUDA kernels, flash-layer shapes, {ceil['device']}: copy {float(ceil['copy_gbps']):.0f} GB/s, "
             f"cuBLASLt bf16 {float(ceil['gemm_bf16_tflops']):.0f} TFLOP/s (measured in the same run)")
fig.tight_layout()
fig.savefig(here / "kernels.png", dpi=120)
print("wrote", here / "kernels.png")
