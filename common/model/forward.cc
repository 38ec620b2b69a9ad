#include "common/model/forward.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "common/core/dtype.h"
#include "common/core/threads.h"
#include "common/model/layers.h"

namespace tandem::model {

using internal::ChunkRows;
using internal::LayerContext;

std::vector<double> RopeInverseFrequencies(int64_t rope_dim, double base, const RopeScaling* yarn) {
  std::vector<double> inv(static_cast<size_t>(rope_dim / 2));
  for (int64_t i = 0; i < rope_dim / 2; ++i) inv[i] = std::pow(base, -2.0 * static_cast<double>(i) / rope_dim);
  if (yarn && yarn->original_max_position_embeddings > 0) {
    const double original = static_cast<double>(yarn->original_max_position_embeddings);
    auto correction = [&](double rotations) {
      return rope_dim * std::log(original / (rotations * 2.0 * std::numbers::pi)) / (2.0 * std::log(base));
    };
    double low = std::max(0.0, std::floor(correction(yarn->beta_fast)));
    double high = std::min(static_cast<double>(rope_dim - 1), std::ceil(correction(yarn->beta_slow)));
    if (low == high) high += 0.001;
    for (int64_t i = 0; i < rope_dim / 2; ++i) {
      const double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
      inv[i] = inv[i] / yarn->factor * ramp + inv[i] * (1.0 - ramp);
    }
  }
  return inv;
}

Dsv4Model::Dsv4Model(std::shared_ptr<const ModelWeights> weights) : weights_(std::move(weights)) {
  const auto& c = weights_->config;
  rope_.plain = RopeInverseFrequencies(c.qk_rope_head_dim, c.rope_theta, nullptr);
  rope_.compressed = RopeInverseFrequencies(c.qk_rope_head_dim, c.compress_rope_theta, &c.rope_scaling);
}

namespace internal {

void HcPre(const ModelConfig& c, const MhcWeights& w, const std::vector<float>& x, int64_t tokens,
           std::vector<float>& y, std::vector<float>& post, std::vector<float>& comb) {
  const int64_t M = c.hc_mult, D = c.hidden_size, MD = c.hc_dim(), mix_dim = c.hc_mix_dim();
  std::vector<float> mix(static_cast<size_t>(tokens * mix_dim));
  kernels::Linear(x.data(), tokens, MD, w.fn.data(), mix_dim, mix.data());
  y.assign(static_cast<size_t>(tokens * D), 0.0f);
  post.resize(static_cast<size_t>(tokens * M));
  comb.resize(static_cast<size_t>(tokens * M * M));
  const double eps = c.hc_eps;
  auto sigmoid = [](double v) { return 1.0 / (1.0 + std::exp(-v)); };
  for (int64_t t = 0; t < tokens; ++t) {
    const float* xt = x.data() + t * MD;
    double sum = 0.0;
    for (int64_t i = 0; i < MD; ++i) sum += static_cast<double>(xt[i]) * xt[i];
    const double r = 1.0 / std::sqrt(sum / static_cast<double>(MD) + c.rms_norm_eps);
    const float* m = mix.data() + t * mix_dim;
    std::vector<double> pre(static_cast<size_t>(M));
    for (int64_t j = 0; j < M; ++j) {
      pre[j] = sigmoid(m[j] * r * w.scale[0] + w.base[j]) + eps;
      post[t * M + j] = static_cast<float>(2.0 * sigmoid(m[M + j] * r * w.scale[1] + w.base[M + j]));
    }
    // Sinkhorn projection of the M x M residual mixing matrix (rows j, columns k).
    std::vector<double> cm(static_cast<size_t>(M * M));
    for (int64_t j = 0; j < M; ++j) {
      double row_max = -INFINITY;
      for (int64_t k = 0; k < M; ++k) {
        cm[j * M + k] = m[2 * M + j * M + k] * r * w.scale[2] + w.base[2 * M + j * M + k];
        row_max = std::max(row_max, cm[j * M + k]);
      }
      double row_sum = 0.0;
      for (int64_t k = 0; k < M; ++k) row_sum += (cm[j * M + k] = std::exp(cm[j * M + k] - row_max));
      for (int64_t k = 0; k < M; ++k) cm[j * M + k] = cm[j * M + k] / row_sum + eps;
    }
    auto normalize_columns = [&] {
      for (int64_t k = 0; k < M; ++k) {
        double col = 0.0;
        for (int64_t j = 0; j < M; ++j) col += cm[j * M + k];
        for (int64_t j = 0; j < M; ++j) cm[j * M + k] /= (col + eps);
      }
    };
    normalize_columns();
    for (int64_t it = 1; it < c.hc_sinkhorn_iters; ++it) {
      for (int64_t j = 0; j < M; ++j) {
        double row = 0.0;
        for (int64_t k = 0; k < M; ++k) row += cm[j * M + k];
        for (int64_t k = 0; k < M; ++k) cm[j * M + k] /= (row + eps);
      }
      normalize_columns();
    }
    for (int64_t i = 0; i < M * M; ++i) comb[t * M * M + i] = static_cast<float>(cm[i]);
    float* yt = y.data() + t * D;
    for (int64_t j = 0; j < M; ++j) {
      const float p = static_cast<float>(pre[j]);
      for (int64_t d = 0; d < D; ++d) yt[d] += p * xt[j * D + d];
    }
  }
}

void HcPost(const ModelConfig& c, const std::vector<float>& out, const std::vector<float>& post,
            const std::vector<float>& comb, int64_t tokens, std::vector<float>& x) {
  const int64_t M = c.hc_mult, D = c.hidden_size;
  std::vector<float> residual(static_cast<size_t>(M * D));
  for (int64_t t = 0; t < tokens; ++t) {
    float* xt = x.data() + t * M * D;
    std::copy(xt, xt + M * D, residual.begin());
    for (int64_t k = 0; k < M; ++k) {
      const float p = post[t * M + k];
      float* dst = xt + k * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = p * out[t * D + d];
      for (int64_t j = 0; j < M; ++j) {
        const float w = comb[t * M * M + j * M + k];
        for (int64_t d = 0; d < D; ++d) dst[d] += w * residual[j * D + d];
      }
    }
  }
}

void HcHead(const ModelConfig& c, const HcHeadWeights& w, const float* x, int64_t tokens, float* y) {
  const int64_t M = c.hc_mult, D = c.hidden_size, MD = c.hc_dim();
  std::vector<float> mix(static_cast<size_t>(tokens * M));
  kernels::Linear(x, tokens, MD, w.fn.data(), M, mix.data());
  for (int64_t t = 0; t < tokens; ++t) {
    const float* xt = x + t * MD;
    double sum = 0.0;
    for (int64_t i = 0; i < MD; ++i) sum += static_cast<double>(xt[i]) * xt[i];
    const double r = 1.0 / std::sqrt(sum / static_cast<double>(MD) + c.rms_norm_eps);
    float* yt = y + t * D;
    std::fill(yt, yt + D, 0.0f);
    for (int64_t j = 0; j < M; ++j) {
      const float pre = static_cast<float>(1.0 / (1.0 + std::exp(-(mix[t * M + j] * r * w.scale[0] + w.base[j]))) + c.hc_eps);
      for (int64_t d = 0; d < D; ++d) yt[d] += pre * xt[j * D + d];
    }
  }
}

}  // namespace internal

void ForwardTrace::Append(const std::string& name, int64_t cols, std::span<const int32_t> row_major) {
  auto& table = tables[name];
  table.cols = cols;
  table.values.insert(table.values.end(), row_major.begin(), row_major.end());
}

absl::Status Dsv4Model::CheckBatch(std::span<const SequenceChunk> batch, bool mtp, int64_t* total) const {
  const auto& c = config();
  *total = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    const auto& chunk = batch[i];
    if (!chunk.state) return absl::InvalidArgumentError(absl::StrCat("batch chunk ", i, ": no state"));
    if (chunk.tokens.empty()) return absl::InvalidArgumentError(absl::StrCat("batch chunk ", i, ": no tokens"));
    for (int32_t token : chunk.tokens) {
      if (token < 0 || token >= c.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("batch chunk ", i, ": token id ", token, " outside the vocabulary [0, ", c.vocab_size, ")"));
      }
    }
    const int64_t start = mtp ? chunk.state->mtp_length() : chunk.state->length();
    const int64_t end = start + static_cast<int64_t>(chunk.tokens.size());
    if (end > c.max_position_embeddings) {
      return absl::OutOfRangeError(absl::StrCat("batch chunk ", i, ": positions up to ", end,
                                                " exceed max_position_embeddings ", c.max_position_embeddings));
    }
    TANDEM_RETURN_IF_ERROR(chunk.state->Reserve(end));
    *total += static_cast<int64_t>(chunk.tokens.size());
  }
  return absl::OkStatus();
}

void Dsv4Model::RunLayer(const LayerWeights& layer, std::span<const SequenceChunk> batch, bool mtp,
                         std::vector<float>& x, ForwardTrace* trace) const {
  const auto& c = config();
  std::vector<ChunkRows> chunks;
  std::vector<int64_t> positions;
  std::vector<int32_t> tokens;
  int64_t offset = 0;
  for (const auto& chunk : batch) {
    const int64_t start = mtp ? chunk.state->mtp_length() : chunk.state->length();
    const int64_t count = static_cast<int64_t>(chunk.tokens.size());
    chunks.push_back({chunk.state, offset, count, start});
    for (int64_t i = 0; i < count; ++i) positions.push_back(start + i);
    tokens.insert(tokens.end(), chunk.tokens.begin(), chunk.tokens.end());
    offset += count;
  }
  const int64_t T = offset;
  const int ratio = mtp ? 0 : layer.spec.compress_ratio;
  LayerContext ctx{c, layer, layer.spec.layer_id, ratio,
                   ratio > 0 ? rope_.compressed.data() : rope_.plain.data(), chunks, positions, trace,
                   mtp ? std::string("mtp.0.") : absl::StrCat("layers.", layer.spec.layer_id, ".")};
  std::vector<float> y, post, comb, out(static_cast<size_t>(T * c.hidden_size));
  internal::HcPre(c, layer.hc_attn, x, T, y, post, comb);
  kernels::RmsNorm(y.data(), T, c.hidden_size, layer.attn_norm.data(), static_cast<float>(c.rms_norm_eps), y.data());
  internal::Attention(ctx, y, out);
  internal::HcPost(c, out, post, comb, T, x);
  internal::HcPre(c, layer.hc_ffn, x, T, y, post, comb);
  kernels::RmsNorm(y.data(), T, c.hidden_size, layer.ffn_norm.data(), static_cast<float>(c.rms_norm_eps), y.data());
  internal::Moe(ctx, y, tokens, out);
  internal::HcPost(c, out, post, comb, T, x);
}

void Dsv4Model::Head(std::span<const SequenceChunk> batch, const HcHeadWeights& hc_head, const std::vector<float>& norm,
                     const std::vector<float>& x, ForwardResult* result) const {
  const auto& c = config();
  const int64_t D = c.hidden_size, MD = c.hc_dim();
  std::vector<int64_t> rows;
  int64_t offset = 0;
  for (const auto& chunk : batch) {
    const int64_t count = static_cast<int64_t>(chunk.tokens.size());
    if (chunk.all_logits) {
      for (int64_t i = 0; i < count; ++i) rows.push_back(offset + i);
    } else {
      rows.push_back(offset + count - 1);
    }
    offset += count;
  }
  const int64_t R = static_cast<int64_t>(rows.size());
  std::vector<float> selected(static_cast<size_t>(R * MD)), h(static_cast<size_t>(R * D));
  for (int64_t r = 0; r < R; ++r) std::copy_n(x.data() + rows[r] * MD, MD, selected.data() + r * MD);
  internal::HcHead(c, hc_head, selected.data(), R, h.data());
  kernels::RmsNorm(h.data(), R, D, norm.data(), static_cast<float>(c.rms_norm_eps), h.data());
  result->rows = R;
  result->logits.resize(static_cast<size_t>(R * c.vocab_size));
  internal::LinearOf(weights_->head, h.data(), R, result->logits.data());
  result->pre_head_hidden = x;
}

absl::Status Dsv4Model::Forward(std::span<const SequenceChunk> batch, const HiddenStates* input, HiddenStates* output,
                                ForwardResult* result, ForwardTrace* trace) const {
  const auto& w = *weights_;
  const auto& c = config();
  int64_t T = 0;
  TANDEM_RETURN_IF_ERROR(CheckBatch(batch, false, &T));
  const int64_t D = c.hidden_size, M = c.hc_mult;
  std::vector<float> x;
  if (w.is_first_stage()) {
    if (input) return absl::InvalidArgumentError("the first pipeline stage embeds tokens and takes no hidden input");
    x.resize(static_cast<size_t>(T * M * D));
    int64_t row = 0;
    for (const auto& chunk : batch) {
      for (int32_t token : chunk.tokens) {
        const uint16_t* e = w.embed.as<uint16_t>() + static_cast<int64_t>(token) * D;
        for (int64_t m = 0; m < M; ++m)
          for (int64_t d = 0; d < D; ++d) x[(row * M + m) * D + d] = Bf16ToFloat(e[d]);
        ++row;
      }
    }
  } else {
    if (!input || input->tokens != T || static_cast<int64_t>(input->values.size()) != T * M * D) {
      return absl::InvalidArgumentError(absl::StrCat("stage [", w.begin_layer, ", ", w.end_layer,
                                                     ") needs hidden states for ", T, " tokens"));
    }
    x = input->values;
  }
  for (const auto& layer : w.layers) RunLayer(layer, batch, false, x, trace);
  for (const auto& chunk : batch) chunk.state->set_length(chunk.state->length() + static_cast<int64_t>(chunk.tokens.size()));
  if (w.is_last_stage()) {
    if (!result) return absl::InvalidArgumentError("the last pipeline stage needs a result");
    Head(batch, w.hc_head, w.norm, x, result);
  } else {
    if (!output) return absl::InvalidArgumentError("a non-final pipeline stage needs an output");
    output->tokens = T;
    output->values = std::move(x);
  }
  return absl::OkStatus();
}

absl::Status Dsv4Model::ForwardMtp(std::span<const SequenceChunk> batch, std::span<const float> hidden,
                                   ForwardResult* result, ForwardTrace* trace) const {
  const auto& w = *weights_;
  const auto& c = config();
  if (!w.mtp) return absl::FailedPreconditionError("this model was loaded without its MTP layer");
  int64_t T = 0;
  TANDEM_RETURN_IF_ERROR(CheckBatch(batch, true, &T));
  const int64_t D = c.hidden_size, M = c.hc_mult;
  if (static_cast<int64_t>(hidden.size()) != T * M * D) {
    return absl::InvalidArgumentError(absl::StrCat("MTP needs ", T, " hidden rows of ", M * D, " floats"));
  }
  const auto& mtp = *w.mtp;
  const float eps = static_cast<float>(c.rms_norm_eps);
  std::vector<float> e(static_cast<size_t>(T * D)), e_proj(static_cast<size_t>(T * D));
  int64_t row = 0;
  for (const auto& chunk : batch) {
    for (int32_t token : chunk.tokens) {
      const uint16_t* src = w.embed.as<uint16_t>() + static_cast<int64_t>(token) * D;
      for (int64_t d = 0; d < D; ++d) e[row * D + d] = Bf16ToFloat(src[d]);
      ++row;
    }
  }
  kernels::RmsNorm(e.data(), T, D, mtp.enorm.data(), eps, e.data());
  internal::LinearOf(mtp.e_proj, e.data(), T, e_proj.data());
  std::vector<float> h(hidden.begin(), hidden.end()), x(static_cast<size_t>(T * M * D));
  kernels::RmsNorm(h.data(), T * M, D, mtp.hnorm.data(), eps, h.data());
  internal::LinearOf(mtp.h_proj, h.data(), T * M, x.data());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t d = 0; d < D; ++d) x[(t * M + m) * D + d] += e_proj[t * D + d];
  RunLayer(mtp.layer, batch, true, x, trace);
  for (const auto& chunk : batch) {
    chunk.state->set_mtp_length(chunk.state->mtp_length() + static_cast<int64_t>(chunk.tokens.size()));
  }
  Head(batch, mtp.hc_head, mtp.norm, x, result);
  return absl::OkStatus();
}

}  // namespace tandem::model
