// Bytes per token and per request (dsv4-model.md §3.5) and pool sizing from a budget.
#include "common/cache/sizing.h"

#include <gtest/gtest.h>

namespace tandem::cache {
namespace {

LayerSchedule Schedule(std::vector<int> head, int pairs, std::vector<int> tail) {
  std::vector<int> ratios = std::move(head);
  for (int i = 0; i < pairs; ++i) {
    ratios.push_back(4);
    ratios.push_back(128);
  }
  ratios.insert(ratios.end(), tail.begin(), tail.end());
  return *LayerSchedule::FromRatios(ratios, static_cast<int>(ratios.size()) - 1);
}
LayerSchedule Flash() { return Schedule({0, 0}, 20, {4, 0}); }
LayerSchedule Pro() { return Schedule({128, 128}, 29, {4, 0}); }

CacheFootprint Footprint(const LayerSchedule& schedule, StageRange stage, int64_t alignment = 0) {
  CacheShapes shapes;
  shapes.kv_page_alignment = alignment;
  return ComputeFootprint(shapes, *StageLayout::Create(schedule, stage, false));
}

TEST(SizingTest, FlashBytesPerToken) {
  const CacheFootprint f = Footprint(Flash(), {0, 43});
  // C4 KV 21·584/4 = 3066, indexer 21·132/4 = 693, C128 20·584/128 = 91.25.
  EXPECT_EQ(f.c4_kv_page_bytes, 3066 * 256);
  EXPECT_EQ(f.c4_indexer_page_bytes, 693 * 256);
  EXPECT_EQ(f.c128_kv_page_bytes, 20 * 2 * 584);
  EXPECT_DOUBLE_EQ(f.bytes_per_token(), 3850.25);
  EXPECT_EQ(static_cast<int64_t>(f.bytes_per_token()), 3850);
  // With sglang's 576-byte page padding: C4 page 37440 B, C128 page 1728 B.
  EXPECT_DOUBLE_EQ(Footprint(Flash(), {0, 43}, 576).bytes_per_token(), 3899.25);
}

TEST(SizingTest, FlashFixedBytesPerRequest) {
  const CacheFootprint f = Footprint(Flash(), {0, 43});
  EXPECT_EQ(f.window_page_bytes, 43 * 128 * 584);          // 3.21 MB
  EXPECT_EQ(f.c4_state_slot_bytes, 21 * 8 * 8192);         // 1.38 MB
  EXPECT_EQ(f.c4_indexer_state_slot_bytes, 21 * 8 * 2048);  // 0.34 MB
  EXPECT_EQ(f.c128_state_slot_bytes, 20 * 128 * 4096);     // 10.49 MB
  EXPECT_EQ(f.bytes_per_request(), 15420416);
  EXPECT_NEAR(static_cast<double>(f.bytes_per_request()) / 1e6, 15.4, 0.05);
  EXPECT_EQ(f.snapshot_bytes(), f.bytes_per_request() - f.c128_state_slot_bytes);
}

TEST(SizingTest, ProBytesPerTokenAndRequest) {
  const CacheFootprint f = Footprint(Pro(), {0, 61});
  EXPECT_DOUBLE_EQ(f.bytes_per_token(), 4380 + 990 + 141.4375);
  EXPECT_NEAR(static_cast<double>(f.bytes_per_request()) / 1e6, 23.3, 0.05);
}

TEST(SizingTest, PipelineStagesSplitTheBytes) {
  const CacheFootprint whole = Footprint(Flash(), {0, 43});
  for (int pp : {2, 3, 4}) {
    int64_t token_page = 0, window_page = 0, request = 0;
    const std::vector<StageRange> stages = *SplitStages(43, pp);
    for (StageRange stage : stages) {
      const CacheFootprint f = Footprint(Flash(), stage);
      token_page += f.token_page_bytes();
      window_page += f.window_page_bytes;
      request += f.bytes_per_request();
      EXPECT_LT(f.token_page_bytes(), whole.token_page_bytes() * 2 / pp) << "each stage counts only its own layers";
    }
    EXPECT_EQ(token_page, whole.token_page_bytes()) << "pp " << pp;
    EXPECT_EQ(window_page, whole.window_page_bytes) << "pp " << pp;
    EXPECT_EQ(request, whole.bytes_per_request()) << "pp " << pp;
  }
}

TEST(SizingTest, PlanFromMemFractionFitsTheBudget) {
  CacheShapes shapes;
  const StageLayout layout = *StageLayout::Create(Flash(), {0, 43}, false);
  SizingOptions options;
  options.mem_fraction_static = 0.85;
  options.memory_total_bytes = 80LL << 30;
  options.static_bytes = 40LL << 30;
  options.max_running_requests = 64;
  options.swa_full_tokens_ratio = 0.8;
  const auto plan = PlanPools(shapes, layout, options);
  ASSERT_TRUE(plan.ok()) << plan.status();
  const int64_t budget = static_cast<int64_t>(0.85 * (80LL << 30)) - (40LL << 30);
  EXPECT_EQ(plan->budget_bytes, budget);
  EXPECT_LE(plan->total_bytes, budget);
  EXPECT_EQ(plan->total_bytes, PoolBytes(plan->footprint, plan->counts));
  const PoolCounts& c = plan->counts;
  EXPECT_EQ(c.c128_state_slots, 64);
  EXPECT_GE(c.window_pages, 64);
  EXPECT_EQ(c.c4_state_slots, c.window_pages);
  // Window pages follow the ratio: 0.8 · tokens / 128 tokens per window page.
  EXPECT_NEAR(static_cast<double>(c.window_pages), 0.8 * static_cast<double>(plan->max_tokens()) / 128.0, 1.0);
  // Nearly all of the budget is used: one more token page and its windows would not fit.
  const double per_page = static_cast<double>(plan->footprint.token_page_bytes()) +
                          2 * 0.8 * static_cast<double>(plan->footprint.snapshot_bytes());
  EXPECT_LT(static_cast<double>(budget - plan->total_bytes), per_page + static_cast<double>(plan->footprint.snapshot_bytes()));
  EXPECT_NE(plan->Summary().find("3850.25 B/token"), std::string::npos) << plan->Summary();
}

TEST(SizingTest, RunningRequestsAlwaysGetTheirWindows) {
  CacheShapes shapes;
  const StageLayout layout = *StageLayout::Create(Flash(), {0, 43}, false);
  SizingOptions options;
  options.budget_bytes = 4LL << 30;
  options.max_running_requests = 128;
  options.swa_full_tokens_ratio = 0.01;
  const auto plan = PlanPools(shapes, layout, options);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->counts.window_pages, 128);
  EXPECT_LE(plan->total_bytes, options.budget_bytes);
  EXPECT_GT(plan->counts.token_pages, 0);
}

TEST(SizingTest, ShortOrBadBudgetsAreClearErrors) {
  CacheShapes shapes;
  const StageLayout layout = *StageLayout::Create(Flash(), {0, 43}, false);
  SizingOptions options;
  options.budget_bytes = 100LL << 20;  // 100 MiB cannot hold 64 requests at 15.4 MB each
  options.max_running_requests = 64;
  const auto short_budget = PlanPools(shapes, layout, options).status();
  EXPECT_EQ(short_budget.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(short_budget.message().find("64 running requests"), std::string::npos) << short_budget;
  options.budget_bytes = 0;
  options.mem_fraction_static = 1.5;
  options.memory_total_bytes = 1LL << 30;
  EXPECT_EQ(PlanPools(shapes, layout, options).status().code(), absl::StatusCode::kInvalidArgument);
  options.mem_fraction_static = 0.5;
  options.static_bytes = 1LL << 30;
  EXPECT_EQ(PlanPools(shapes, layout, options).status().code(), absl::StatusCode::kResourceExhausted);
  options.budget_bytes = 8LL << 30;
  options.max_running_requests = 0;
  EXPECT_EQ(PlanPools(shapes, layout, options).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tandem::cache
