// Per-request sampling and finish rules (reference/text-and-api.md §7): validated parameters,
// penalties over output tokens, temperature/top-k/top-p/min-p, seeded draws, stop ids, min/max tokens.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/core/status.h"
#include "common/model/forward.h"

namespace tandem::engine {

// As a client sends them: every field optional, so "not given" and "zero" stay distinct.
struct SamplingParams {
  std::optional<double> temperature;
  std::optional<double> top_p;
  std::optional<int64_t> top_k;  // -1: all
  std::optional<double> min_p;
  std::optional<double> repetition_penalty;
  std::optional<double> frequency_penalty;
  std::optional<double> presence_penalty;
  std::optional<uint64_t> seed;
  std::optional<int64_t> max_new_tokens;
  std::optional<int64_t> min_new_tokens;
  bool ignore_eos = false;
  std::vector<int32_t> stop_token_ids;
  std::vector<std::pair<int32_t, double>> logit_bias;
};

// Validated and defaulted.
struct SamplingConfig {
  bool greedy = true;
  double temperature = 1.0;
  double top_p = 1.0;
  int64_t top_k = -1;
  double min_p = 0.0;
  double repetition_penalty = 1.0;
  double frequency_penalty = 0.0;
  double presence_penalty = 0.0;
  uint64_t seed = 0;
  int64_t max_new_tokens = 128;
  int64_t min_new_tokens = 0;
  bool ignore_eos = false;
  std::vector<int32_t> stop_token_ids;  // the request's own
  std::vector<std::pair<int32_t, double>> logit_bias;
};

// INVALID_ARGUMENT naming the field for anything out of range ("top_p must be in (0, 1], got 1.5").
// Without a seed, a fresh random one is drawn.
absl::StatusOr<SamplingConfig> ValidateSampling(const SamplingParams& params, int64_t vocab_size,
                                                int64_t max_new_tokens_limit);

// kTransferred: a prefill-role request whose state and first token were handed to a decode engine.
enum class FinishReason { kNone, kLength, kStop, kTransferred };
std::string FinishReasonName(FinishReason reason);

class RequestSampler {
 public:
  // eos_token_ids: the model's end-of-sequence ids (ignored when ignore_eos).
  RequestSampler(SamplingConfig config, std::vector<int32_t> eos_token_ids);

  // Picks the next token from one row of logits (modified in place).
  int32_t Sample(std::span<float> logits);
  // Test only: the i-th generated token becomes ids[i] (Sample still draws, so later draws do not
  // shift). `ids` must outlive the sampler.
  void ForceOutput(std::span<const int32_t> ids) { forced_ = ids; }
  // Records an accepted token and says whether the request is done.
  FinishReason Accept(int32_t token);
  // The draw Sample would make next, for a forward runner to make where the logits lie: the edits Sample
  // would apply to the row and the uniform it would take (taken now). Nullopt, with nothing taken, when
  // the edits are not one per token (a token twice in logit_bias): Sample the row on the host then.
  std::optional<model::RowDraw> PlanDraw(int64_t row);
  // The token of a planned draw once the runner made it (the forced output where one is set, as Sample).
  int32_t TakeDrawn(int32_t drawn) const;
  // Accepts a token another engine sampled with this same configuration (the first token of a
  // disaggregated request): the draw it took is skipped here, so later draws match a mixed engine's.
  FinishReason AcceptSampledElsewhere(int32_t token);

  int64_t generated() const { return generated_; }
  const SamplingConfig& config() const { return config_; }
  // The matched stop id when Accept returned kStop (it is not part of the visible output).
  std::optional<int32_t> matched_stop() const { return matched_stop_; }

 private:
  int32_t Draw(std::span<float> logits);
  double NextUniform();
  bool IsStop(int32_t token) const;

  SamplingConfig config_;
  std::vector<int32_t> eos_token_ids_;
  std::unordered_map<int32_t, int64_t> output_counts_;
  int64_t generated_ = 0;
  uint64_t rng_state_;
  std::optional<int32_t> matched_stop_;
  std::span<const int32_t> forced_;
};

}  // namespace tandem::engine
