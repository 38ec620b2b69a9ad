#include "common/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

namespace tandem::engine {
namespace {

absl::Status Bad(const std::string& text) { return absl::InvalidArgumentError(text); }

bool Finite(double v) { return std::isfinite(v); }

uint64_t SplitMix(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace

std::string FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength: return "length";
    case FinishReason::kStop: return "stop";
    case FinishReason::kTransferred: return "transferred";
    default: return "";
  }
}

absl::StatusOr<SamplingConfig> ValidateSampling(const SamplingParams& p, int64_t vocab_size,
                                                int64_t max_new_tokens_limit) {
  SamplingConfig c;
  if (p.temperature) {
    if (!Finite(*p.temperature) || *p.temperature < 0) {
      return Bad(absl::StrCat("temperature must be a finite number >= 0, got ", *p.temperature));
    }
    c.temperature = *p.temperature;
  }
  if (p.top_p) {
    if (!Finite(*p.top_p) || *p.top_p <= 0 || *p.top_p > 1) return Bad(absl::StrCat("top_p must be in (0, 1], got ", *p.top_p));
    c.top_p = *p.top_p;
  }
  if (p.top_k) {
    if (*p.top_k == 0 || *p.top_k < -1) return Bad(absl::StrCat("top_k must be -1 (all) or >= 1, got ", *p.top_k));
    c.top_k = *p.top_k;
  }
  if (p.min_p) {
    if (!Finite(*p.min_p) || *p.min_p < 0 || *p.min_p > 1) return Bad(absl::StrCat("min_p must be in [0, 1], got ", *p.min_p));
    c.min_p = *p.min_p;
  }
  if (p.repetition_penalty) {
    if (!Finite(*p.repetition_penalty) || *p.repetition_penalty <= 0 || *p.repetition_penalty > 2) {
      return Bad(absl::StrCat("repetition_penalty must be in (0, 2], got ", *p.repetition_penalty));
    }
    c.repetition_penalty = *p.repetition_penalty;
  }
  for (auto [value, name, out] : {std::tuple{p.frequency_penalty, "frequency_penalty", &c.frequency_penalty},
                                  std::tuple{p.presence_penalty, "presence_penalty", &c.presence_penalty}}) {
    if (!value) continue;
    if (!Finite(*value) || *value < -2 || *value > 2) return Bad(absl::StrCat(name, " must be in [-2, 2], got ", *value));
    *out = *value;
  }
  if (p.max_new_tokens) {
    if (*p.max_new_tokens < 1 || *p.max_new_tokens > max_new_tokens_limit) {
      return Bad(absl::StrCat("max_new_tokens must be in [1, ", max_new_tokens_limit, "], got ", *p.max_new_tokens));
    }
    c.max_new_tokens = *p.max_new_tokens;
  } else {
    c.max_new_tokens = std::min<int64_t>(c.max_new_tokens, max_new_tokens_limit);
  }
  if (p.min_new_tokens) {
    if (*p.min_new_tokens < 0 || *p.min_new_tokens > c.max_new_tokens) {
      return Bad(absl::StrCat("min_new_tokens must be in [0, max_new_tokens = ", c.max_new_tokens, "], got ",
                              *p.min_new_tokens));
    }
    c.min_new_tokens = *p.min_new_tokens;
  }
  for (int32_t id : p.stop_token_ids) {
    if (id < 0 || id >= vocab_size) return Bad(absl::StrCat("stop_token_ids: ", id, " is outside [0, ", vocab_size, ")"));
  }
  for (auto [id, bias] : p.logit_bias) {
    if (id < 0 || id >= vocab_size) return Bad(absl::StrCat("logit_bias: token ", id, " is outside [0, ", vocab_size, ")"));
    if (!Finite(bias)) return Bad(absl::StrCat("logit_bias: token ", id, " has a non-finite bias"));
  }
  c.stop_token_ids = p.stop_token_ids;
  c.logit_bias = p.logit_bias;
  c.ignore_eos = p.ignore_eos;
  // Temperature ~0 means greedy; so does top_k 1.
  c.greedy = c.temperature < 1e-6 || c.top_k == 1;
  if (c.greedy) c.temperature = 1.0;
  c.seed = p.seed ? *p.seed : std::random_device{}() ^ (static_cast<uint64_t>(std::random_device{}()) << 32);
  return c;
}

RequestSampler::RequestSampler(SamplingConfig config, std::vector<int32_t> eos_token_ids)
    : config_(std::move(config)), eos_token_ids_(std::move(eos_token_ids)), rng_state_(config_.seed) {}

double RequestSampler::NextUniform() { return static_cast<double>(SplitMix(rng_state_) >> 11) * 0x1.0p-53; }

bool RequestSampler::IsStop(int32_t token) const {
  if (std::find(config_.stop_token_ids.begin(), config_.stop_token_ids.end(), token) != config_.stop_token_ids.end()) {
    return true;
  }
  return !config_.ignore_eos && std::find(eos_token_ids_.begin(), eos_token_ids_.end(), token) != eos_token_ids_.end();
}

int32_t RequestSampler::Sample(std::span<float> logits) {
  const int32_t sampled = Draw(logits);
  if (static_cast<size_t>(generated_) < forced_.size()) return forced_[static_cast<size_t>(generated_)];
  return sampled;
}

int32_t RequestSampler::Draw(std::span<float> logits) {
  const int64_t vocab = static_cast<int64_t>(logits.size());
  // Penalties look at output tokens only (the prompt is never penalized).
  for (const auto& [token, count] : output_counts_) {
    float& l = logits[token];
    l -= static_cast<float>(config_.frequency_penalty * count + (count > 0 ? config_.presence_penalty : 0.0));
    if (config_.repetition_penalty != 1.0) {
      l = l < 0 ? static_cast<float>(l * config_.repetition_penalty) : static_cast<float>(l / config_.repetition_penalty);
    }
  }
  for (auto [id, bias] : config_.logit_bias) logits[id] += static_cast<float>(bias);
  if (generated_ < config_.min_new_tokens) {
    for (int32_t id : config_.stop_token_ids) logits[id] = -INFINITY;
    for (int32_t id : eos_token_ids_) logits[id] = -INFINITY;
  }
  if (config_.greedy) {
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }
  // Softmax over logits / temperature, then top-k, top-p, min-p, renormalize and draw.
  std::vector<int32_t> order(static_cast<size_t>(vocab));
  std::iota(order.begin(), order.end(), 0);
  const int64_t keep_k = config_.top_k > 0 ? std::min(config_.top_k, vocab) : vocab;
  auto by_logit = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  if (keep_k < vocab) {
    std::partial_sort(order.begin(), order.begin() + keep_k, order.end(), by_logit);
    order.resize(static_cast<size_t>(keep_k));
  } else {
    std::sort(order.begin(), order.end(), by_logit);
  }
  const double top = logits[order[0]] / config_.temperature;
  std::vector<double> probs(order.size());
  double total = 0.0;
  // Normalize over the whole vocabulary first: top-p is a fraction of the full distribution.
  for (int64_t v = 0; v < vocab; ++v) total += std::exp(logits[v] / config_.temperature - top);
  size_t kept = 0;
  double cumulative = 0.0;
  for (size_t i = 0; i < order.size(); ++i) {
    probs[i] = std::exp(logits[order[i]] / config_.temperature - top) / total;
    if (i > 0 && cumulative > config_.top_p) break;  // keep tokens whose preceding mass <= top_p
    if (probs[i] < config_.min_p * probs[0]) break;
    cumulative += probs[i];
    kept = i + 1;
  }
  double mass = 0.0;
  for (size_t i = 0; i < kept; ++i) mass += probs[i];
  double u = NextUniform() * mass;
  for (size_t i = 0; i < kept; ++i) {
    u -= probs[i];
    if (u < 0) return order[i];
  }
  return order[kept - 1];
}

std::optional<model::RowDraw> RequestSampler::PlanDraw(int64_t row) {
  model::RowDraw draw;
  draw.row = row;
  draw.greedy = config_.greedy;
  draw.temperature = config_.temperature;
  draw.top_k = config_.top_k;
  draw.top_p = config_.top_p;
  draw.min_p = config_.min_p;
  std::unordered_map<int32_t, size_t> at;  // token -> its edit
  auto edit = [&](int32_t token) -> model::LogitEdit& {
    auto [it, added] = at.try_emplace(token, draw.edits.size());
    if (added) draw.edits.push_back({.token = token});
    return draw.edits[it->second];
  };
  // Draw's arithmetic, per token. Neutral penalties (all zero, of either sign) subtract a zero, which can at most
  // flip the sign of a zero logit, and nothing after tells -0 from +0: they are left out.
  if (config_.frequency_penalty != 0 || config_.presence_penalty != 0 || config_.repetition_penalty != 1.0) {
    draw.edits.reserve(output_counts_.size());
    for (const auto& [token, count] : output_counts_) {
      model::LogitEdit& e = edit(token);
      e.penalize = true;
      e.subtract = static_cast<float>(config_.frequency_penalty * count + (count > 0 ? config_.presence_penalty : 0.0));
      e.repetition = config_.repetition_penalty;
    }
  }
  for (auto [id, bias] : config_.logit_bias) {
    model::LogitEdit& e = edit(id);
    if (e.biased) return std::nullopt;  // Draw adds both biases in turn: not one edit
    e.biased = true;
    e.bias = static_cast<float>(bias);
  }
  if (generated_ < config_.min_new_tokens) {
    for (int32_t id : config_.stop_token_ids) edit(id).mask = true;
    for (int32_t id : eos_token_ids_) edit(id).mask = true;
  }
  // Draw takes exactly one uniform per non-greedy draw.
  if (!config_.greedy) draw.uniform = NextUniform();
  return draw;
}

int32_t RequestSampler::TakeDrawn(int32_t drawn) const {
  if (static_cast<size_t>(generated_) < forced_.size()) return forced_[static_cast<size_t>(generated_)];
  return drawn;
}

FinishReason RequestSampler::AcceptSampledElsewhere(int32_t token) {
  if (!config_.greedy) NextUniform();
  return Accept(token);
}

FinishReason RequestSampler::Accept(int32_t token) {
  ++generated_;
  ++output_counts_[token];
  if (IsStop(token) && generated_ > config_.min_new_tokens - 1) {
    matched_stop_ = token;
    return FinishReason::kStop;
  }
  if (generated_ >= config_.max_new_tokens) return FinishReason::kLength;
  return FinishReason::kNone;
}

}  // namespace tandem::engine
