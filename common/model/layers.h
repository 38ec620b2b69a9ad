// Internal to common/model: the sublayers the forward composes (attention with compressor and indexer,
// MoE, mHC). Not part of the library's public surface.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "common/model/forward.h"

namespace tandem::model::internal {

// Per-chunk geometry within a batch: rows [offset, offset + count) of the batch, first position start.
struct ChunkRows {
  SequenceState* state;
  int64_t offset;
  int64_t count;
  int64_t start;
};

struct LayerContext {
  const ModelConfig& config;
  const LayerWeights& layer;
  int layer_id;              // global id; num_hidden_layers for MTP
  int ratio;                 // effective compress ratio (0 for MTP)
  const double* inv_freq;    // rope frequencies of this layer
  std::span<const ChunkRows> chunks;
  std::span<const int64_t> positions;  // [T]
  ForwardTrace* trace;       // may be null
  std::string trace_prefix;  // "layers.3." or "mtp.0."
};

// y: [T, D] normalized attention input. Writes out [T, D]. Updates the window, compressed entries,
// indexer keys and compressor rows of every chunk's state.
void Attention(const LayerContext& ctx, const std::vector<float>& y, std::vector<float>& out);

// y: [T, D] normalized FFN input, tokens [T]. Writes out [T, D].
void Moe(const LayerContext& ctx, const std::vector<float>& y, std::span<const int32_t> tokens, std::vector<float>& out);

// mHC pre: x [T, M*D] -> y [T, D], post [T, M], comb [T, M, M].
void HcPre(const ModelConfig& c, const MhcWeights& w, const std::vector<float>& x, int64_t tokens,
           std::vector<float>& y, std::vector<float>& post, std::vector<float>& comb);
// mHC post: x [T, M*D] <- post * out + comb^T x.
void HcPost(const ModelConfig& c, const std::vector<float>& out, const std::vector<float>& post,
            const std::vector<float>& comb, int64_t tokens, std::vector<float>& x);
// hc_head: x [T, M*D] -> y [T, D].
void HcHead(const ModelConfig& c, const HcHeadWeights& w, const float* x, int64_t tokens, float* y);

inline void LinearOf(const DenseWeight& w, const float* x, int64_t rows, float* y) {
  kernels::Linear(x, rows, w.in, w.values.data(), w.out, y);
}

}  // namespace tandem::model::internal
