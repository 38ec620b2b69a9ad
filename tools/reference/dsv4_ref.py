#!/usr/bin/env python3
"""Float64 NumPy reference of the DeepSeek-V4 forward pass (common/model/NUMERICS.md).

Reads a checkpoint directory in the released DSV4 format, dequantizes every weight to float64 and
computes, for one sequence starting at position 0, the logits, the pre-hc_head streams H and the
MTP draft logits. Written independently of the C++ forward; parity tests compare the two.

    python tools/reference/dsv4_ref.py DIR --prompt-ids 0,5,7 --out logits.npy [--mtp-out mtp.npy]
"""
import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quant  # noqa: E402

# ---------------------------------------------------------------- checkpoint reading

_NUMPY_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
    "I8": "i1", "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BOOL": "?",
    "F8_E4M3": "u1", "F8_E5M2": "u1", "F8_E8M0": "u1",
}


class Checkpoint:
    """Tensors of a safetensors file, or of a checkpoint directory (sharded through the index, or every file)."""

    def __init__(self, directory):
        self.entries = {}  # name -> (memmap of the shard's data buffer, dtype name, shape, begin, end)
        if os.path.isfile(directory):
            self._open(directory)
            return
        index_path = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index_path):
            with open(index_path) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(p for p in os.listdir(directory) if p.endswith(".safetensors"))
        for file in files:
            self._open(os.path.join(directory, file))

    def _open(self, path):
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in self.entries:
                raise ValueError(f"tensor {name} appears in two files")
            begin, end = info["data_offsets"]
            self.entries[name] = (data, info["dtype"], tuple(info["shape"]), begin, end)

    def __contains__(self, name):
        return name in self.entries

    def dtype(self, name):
        return self.entries[name][1]

    def raw(self, name):
        """The stored array (F8 and BF16 as their integer bit patterns)."""
        if name not in self.entries:
            raise KeyError(f"checkpoint has no tensor {name}")
        data, dtype, shape, begin, end = self.entries[name]
        return np.frombuffer(data[begin:end], dtype=_NUMPY_DTYPES[dtype]).reshape(shape)

    def float(self, name):
        """A plain (non-linear) tensor as float64: BF16/F32/F16/F64."""
        dtype = self.dtype(name)
        raw = self.raw(name)
        if dtype == "BF16":
            return quant.bf16_to_float(raw).astype(np.float64)
        if dtype in ("F32", "F16", "F64"):
            return raw.astype(np.float64)
        raise ValueError(f"tensor {name}: unexpected dtype {dtype}")

    def linear(self, prefix):
        """Weight of linear `prefix` ([out, in]) dequantized from FP8 blocks, MXFP4 or bf16/f32."""
        name = prefix + ".weight"
        dtype = self.dtype(name)
        if dtype == "F8_E4M3":
            return quant.fp8_block_dequant(self.raw(name), self.raw(prefix + ".scale"))
        if dtype == "I8":
            return quant.mxfp4_dequant(self.raw(name), self.raw(prefix + ".scale"))
        return self.float(name)


# ---------------------------------------------------------------- building blocks

def rms_norm(x, weight, eps):
    out = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return out if weight is None else out * weight


def sigmoid(x):
    return np.exp(-np.logaddexp(0.0, -x))


def softmax(x, axis):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def hadamard_matrix(n):
    i = np.arange(n)
    bits = np.bitwise_and.outer(i, i)
    parity = np.zeros_like(bits)
    while bits.any():
        parity ^= bits & 1
        bits >>= 1
    return np.where(parity == 1, -1.0, 1.0) / math.sqrt(n)


def rope_frequencies(cfg, ratio):
    """f_i for the rotary slice of a layer with this compress ratio (YaRN only for ratio > 0)."""
    rd = cfg["qk_rope_head_dim"]
    base = float(cfg["compress_rope_theta"] if ratio else cfg["rope_theta"])
    i = np.arange(rd // 2, dtype=np.float64)
    freqs = base ** (-2.0 * i / rd)
    scaling = cfg.get("rope_scaling") or {}
    original = scaling.get("original_max_position_embeddings", 0) or 0
    if ratio and original > 0:
        def bound(beta):
            return rd * math.log(original / (beta * 2 * math.pi)) / (2 * math.log(base))
        low = min(max(math.floor(bound(scaling["beta_fast"])), 0), rd - 1)
        high = min(max(math.ceil(bound(scaling["beta_slow"])), 0), rd - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((i - low) / (high - low), 0.0, 1.0)
        freqs = freqs / scaling["factor"] * ramp + freqs * (1.0 - ramp)
    return freqs


def apply_rope(x, positions, freqs, inverse=False):
    """Rotate interleaved pairs of the last 2*len(freqs) dims; positions broadcast against x[..., 0]."""
    rd = 2 * len(freqs)
    angle = np.asarray(positions, dtype=np.float64)[..., None] * freqs
    if inverse:
        angle = -angle
    cos, sin = np.cos(angle), np.sin(angle)
    a, b = x[..., -rd::2], x[..., -rd + 1::2]
    out = x.copy()
    out[..., -rd::2] = a * cos - b * sin
    out[..., -rd + 1::2] = a * sin + b * cos
    return out


# ---------------------------------------------------------------- model

class Model:
    def __init__(self, directory):
        with open(os.path.join(directory, "config.json")) as f:
            self.cfg = json.load(f)
        cfg = self.cfg
        self.ckpt = Checkpoint(directory)
        self.dim = cfg["hidden_size"]
        self.streams = cfg["hc_mult"]
        self.eps = cfg["rms_norm_eps"]
        self.hc_eps = cfg["hc_eps"]
        self.heads = cfg["num_attention_heads"]
        self.head_dim = cfg["head_dim"]
        self.window = cfg.get("sliding_window", 128)
        self.ratios = cfg["compress_ratios"]
        self.num_layers = cfg["num_hidden_layers"]
        self.expert_dtype = cfg.get("expert_dtype", "fp4")
        stored = self.ckpt.dtype("layers.0.ffn.experts.0.w1.weight") if self.num_layers else None
        if stored and stored != {"fp4": "I8", "fp8": "F8_E4M3"}[self.expert_dtype]:
            raise ValueError(f"expert_dtype {self.expert_dtype} but routed experts are stored as {stored}")
        self.freqs = {r: rope_frequencies(cfg, r) for r in set(self.ratios) | {0}}
        self.hadamard = hadamard_matrix(cfg["index_head_dim"])
        self._cache = {}
        # Optional discrete decisions of another implementation, adopted only at near-ties (see adopt()).
        self.forced = {}
        self.adopted = []  # (key, row, regret, adopted) for every row where a forced decision differed
        self.near_tie = 1e-3
        self.head = self.ckpt.linear("head")

    # Weights are dequantized on first use and kept.
    def w(self, name):
        if name not in self._cache:
            self._cache[name] = self.ckpt.float(name)
        return self._cache[name]

    def lin(self, prefix):
        if prefix not in self._cache:
            self._cache[prefix] = self.ckpt.linear(prefix)
        return self._cache[prefix]

    def embed(self, tokens):
        return quant.bf16_to_float(self.ckpt.raw("embed.weight")[np.asarray(tokens)]).astype(np.float64)

    # ------------------------------------------------------------ mHC
    def hc_pre(self, X, prefix):
        T, M, D = X.shape
        fn, base, scale = self.w(prefix + "fn"), self.w(prefix + "base"), self.w(prefix + "scale")
        x = X.reshape(T, M * D)
        r = 1.0 / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + self.eps)
        mix = (x @ fn.T) * r
        pre = sigmoid(mix[:, :M] * scale[0] + base[:M]) + self.hc_eps
        post = 2.0 * sigmoid(mix[:, M:2 * M] * scale[1] + base[M:2 * M])
        comb = (mix[:, 2 * M:] * scale[2] + base[2 * M:]).reshape(T, M, M)  # [t, j, k]
        comb = softmax(comb, axis=2) + self.hc_eps
        comb = comb / (comb.sum(axis=1, keepdims=True) + self.hc_eps)
        for _ in range(self.cfg["hc_sinkhorn_iters"] - 1):
            comb = comb / (comb.sum(axis=2, keepdims=True) + self.hc_eps)
            comb = comb / (comb.sum(axis=1, keepdims=True) + self.hc_eps)
        y = np.einsum("tj,tjd->td", pre, X)
        return y, post, comb

    @staticmethod
    def hc_post(out, X, post, comb):
        return post[:, :, None] * out[:, None, :] + np.einsum("tjk,tjd->tkd", comb, X)

    def hc_head(self, X, prefix):
        T, M, D = X.shape
        x = X.reshape(T, M * D)
        r = 1.0 / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + self.eps)
        mix = (x @ self.w(prefix + "hc_head_fn").T) * r
        pre = sigmoid(mix * self.w(prefix + "hc_head_scale")[0] + self.w(prefix + "hc_head_base")) + self.hc_eps
        return np.einsum("tj,tjd->td", pre, X)

    # ------------------------------------------------------------ compressor and indexer
    def compress(self, y, positions, prefix, ratio, freqs, indexer):
        """Entries emitted by the compressor `prefix` over a sequence starting at position 0."""
        kv = y @ self.lin(prefix + "wkv").T
        score = y @ self.lin(prefix + "wgate").T + self.w(prefix + "ape")[positions % ratio]
        count = len(y) // ratio
        d = kv.shape[1] // (2 if ratio == 4 else 1)
        if count == 0:
            return np.zeros((0, d))
        kv = kv[:count * ratio].reshape(count, ratio, -1)
        score = score[:count * ratio].reshape(count, ratio, -1)
        if ratio == 4:  # overlap: previous chunk on channels [0, d), current chunk on [d, 2d)
            prev_kv = np.concatenate([np.zeros((1, ratio, d)), kv[:-1, :, :d]])
            prev_score = np.concatenate([np.full((1, ratio, d), -np.inf), score[:-1, :, :d]])
            kv = np.concatenate([prev_kv, kv[:, :, d:]], axis=1)
            score = np.concatenate([prev_score, score[:, :, d:]], axis=1)
        pooled = (softmax(score, axis=1) * kv).sum(axis=1)
        pooled = rms_norm(pooled, self.w(prefix + "norm.weight"), self.eps)
        pooled = apply_rope(pooled, ratio * np.arange(count), freqs)
        if indexer:
            return quant.indexer_key_roundtrip(pooled @ self.hadamard.T)
        return quant.kv_cache_roundtrip(pooled)

    def index_select(self, y, qr, positions, prefix, freqs, count):
        """[T, count] mask of the compressed entries the C4 indexer keeps for each query."""
        nh, ihd = self.cfg["index_n_heads"], self.cfg["index_head_dim"]
        T = len(y)
        keys = self.compress(y, positions, prefix + "compressor.", 4, freqs, indexer=True)
        qi = (qr @ self.lin(prefix + "wq_b").T).reshape(T, nh, ihd)
        qi = apply_rope(qi, positions[:, None], freqs) @ self.hadamard.T
        weights = (y @ self.lin(prefix + "weights_proj").T) * ihd ** -0.5 * nh ** -0.5
        relu = np.maximum(qi @ keys.T, 0.0)  # [T, nh, count]
        score = (weights[:, None, :] @ relu)[:, 0, :]
        visible = np.arange(count)[None, :] < ((positions + 1) // 4)[:, None]
        order = np.argsort(-np.where(visible, score, -np.inf), axis=1, kind="stable")
        order = order[:, :self.cfg["index_topk"]]
        keep = np.zeros((T, count), dtype=bool)
        np.put_along_axis(keep, order, True, axis=1)
        keep &= visible
        forced = self.forced.get(prefix + "topk")
        if forced is not None:
            theirs = np.zeros((T, count + 1), dtype=bool)  # last column catches -1 padding
            np.put_along_axis(theirs, np.where(forced < 0, count, forced), True, axis=1)
            keep = self.adopt(prefix + "topk", np.where(visible, score, -np.inf), keep, theirs[:, :count])
        return keep

    # ------------------------------------------------------------ attention
    def attention(self, y, positions, prefix, ratio):
        T, H, hd = len(y), self.heads, self.head_dim
        freqs = self.freqs[ratio]
        qr = rms_norm(y @ self.lin(prefix + "wq_a").T, self.w(prefix + "q_norm.weight"), self.eps)
        q = rms_norm((qr @ self.lin(prefix + "wq_b").T).reshape(T, H, hd), None, self.eps)
        q = apply_rope(q, positions[:, None], freqs)
        kv = rms_norm(y @ self.lin(prefix + "wkv").T, self.w(prefix + "kv_norm.weight"), self.eps)
        keys = [quant.kv_cache_roundtrip(apply_rope(kv, positions, freqs))]
        # Token j of this sequence sits at positions[j]; the window covers the last `window` positions.
        rel = positions[:, None] - positions[None, :]
        masks = [(rel >= 0) & (rel < self.window)]
        if ratio:
            entries = self.compress(y, positions, prefix + "compressor.", ratio, freqs, indexer=False)
            keys.append(entries)
            count = len(entries)
            if ratio == 4:
                masks.append(self.index_select(y, qr, positions, prefix + "indexer.", freqs, count))
            else:
                masks.append(np.arange(count)[None, :] < ((positions + 1) // ratio)[:, None])
        K = np.concatenate(keys)
        mask = np.concatenate(masks, axis=1)
        scores = (q.transpose(1, 0, 2) @ K.T) / math.sqrt(hd)  # [H, T, keys]
        scores = np.where(mask[None], scores, -np.inf)
        sink = self.w(prefix + "attn_sink")[:, None]
        top = np.maximum(scores.max(axis=2), sink)
        probs = np.exp(scores - top[:, :, None])
        probs /= (probs.sum(axis=2) + np.exp(sink - top))[:, :, None]
        out = (probs @ K).transpose(1, 0, 2)  # [T, H, hd]
        out = apply_rope(out, positions[:, None], freqs, inverse=True)
        groups = self.cfg["o_groups"]
        wo_a = self.lin(prefix + "wo_a").reshape(groups, self.cfg["o_lora_rank"], -1)
        z = out.reshape(T, groups, -1).transpose(1, 0, 2) @ wo_a.transpose(0, 2, 1)  # [G, T, R]
        return z.transpose(1, 0, 2).reshape(T, -1) @ self.lin(prefix + "wo_b").T

    def adopt(self, key, score, ours, theirs):
        """Take another implementation's top-k set per row where it differs from ours only by a near-tie.

        regret = (our worst kept score - their worst kept score) / mean |our kept scores|; a row is adopted
        when regret <= near_tie, otherwise ours is kept (and the row is logged as a real divergence).
        """
        out = ours.copy()
        for row in np.nonzero((ours != theirs).any(axis=1))[0]:
            ours_min = score[row][ours[row]].min()
            theirs_min = score[row][theirs[row]].min() if theirs[row].any() else -np.inf
            scale = np.abs(score[row][ours[row]]).mean() + 1e-30
            regret = float((ours_min - theirs_min) / scale)
            same_size = theirs[row].sum() == ours[row].sum()
            ok = same_size and regret <= self.near_tie
            if ok:
                out[row] = theirs[row]
            self.adopted.append((key, int(row), regret, bool(ok)))
        return out

    # ------------------------------------------------------------ MoE
    def expert(self, prefix, x):
        limit = self.cfg["swiglu_limit"]
        a = np.minimum(x @ self.lin(prefix + "w1").T, limit)
        b = np.clip(x @ self.lin(prefix + "w3").T, -limit, limit)
        return (a * sigmoid(a) * b) @ self.lin(prefix + "w2").T

    def moe(self, y, tokens, prefix, hashed):
        cfg = self.cfg
        logits = y @ self.lin(prefix + "gate").T
        s = np.sqrt(np.logaddexp(0.0, logits))
        if hashed:
            ids = self.ckpt.raw(prefix + "gate.tid2eid")[np.asarray(tokens)].astype(np.int64)
        else:
            biased = s + self.w(prefix + "gate.bias")
            ids = np.argsort(-biased, axis=1, kind="stable")[:, :cfg["num_experts_per_tok"]]
            forced = self.forced.get(prefix + "experts")
            if forced is not None:
                ours = np.zeros(biased.shape, dtype=bool)
                np.put_along_axis(ours, ids, True, axis=1)
                theirs = np.zeros(biased.shape, dtype=bool)
                np.put_along_axis(theirs, forced, True, axis=1)
                chosen = self.adopt(prefix + "experts", biased, ours, theirs)
                ids = np.argsort(~chosen, axis=1, kind="stable")[:, :ids.shape[1]]  # same sizes: k per row
        weights = np.take_along_axis(s, ids, axis=1)
        weights = weights / weights.sum(axis=1, keepdims=True) * cfg["routed_scaling_factor"]
        out = self.expert(prefix + "shared_experts.", y)
        for e in np.unique(ids):
            rows, slots = np.nonzero(ids == e)
            routed = self.expert(f"{prefix}experts.{e}.", y[rows]) * weights[rows, slots][:, None]
            np.add.at(out, rows, routed)
        return out

    # ------------------------------------------------------------ layers and heads
    def layer(self, X, tokens, positions, prefix, ratio, hashed):
        y, post, comb = self.hc_pre(X, prefix + "hc_attn_")
        y = rms_norm(y, self.w(prefix + "attn_norm.weight"), self.eps)
        X = self.hc_post(self.attention(y, positions, prefix + "attn.", ratio), X, post, comb)
        y, post, comb = self.hc_pre(X, prefix + "hc_ffn_")
        y = rms_norm(y, self.w(prefix + "ffn_norm.weight"), self.eps)
        return self.hc_post(self.moe(y, tokens, prefix + "ffn.", hashed), X, post, comb)

    def logits(self, X, prefix, norm_name):
        h = rms_norm(self.hc_head(X, prefix), self.w(norm_name), self.eps)
        return h @ self.head.T

    def forward(self, tokens, trace=None):
        """Logits [T, vocab] and H [T, hc_mult*hidden] for tokens at positions 0..T-1.

        trace, when a list, receives the residual streams X [T, M, D] after the embedding and each layer.
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        T, positions = len(tokens), np.arange(len(tokens))
        X = np.repeat(self.embed(tokens)[:, None, :], self.streams, axis=1)
        if trace is not None:
            trace.append(X)
        for i in range(self.num_layers):
            hashed = i < self.cfg["num_hash_layers"]
            X = self.layer(X, tokens, positions, f"layers.{i}.", self.ratios[i], hashed)
            if trace is not None:
                trace.append(X)
        return self.logits(X, "", "norm.weight"), X.reshape(T, -1)

    def mtp_forward(self, next_tokens, H):
        """Draft logits: row q uses token t_{q+1} and the main model's H_q, at position q."""
        next_tokens = np.asarray(next_tokens, dtype=np.int64)
        T, M, D = len(next_tokens), self.streams, self.dim
        if T == 0:
            return np.zeros((0, self.head.shape[0]))
        p = "mtp.0."
        e = rms_norm(self.embed(next_tokens), self.w(p + "enorm.weight"), self.eps) @ self.lin(p + "e_proj").T
        h = rms_norm(np.asarray(H).reshape(T, M, D), self.w(p + "hnorm.weight"), self.eps) @ self.lin(p + "h_proj").T
        X = e[:, None, :] + h
        X = self.layer(X, next_tokens, np.arange(T), p, 0, hashed=False)
        return self.logits(X, p, p + "norm.weight")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    parser.add_argument("--out", required=True, help="logits [T, vocab] float64 .npy")
    parser.add_argument("--mtp-out", help="MTP draft logits [T-1, vocab] float64 .npy")
    parser.add_argument("--hidden-out", help="H [T, hc_mult*hidden] float64 .npy")
    args = parser.parse_args()
    tokens = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    model = Model(args.model_dir)
    logits, H = model.forward(tokens)
    np.save(args.out, logits)
    if args.hidden_out:
        np.save(args.hidden_out, H)
    if args.mtp_out:
        np.save(args.mtp_out, model.mtp_forward(tokens[1:], H[:-1]))


if __name__ == "__main__":
    main()
