// The scheduler's seam for drawing tokens where a runner keeps its logits (a GPU), on the CPU: a runner that
// keeps them and draws by the device contract's host statement gives every request exactly the tokens and
// logprobs of the plain CPU scheduler; logprob requests and plans the runner cannot take (a bias given
// twice for one token) get their row copied and sampled on the host instead; a failed draw ends the batch.
#include <map>
#include <random>

#include <gtest/gtest.h>

#include "common/engine/scheduler.h"
#include "common/kernels/kernels.h"
#include "tests/unit/engine/row_draw_reference.h"
#include "tests/unit/engine/tiny_model.h"

namespace tandem::engine {
namespace {

using testing::Tiny;

// The CPU forward, keeping the logits of its last forward and drawing from them on request.
class KeepingRunner final : public model::ForwardRunner {
 public:
  explicit KeepingRunner(const model::Dsv4Model* model) : cpu_(model) {}
  const model::ModelConfig& config() const override { return cpu_.config(); }
  absl::Status Forward(std::span<const model::SequenceChunk> batch, model::ForwardResult* result) override {
    ++plain_forwards;
    return cpu_.Forward(batch, result);
  }
  bool keeps_logits() const override { return true; }
  absl::Status ForwardKeepingLogits(std::span<const model::SequenceChunk> batch, model::ForwardResult* result) override {
    model::ForwardResult full;
    TANDEM_RETURN_IF_ERROR(cpu_.Forward(batch, &full));
    kept_ = std::move(full.logits);
    result->rows = full.rows;
    return absl::OkStatus();
  }
  absl::Status DrawKept(std::span<const model::RowDraw> draws, std::span<int32_t> ids, std::span<const int64_t> copy_rows,
                        std::span<float> copied) override {
    if (!fail_draws.ok()) return fail_draws;
    const size_t vocab = static_cast<size_t>(config().vocab_size);
    EXPECT_EQ(ids.size(), draws.size());
    EXPECT_EQ(copied.size(), copy_rows.size() * vocab);
    for (size_t k = 0; k < draws.size(); ++k) {
      const auto row = kept_.begin() + draws[k].row * static_cast<int64_t>(vocab);
      ids[k] = testing::DrawOnHost(draws[k], std::vector<float>(row, row + static_cast<int64_t>(vocab)));
      ++drawn;
      edited += draws[k].edits.empty() ? 0 : 1;
    }
    for (size_t j = 0; j < copy_rows.size(); ++j) {
      std::copy_n(kept_.begin() + copy_rows[j] * static_cast<int64_t>(vocab), vocab, copied.begin() + j * vocab);
      ++rows_copied;
    }
    return absl::OkStatus();
  }

  int64_t plain_forwards = 0, drawn = 0, edited = 0, rows_copied = 0;
  absl::Status fail_draws;

 private:
  model::CpuForwardRunner cpu_;
  std::vector<float> kept_;
};

struct Seen {
  std::vector<TokenOutput> tokens;
  int64_t samples = 0;  // tokens sampled: the visible ones and a matched stop id
  bool finished = false;
  absl::Status status;
};

bool SameTokens(const std::vector<TokenOutput>& a, const std::vector<TokenOutput>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].token != b[i].token || a[i].logprob != b[i].logprob || a[i].top.size() != b[i].top.size()) return false;
    for (size_t j = 0; j < a[i].top.size(); ++j) {
      if (a[i].top[j].token != b[i].top[j].token || a[i].top[j].logprob != b[i].top[j].logprob) return false;
    }
  }
  return true;
}

std::string Ids(const std::vector<TokenOutput>& tokens) {
  std::string out;
  for (const auto& t : tokens) out += std::to_string(t.token) + " ";
  return out;
}

class DeviceSamplingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_NE(Tiny(), nullptr);
    kernels::SetDeterministic(true);
    kernels::SetThreads(1);
    model_ = std::make_unique<model::Dsv4Model>(Tiny());
  }
  void TearDown() override { kernels::SetDeterministic(false); }

  // A request mix covering every sampling option: name -> params (and whether it wants logprobs).
  struct Spec {
    std::string id;
    SamplingParams sampling;
    bool logprobs = false;
    int64_t prompt = 0;
  };
  static std::vector<Spec> Mix() {
    std::vector<Spec> specs(11);
    auto seeded = [](Spec& s, const char* id, double temperature, uint64_t seed) {
      s.id = id;
      s.sampling.temperature = temperature;
      s.sampling.seed = seed;
    };
    seeded(specs[0], "greedy", 0.0, 0);
    seeded(specs[1], "top_p", 0.8, 11);
    specs[1].sampling.top_p = 0.9;
    seeded(specs[2], "top_k", 1.2, 12);
    specs[2].sampling.top_k = 40;
    seeded(specs[3], "min_p", 1.0, 13);
    specs[3].sampling.min_p = 0.05;
    seeded(specs[4], "penalised", 0.9, 14);
    specs[4].sampling.repetition_penalty = 1.3;
    specs[4].sampling.frequency_penalty = 0.4;
    specs[4].sampling.presence_penalty = 0.2;
    seeded(specs[5], "penalised_greedy", 0.0, 15);
    specs[5].sampling.repetition_penalty = 1.8;
    seeded(specs[6], "biased", 0.7, 16);
    specs[6].sampling.logit_bias = {{100, 4.0}, {2000, -1e9}, {77777, 2.5}};
    seeded(specs[7], "min_new", 1.0, 17);
    specs[7].sampling.min_new_tokens = 6;
    specs[7].sampling.stop_token_ids = {5, 6};
    specs[7].sampling.ignore_eos = false;
    seeded(specs[8], "logprobs", 0.7, 18);
    specs[8].logprobs = true;
    seeded(specs[9], "bias_twice", 0.9, 19);
    specs[9].sampling.logit_bias = {{300, 1.0}, {300, 2.0}};
    seeded(specs[10], "flat", 2.0, 20);
    for (size_t i = 0; i < specs.size(); ++i) {
      specs[i].prompt = 3 + static_cast<int64_t>(i) * 23;
      if (specs[i].id != "min_new") specs[i].sampling.ignore_eos = true;
      specs[i].sampling.max_new_tokens = 10;
    }
    return specs;
  }

  // Runs the mix on a fresh scheduler over `runner`; the sinks fill `seen`.
  void Run(model::ForwardRunner* runner, SchedulerOptions options, const std::vector<Spec>& specs,
           std::map<std::string, Seen>& seen) {
    const auto& config = Tiny()->config;
    auto layout = StageLayoutFor(config, 0, static_cast<int>(config.num_hidden_layers), true);
    ASSERT_TRUE(layout.ok()) << layout.status();
    auto pools = cache::StatePools::Create(CacheShapesFor(config, 128), *layout,
                                           {.token_pages = 32, .window_pages = 16, .c4_state_slots = 16, .c128_state_slots = 16});
    ASSERT_TRUE(pools.ok()) << pools.status();
    Scheduler scheduler(runner, pools->get(), options);
    std::mt19937 rng(5);
    for (const Spec& spec : specs) {
      NewRequest r;
      r.id = spec.id;
      for (int64_t i = 0; i < spec.prompt; ++i) r.prompt.push_back(static_cast<int32_t>(2 + rng() % 129000));
      r.sampling = spec.sampling;
      r.return_logprobs = spec.logprobs;
      r.top_logprobs = spec.logprobs ? 3 : 0;
      r.sink = [&seen, id = spec.id](RequestUpdate&& update) {
        Seen& s = seen[id];
        s.samples += static_cast<int64_t>(update.tokens.size()) + (update.matched_stop ? 1 : 0);
        for (auto& t : update.tokens) s.tokens.push_back(std::move(t));
        if (update.finished) {
          s.finished = true;
          s.status = update.status;
        }
      };
      ASSERT_TRUE(scheduler.Add(std::move(r)).ok());
    }
    for (int i = 0; i < 10000 && !scheduler.idle(); ++i) {
      auto stepped = scheduler.Step();
      if (!stepped.ok()) break;  // the requests of the batch were ended with the error
    }
    ASSERT_TRUE(scheduler.idle());
    EXPECT_TRUE(scheduler.CheckAccounting().ok());
  }

  std::unique_ptr<model::Dsv4Model> model_;
};

TEST_F(DeviceSamplingTest, KeptLogitsGiveTheHostSamplersTokensAndLogprobs) {
  const auto specs = Mix();
  SchedulerOptions options{.chunked_prefill_size = 256, .max_running_requests = 16, .enable_prefix_cache = false};
  std::map<std::string, Seen> host, kept;
  model::CpuForwardRunner cpu(model_.get());
  Run(&cpu, options, specs, host);
  KeepingRunner runner(model_.get());
  Run(&runner, options, specs, kept);
  int64_t copied_samples = 0, drawn_samples = 0;
  for (const Spec& spec : specs) {
    const Seen& h = host[spec.id];
    const Seen& k = kept[spec.id];
    ASSERT_TRUE(h.finished && k.finished) << spec.id;
    EXPECT_TRUE(h.status.ok() && k.status.ok()) << spec.id << ": " << h.status << " / " << k.status;
    EXPECT_TRUE(SameTokens(h.tokens, k.tokens)) << spec.id << ": host " << Ids(h.tokens) << "| kept " << Ids(k.tokens);
    EXPECT_EQ(h.samples, k.samples) << spec.id;
    (spec.logprobs || spec.id == "bias_twice" ? copied_samples : drawn_samples) += k.samples;
    if (spec.logprobs) {
      ASSERT_FALSE(k.tokens.empty());
      EXPECT_EQ(k.tokens[0].top.size(), 3u) << "logprobs come from the copied row";
    }
  }
  EXPECT_EQ(runner.plain_forwards, 0) << "a keeping runner never copies all logits";
  EXPECT_EQ(runner.drawn, drawn_samples) << "every token of the requests without logprobs is drawn by the runner";
  EXPECT_EQ(runner.rows_copied, copied_samples) << "only logprob and declined requests bring their row back";
  EXPECT_GT(runner.edited, 0) << "penalised, biased and min_new_tokens rows carry edits";
}

TEST_F(DeviceSamplingTest, OffOrForcedOutputsStayTheHostSamplers) {
  auto specs = Mix();
  specs = {specs[1], specs[4], specs[8], specs[9]};  // seeded, penalised, logprobs, declined
  SchedulerOptions options{.chunked_prefill_size = 256, .max_running_requests = 16, .enable_prefix_cache = false};
  // sample_on_device off: the keeping runner is used as a plain one.
  {
    KeepingRunner runner(model_.get());
    std::map<std::string, Seen> seen;
    SchedulerOptions off = options;
    off.sample_on_device = false;
    Run(&runner, off, specs, seen);
    EXPECT_GT(runner.plain_forwards, 0);
    EXPECT_EQ(runner.drawn + runner.rows_copied, 0);
  }
  // Forced output ids (the test flag) replace drawn tokens as they replace sampled ones.
  options.forced_output_ids = {9, 9, 10, 11};
  std::map<std::string, Seen> host, kept;
  model::CpuForwardRunner cpu(model_.get());
  Run(&cpu, options, specs, host);
  KeepingRunner runner(model_.get());
  Run(&runner, options, specs, kept);
  for (const Spec& spec : specs) {
    const Seen& k = kept[spec.id];
    EXPECT_TRUE(SameTokens(host[spec.id].tokens, k.tokens)) << spec.id << ": host " << Ids(host[spec.id].tokens)
                                                            << "| kept " << Ids(k.tokens);
    ASSERT_GE(k.tokens.size(), 4u) << spec.id;
    EXPECT_EQ(k.tokens[2].token, 10) << spec.id;
  }
  EXPECT_GT(runner.drawn, 0);
}

TEST_F(DeviceSamplingTest, AFailedDrawEndsTheBatchWithTheReason) {
  KeepingRunner runner(model_.get());
  runner.fail_draws = absl::InternalError("device lost");
  std::map<std::string, Seen> seen;
  auto specs = Mix();
  specs.resize(2);
  Run(&runner, {.chunked_prefill_size = 256, .max_running_requests = 16, .enable_prefix_cache = false}, specs, seen);
  for (const Spec& spec : specs) {
    const Seen& s = seen[spec.id];
    EXPECT_TRUE(s.finished) << spec.id;
    EXPECT_EQ(s.status.code(), absl::StatusCode::kInternal) << spec.id;
    EXPECT_NE(s.status.message().find("device lost"), std::string::npos) << s.status;
    EXPECT_TRUE(s.tokens.empty()) << spec.id;
  }
}

}  // namespace
}  // namespace tandem::engine
