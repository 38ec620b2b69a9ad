#!/usr/bin/env python3
"""Markdown tables for a closing note from the GPU benchmarks' CSVs (the numbers as measured, nothing fitted).
   tables.py attention KERNELS_CSV        sparse attention per math / kernel: us, fraction of the run's copy
                                          bandwidth, speed-up over the f32 kernel of the same row
   tables.py layer DIR                    DIR/gpu-layer.csv (+ DIR/torch-layer.csv): decode step per batch and
                                          context (eager, graphs, bf16 attention) against PyTorch eager, then
                                          the prefill rows"""
import csv
import os
import sys


def read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def attention(path):
    rows = [r for r in read(path) if r["op"].startswith("sparse_attention")]
    ops = sorted({r["op"] for r in rows}, key=lambda o: (o != "sparse_attention", o))
    cell = {(r["op"], int(r["tokens"]), int(r.get("context") or 0)): r for r in rows}
    points = sorted({(int(r["tokens"]), int(r.get("context") or 0)) for r in rows}, key=lambda p: (p[0] == p[1], p[1], p[0]))
    print("| tokens | context | " + " | ".join(ops) + " |")
    print("|---|---|" + "---|" * len(ops))
    for tokens, context in points:
        base = cell.get(("sparse_attention", tokens, context))
        out = []
        for op in ops:
            r = cell.get((op, tokens, context))
            if not r:
                out.append("-")
                continue
            us, frac = float(r["time_us"]), float(r["frac_copy_bw"])
            speed = f", {float(base['time_us']) / us:.2f}x" if base and op != "sparse_attention" else ""
            out.append(f"{us:.1f} us ({100 * frac:.1f}% BW{speed})")
        kind = "prefill" if tokens == context else f"{context // 1024}k"
        print(f"| {tokens} | {kind} | " + " | ".join(out) + " |")


def layer(directory):
    rows = read(os.path.join(directory, "gpu-layer.csv"))
    ms = {(r["kind"], int(r["batch"]), int(r["context"])): float(r["ms"]) for r in rows}
    frac = {(r["kind"], int(r["batch"]), int(r["context"])): float(r["fraction_of_copy_bw"]) for r in rows}
    torch_path = os.path.join(directory, "torch-layer.csv")
    torch = {}
    if os.path.exists(torch_path):
        torch = {(int(r["batch"]), int(r["context"])): float(r["ms_per_step"]) for r in read(torch_path) if r["ms_per_step"]}
    points = sorted({(b, c) for k, b, c in ms if k == "decode"}, key=lambda p: (p[1], p[0]))
    print("| batch | context | eager ms | graphs ms | bf16 attention ms | PyTorch ms | speed-up eager (graphs, bf16 attn) | "
          "fraction of copy BW |")
    print("|---|---|---|---|---|---|---|---|")
    fmt = lambda v: f"{v:.3f}" if v is not None else "-"
    for b, c in points:
        eager, graphs, bf16 = ms.get(("decode", b, c)), ms.get(("decode-graphs", b, c)), ms.get(("decode-attn-bf16", b, c))
        t = torch.get((b, c))
        ratios = "-"
        if t:
            extra = ", ".join(f"{t / v:.1f}x" for v in (graphs, bf16) if v)
            ratios = f"{t / eager:.1f}x" + (f" ({extra})" if extra else "")
        print(f"| {b} | {c // 1024}k | {fmt(eager)} | {fmt(graphs)} | {fmt(bf16)} | {fmt(t)} | {ratios} | "
              f"{frac.get(('decode', b, c), 0):.2f} |")
    for r in rows:
        if r["kind"].startswith("prefill"):
            print(f"\n{r['kind']}: {int(r['tokens'])} tokens in {float(r['ms']):.2f} ms ({float(r['tokens_per_s']) / 1e3:.0f}k tokens/s)",
                  end="")
    print()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("attention", "layer"):
        sys.exit(__doc__)
    attention(sys.argv[2]) if sys.argv[1] == "attention" else layer(sys.argv[2])
