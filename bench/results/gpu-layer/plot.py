#!/usr/bin/env python3
"""Plots the whole-layer GPU benchmark: our decode step (gpu_layer_bench) against the PyTorch eager step
(bench/gpu/torch_layer.py) from the same run, and where our step's time goes (the per-op profile).
   plot.py DIR   (reads DIR/gpu-layer.csv, DIR/torch-layer.csv, DIR/gpu-layer-profile.csv; writes DIR/*.png)"""
import csv
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def main(out):
    layer = read(os.path.join(out, "gpu-layer.csv"))
    ours = {(int(r["batch"]), int(r["context"])): float(r["ms"]) for r in layer if r["kind"] == "decode"}
    # --cuda-attention bf16 steps (runs from before it have none)
    bf16 = {(int(r["batch"]), int(r["context"])): float(r["ms"]) for r in layer if r["kind"] == "decode-attn-bf16"}
    torch_path = os.path.join(out, "torch-layer.csv")
    torch = {}
    if os.path.exists(torch_path):
        torch = {(int(r["batch"]), int(r["context"])): float(r["ms_per_step"]) for r in read(torch_path)
                 if r["ms_per_step"]}
    points = sorted(ours, key=lambda p: (p[1], p[0]))
    labels = [f"B={b}\nctx={c // 1024}k" for b, c in points]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    x = range(len(points))
    width = 0.27 if bf16 else 0.4
    ax.bar([i - width / 2 - (width / 2 if bf16 else 0) for i in x], [ours[p] for p in points], width, label="tandem CUDA")
    if bf16:
        ax.bar(list(x), [bf16.get(p, 0) for p in points], width, label="tandem CUDA, --cuda-attention bf16")
    if torch:
        ax.bar([i + width / 2 + (width / 2 if bf16 else 0) for i in x], [torch.get(p, 0) for p in points], width,
               label="PyTorch eager")
        for i, p in enumerate(points):
            if p in torch:
                ax.annotate(f"{torch[p] / ours[p]:.1f}x", (i, max(ours[p], torch[p])), ha="center", va="bottom")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels)
    ax.set_ylabel("ms per decode step (one V4-Flash layer)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Decode step of one V4-Flash layer on one H200 (speed-up over PyTorch eager above the bars)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "gpu-layer.png"), dpi=120)

    profile_path = os.path.join(out, "gpu-layer-profile.csv")
    if not os.path.exists(profile_path):
        return
    rows = [r for r in read(profile_path) if not r["batch"].startswith("prefill") and "(bf16 math)" not in r["op"]]
    ops = sorted({r["op"] for r in rows})
    keys = sorted({(int(r["batch"]), int(r["context"])) for r in rows}, key=lambda p: (p[1], p[0]))
    table = {(int(r["batch"]), int(r["context"]), r["op"]): float(r["ms_per_step"]) for r in rows}
    fig, ax = plt.subplots(figsize=(11, 5))
    bottom = [0.0] * len(keys)
    for op in ops:
        values = [table.get((b, c, op), 0.0) for b, c in keys]
        ax.bar(range(len(keys)), values, bottom=bottom, label=op)
        bottom = [a + v for a, v in zip(bottom, values)]
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"B={b}\nctx={c // 1024}k" for b, c in keys])
    ax.set_ylabel("ms per decode step")
    ax.set_title("Where a decode step's time goes (CUDA events between op groups)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "gpu-layer-profile.png"), dpi=120)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__)))
