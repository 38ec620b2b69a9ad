// Radix prefix cache: insert, match at restorable boundaries only, lock/unlock, LRU eviction back to the pools.
#include "common/cache/radix_cache.h"

#include <numeric>

#include <gtest/gtest.h>

namespace tandem::cache {
namespace {

constexpr int64_t kPage = 8;

// Window + C4 layers only, so small pages are allowed: ratios {0, 4}, 8-token pages, 8-entry windows.
class RadixCacheTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::vector<int> ratios = {0, 4};
    const StageLayout layout = *StageLayout::Create(*LayerSchedule::FromRatios(ratios, 2), {0, 2}, false);
    CacheShapes shapes;
    shapes.page_size = kPage;
    shapes.sliding_window = 8;
    auto pools = StatePools::Create(shapes, layout, {16, 8, 8, 0});
    ASSERT_TRUE(pools.ok()) << pools.status();
    pools_ = std::move(*pools);
    cache_ = std::make_unique<RadixCache>(pools_.get());
  }
  void TearDown() override {
    cache_.reset();
    for (const auto& usage : pools_->Usage()) EXPECT_EQ(usage.used, 0) << usage.name << " leaked";
    EXPECT_TRUE(pools_->CheckAccounting().ok());
  }

  // A finished request: its token pages and the snapshots it captured at the given lengths.
  struct Request {
    std::vector<PageId> pages;
    StateSlots slots;
    std::vector<BoundarySnapshot> snapshots;
  };
  Request Run(int64_t tokens, std::vector<int64_t> snapshot_lengths) {
    Request request;
    EXPECT_TRUE(pools_->token_pages().Allocate(tokens / kPage, &request.pages).ok());
    request.slots = *pools_->AcquireSlots();
    for (int64_t length : snapshot_lengths) request.snapshots.push_back(*pools_->Capture(request.slots, length, 0));
    return request;
  }
  // Inserts and then ends the request (its own page references and slots go back).
  int64_t InsertAndFinish(const std::vector<int32_t>& tokens, Request request) {
    auto added = cache_->Insert(tokens, request.pages, std::move(request.snapshots));
    EXPECT_TRUE(added.ok()) << added.status();
    EXPECT_TRUE(pools_->token_pages().Release(request.pages).ok());
    EXPECT_TRUE(pools_->ReleaseSlots(request.slots).ok());
    return added.ok() ? *added : -1;
  }

  static std::vector<int32_t> Tokens(int64_t n, int32_t first = 0) {
    std::vector<int32_t> tokens(static_cast<size_t>(n));
    std::iota(tokens.begin(), tokens.end(), first);
    return tokens;
  }

  std::unique_ptr<StatePools> pools_;
  std::unique_ptr<RadixCache> cache_;
};

TEST_F(RadixCacheTest, MatchEndsAtTheLongestBoundaryWithASnapshot) {
  const auto a = Tokens(32);
  Request request = Run(32, {16, 32});
  const std::vector<PageId> pages = request.pages;
  EXPECT_EQ(InsertAndFinish(a, std::move(request)), 32);

  auto whole = cache_->MatchPrefix(a);
  EXPECT_EQ(whole.tokens, 32);
  EXPECT_EQ(whole.pages, pages);
  EXPECT_EQ(whole.snapshot.length, 32);
  EXPECT_TRUE(whole.node.valid());

  // Diverging inside page 3: three pages match, the last snapshot before that is at 16.
  auto diverged = a;
  diverged[27] = 999;
  auto partial = cache_->MatchPrefix(diverged);
  EXPECT_EQ(partial.matched_tokens, 24);
  EXPECT_EQ(partial.tokens, 16);
  EXPECT_EQ(partial.pages, std::vector<PageId>(pages.begin(), pages.begin() + 2));
  EXPECT_EQ(partial.snapshot.length, 16);

  // A partial page never matches; nor does a different first page.
  EXPECT_EQ(cache_->MatchPrefix(std::span(a).first(15)).tokens, 0);
  EXPECT_EQ(cache_->MatchPrefix(std::span(a).first(15)).matched_tokens, 8);
  EXPECT_EQ(cache_->MatchPrefix(Tokens(32, 1)).matched_tokens, 0);
  cache_->Evict(16, 8);
}

TEST_F(RadixCacheTest, PrefixIsReusableOnlyWhereStateCanBeRestored) {
  const auto a = Tokens(32);
  EXPECT_EQ(InsertAndFinish(a, Run(32, {32})), 32);
  // 24 tokens match, but no snapshot exists below 32: nothing can be reused.
  auto match = cache_->MatchPrefix(std::span(a).first(31));
  EXPECT_EQ(match.matched_tokens, 24);
  EXPECT_EQ(match.tokens, 0);
  EXPECT_TRUE(match.pages.empty());
  EXPECT_FALSE(match.node.valid());
  // A later request that captured 16 fills the gap; its duplicate 32 snapshot is released.
  const int64_t window_used = pools_->window_pages().used();
  EXPECT_EQ(InsertAndFinish(a, Run(32, {16, 32})), 0) << "no new tokens";
  EXPECT_EQ(pools_->window_pages().used(), window_used + 1);
  EXPECT_EQ(cache_->MatchPrefix(std::span(a).first(31)).tokens, 16);
  EXPECT_EQ(cache_->stats().snapshots, 2);
  cache_->Evict(16, 8);
}

TEST_F(RadixCacheTest, SharedPrefixSplitsANodeAndKeepsTheTreePages) {
  const auto a = Tokens(32);
  Request first = Run(32, {16, 32});
  const std::vector<PageId> tree_pages = first.pages;
  InsertAndFinish(a, std::move(first));
  auto b = Tokens(40);
  b[20] = 777;  // shares pages 0 and 1 with a
  Request second = Run(40, {16, 24, 40});
  // The tree holds a's pages; b's own copies of pages 0, 1 stay b's and go back when b ends.
  EXPECT_EQ(InsertAndFinish(b, std::move(second)), 24);
  const auto stats = cache_->stats();
  EXPECT_EQ(stats.nodes, 3);  // shared 16 tokens, then a's and b's tails
  EXPECT_EQ(stats.cached_tokens, 32 + 24);
  EXPECT_EQ(stats.snapshots, 4) << "16 (kept from a), 32, 24 and 40";
  EXPECT_EQ(pools_->token_pages().used(), 4 + 3);
  auto match_b = cache_->MatchPrefix(b);
  EXPECT_EQ(match_b.tokens, 40);
  EXPECT_EQ(match_b.pages[0], tree_pages[0]);
  EXPECT_EQ(match_b.pages[1], tree_pages[1]);
  EXPECT_EQ(cache_->MatchPrefix(a).tokens, 32);
  cache_->Evict(16, 8);
  EXPECT_EQ(cache_->stats().nodes, 0);
}

TEST_F(RadixCacheTest, LockedPrefixesAreNeverEvicted) {
  const auto a = Tokens(16), b = Tokens(16, 100);
  InsertAndFinish(a, Run(16, {16}));
  InsertAndFinish(b, Run(16, {16}));
  auto match = cache_->MatchPrefix(a);
  ASSERT_EQ(match.tokens, 16);
  // A request resuming from `a` shares its pages and locks the node.
  ASSERT_TRUE(pools_->token_pages().AddRef(match.pages).ok());
  cache_->Lock(match.node);
  const auto evicted = cache_->Evict(16, 8);
  EXPECT_EQ(evicted.nodes, 1);
  EXPECT_EQ(evicted.token_pages_freed, 2);
  EXPECT_EQ(evicted.window_pages_freed, 1);
  EXPECT_EQ(cache_->MatchPrefix(a).tokens, 16) << "the locked prefix survived";
  EXPECT_EQ(cache_->MatchPrefix(b).tokens, 0);
  EXPECT_EQ(cache_->stats().locked_nodes, 1);
  // Unlocked, it goes too; the request's own references keep its pages alive until it ends.
  ASSERT_TRUE(cache_->Unlock(match.node).ok());
  EXPECT_EQ(cache_->Unlock(match.node).code(), absl::StatusCode::kFailedPrecondition);
  const auto rest = cache_->Evict(16, 8);
  EXPECT_EQ(rest.nodes, 1);
  EXPECT_EQ(rest.token_pages_freed, 0);
  ASSERT_TRUE(pools_->token_pages().Release(match.pages).ok());
}

TEST_F(RadixCacheTest, EvictsLeastRecentlyUsedFirstAndTrimsFromTheTail) {
  const auto a = Tokens(24), b = Tokens(24, 100);
  InsertAndFinish(a, Run(24, {8, 24}));
  InsertAndFinish(b, Run(24, {24}));
  cache_->MatchPrefix(a);  // a is now the most recently used
  const int64_t free_before = pools_->token_pages().free();
  // One page more: b loses its last page and, with it, its only snapshot.
  const auto evicted = cache_->Evict(free_before + 1);
  EXPECT_EQ(evicted.token_pages_freed, 1);
  EXPECT_EQ(evicted.nodes, 0);
  EXPECT_EQ(evicted.window_pages_freed, 1);
  EXPECT_EQ(cache_->MatchPrefix(b).matched_tokens, 16);
  EXPECT_EQ(cache_->MatchPrefix(b).tokens, 0);
  EXPECT_EQ(cache_->MatchPrefix(a).tokens, 24);
  // Asking for nothing evicts nothing.
  EXPECT_EQ(cache_->Evict(0).token_pages_freed, 0);
  // Everything: both chains go and every page returns to its pool.
  const auto all = cache_->Evict(16, 8);
  EXPECT_EQ(all.nodes, 2);
  EXPECT_EQ(pools_->token_pages().free(), 16);
  EXPECT_EQ(pools_->window_pages().free(), 8);
}

TEST_F(RadixCacheTest, InvalidInsertsChangeNothingAndReleaseTheSnapshots) {
  Request request = Run(16, {8, 16});
  const auto tokens = Tokens(16);
  // Token count not matching the pages.
  std::vector<BoundarySnapshot> first = {request.snapshots[0]};
  EXPECT_EQ(cache_->Insert(std::span(tokens).first(12), request.pages, first).status().code(),
            absl::StatusCode::kInvalidArgument);
  // A page that is not allocated.
  const std::vector<PageId> foreign = {request.pages[0], 15};
  std::vector<BoundarySnapshot> second = {request.snapshots[1]};
  EXPECT_EQ(cache_->Insert(tokens, foreign, second).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cache_->stats().nodes, 0);
  EXPECT_EQ(pools_->window_pages().used(), 1) << "both snapshots went back; only the request's window is left";
  // A snapshot off a page boundary.
  BoundarySnapshot odd = *pools_->Capture(request.slots, 8, 0);
  odd.length = 12;
  EXPECT_EQ(cache_->Insert(tokens, request.pages, {odd}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(pools_->token_pages().refcount(request.pages[0]), 1) << "no reference taken";
  ASSERT_TRUE(pools_->token_pages().Release(request.pages).ok());
  ASSERT_TRUE(pools_->ReleaseSlots(request.slots).ok());
}

TEST_F(RadixCacheTest, DestroyingTheCacheReturnsEverything) {
  InsertAndFinish(Tokens(40), Run(40, {8, 16, 40}));
  InsertAndFinish(Tokens(16, 50), Run(16, {16}));
  EXPECT_GT(pools_->token_pages().used(), 0);
  cache_.reset();  // TearDown checks every pool is empty
}

}  // namespace
}  // namespace tandem::cache
