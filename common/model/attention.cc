// DSV4 attention on the CPU: q/kv low-rank paths, sliding window, C4/C128 compressors, the C4
// indexer, attention sink, inverse RoPE and the grouped output projection (NUMERICS.md).
#include <algorithm>
#include <cmath>
#include <numeric>

#include "common/core/threads.h"
#include "common/model/layers.h"

namespace tandem::model::internal {
namespace {

// Feeds every chunk token through a compressor, writing its ring row and emitting the entry that
// completes a chunk of `ratio` tokens into the state (attention KV or indexer key format).
void RunCompressor(const LayerContext& ctx, const CompressorWeights& cw, CompressorKind kind,
                   const std::vector<float>& y) {
  const auto& c = ctx.config;
  const int64_t T = static_cast<int64_t>(ctx.positions.size());
  const int64_t d = cw.dim, ratio = cw.ratio, width = CompressorWidth(cw.ratio) * d, rd = c.qk_rope_head_dim;
  std::vector<float> kv(static_cast<size_t>(T * width)), score(static_cast<size_t>(T * width));
  LinearOf(cw.wkv, y.data(), T, kv.data());
  LinearOf(cw.wgate, y.data(), T, score.data());
  const kernels::KvFormat format{c.nope_dim(), rd};
  std::vector<float> pooled(static_cast<size_t>(d));
  for (const auto& chunk : ctx.chunks) {
    for (int64_t i = 0; i < chunk.count; ++i) {
      const int64_t p = chunk.start + i, t = chunk.offset + i;
      float* row = chunk.state->compressor_row(ctx.layer_id, kind, p);
      const float* ape = cw.ape.data() + (p % ratio) * width;
      for (int64_t ch = 0; ch < width; ++ch) {
        row[ch] = kv[t * width + ch];
        row[width + ch] = score[t * width + ch] + ape[ch];
      }
      if ((p + 1) % ratio != 0) continue;
      const int64_t index = p / ratio;
      // Rows taking part: (position, channel offset). C4 overlaps the previous chunk's first half.
      std::vector<std::pair<const float*, int64_t>> rows;
      if (ratio == 4) {
        if (index > 0) {
          for (int64_t q = p - 7; q <= p - 4; ++q) rows.emplace_back(chunk.state->compressor_row(ctx.layer_id, kind, q), 0);
        }
        for (int64_t q = p - 3; q <= p; ++q) rows.emplace_back(chunk.state->compressor_row(ctx.layer_id, kind, q), d);
      } else {
        for (int64_t q = p - ratio + 1; q <= p; ++q) rows.emplace_back(chunk.state->compressor_row(ctx.layer_id, kind, q), 0);
      }
      for (int64_t ch = 0; ch < d; ++ch) {
        float best = -INFINITY;
        for (const auto& [r, off] : rows) best = std::max(best, r[width + off + ch]);
        double num = 0.0, den = 0.0;
        for (const auto& [r, off] : rows) {
          const double e = std::exp(static_cast<double>(r[width + off + ch]) - best);
          den += e;
          num += e * r[off + ch];
        }
        pooled[ch] = static_cast<float>(num / den);
      }
      kernels::RmsNorm(pooled.data(), 1, d, cw.norm.data(), static_cast<float>(c.rms_norm_eps), pooled.data());
      kernels::ApplyRopeOne(pooled.data() + d - rd, rd, ratio * index, ctx.inv_freq, false);
      if (kind == CompressorKind::kIndexer) {
        kernels::Hadamard(pooled.data(), d);
        kernels::QuantizeIndexerKey(pooled.data(), d, chunk.state->indexer_key(ctx.layer_id, index));
      } else {
        const KvSlot slot = chunk.state->compressed_kv(ctx.layer_id, index);
        kernels::QuantizeKvEntry(format, pooled.data(), slot.data, slot.scales);
      }
    }
  }
}

// Indices of the top-k scores (ties: smaller index first).
std::vector<int64_t> TopK(const std::vector<float>& scores, int64_t k) {
  std::vector<int64_t> order(scores.size());
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
    return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
  });
  order.resize(static_cast<size_t>(k));
  return order;
}

}  // namespace

void Attention(const LayerContext& ctx, const std::vector<float>& y, std::vector<float>& out) {
  const auto& c = ctx.config;
  const auto& w = ctx.layer.attn;
  const int64_t T = static_cast<int64_t>(ctx.positions.size());
  const int64_t H = c.num_attention_heads, hd = c.head_dim, nope = c.nope_dim(), rd = c.qk_rope_head_dim;
  const int64_t window = c.sliding_window;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const int64_t* pos = ctx.positions.data();

  // Query path.
  std::vector<float> qr(static_cast<size_t>(T * c.q_lora_rank)), q(static_cast<size_t>(T * H * hd));
  LinearOf(w.wq_a, y.data(), T, qr.data());
  kernels::RmsNorm(qr.data(), T, c.q_lora_rank, w.q_norm.data(), eps, qr.data());
  LinearOf(w.wq_b, qr.data(), T, q.data());
  kernels::RmsNorm(q.data(), T * H, hd, nullptr, eps, q.data());
  kernels::ApplyRope(q.data(), T, H * hd, H, hd, nope, rd, pos, ctx.inv_freq, false);

  // KV path: the new tokens' entries in cache format, and their dequantized values.
  const kernels::KvFormat format{nope, rd};
  std::vector<float> kv(static_cast<size_t>(T * hd));
  LinearOf(w.wkv, y.data(), T, kv.data());
  kernels::RmsNorm(kv.data(), T, hd, w.kv_norm.data(), eps, kv.data());
  kernels::ApplyRope(kv.data(), T, hd, 1, hd, nope, rd, pos, ctx.inv_freq, false);
  std::vector<uint8_t> entries(static_cast<size_t>(T * format.entry_bytes()));
  for (int64_t t = 0; t < T; ++t) {
    uint8_t* e = entries.data() + t * format.entry_bytes();
    kernels::QuantizeKvEntry(format, kv.data() + t * hd, e, e + format.data_bytes());
    kernels::DequantizeKvEntry(format, e, e + format.data_bytes(), kv.data() + t * hd);
  }

  // Compressors append entries for every chunk boundary the new tokens complete.
  const int ratio = ctx.ratio;
  if (ratio > 0) RunCompressor(ctx, *w.compressor, CompressorKind::kAttention, y);
  std::vector<float> index_q, index_w;
  const int64_t n_index_heads = c.index_n_heads, index_dim = c.index_head_dim;
  if (ratio == 4) {
    const auto& ix = *w.indexer;
    RunCompressor(ctx, ix.compressor, CompressorKind::kIndexer, y);
    index_q.resize(static_cast<size_t>(T * n_index_heads * index_dim));
    LinearOf(ix.wq_b, qr.data(), T, index_q.data());
    kernels::ApplyRope(index_q.data(), T, n_index_heads * index_dim, n_index_heads, index_dim, index_dim - rd, rd, pos,
                       ctx.inv_freq, false);
    for (int64_t i = 0; i < T * n_index_heads; ++i) kernels::Hadamard(index_q.data() + i * index_dim, index_dim);
    index_w.resize(static_cast<size_t>(T * n_index_heads));
    LinearOf(ix.weights_proj, y.data(), T, index_w.data());
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(index_dim * n_index_heads)));
    for (auto& v : index_w) v *= scale;
  }

  std::vector<float> o(static_cast<size_t>(T * H * hd), 0.0f);
  // Indexer choices per token (-1 padded), for the trace.
  std::vector<int32_t> selected(ratio == 4 && ctx.trace ? static_cast<size_t>(T * c.index_topk) : 0, -1);
  const float softmax_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  for (const auto& chunk : ctx.chunks) {
    // Window keys: positions [first, start + count), old ones from the state's ring.
    const int64_t first = std::max<int64_t>(0, chunk.start - window + 1);
    const int64_t old = chunk.start - first;
    std::vector<float> keys(static_cast<size_t>((old + chunk.count) * hd));
    for (int64_t i = 0; i < old; ++i) {
      const KvSlot slot = chunk.state->window_kv(ctx.layer_id, first + i);
      kernels::DequantizeKvEntry(format, slot.data, slot.scales, keys.data() + i * hd);
    }
    std::copy_n(kv.data() + chunk.offset * hd, chunk.count * hd, keys.data() + old * hd);
    // Compressed entries visible to the chunk's last token.
    const int64_t n_entries = ratio > 0 ? (chunk.start + chunk.count) / ratio : 0;
    std::vector<float> compressed(static_cast<size_t>(n_entries * hd)), index_keys;
    for (int64_t j = 0; j < n_entries; ++j) {
      const KvSlot slot = chunk.state->compressed_kv(ctx.layer_id, j);
      kernels::DequantizeKvEntry(format, slot.data, slot.scales, compressed.data() + j * hd);
    }
    if (ratio == 4) {
      index_keys.resize(static_cast<size_t>(n_entries * index_dim));
      for (int64_t j = 0; j < n_entries; ++j) {
        kernels::DequantizeIndexerKey(chunk.state->indexer_key(ctx.layer_id, j), index_dim, index_keys.data() + j * index_dim);
      }
    }
    ParallelFor(chunk.count, [&](int64_t begin, int64_t end) {
      std::vector<const float*> candidates;
      std::vector<float> scores;
      std::vector<float> index_scores;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t t = chunk.offset + i, p = chunk.start + i;
        candidates.clear();
        for (int64_t k = std::max(first, p - window + 1); k <= p; ++k) candidates.push_back(keys.data() + (k - first) * hd);
        const int64_t visible = ratio > 0 ? (p + 1) / ratio : 0;
        if (ratio == 128 || (ratio == 4 && visible <= c.index_topk)) {
          for (int64_t j = 0; j < visible; ++j) candidates.push_back(compressed.data() + j * hd);
          if (!selected.empty()) {
            for (int64_t j = 0; j < visible; ++j) selected[t * c.index_topk + j] = static_cast<int32_t>(j);
          }
        } else if (ratio == 4) {
          index_scores.assign(static_cast<size_t>(visible), 0.0f);
          for (int64_t j = 0; j < visible; ++j) {
            double s = 0.0;
            for (int64_t h = 0; h < n_index_heads; ++h) {
              const float* qh = index_q.data() + (t * n_index_heads + h) * index_dim;
              const float* kj = index_keys.data() + j * index_dim;
              double dot = 0.0;
              for (int64_t e = 0; e < index_dim; ++e) dot += static_cast<double>(qh[e]) * kj[e];
              s += static_cast<double>(index_w[t * n_index_heads + h]) * std::max(dot, 0.0);
            }
            index_scores[j] = static_cast<float>(s);
          }
          const auto top = TopK(index_scores, c.index_topk);
          for (size_t n = 0; n < top.size(); ++n) {
            candidates.push_back(compressed.data() + top[n] * hd);
            if (!selected.empty()) selected[t * c.index_topk + static_cast<int64_t>(n)] = static_cast<int32_t>(top[n]);
          }
        }
        scores.resize(candidates.size());
        for (int64_t h = 0; h < H; ++h) {
          const float* qh = q.data() + (t * H + h) * hd;
          float best = w.attn_sink[h];
          for (size_t k = 0; k < candidates.size(); ++k) {
            float dot = 0.0f;
            for (int64_t e = 0; e < hd; ++e) dot += qh[e] * candidates[k][e];
            scores[k] = dot * softmax_scale;
            best = std::max(best, scores[k]);
          }
          double den = std::exp(static_cast<double>(w.attn_sink[h]) - best);
          float* oh = o.data() + (t * H + h) * hd;
          std::vector<double> acc(static_cast<size_t>(hd), 0.0);
          for (size_t k = 0; k < candidates.size(); ++k) {
            const double e = std::exp(static_cast<double>(scores[k]) - best);
            den += e;
            for (int64_t d = 0; d < hd; ++d) acc[d] += e * candidates[k][d];
          }
          for (int64_t d = 0; d < hd; ++d) oh[d] = static_cast<float>(acc[d] / den);
        }
      }
    });
    // The newest `window` tokens become the request's window.
    for (int64_t i = std::max<int64_t>(0, chunk.count - window); i < chunk.count; ++i) {
      const KvSlot slot = chunk.state->window_kv(ctx.layer_id, chunk.start + i);
      const uint8_t* e = entries.data() + (chunk.offset + i) * format.entry_bytes();
      std::copy_n(e, format.data_bytes(), slot.data);
      std::copy_n(e + format.data_bytes(), format.scale_bytes(), slot.scales);
    }
  }
  if (!selected.empty()) ctx.trace->Append(ctx.trace_prefix + "attn.indexer.topk", c.index_topk, selected);
  kernels::ApplyRope(o.data(), T, H * hd, H, hd, nope, rd, pos, ctx.inv_freq, true);

  // Grouped low-rank output: group g's heads through wo_a[g], then wo_b over all groups.
  const int64_t G = c.o_groups, R = c.o_lora_rank, group_in = H / G * hd;
  std::vector<float> group(static_cast<size_t>(T * group_in)), z(static_cast<size_t>(T * G * R)),
      zg(static_cast<size_t>(T * R));
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t t = 0; t < T; ++t) std::copy_n(o.data() + t * H * hd + g * group_in, group_in, group.data() + t * group_in);
    kernels::Linear(group.data(), T, group_in, w.wo_a.values.data() + g * R * group_in, R, zg.data());
    for (int64_t t = 0; t < T; ++t) std::copy_n(zg.data() + t * R, R, z.data() + t * G * R + g * R);
  }
  LinearOf(w.wo_b, z.data(), T, out.data());
}

}  // namespace tandem::model::internal
