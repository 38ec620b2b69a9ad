// Page allocator: all-or-nothing allocation, reference counts, misuse as errors, and every page accounted for.
#include "common/cache/page_allocator.h"

#include <random>
#include <set>

#include <gtest/gtest.h>

namespace tandem::cache {
namespace {

TEST(PageAllocatorTest, FreshPoolHandsOutLowestIdsFirst) {
  PageAllocator pool("test", 4);
  EXPECT_EQ(pool.total(), 4);
  EXPECT_EQ(pool.free(), 4);
  std::vector<PageId> pages;
  ASSERT_TRUE(pool.Allocate(3, &pages).ok());
  EXPECT_EQ(pages, (std::vector<PageId>{0, 1, 2}));
  EXPECT_EQ(pool.used(), 3);
  EXPECT_EQ(pool.refcount(1), 1);
  EXPECT_TRUE(pool.CheckAccounting().ok());
}

TEST(PageAllocatorTest, AllocateIsAllOrNothing) {
  PageAllocator pool("window_kv", 4);
  std::vector<PageId> pages;
  ASSERT_TRUE(pool.Allocate(3, &pages).ok());
  const auto status = pool.Allocate(2, &pages);
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(status.message().find("window_kv: need 2 pages, 1 of 4 free"), std::string::npos) << status;
  EXPECT_EQ(pages.size(), 3u);
  EXPECT_EQ(pool.free(), 1);
  EXPECT_EQ(pool.Allocate(-1, &pages).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(pool.Allocate(0, &pages).ok());
  EXPECT_TRUE(pool.CheckAccounting().ok());
}

TEST(PageAllocatorTest, SharedPagesLiveUntilTheLastReference) {
  PageAllocator pool("test", 2);
  const auto page = pool.AllocateOne();
  ASSERT_TRUE(page.ok());
  ASSERT_TRUE(pool.AddRef(*page).ok());
  EXPECT_EQ(pool.refcount(*page), 2);
  ASSERT_TRUE(pool.Release(*page).ok());
  EXPECT_EQ(pool.used(), 1) << "still held by its second owner";
  ASSERT_TRUE(pool.Release(*page).ok());
  EXPECT_EQ(pool.free(), 2);
  EXPECT_TRUE(pool.CheckAccounting().ok());
}

TEST(PageAllocatorTest, DoubleFreeAndForeignIdsAreErrorsThatChangeNothing) {
  PageAllocator pool("c4_state", 3);
  const PageId page = *pool.AllocateOne();
  ASSERT_TRUE(pool.Release(page).ok());
  const auto twice = pool.Release(page);
  EXPECT_EQ(twice.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(twice.message().find("double free"), std::string::npos) << twice;
  EXPECT_EQ(pool.Release(kNoPage).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(pool.Release(3).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(pool.AddRef(page).code(), absl::StatusCode::kFailedPrecondition) << "a free page cannot gain an owner";
  EXPECT_EQ(pool.AddRef(99).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(pool.refcount(99), 0);
  EXPECT_EQ(pool.free(), 3);
  EXPECT_TRUE(pool.CheckAccounting().ok());
}

TEST(PageAllocatorTest, SpanReleaseChecksEveryPageBeforeTouchingAny) {
  PageAllocator pool("test", 4);
  std::vector<PageId> pages;
  ASSERT_TRUE(pool.Allocate(2, &pages).ok());
  // Page 1 listed twice but held once: the whole call fails and page 0 keeps its reference.
  const std::vector<PageId> bad = {0, 1, 1};
  EXPECT_EQ(pool.Release(bad).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(pool.refcount(0), 1);
  EXPECT_EQ(pool.refcount(1), 1);
  const std::vector<PageId> foreign = {0, 7};
  EXPECT_EQ(pool.Release(foreign).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(pool.AddRef(foreign).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(pool.refcount(0), 1);
  ASSERT_TRUE(pool.AddRef(pages).ok());
  const std::vector<PageId> twice = {0, 0, 1, 1};
  ASSERT_TRUE(pool.Release(twice).ok());
  EXPECT_EQ(pool.free(), 4);
  EXPECT_TRUE(pool.CheckAccounting().ok());
}

TEST(PageAllocatorTest, RandomTrafficKeepsEveryPageAccountedFor) {
  PageAllocator pool("test", 32);
  std::mt19937 rng(5);
  std::vector<PageId> held;  // one entry per reference we own
  for (int step = 0; step < 2000; ++step) {
    const int op = static_cast<int>(rng() % 3);
    if (op == 0) {
      const int64_t count = static_cast<int64_t>(rng() % 5);
      const int64_t free_before = pool.free();
      const auto status = pool.Allocate(count, &held);
      EXPECT_EQ(status.ok(), count <= free_before);
    } else if (op == 1 && !held.empty()) {
      const PageId page = held[rng() % held.size()];
      ASSERT_TRUE(pool.AddRef(page).ok());
      held.push_back(page);
    } else if (!held.empty()) {
      const size_t i = rng() % held.size();
      ASSERT_TRUE(pool.Release(held[i]).ok());
      held.erase(held.begin() + static_cast<std::ptrdiff_t>(i));
    }
    ASSERT_TRUE(pool.CheckAccounting().ok()) << "step " << step;
    ASSERT_EQ(pool.used(), static_cast<int64_t>(std::set<PageId>(held.begin(), held.end()).size()));
  }
  ASSERT_TRUE(pool.Release(held).ok());
  EXPECT_EQ(pool.free(), 32);
  EXPECT_TRUE(pool.CheckAccounting().ok());
}

}  // namespace
}  // namespace tandem::cache
