// Sampling and finish rules of reference/text-and-api.md §7.
#include "common/engine/sampler.h"

#include <cmath>
#include <map>
#include <random>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/unit/engine/row_draw_reference.h"

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

// PlanDraw packs what Sample would do (edits and uniform) for a runner to draw where the logits are: made
// by the device contract's host statement, every planned draw gives Sample's token, step after step, under
// every option the device takes (penalties over the output, logit_bias, min_new_tokens masks, forced ids).
TEST(Sampling, PlannedDrawsGiveSamplesTokens) {
  const int64_t vocab = 300;
  std::mt19937 rng(2024);
  std::vector<SamplingParams> settings(12);
  settings[0].temperature = 0.0;
  settings[1].temperature = 0.7;
  settings[1].top_p = 0.9;
  settings[2].temperature = 1.3;
  settings[2].top_k = 20;
  settings[3].temperature = 1.0;
  settings[3].min_p = 0.05;
  settings[4].temperature = 0.9;
  settings[4].repetition_penalty = 1.4;
  settings[4].frequency_penalty = 0.3;
  settings[4].presence_penalty = -0.2;
  settings[5].temperature = 0.0;
  settings[5].repetition_penalty = 0.7;  // below 1: rewards repeats
  settings[6].temperature = 0.8;
  settings[6].logit_bias = {{5, 3.0}, {17, -1e9}, {250, 0.125}};
  settings[7].temperature = 1.1;
  settings[7].min_new_tokens = 30;
  settings[7].stop_token_ids = {3, 4, 4};
  settings[8].temperature = 0.6;
  settings[8].top_k = 50;
  settings[8].top_p = 0.8;
  settings[8].min_p = 0.02;
  settings[8].frequency_penalty = 1.5;
  settings[8].logit_bias = {{1, 2.0}};
  settings[8].min_new_tokens = 10;
  settings[9].temperature = 2.0;  // flat: the whole vocabulary in play
  settings[10].temperature = 1.0;
  settings[10].top_k = 1;  // greedy
  settings[10].presence_penalty = 2.0;
  settings[11].temperature = 0.5;
  settings[11].top_k = 1000;  // past the vocabulary: all
  const std::vector<int32_t> eos = {1};
  const std::vector<int32_t> forced = {7, 7, 9};
  for (size_t c = 0; c < settings.size(); ++c) {
    for (const bool force : {false, true}) {
      SamplingParams p = settings[c];
      p.seed = 100 + c;
      p.max_new_tokens = 200;
      const SamplingConfig config = Config(p, vocab);
      RequestSampler host(config, eos), planned(config, eos);
      if (force) {
        host.ForceOutput(forced);
        planned.ForceOutput(forced);
      }
      for (int step = 0; step < 60; ++step) {
        // Peaked rows with ties, so that penalties and cuts change the answer.
        std::normal_distribution<float> spread(0.0f, step % 2 ? 3.0f : 1.0f);
        std::vector<float> logits(static_cast<size_t>(vocab));
        for (auto& l : logits) l = spread(rng);
        for (int i = 0; i < 10; ++i) logits[rng() % vocab] = logits[rng() % vocab];
        logits[1] = 6.0f;  // eos leads: masked until min_new_tokens
        auto draw = planned.PlanDraw(3);
        ASSERT_TRUE(draw.has_value()) << "setting " << c;
        EXPECT_EQ(draw->row, 3);
        EXPECT_EQ(draw->greedy, config.greedy);
        auto copy = logits;
        const int32_t expected = host.Sample(copy);
        const int32_t got = planned.TakeDrawn(testing::DrawOnHost(*draw, logits));
        ASSERT_EQ(got, expected) << "setting " << c << (force ? " forced" : "") << " step " << step;
        host.Accept(expected);
        planned.Accept(got);
      }
    }
  }
}

TEST(Sampling, PlanDrawPacksOneEditPerTokenAndTakesOneUniform) {
  SamplingParams p;
  p.temperature = 0.8;
  p.seed = 5;
  p.repetition_penalty = 1.5;
  p.frequency_penalty = 0.5;
  p.presence_penalty = 0.25;
  p.logit_bias = {{7, -2.0}, {9, 1.0}};
  p.min_new_tokens = 4;
  p.stop_token_ids = {9, 11};
  RequestSampler s(Config(p, 50), {11, 12});
  s.Accept(5);
  s.Accept(5);
  s.Accept(7);
  auto draw = s.PlanDraw(0);
  ASSERT_TRUE(draw.has_value());
  std::map<int32_t, model::LogitEdit> by_token;
  for (const auto& e : draw->edits) EXPECT_TRUE(by_token.emplace(e.token, e).second) << "token " << e.token << " twice";
  ASSERT_EQ(by_token.size(), 5u);  // 5, 7 (generated), 9 (bias and stop), 11 (stop and eos), 12 (eos)
  EXPECT_TRUE(by_token[5].penalize && !by_token[5].biased && !by_token[5].mask);
  EXPECT_EQ(by_token[5].subtract, static_cast<float>(0.5 * 2 + 0.25));
  EXPECT_EQ(by_token[5].repetition, 1.5);
  EXPECT_TRUE(by_token[7].penalize && by_token[7].biased && !by_token[7].mask);
  EXPECT_EQ(by_token[7].subtract, static_cast<float>(0.5 + 0.25));
  EXPECT_EQ(by_token[7].bias, -2.0f);
  EXPECT_TRUE(!by_token[9].penalize && by_token[9].biased && by_token[9].mask);
  EXPECT_TRUE(by_token[11].mask && by_token[12].mask && !by_token[11].biased);
  // The uniform is the one Sample would have taken: a twin that samples on the host draws the same next.
  SamplingParams flat;
  flat.temperature = 1.0;
  flat.seed = 5;
  RequestSampler a(Config(flat, 50), {}), b(Config(flat, 50), {});
  const auto planned = a.PlanDraw(0);
  ASSERT_TRUE(planned.has_value());
  EXPECT_TRUE(planned->edits.empty()) << "no penalties, biases or masks: nothing to edit";
  const auto logits = RandomLogits(50, 9);
  auto copy = logits;
  EXPECT_EQ(testing::DrawOnHost(*planned, logits), b.Sample(copy));
  // Greedy requests take no uniform at all.
  SamplingParams greedy;
  greedy.temperature = 0.0;
  RequestSampler g(Config(greedy, 50), {});
  EXPECT_EQ(g.PlanDraw(0)->uniform, 0.0);
}

TEST(Sampling, PlanDrawDeclinesABiasTwiceOnOneTokenAndTakesNothing) {
  SamplingParams p;
  p.temperature = 0.9;
  p.seed = 77;
  p.logit_bias = {{3, 1.0}, {3, 0.5}};  // Draw adds both in turn
  RequestSampler declined(Config(p, 50), {}), twin(Config(p, 50), {});
  EXPECT_FALSE(declined.PlanDraw(0).has_value());
  for (uint32_t i = 0; i < 20; ++i) {
    auto logits = RandomLogits(50, 40 + i);
    auto copy = logits;
    EXPECT_EQ(declined.Sample(logits), twin.Sample(copy)) << "draw " << i << ": the declined plan took a uniform";
  }
}

}  // namespace
}  // namespace tandem::engine
