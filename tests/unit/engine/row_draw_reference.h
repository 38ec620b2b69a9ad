// A model::RowDraw made on the host: the contract a runner's DrawKept keeps (the CUDA runner through
// kernels/cuda ApplyLogitEdits + SampleRows), re-stated the way engine::RequestSampler::Draw writes it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "common/model/forward.h"

namespace tandem::engine::testing {

inline void ApplyEditsOnHost(const model::RowDraw& draw, std::vector<float>& logits) {
  for (const model::LogitEdit& e : draw.edits) {
    float& l = logits[static_cast<size_t>(e.token)];
    if (e.penalize) {
      l -= e.subtract;
      if (e.repetition != 1.0) l = l < 0 ? static_cast<float>(l * e.repetition) : static_cast<float>(l / e.repetition);
    }
    if (e.biased) l += e.bias;
    if (e.mask) l = -INFINITY;
  }
}

inline int32_t DrawOnHost(const model::RowDraw& draw, std::vector<float> logits) {
  ApplyEditsOnHost(draw, logits);
  if (draw.greedy) return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  const int64_t vocab = static_cast<int64_t>(logits.size());
  const double temperature = draw.temperature;
  std::vector<int32_t> order(static_cast<size_t>(vocab));
  std::iota(order.begin(), order.end(), 0);
  const int64_t keep_k = draw.top_k > 0 ? std::min(draw.top_k, vocab) : vocab;
  auto by_logit = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  if (keep_k < vocab) {
    std::partial_sort(order.begin(), order.begin() + keep_k, order.end(), by_logit);
    order.resize(static_cast<size_t>(keep_k));
  } else {
    std::sort(order.begin(), order.end(), by_logit);
  }
  const double top = logits[order[0]] / temperature;
  double total = 0.0;
  for (int64_t v = 0; v < vocab; ++v) total += std::exp(logits[v] / temperature - top);
  std::vector<double> probs(order.size());
  size_t kept = 0;
  double cumulative = 0.0;
  for (size_t i = 0; i < order.size(); ++i) {
    probs[i] = std::exp(logits[order[i]] / temperature - top) / total;
    if (i > 0 && cumulative > draw.top_p) break;
    if (probs[i] < draw.min_p * probs[0]) break;
    cumulative += probs[i];
    kept = i + 1;
  }
  double mass = 0.0;
  for (size_t i = 0; i < kept; ++i) mass += probs[i];
  double u = draw.uniform * mass;
  for (size_t i = 0; i < kept; ++i) {
    u -= probs[i];
    if (u < 0) return order[i];
  }
  return order[kept - 1];
}

}  // namespace tandem::engine::testing
