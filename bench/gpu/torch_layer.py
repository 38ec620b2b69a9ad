#!/usr/bin/env python3
"""Time a PyTorch eager decode step of one DSV4 C4 decoder layer, or check its math against tools/reference.

    python3 bench/gpu/torch_layer.py --model DIR --out results.csv          # GPU timing, flash-layer checkpoint
    python3 bench/gpu/torch_layer.py --synthetic --out results.csv          # same shapes, random weights
    python3 bench/gpu/torch_layer.py --check --model models/tiny            # CPU, f32 vs the float64 reference

The layer math is in dsv4_layer.py. Each timed step is the decode of position p = context - 1 for every row:
the window holds positions p-127..p, the token completes compressed chunk p // 4 (so the compressor pools and
emits, the costlier of the four steps of a chunk) and the indexer picks index_topk of the context // 4 entries.
"""
import argparse
import copy
import csv
import gc
import json
import math
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dsv4_layer  # noqa: E402

# The generator's "flash-layer" preset (common/model/generator.cc), for --synthetic.
FLASH_LAYER = {
    "hidden_size": 4096, "num_hidden_layers": 1, "compress_ratios": [4], "num_hash_layers": 0,
    "num_attention_heads": 64, "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024,
    "o_groups": 8, "o_lora_rank": 1024, "sliding_window": 128, "index_n_heads": 64, "index_head_dim": 128,
    "index_topk": 512, "n_routed_experts": 256, "num_experts_per_tok": 6, "moe_intermediate_size": 2048,
    "routed_scaling_factor": 1.5, "swiglu_limit": 10.0, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "compress_rope_theta": 160000.0,
    "rope_scaling": {"type": "yarn", "factor": 16.0, "beta_fast": 32.0, "beta_slow": 1.0,
                     "original_max_position_embeddings": 65536},
}


def load_config(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)


def first_c4_layer(cfg):
    """The first ratio-4 layer with learned gating (flash-layer: 0; tiny: 3)."""
    for i, ratio in enumerate(cfg["compress_ratios"][:cfg["num_hidden_layers"]]):
        if ratio == 4 and i >= cfg.get("num_hash_layers", 0):
            return i
    raise ValueError("the model has no ratio-4 layer with learned gating")


def random_caches(layer, batch, context, dtype, device, generator):
    """Caches of `batch` sequences that hold positions < context - 1, drawn from a seed."""
    cfg = layer.cfg
    entries = context // 4  # capacity: the step at p = context - 1 writes the last entry

    def randn(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    return dsv4_layer.DecodeCaches(
        window=randn(batch, layer.window, layer.hd, dtype=dtype),
        compressed=randn(batch, entries, layer.hd, dtype=dtype),
        index_keys=randn(batch, entries, layer.ihd, dtype=dtype),
        comp_kv=randn(batch, 8, 2 * layer.hd), comp_score=randn(batch, 8, 2 * layer.hd),
        index_kv=randn(batch, 8, 2 * layer.ihd), index_score=randn(batch, 8, 2 * layer.ihd))


def cache_bytes(layer, batch, context, dtype):
    size = torch.tensor([], dtype=dtype).element_size()
    return batch * (layer.window * layer.hd + context // 4 * (layer.hd + layer.ihd)) * size


def floor_ms(layer, batch, context, args):
    """The step's least time on this math (METHOD.md): weights in the compute dtype read once (dense ones and the
    routed experts the last step touched), the cache data it must read, at the given copy and GEMM rates."""
    size = torch.tensor([], dtype=layer.dtype).element_size()
    dense, expert = layer.dense_weight_elements()
    entries, chosen = context // 4, min(layer.topk, context // 4)
    cache_read = batch * (layer.window * layer.hd + entries * layer.ihd + chosen * layer.hd)
    moved = (dense + layer.active_experts * expert + cache_read) * size
    flops = 2 * batch * (dense + layer.k * expert + layer.nih * layer.ihd * entries
                         + 2 * layer.H * layer.hd * (layer.window + chosen))
    return max(moved / (args.copy_gbps * 1e9), flops / (args.gemm_tflops * 1e12)) * 1e3, moved


# ---------------------------------------------------------------- timing

def time_point(layer, batch, context, args, device):
    generator = torch.Generator(device=device).manual_seed(args.seed * 1000003 + batch * 7919 + context)
    caches = random_caches(layer, batch, context, layer.dtype, device, generator)
    # Several input sets so that repeated steps do not read one X from cache.
    inputs = [torch.randn(batch, layer.M, layer.D, generator=generator, device=device) for _ in range(4)]
    p = context - 1
    with torch.inference_mode():
        for i in range(args.warmup):
            layer.step(inputs[i % len(inputs)], p, caches)
        total, attn = [], []
        if device.type == "cuda":
            torch.cuda.synchronize()
            events = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(args.iters)]
            for i, (start, middle, end) in enumerate(events):
                start.record()
                layer.step(inputs[i % len(inputs)], p, caches, marks=middle.record)
                end.record()
            torch.cuda.synchronize()
            total = [s.elapsed_time(e) for s, _, e in events]
            attn = [s.elapsed_time(m) for s, m, _ in events]
        else:
            for i in range(args.iters):
                t0 = time.perf_counter()
                marks = []
                layer.step(inputs[i % len(inputs)], p, caches, marks=lambda: marks.append(time.perf_counter()))
                total.append((time.perf_counter() - t0) * 1e3)
                attn.append((marks[0] - t0) * 1e3)
    del caches, inputs
    return total, attn


def run_bench(args):
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[args.dtype]
    if args.synthetic:
        cfg = copy.deepcopy(FLASH_LAYER)
        source = dsv4_layer.RandomSource(cfg, device, args.seed)
        what = "random weights (flash-layer shapes)"
    else:
        cfg = load_config(args.model)
        source = dsv4_layer.CheckpointSource(args.model, device)
        what = args.model
    index = first_c4_layer(cfg) if args.layer is None else args.layer
    t0 = time.time()
    layer = dsv4_layer.DecodeLayer(cfg, source, index, device, dtype, max_position=max(args.contexts))
    del source
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"loaded layer {index} of {what} in {time.time() - t0:.1f} s ({args.dtype} weights)", flush=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            base = (f"{gpu}; torch {torch.__version__}; {args.dtype}; layer {index}; emit step p={context - 1}; "
                    f"topk {min(layer.topk, context // 4)} of {context // 4}; caches "
                    f"{cache_bytes(layer, batch, context, dtype) / 2**20:.1f} MiB")
            try:
                total, attn = time_point(layer, batch, context, args, device)
                failure = None
            except torch.cuda.OutOfMemoryError as error:
                failure = str(error).splitlines()[0]
            if failure is not None:  # outside the except block, so that its frames no longer hold the caches
                gc.collect()
                torch.cuda.empty_cache()
                rows.append((batch, context, "", f"skipped: out of memory ({failure}); {base}"))
                print(f"B={batch:4d} L={context:6d}  skipped (out of memory)", flush=True)
                continue
            median = statistics.median(total)
            floor, moved = floor_ms(layer, batch, context, args)
            notes = (f"floor {floor:.3f} ms ({moved / 1e9:.2f} GB incl. {layer.active_experts} routed experts, at "
                     f"{args.copy_gbps:.0f} GB/s, {args.gemm_tflops:.0f} TFLOP/s); "
                     f"median of {len(total)} after {args.warmup} warmup; mean {statistics.mean(total):.3f} "
                     f"min {min(total):.3f} max {max(total):.3f} ms; attn sublayer median {statistics.median(attn):.3f} "
                     f"ms, ffn {statistics.median([t - a for t, a in zip(total, attn)]):.3f} ms; {base}")
            rows.append((batch, context, f"{median:.4f}", notes))
            print(f"B={batch:4d} L={context:6d}  {median:9.3f} ms/step  (attn {statistics.median(attn):.3f}, "
                  f"floor {floor:.3f})", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    with open(args.out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["batch", "context", "ms_per_step", "notes"])
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {args.out}")


# ---------------------------------------------------------------- check against tools/reference

def run_check(args):
    """Decode the last token of random sequences with caches built by the float64 reference, compare outputs."""
    import numpy as np
    sys.path.insert(0, os.path.join(HERE, "..", "..", "tools", "reference"))
    import dsv4_ref  # noqa: E402
    import quant  # noqa: E402

    cfg = load_config(args.model)
    index = first_c4_layer(cfg) if args.layer is None else args.layer
    prefix = f"layers.{index}."
    ref = dsv4_ref.Model(args.model)
    device = torch.device("cpu")
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[args.check_dtype]
    layer = dsv4_layer.DecodeLayer(cfg, dsv4_layer.CheckpointSource(args.model, device), index, device,
                                   dtype, max_position=max(args.check_lengths))
    freqs = ref.freqs[4]
    rng = np.random.default_rng(args.seed)
    worst = 0.0
    for T in args.check_lengths:
        p, batch = T - 1, args.check_batch
        X = rng.standard_normal((batch, T, layer.M, layer.D))
        positions = np.arange(T)
        caches = dsv4_layer.DecodeCaches(*[None] * 7)
        pieces = {k: [] for k in ("window", "compressed", "index_keys", "comp_kv", "comp_score", "index_kv",
                                  "index_score")}
        want = {k: [] for k in ("out", "attn", "ffn", "topk", "experts")}
        for b in range(batch):
            # The reference layer over the whole sequence; row p is what the decode step must produce.
            y, post, comb = ref.hc_pre(X[b], prefix + "hc_attn_")
            y = dsv4_ref.rms_norm(y, ref.w(prefix + "attn_norm.weight"), ref.eps)
            attn = ref.attention(y, positions, prefix + "attn.", 4)
            X1 = ref.hc_post(attn, X[b], post, comb)
            y2, post2, comb2 = ref.hc_pre(X1, prefix + "hc_ffn_")
            y2 = dsv4_ref.rms_norm(y2, ref.w(prefix + "ffn_norm.weight"), ref.eps)
            ffn = ref.moe(y2, np.zeros(T, np.int64), prefix + "ffn.", hashed=False)
            out = ref.hc_post(ffn, X1, post2, comb2)
            assert np.array_equal(out, ref.layer(X[b], np.zeros(T, np.int64), positions, prefix, 4, False))
            want["out"].append(out[p]), want["attn"].append(attn[p]), want["ffn"].append(ffn[p])
            count = (p + 1) // 4
            qr = dsv4_ref.rms_norm(y @ ref.lin(prefix + "attn.wq_a").T, ref.w(prefix + "attn.q_norm.weight"), ref.eps)
            keep = ref.index_select(y, qr, positions, prefix + "attn.indexer.", freqs, count)[p]
            want["topk"].append(set(np.nonzero(keep)[0].tolist()))
            logits = y2[p] @ ref.lin(prefix + "ffn.gate").T
            biased = np.sqrt(np.logaddexp(0.0, logits)) + ref.w(prefix + "ffn.gate.bias")
            want["experts"].append(set(np.argsort(-biased, kind="stable")[:cfg["num_experts_per_tok"]].tolist()))
            # Caches as they stand before position p, from the reference's own pieces.
            kv = dsv4_ref.rms_norm(y @ ref.lin(prefix + "attn.wkv").T, ref.w(prefix + "attn.kv_norm.weight"), ref.eps)
            kv = quant.kv_cache_roundtrip(dsv4_ref.apply_rope(kv, positions, freqs))
            window = np.zeros((layer.window, layer.hd))
            for t in range(max(0, p - layer.window + 1), p):
                window[t % layer.window] = kv[t]
            pieces["window"].append(window)
            cap = (T + 3) // 4
            for key, sub, width, is_index in (("compressed", "attn.compressor.", layer.hd, False),
                                              ("index_keys", "attn.indexer.compressor.", layer.ihd, True)):
                entries = np.zeros((cap, width))
                made = ref.compress(y[:p], positions[:p], prefix + sub, 4, freqs, indexer=is_index)
                entries[:len(made)] = made
                pieces[key].append(entries)
            for kv_key, score_key, sub in (("comp_kv", "comp_score", "attn.compressor."),
                                           ("index_kv", "index_score", "attn.indexer.compressor.")):
                rows_kv = y @ ref.lin(prefix + sub + "wkv").T
                rows_score = y @ ref.lin(prefix + sub + "wgate").T + ref.w(prefix + sub + "ape")[positions % 4]
                state_kv, state_score = np.zeros((8, rows_kv.shape[1])), np.zeros((8, rows_kv.shape[1]))
                for t in range(max(0, p - 7), p):
                    state_kv[t % 8], state_score[t % 8] = rows_kv[t], rows_score[t]
                pieces[kv_key].append(state_kv), pieces[score_key].append(state_score)
        for key, values in pieces.items():
            stored = dtype if key in ("window", "compressed", "index_keys") else torch.float32
            setattr(caches, key, torch.from_numpy(np.stack(values)).to(stored))
        debug = {}
        with torch.inference_mode():
            got = layer.step(torch.from_numpy(X[:, p]).float(), p, caches, debug)

        def rel(a, b):
            b = np.stack(b)
            return float(np.linalg.norm(a.double().numpy() - b) / np.linalg.norm(b))

        errors = {k: rel(v, want[k]) for k, v in (("out", got), ("attn", debug["attn"]), ("ffn", debug["ffn"]))}
        errors["delta"] = rel(got - torch.from_numpy(X[:, p]).float(),
                              [o - x for o, x in zip(want["out"], X[:, p])])
        same_topk = all(set(debug["index_topk"][b].tolist()) == want["topk"][b] for b in range(batch))
        same_experts = all(set(debug["experts"][b].tolist()) == want["experts"][b] for b in range(batch))
        emits = "emits entry" if (p + 1) % 4 == 0 else "no emission"
        print(f"T={T:4d} p={p:4d} ({emits}, {min(layer.topk, (p + 1) // 4)} of {(p + 1) // 4} entries) B={batch}: "
              f"rel-L2 out {errors['out']:.2e}  out-minus-input {errors['delta']:.2e}  attn {errors['attn']:.2e}  "
              f"ffn {errors['ffn']:.2e}; indexer top-k equal {same_topk}, experts equal {same_experts}")
        worst = max([worst] + [errors[k] for k in ("out", "delta", "attn", "ffn")])
        if not (same_topk and same_experts) and dtype == torch.float32:
            worst = math.inf  # bf16 may flip near-ties; f32 must not on these inputs
    tolerance = args.tolerance if args.tolerance is not None else (1e-4 if dtype == torch.float32 else 3e-2)
    ok = worst <= tolerance
    print(f"check {'passed' if ok else 'FAILED'}: worst rel-L2 {worst:.2e} (tolerance {tolerance:.0e}, {args.check_dtype})")
    return 0 if ok else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (flash-layer for timing, tiny for --check)")
    parser.add_argument("--synthetic", action="store_true", help="random flash-layer-shaped weights, no checkpoint")
    parser.add_argument("--out", default="torch_layer.csv", help="CSV: batch, context, ms_per_step, notes")
    parser.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 16, 64, 256])
    parser.add_argument("--contexts", type=lambda s: [int(v) for v in s.split(",")], default=[4096, 32768])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--layer", type=int, help="layer index (default: first ratio-4 layer with learned gating)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bf16", "f32"], default="bf16", help="weights, caches and matmul inputs")
    # Ceilings measured on the lent H200 (bench/results/cuda-kernels/ceilings.csv), for the floor in the notes.
    parser.add_argument("--copy-gbps", type=float, default=4260.2, help="device copy bandwidth, read + write")
    parser.add_argument("--gemm-tflops", type=float, default=814.3, help="bf16 GEMM rate")
    parser.add_argument("--check", action="store_true", help="CPU f32 comparison with tools/reference (float64)")
    parser.add_argument("--check-lengths", type=lambda s: [int(v) for v in s.split(",")], default=[300, 302, 132, 130])
    parser.add_argument("--check-batch", type=int, default=2)
    parser.add_argument("--check-dtype", choices=["f32", "bf16"], default="f32",
                        help="--check in f32 (the proof) or in the timed run's bf16 (to see its error)")
    parser.add_argument("--tolerance", type=float, help="--check rel-L2 bound (default 1e-4 f32, 3e-2 bf16)")
    args = parser.parse_args()
    if args.check:
        if not args.model:
            parser.error("--check needs --model (the tiny checkpoint, e.g. models/tiny)")
        torch.set_num_threads(min(2, torch.get_num_threads()))
        return run_check(args)
    if not args.model and not args.synthetic:
        parser.error("give --model DIR (a flash-layer checkpoint) or --synthetic")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device; use --device cpu for a smoke run")
    for context in args.contexts:
        if context % 4 or context < 128:
            parser.error(f"context {context}: must be a multiple of 4 and at least 128")
    run_bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
