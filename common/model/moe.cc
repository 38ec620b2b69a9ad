// DSV4 MoE on the CPU: hash routing (tid2eid) or sqrt-softplus gating with bias, routed experts from
// MXFP4/FP8 weights with the clamped SwiGLU, plus the shared expert.
#include <algorithm>
#include <cmath>

#include "common/model/layers.h"

namespace tandem::model::internal {
namespace {

// out[rows, D] = W2 · (min(W1 x, L).silu * clamp(W3 x, -L, L)).
void RunExpert(const ExpertWeights& e, const float* x, int64_t rows, float limit, float* out) {
  const int64_t I = e.w1.view.out;
  std::vector<float> a(static_cast<size_t>(rows * I)), b(static_cast<size_t>(rows * I));
  kernels::QuantizedLinear(x, rows, e.w1.view, a.data());
  kernels::QuantizedLinear(x, rows, e.w3.view, b.data());
  for (int64_t i = 0; i < rows * I; ++i) {
    const float g = std::min(a[i], limit);
    const float u = std::clamp(b[i], -limit, limit);
    a[i] = g / (1.0f + std::exp(-g)) * u;
  }
  kernels::QuantizedLinear(a.data(), rows, e.w2.view, out);
}

double SqrtSoftplus(double v) {
  const double softplus = v > 20.0 ? v : std::log1p(std::exp(v));
  return std::sqrt(softplus);
}

}  // namespace

void Moe(const LayerContext& ctx, const std::vector<float>& y, std::span<const int32_t> tokens, std::vector<float>& out) {
  const auto& c = ctx.config;
  const auto& w = ctx.layer.ffn;
  const int64_t T = static_cast<int64_t>(tokens.size()), D = c.hidden_size, E = c.n_routed_experts;
  const int64_t k = c.num_experts_per_tok;
  const float limit = static_cast<float>(c.swiglu_limit);

  std::vector<float> logits(static_cast<size_t>(T * E));
  LinearOf(w.gate, y.data(), T, logits.data());
  // Routing: per expert, the rows it serves and their weights.
  std::vector<std::vector<int64_t>> expert_rows(static_cast<size_t>(E));
  std::vector<std::vector<float>> expert_weights(static_cast<size_t>(E));
  std::vector<double> score(static_cast<size_t>(E));
  std::vector<int64_t> chosen(static_cast<size_t>(k));
  std::vector<int32_t> trace_rows;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t e = 0; e < E; ++e) score[e] = SqrtSoftplus(logits[t * E + e]);
    if (ctx.layer.spec.hash_routed) {
      for (int64_t i = 0; i < k; ++i) chosen[i] = w.tid2eid[static_cast<int64_t>(tokens[t]) * k + i];
    } else {
      std::vector<int64_t> order(static_cast<size_t>(E));
      for (int64_t e = 0; e < E; ++e) order[e] = e;
      std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
        const double sa = score[a] + w.bias[a], sb = score[b] + w.bias[b];
        return sa > sb || (sa == sb && a < b);
      });
      std::copy_n(order.begin(), k, chosen.begin());
    }
    if (ctx.trace) trace_rows.insert(trace_rows.end(), chosen.begin(), chosen.end());
    double sum = 0.0;
    for (int64_t i = 0; i < k; ++i) sum += score[chosen[i]];
    for (int64_t i = 0; i < k; ++i) {
      expert_rows[chosen[i]].push_back(t);
      expert_weights[chosen[i]].push_back(static_cast<float>(score[chosen[i]] / sum * c.routed_scaling_factor));
    }
  }

  if (ctx.trace) ctx.trace->Append(ctx.trace_prefix + "ffn.experts", k, trace_rows);
  RunExpert(w.shared, y.data(), T, limit, out.data());
  std::vector<float> gathered, result;
  for (int64_t e = 0; e < E; ++e) {
    const auto& rows = expert_rows[e];
    if (rows.empty()) continue;
    const int64_t n = static_cast<int64_t>(rows.size());
    gathered.resize(static_cast<size_t>(n * D));
    result.resize(static_cast<size_t>(n * D));
    for (int64_t i = 0; i < n; ++i) std::copy_n(y.data() + rows[i] * D, D, gathered.data() + i * D);
    RunExpert(w.experts[e], gathered.data(), n, limit, result.data());
    for (int64_t i = 0; i < n; ++i) {
      const float weight = expert_weights[e][i];
      float* dst = out.data() + rows[i] * D;
      for (int64_t d = 0; d < D; ++d) dst[d] += weight * result[i * D + d];
    }
  }
}

}  // namespace tandem::model::internal
