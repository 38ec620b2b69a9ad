// The scheduler on `tiny` in deterministic mode, driven step by step: retraction under page pressure
// keeps a request's tokens, aborts at every stage free every page, and bad requests are refused with
// the field that is wrong.
#include "common/engine/scheduler.h"

#include <cstdlib>
#include <map>
#include <random>

#include <gtest/gtest.h>

#include "common/kernels/kernels.h"
#include "tests/unit/engine/tiny_model.h"

namespace tandem::engine {
namespace {

using testing::Tiny;
using testing::TinyDir;

std::vector<int32_t> Prompt(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (auto& id : ids) id = static_cast<int32_t>(2 + rng() % 129000);
  return ids;
}

// What one request's sink saw.
struct Seen {
  std::vector<int32_t> tokens;
  int updates = 0;
  bool finished = false;
  absl::Status status;
  int64_t retractions = 0;
  int64_t cached = 0;
};

class SchedulerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_NE(Tiny(), nullptr);
    kernels::SetDeterministic(true);
    kernels::SetThreads(1);
    model_ = std::make_unique<model::Dsv4Model>(Tiny());
  }
  void TearDown() override { kernels::SetDeterministic(false); }

  void MakeScheduler(cache::PoolCounts counts, int64_t page_size, SchedulerOptions options) {
    const auto& config = Tiny()->config;
    auto layout = StageLayoutFor(config, 0, static_cast<int>(config.num_hidden_layers), true);
    ASSERT_TRUE(layout.ok()) << layout.status();
    auto pools = cache::StatePools::Create(CacheShapesFor(config, page_size), *layout, counts);
    ASSERT_TRUE(pools.ok()) << pools.status();
    pools_ = std::move(*pools);
    for (const auto& usage : pools_->Usage()) initial_free_[usage.name] = usage.free;
    scheduler_ = std::make_unique<Scheduler>(model_.get(), pools_.get(), options);
  }

  NewRequest Request(const std::string& id, std::vector<int32_t> prompt, int64_t max_new) {
    NewRequest r;
    r.id = id;
    r.prompt = std::move(prompt);
    r.sampling.temperature = 0.0;
    r.sampling.max_new_tokens = max_new;
    r.sampling.ignore_eos = true;
    r.sink = [this, id](RequestUpdate&& update) {
      Seen& seen = seen_[id];
      ++seen.updates;
      for (const auto& t : update.tokens) seen.tokens.push_back(t.token);
      seen.retractions = update.retractions;
      seen.cached = update.cached_tokens;
      if (update.finished) {
        EXPECT_FALSE(seen.finished) << id << " finished twice";
        seen.finished = true;
        seen.status = update.status;
      }
    };
    return r;
  }

  void RunToIdle(int max_steps = 100000) {
    for (int i = 0; i < max_steps && !scheduler_->idle(); ++i) {
      auto stepped = scheduler_->Step();
      ASSERT_TRUE(stepped.ok()) << stepped.status();
    }
    ASSERT_TRUE(scheduler_->idle()) << "the scheduler did not drain";
  }

  void ExpectAllPagesBack() {
    for (const auto& usage : pools_->Usage()) {
      EXPECT_EQ(usage.free, initial_free_[usage.name]) << usage.name << " did not get every page back";
    }
    EXPECT_TRUE(scheduler_->CheckAccounting().ok());
  }

  std::unique_ptr<model::Dsv4Model> model_;
  std::unique_ptr<cache::StatePools> pools_;
  std::unique_ptr<Scheduler> scheduler_;
  std::map<std::string, int64_t> initial_free_;
  std::map<std::string, Seen> seen_;
};

TEST_F(SchedulerTest, RetractionUnderPagePressureKeepsTheTokens) {
  // 4 pages of 128 tokens. Two requests with the same prompt are admitted with two pages each; at
  // position 256 both need a third, so the newer is retracted, recomputed later, and must still
  // produce exactly the tokens of the one that ran through.
  MakeScheduler({.token_pages = 4, .window_pages = 4, .c4_state_slots = 4, .c128_state_slots = 4}, 128,
                {.chunked_prefill_size = 512, .max_running_requests = 4, .enable_prefix_cache = false});
  const auto prompt = Prompt(100, 1);
  ASSERT_TRUE(scheduler_->Add(Request("first", prompt, 200)).ok());
  ASSERT_TRUE(scheduler_->Add(Request("second", prompt, 200)).ok());
  RunToIdle();
  const Seen& first = seen_["first"];
  const Seen& second = seen_["second"];
  ASSERT_TRUE(first.finished && second.finished);
  EXPECT_TRUE(first.status.ok() && second.status.ok());
  EXPECT_EQ(first.retractions, 0);
  EXPECT_EQ(second.retractions, 1);
  EXPECT_EQ(scheduler_->Stats().retractions_total, 1);
  ASSERT_EQ(first.tokens.size(), 200u);
  EXPECT_EQ(first.tokens, second.tokens) << "the retracted request changed its output";
  ExpectAllPagesBack();
}

TEST_F(SchedulerTest, AbortWhileWaitingPrefillingOrDecodingFreesEverything) {
  MakeScheduler({.token_pages = 8, .window_pages = 4, .c4_state_slots = 4, .c128_state_slots = 4}, 256,
                {.chunked_prefill_size = 64, .max_running_requests = 2, .enable_prefix_cache = true});
  ASSERT_TRUE(scheduler_->Add(Request("decoding", Prompt(20, 2), 50)).ok());
  ASSERT_TRUE(scheduler_->Add(Request("prefilling", Prompt(600, 3), 5)).ok());
  ASSERT_TRUE(scheduler_->Add(Request("waiting", Prompt(30, 4), 5)).ok());  // max_running_requests 2
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(scheduler_->Step().ok());
  EXPECT_GT(seen_["decoding"].tokens.size(), 0u);
  EXPECT_TRUE(seen_["prefilling"].tokens.empty());
  EXPECT_EQ(scheduler_->Stats().waiting, 1);
  for (const char* id : {"waiting", "prefilling", "decoding"}) {
    EXPECT_TRUE(scheduler_->Abort(id, absl::AbortedError("test abort"))) << id;
    EXPECT_TRUE(seen_[id].finished) << id;
    EXPECT_EQ(seen_[id].status.code(), absl::StatusCode::kAborted) << id;
  }
  EXPECT_FALSE(scheduler_->Abort("decoding", absl::AbortedError("again")));
  EXPECT_TRUE(scheduler_->idle());
  ExpectAllPagesBack();
}

TEST_F(SchedulerTest, PrefixCacheHitGivesTheSameTokens) {
  MakeScheduler({.token_pages = 16, .window_pages = 8, .c4_state_slots = 8, .c128_state_slots = 4}, 256,
                {.chunked_prefill_size = 8192, .max_running_requests = 4, .enable_prefix_cache = true});
  auto shared = Prompt(300, 5);
  auto a = shared, b = shared;
  a.push_back(7);
  b.push_back(9);
  ASSERT_TRUE(scheduler_->Add(Request("a", a, 6)).ok());
  RunToIdle();
  ASSERT_TRUE(scheduler_->Add(Request("b", b, 6)).ok());
  RunToIdle();
  EXPECT_EQ(seen_["a"].cached, 0);
  EXPECT_EQ(seen_["b"].cached, 256);
  // The same prompt again, now fully computed from scratch on a fresh scheduler without a cache.
  const auto cached_tokens = seen_["b"].tokens;
  scheduler_.reset();
  MakeScheduler({.token_pages = 16, .window_pages = 8, .c4_state_slots = 8, .c128_state_slots = 4}, 256,
                {.chunked_prefill_size = 8192, .max_running_requests = 4, .enable_prefix_cache = false});
  ASSERT_TRUE(scheduler_->Add(Request("b-fresh", b, 6)).ok());
  RunToIdle();
  EXPECT_EQ(seen_["b-fresh"].tokens, cached_tokens);
}

TEST_F(SchedulerTest, BadRequestsAreRefusedWithTheField) {
  MakeScheduler({.token_pages = 2, .window_pages = 2, .c4_state_slots = 2, .c128_state_slots = 2}, 256, {});
  auto refuse = [&](NewRequest r, const std::string& needle) {
    const absl::Status status = scheduler_->Add(std::move(r));
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << needle;
    EXPECT_NE(status.message().find(needle), std::string::npos) << status.message();
  };
  refuse(Request("empty", {}, 4), "input_ids is empty");
  refuse(Request("vocab", {3, 129280}, 4), "input_ids[1] = 129280");
  refuse(Request("context", Prompt(500, 6), 100), "maximum context of 512 tokens");
  auto top = Request("top", {3}, 4);
  top.top_logprobs = 21;
  refuse(std::move(top), "top_logprobs");
  ASSERT_TRUE(scheduler_->Add(Request("ok", {3, 4}, 2)).ok());
  EXPECT_EQ(scheduler_->Add(Request("ok", {3, 4}, 2)).code(), absl::StatusCode::kAlreadyExists);
  RunToIdle();
  EXPECT_EQ(seen_["ok"].tokens.size(), 2u);
  EXPECT_TRUE(seen_.find("empty") == seen_.end()) << "a refused request must never reach its sink";
  ExpectAllPagesBack();
}

}  // namespace
}  // namespace tandem::engine
