"""Plots kernels.csv from tests/gpu/cuda_kernel_bench: per op, the fraction of the run's own ceiling
(the larger of bytes/copy-bandwidth and FLOPs/cuBLAS-rate over the measured time) and the time against
tokens, one PNG per group: kernels.png (the layer ops: norms, RoPE, mHC, KV quantize, GEMMs),
kernels-attention.png, kernels-moe.png, kernels-head.png. Ops that depend on the context are one series
per context; series timed as plain launches (graph capture failed) are marked in the legend. Reads the
older CSVs too (no context or timing column)."""
import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

GROUPS = [
    ("kernels.png", "layer ops", ("rmsnorm", "rope", "mhc", "kv_quantize", "cast", "gemm", "dequant")),
    ("kernels-attention.png", "attention: sparse MQA, C4 indexer, compressors",
     ("sparse_attention", "indexer", "compressor")),
    ("kernels-moe.png", "MoE: route, group, expert GEMMs, SwiGLU, combine", ("moe_", "grouped_", "swiglu")),
    ("kernels-head.png", "output head: hc_head, argmax, sampling", ("hc_head", "argmax", "sample")),
]

here = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
rows = list(csv.DictReader(open(here / "kernels.csv")))
ceil = next(csv.DictReader(open(here / "ceilings.csv")))


def series_of(r):
    context = int(r.get("context") or 0)
    return r["op"] + (f" ctx {context}" if context > 0 else "")


def group_of(op):
    for name, _, prefixes in GROUPS:
        if op.startswith(prefixes):
            return name
    return "kernels-other.png"


series = {}
for r in rows:
    if int(r["tokens"]) <= 0:  # one-time ops (the wq_b dequantization) have no token axis
        continue
    series.setdefault(series_of(r), []).append(r)

titles = {name: title for name, title, _ in GROUPS}
titles["kernels-other.png"] = "other ops"
for png in dict.fromkeys(group_of(points[0]["op"]) for points in series.values()):
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6))
    for label, points in series.items():
        if group_of(points[0]["op"]) != png:
            continue
        points = sorted(points, key=lambda r: int(r["tokens"]))
        tokens = [int(r["tokens"]) for r in points]
        style = "-o" if points[0]["op"].startswith(("gemm", "grouped_")) else "--s"
        if any(r.get("timing", "graph") == "launches" for r in points):
            label += " (plain launches)"
        left.plot(tokens, [100 * float(r["frac_of_floor"]) for r in points], style, label=label, markersize=4)
        right.plot(tokens, [float(r["time_us"]) for r in points], style, label=label, markersize=4)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens in the step (8192 = prefill)")
        ax.grid(True, which="both", alpha=0.3)
    left.set_ylabel("% of the floor time (max of bytes/BW, FLOPs/GEMM rate)")
    left.set_ylim(0, 105)
    right.set_yscale("log")
    right.set_ylabel("time per launch (us, CUDA-graph replay median)")
    right.legend(fontsize=7, ncol=2)
    fig.suptitle(f"Tandem CUDA kernels, V4-Flash shapes, {titles[png]}; {ceil['device']}: copy "
                 f"{float(ceil['copy_gbps']):.0f} GB/s, cuBLASLt bf16 {float(ceil['gemm_bf16_tflops']):.0f} TFLOP/s "
                 "(measured in the same run)", fontsize=10)
    fig.tight_layout()
    fig.savefig(here / png, dpi=120)
    plt.close(fig)
    print("wrote", here / png)
