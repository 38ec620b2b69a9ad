// Sampling and finish rules of reference/text-and-api.md §7.
#include "common/engine/sampler.h"

#include <cmath>
#include <map>
#include <random>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace tandem::engine {
namespace {

using ::testing::HasSubstr;

SamplingConfig Config(SamplingParams p, int64_t vocab = 50) {
  auto c = ValidateSampling(p, vocab, 4096);
  EXPECT_TRUE(c.ok()) << c.status();
  return *c;
}

std::vector<float> RandomLogits(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, 2.0f);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = d(rng);
  return v;
}

TEST(Sampling, ValidationNamesTheField) {
  struct Case {
    SamplingParams p;
    const char* message;
  };
  std::vector<Case> cases(7);
  cases[0].p.temperature = -0.5;  cases[0].message = "temperature must be";
  cases[1].p.top_p = 0.0;         cases[1].message = "top_p must be in (0, 1]";
  cases[2].p.top_p = 1.5;         cases[2].message = "top_p must be in (0, 1]";
  cases[3].p.max_new_tokens = 0;  cases[3].message = "max_new_tokens must be in [1, 4096]";
  cases[4].p.max_new_tokens = 1 << 30; cases[4].message = "max_new_tokens must be in [1, 4096]";
  cases[5].p.stop_token_ids = {50}; cases[5].message = "stop_token_ids: 50 is outside";
  cases[6].p.min_new_tokens = 200; cases[6].p.max_new_tokens = 100; cases[6].message = "min_new_tokens must be in";
  for (const auto& c : cases) {
    auto r = ValidateSampling(c.p, 50, 4096);
    ASSERT_FALSE(r.ok()) << c.message;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(r.status().message()), HasSubstr(c.message));
  }
  SamplingParams nan;
  nan.repetition_penalty = NAN;
  EXPECT_FALSE(ValidateSampling(nan, 50, 4096).ok());
}

TEST(Sampling, TemperatureZeroAndTopKOneAreArgmax) {
  for (uint32_t seed = 0; seed < 20; ++seed) {
    auto logits = RandomLogits(50, seed);
    const int32_t argmax = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    SamplingParams zero;
    zero.temperature = 0.0;
    SamplingParams top1;
    top1.temperature = 1.5;
    top1.top_k = 1;
    for (const auto& p : {zero, top1}) {
      RequestSampler s(Config(p), {1});
      auto copy = logits;
      EXPECT_EQ(s.Sample(copy), argmax);
    }
  }
}

TEST(Sampling, SeededRunsReproduceAndSeedsDiffer) {
  SamplingParams p;
  p.temperature = 1.0;
  p.seed = 1234;
  auto draw = [&](SamplingParams params) {
    RequestSampler s(Config(params), {});
    std::vector<int32_t> out;
    for (int i = 0; i < 64; ++i) {
      auto logits = RandomLogits(50, static_cast<uint32_t>(i));
      out.push_back(s.Sample(logits));
    }
    return out;
  };
  EXPECT_EQ(draw(p), draw(p));
  SamplingParams other = p;
  other.seed = 99;
  EXPECT_NE(draw(p), draw(other));
}

TEST(Sampling, NeutralFiltersSampleTheSoftmax) {
  // Chi-squared goodness of fit of 20000 draws against softmax(logits / T) over 8 tokens.
  const std::vector<float> logits = {0.0f, 1.0f, -1.0f, 2.0f, 0.5f, -0.5f, 1.5f, 0.2f};
  const double temperature = 0.8;
  SamplingParams p;
  p.temperature = temperature;
  p.top_p = 1.0;
  p.min_p = 0.0;
  p.top_k = -1;
  p.seed = 7;
  RequestSampler s(Config(p, 8), {});
  std::vector<int> counts(8);
  const int draws = 20000;
  for (int i = 0; i < draws; ++i) {
    auto copy = logits;
    ++counts[s.Sample(copy)];
  }
  double z = 0, chi2 = 0;
  for (float l : logits) z += std::exp(l / temperature);
  for (int v = 0; v < 8; ++v) {
    const double expected = draws * std::exp(logits[v] / temperature) / z;
    chi2 += (counts[v] - expected) * (counts[v] - expected) / expected;
  }
  EXPECT_LT(chi2, 24.3) << "chi2 with 7 degrees of freedom beyond p = 0.001";
}

TEST(Sampling, TopPAndMinPCutTheTail) {
  const std::vector<float> logits = {5.0f, 4.9f, 0.0f, -1.0f, -2.0f};
  SamplingParams p;
  p.temperature = 1.0;
  p.top_p = 0.5;  // the first token alone holds ~52%: only it survives
  p.seed = 3;
  RequestSampler s(Config(p, 5), {});
  for (int i = 0; i < 200; ++i) {
    auto copy = logits;
    EXPECT_EQ(s.Sample(copy), 0);
  }
  SamplingParams q;
  q.temperature = 1.0;
  q.min_p = 0.5;  // drops everything below half the top probability: tokens 0 and 1 remain
  q.seed = 4;
  RequestSampler t(Config(q, 5), {});
  std::map<int32_t, int> seen;
  for (int i = 0; i < 400; ++i) {
    auto copy = logits;
    ++seen[t.Sample(copy)];
  }
  EXPECT_EQ(seen.size(), 2u);
  EXPECT_GT(seen[0], 0);
  EXPECT_GT(seen[1], 0);
}

TEST(Sampling, RepetitionPenaltyIgnoresPromptOnlyTokens) {
  // Token 3 is the argmax; penalties only apply once it has been *generated*.
  std::vector<float> logits = {1.0f, 0.0f, 0.5f, 1.2f};
  SamplingParams p;
  p.temperature = 0.0;
  p.repetition_penalty = 2.0;
  RequestSampler s(Config(p, 4), {});
  auto copy = logits;
  EXPECT_EQ(s.Sample(copy), 3) << "a fresh request (prompt tokens unknown to the sampler) is not penalized";
  EXPECT_EQ(s.Accept(3), FinishReason::kNone);
  copy = logits;
  EXPECT_EQ(s.Sample(copy), 0) << "after generating 3, 1.2/2 = 0.6 < 1.0";
  SamplingParams f;
  f.temperature = 0.0;
  f.frequency_penalty = 0.15;
  RequestSampler freq(Config(f, 4), {});
  freq.Accept(3);
  copy = logits;
  EXPECT_EQ(freq.Sample(copy), 3) << "1.2 - 0.15 = 1.05 still wins";
  freq.Accept(3);
  copy = logits;
  EXPECT_EQ(freq.Sample(copy), 0) << "1.2 - 0.30 = 0.90 loses";
}

TEST(Sampling, MinNewTokensBlocksEosAndIgnoreEosRunsToMax) {
  std::vector<float> logits = {0.0f, 10.0f, 0.0f};  // EOS (id 1) dominates
  SamplingParams p;
  p.temperature = 0.0;
  p.min_new_tokens = 3;
  p.max_new_tokens = 10;
  RequestSampler s(Config(p, 3), {1});
  for (int i = 0; i < 3; ++i) {
    auto copy = logits;
    const int32_t t = s.Sample(copy);
    EXPECT_NE(t, 1) << "step " << i;
    EXPECT_EQ(s.Accept(t), FinishReason::kNone);
  }
  auto copy = logits;
  const int32_t t = s.Sample(copy);
  EXPECT_EQ(t, 1);
  EXPECT_EQ(s.Accept(t), FinishReason::kStop);
  EXPECT_EQ(s.matched_stop(), 1);

  SamplingParams q;
  q.temperature = 0.0;
  q.ignore_eos = true;
  q.max_new_tokens = 5;
  RequestSampler r(Config(q, 3), {1});
  FinishReason reason = FinishReason::kNone;
  int steps = 0;
  while (reason == FinishReason::kNone) {
    copy = logits;
    reason = r.Accept(r.Sample(copy));
    ++steps;
  }
  EXPECT_EQ(reason, FinishReason::kLength);
  EXPECT_EQ(steps, 5);
}

TEST(Sampling, RequestStopIdsFinishEvenWithIgnoreEos) {
  SamplingParams p;
  p.temperature = 0.0;
  p.ignore_eos = true;
  p.stop_token_ids = {2};
  RequestSampler s(Config(p, 3), {1});
  EXPECT_EQ(s.Accept(1), FinishReason::kNone);
  EXPECT_EQ(s.Accept(2), FinishReason::kStop);
}

}  // namespace
}  // namespace tandem::engine
