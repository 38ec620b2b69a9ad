// Byte layouts of the DSV4 pools (dsv4-model.md §3.2) and the pools' addressing, slots and snapshots.
#include "common/cache/pools.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <random>

#include <gtest/gtest.h>

namespace tandem::cache {
namespace {

TEST(LayoutTest, KvPageIsDataBlockThenScaleBlock) {
  const kernels::KvFormat format{448, 64};
  const KvPageLayout c4 = KvPageLayout::Make(64, format, 0);
  EXPECT_EQ(c4.data_bytes, 576);
  EXPECT_EQ(c4.scale_bytes, 8);
  EXPECT_EQ(c4.page_bytes, 64 * 584);
  EXPECT_EQ(c4.data_offset(3), 3 * 576);
  EXPECT_EQ(c4.scale_offset(0), 64 * 576);
  EXPECT_EQ(c4.scale_offset(63), 64 * 576 + 63 * 8);
  // sglang pads every page to a multiple of 576 bytes (C4 page 37440 B, C128 page 1728 B).
  EXPECT_EQ(KvPageLayout::Make(64, format, 576).page_bytes, 37440);
  EXPECT_EQ(KvPageLayout::Make(2, format, 0).page_bytes, 1168);
  EXPECT_EQ(KvPageLayout::Make(2, format, 576).page_bytes, 1728);
}

TEST(LayoutTest, IndexerPagesAndRings) {
  const IndexerPageLayout indexer = IndexerPageLayout::Make(64, 128);
  EXPECT_EQ(indexer.entry_bytes, 132);
  EXPECT_EQ(indexer.page_bytes, 64 * 132);
  const RingLayout c4 = RingLayout::Make(4, 512), c4_indexer = RingLayout::Make(4, 128), c128 = RingLayout::Make(128, 512);
  EXPECT_EQ(c4.rows, 8);
  EXPECT_EQ(c4.row_floats, 2048);  // [kv 2·512 | score 2·512]
  EXPECT_EQ(c4.slot_bytes, 8 * 8192);
  EXPECT_EQ(c4_indexer.slot_bytes, 8 * 2048);
  EXPECT_EQ(c128.rows, 128);
  EXPECT_EQ(c128.row_floats, 1024);
  EXPECT_EQ(c128.slot_bytes, 128 * 4096);
}

// The tiny model's schedule: layers 0..3 with ratios 0, 4, 128, 4, then MTP.
StageLayout TinyLayout() {
  const std::vector<int> ratios = {0, 4, 128, 4, 0};
  return *StageLayout::Create(*LayerSchedule::FromRatios(ratios, 4), {0, 4}, true);
}

std::unique_ptr<StatePools> TinyPools(PoolCounts counts = {4, 3, 3, 2}, int64_t page_size = 256) {
  CacheShapes shapes;
  shapes.page_size = page_size;
  auto pools = StatePools::Create(shapes, TinyLayout(), counts);
  EXPECT_TRUE(pools.ok()) << pools.status();
  return pools.ok() ? std::move(*pools) : nullptr;
}

TEST(PoolsTest, AddressesFollowTheLayerMajorPagedLayout) {
  auto pools = TinyPools();
  ASSERT_TRUE(pools);
  // Window: 5 layers (4 + MTP) × 3 pages × 128 entries.
  const auto window = pools->region(PoolKind::kWindowKv);
  const int64_t window_page = 128 * 584;
  ASSERT_EQ(static_cast<int64_t>(window.size()), 5 * 3 * window_page);
  const KvEntryRef w = pools->window_kv(StageLayerIndex(4), 2, 5);
  EXPECT_EQ(w.data - window.data(), (4 * 3 + 2) * window_page + 5 * 576);
  EXPECT_EQ(w.scales - window.data(), (4 * 3 + 2) * window_page + 128 * 576 + 5 * 8);
  // C4 KV: 2 C4 layers × 4 token pages × 64 entries.
  const auto c4 = pools->region(PoolKind::kC4Kv);
  const int64_t c4_page = 64 * 584;
  ASSERT_EQ(static_cast<int64_t>(c4.size()), 2 * 4 * c4_page);
  const KvEntryRef k = pools->c4_kv(CompressedLayerIndex<4>(1), 3, 63);
  EXPECT_EQ(k.data - c4.data(), (1 * 4 + 3) * c4_page + 63 * 576);
  EXPECT_EQ(k.scales - c4.data(), (1 * 4 + 3) * c4_page + 64 * 576 + 63 * 8);
  // Indexer keys: contiguous 132-byte entries.
  const auto indexer = pools->region(PoolKind::kC4Indexer);
  EXPECT_EQ(pools->c4_indexer_key(CompressedLayerIndex<4>(0), 1, 2) - indexer.data(), 1 * 64 * 132 + 2 * 132);
  // C128 KV: 1 layer × 4 pages × 2 entries.
  const auto c128 = pools->region(PoolKind::kC128Kv);
  ASSERT_EQ(static_cast<int64_t>(c128.size()), 4 * 2 * 584);
  EXPECT_EQ(pools->c128_kv(CompressedLayerIndex<128>(0), 2, 1).scales - c128.data(), 2 * 1168 + 2 * 576 + 8);
}

TEST(PoolsTest, KvEntriesRoundTripThroughPageBytes) {
  auto pools = TinyPools();
  ASSERT_TRUE(pools);
  const kernels::KvFormat format{448, 64};
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  std::vector<float> x(512), back(512), direct(512);
  for (auto& v : x) v = normal(rng);
  std::vector<uint8_t> data(576), scales(8);
  kernels::QuantizeKvEntry(format, x.data(), data.data(), scales.data());
  kernels::DequantizeKvEntry(format, data.data(), scales.data(), direct.data());
  // Written into a page, read back from the raw region at the documented offsets.
  const KvEntryRef slot = pools->c4_kv(CompressedLayerIndex<4>(1), 2, 17);
  kernels::QuantizeKvEntry(format, x.data(), slot.data, slot.scales);
  const uint8_t* page = pools->region(PoolKind::kC4Kv).data() + (1 * 4 + 2) * 64 * 584;
  EXPECT_EQ(std::memcmp(page + 17 * 576, data.data(), 576), 0);
  EXPECT_EQ(std::memcmp(page + 64 * 576 + 17 * 8, scales.data(), 8), 0);
  kernels::DequantizeKvEntry(format, page + 17 * 576, page + 64 * 576 + 17 * 8, back.data());
  EXPECT_EQ(back, direct);
}

TEST(PoolsTest, CompressorRowsAreLookedUpByGlobalLayerId) {
  auto pools = TinyPools();
  ASSERT_TRUE(pools);
  auto slots = pools->AcquireSlots();
  ASSERT_TRUE(slots.ok()) << slots.status();
  // Layer 3 is the second C4 layer: its rows sit in the second layer block of the C4 ring pools.
  const float* row = pools->compressor_row(GlobalLayerId(3), StateKind::kC4Attention, slots->c4_state, 9);
  const auto* base = reinterpret_cast<const float*>(pools->region(PoolKind::kC4State).data());
  EXPECT_EQ(row - base, (1 * 3 + slots->c4_state) * 8 * 2048 + (9 % 8) * 2048);
  EXPECT_NE(pools->compressor_row(GlobalLayerId(2), StateKind::kC128, slots->c128_state, 200), nullptr);
  // No ring for window-only layers, the wrong kind, or layers outside the stage.
  EXPECT_EQ(pools->compressor_row(GlobalLayerId(0), StateKind::kC4Attention, slots->c4_state, 0), nullptr);
  EXPECT_EQ(pools->compressor_row(GlobalLayerId(2), StateKind::kC4Indexer, slots->c4_indexer_state, 0), nullptr);
  EXPECT_EQ(pools->compressor_row(GlobalLayerId(4), StateKind::kC4Attention, slots->c4_state, 0), nullptr);
  EXPECT_EQ(pools->compressor_row(GlobalLayerId(9), StateKind::kC128, slots->c128_state, 0), nullptr);
  // Fresh rings are clear: kv 0, score -inf.
  const float* indexer_row = pools->compressor_row(GlobalLayerId(1), StateKind::kC4Indexer, slots->c4_indexer_state, 4);
  EXPECT_EQ(indexer_row[0], 0.0f);
  EXPECT_EQ(indexer_row[255], 0.0f);
  EXPECT_TRUE(std::isinf(indexer_row[256]) && indexer_row[256] < 0);
  EXPECT_TRUE(pools->ReleaseSlots(*slots).ok());
  EXPECT_EQ(slots->window, kNoPage);
}

TEST(PoolsTest, AcquireSlotsIsAllOrNothing) {
  auto pools = TinyPools({4, 3, 3, 1});  // one C128 ring: the second request cannot start
  ASSERT_TRUE(pools);
  auto first = pools->AcquireSlots();
  ASSERT_TRUE(first.ok());
  const auto second = pools->AcquireSlots();
  EXPECT_EQ(second.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(second.status().message().find("c128_state"), std::string::npos) << second.status();
  for (const auto& usage : pools->Usage()) {
    const bool per_request = usage.kind == PoolKind::kWindowKv || usage.kind == PoolKind::kC4State ||
                             usage.kind == PoolKind::kC4IndexerState || usage.kind == PoolKind::kC128State;
    EXPECT_EQ(usage.used, per_request ? 1 : 0) << usage.name;
  }
  ASSERT_TRUE(pools->ReleaseSlots(*first).ok());
  EXPECT_TRUE(pools->CheckAccounting().ok());
}

TEST(PoolsTest, SnapshotCopiesWindowAndC4RingsExactly) {
  auto pools = TinyPools();
  ASSERT_TRUE(pools);
  auto from = *pools->AcquireSlots();
  // Scribble over the source's window and rings.
  std::mt19937 rng(9);
  for (int layer = 0; layer < 5; ++layer) {
    for (int slot = 0; slot < 128; ++slot) {
      const KvEntryRef e = pools->window_kv(StageLayerIndex(layer), from.window, slot);
      for (int b = 0; b < 576; ++b) e.data[b] = static_cast<uint8_t>(rng());
      for (int b = 0; b < 8; ++b) e.scales[b] = static_cast<uint8_t>(rng());
    }
  }
  for (int g : {1, 3}) {
    for (int row = 0; row < 8; ++row) {
      pools->compressor_row(GlobalLayerId(g), StateKind::kC4Attention, from.c4_state, row)[7] = static_cast<float>(rng());
      pools->compressor_row(GlobalLayerId(g), StateKind::kC4Indexer, from.c4_indexer_state, row)[3] = static_cast<float>(rng());
    }
  }
  EXPECT_EQ(pools->Capture(from, 100, 0).status().code(), absl::StatusCode::kFailedPrecondition) << "not page aligned";
  auto snapshot = pools->Capture(from, 256, 255);
  ASSERT_TRUE(snapshot.ok()) << snapshot.status();
  EXPECT_EQ(snapshot->slots.c128_state, kNoPage) << "the C128 ring is empty at a page boundary";
  EXPECT_EQ(pools->window_pages().used(), 2);

  auto into = *pools->AcquireSlots();
  ASSERT_TRUE(pools->Restore(*snapshot, into).ok());
  for (int layer = 0; layer < 5; ++layer) {
    const KvEntryRef a = pools->window_kv(StageLayerIndex(layer), from.window, 0);
    const KvEntryRef b = pools->window_kv(StageLayerIndex(layer), into.window, 0);
    EXPECT_EQ(std::memcmp(a.data, b.data, 128 * 584), 0) << "layer " << layer;  // the whole page
  }
  for (int g : {1, 3}) {
    for (auto [kind, a, b] : {std::tuple{StateKind::kC4Attention, from.c4_state, into.c4_state},
                              std::tuple{StateKind::kC4Indexer, from.c4_indexer_state, into.c4_indexer_state}}) {
      const int64_t bytes = pools->ring_layout(kind).slot_bytes;
      EXPECT_EQ(std::memcmp(pools->compressor_row(GlobalLayerId(g), kind, a, 0), pools->compressor_row(GlobalLayerId(g), kind, b, 0),
                            static_cast<size_t>(bytes)), 0);
    }
  }
  ASSERT_TRUE(pools->ReleaseSnapshot(*snapshot).ok());
  ASSERT_TRUE(pools->ReleaseSlots(from).ok());
  ASSERT_TRUE(pools->ReleaseSlots(into).ok());
  for (const auto& usage : pools->Usage()) EXPECT_EQ(usage.used, 0) << usage.name;
  EXPECT_TRUE(pools->CheckAccounting().ok());
}

TEST(PoolsTest, UsageNamesEveryPoolAndCompressedPoolsMoveInLockStep) {
  auto pools = TinyPools();
  ASSERT_TRUE(pools);
  std::vector<PageId> pages;
  ASSERT_TRUE(pools->token_pages().Allocate(3, &pages).ok());
  std::vector<std::string> names;
  for (const auto& usage : pools->Usage()) {
    names.push_back(usage.name);
    if (usage.kind == PoolKind::kC4Kv || usage.kind == PoolKind::kC4Indexer || usage.kind == PoolKind::kC128Kv) {
      EXPECT_EQ(usage.used, 3) << usage.name;
      EXPECT_EQ(usage.free, 1) << usage.name;
    }
  }
  EXPECT_EQ(names, (std::vector<std::string>{"window_kv", "c4_kv", "c4_indexer", "c128_kv", "c4_state", "c4_indexer_state",
                                             "c128_state"}));
  ASSERT_TRUE(pools->token_pages().Release(pages).ok());
}

TEST(PoolsTest, BadShapesAndCountsAreErrors) {
  CacheShapes shapes;
  shapes.page_size = 64;  // not a multiple of 128 while the stage has a C128 layer
  const auto status = StatePools::Create(shapes, TinyLayout(), {4, 3, 3, 2}).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("multiple of 128"), std::string::npos) << status;
  EXPECT_FALSE(StatePools::Create(CacheShapes{}, TinyLayout(), {4, 3, 0, 2}).ok()) << "C4 layers need C4 state slots";
  EXPECT_FALSE(StatePools::Create(CacheShapes{}, TinyLayout(), {0, 3, 3, 2}).ok());
}

TEST(PoolsTest, RegionsComeFromTheGivenAllocatorAndItsErrorsNameThePool) {
  // What a transport does: it owns the memory (so a peer can map it) and the pools use it.
  std::vector<std::unique_ptr<uint8_t[]>> owned;
  std::map<std::string, int64_t> asked;
  RegionAllocator counting = [&](std::string_view name, int64_t bytes) -> absl::StatusOr<uint8_t*> {
    asked[std::string(name)] = bytes;
    owned.push_back(std::make_unique<uint8_t[]>(static_cast<size_t>(bytes)));
    return owned.back().get();
  };
  CacheShapes shapes;
  auto pools = StatePools::Create(shapes, TinyLayout(), {4, 3, 3, 2}, counting);
  ASSERT_TRUE(pools.ok()) << pools.status();
  for (PoolKind kind : kAllPools) {
    const auto region = (*pools)->region(kind);
    if (region.empty()) continue;
    ASSERT_TRUE(asked.contains(PoolName(kind))) << PoolName(kind) << " was not allocated through the allocator";
    EXPECT_EQ(asked[PoolName(kind)], static_cast<int64_t>(region.size()));
    const bool from_allocator = std::any_of(owned.begin(), owned.end(), [&](const auto& p) { return p.get() == region.data(); });
    EXPECT_TRUE(from_allocator) << PoolName(kind);
  }
  RegionAllocator failing = [&](std::string_view name, int64_t bytes) -> absl::StatusOr<uint8_t*> {
    if (name == "c4_kv") return absl::ResourceExhaustedError("no shared memory left");
    return counting(name, bytes);
  };
  const auto refused = StatePools::Create(shapes, TinyLayout(), {4, 3, 3, 2}, failing).status();
  EXPECT_FALSE(refused.ok());
  EXPECT_NE(refused.message().find("c4_kv"), std::string::npos) << refused;
}

// Device regions: every write the pools make to their own memory goes through the given copy (a host
// memcpy here would touch GPU memory), and a failing copy fails the call and takes nothing.
TEST(PoolsTest, OwnWritesGoThroughTheRegionCopy) {
  std::vector<std::unique_ptr<uint8_t[]>> owned;
  RegionAllocator heap = [&](std::string_view, int64_t bytes) -> absl::StatusOr<uint8_t*> {
    owned.push_back(std::make_unique<uint8_t[]>(static_cast<size_t>(bytes)));
    return owned.back().get();
  };
  int64_t copies = 0, copied_bytes = 0;
  bool fail = false;
  RegionCopy counting = [&](void* dst, const void* src, size_t bytes) -> absl::Status {
    if (fail) return absl::InternalError("copy engine fault");
    ++copies;
    copied_bytes += static_cast<int64_t>(bytes);
    std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  };
  auto created = StatePools::Create(CacheShapes{}, TinyLayout(), {4, 3, 3, 2}, heap, counting);
  ASSERT_TRUE(created.ok()) << created.status();
  auto& pools = **created;
  auto slots = pools.AcquireSlots();
  ASSERT_TRUE(slots.ok()) << slots.status();
  // Rings cleared through the copy: one per layer of each ring kind, kv 0 and score -inf.
  const int64_t ring_layers = pools.layers(PoolKind::kC4State) + pools.layers(PoolKind::kC4IndexerState) +
                              pools.layers(PoolKind::kC128State);
  EXPECT_EQ(copies, ring_layers);
  const auto& ring = pools.ring_layout(StateKind::kC4Attention);
  const float* row = pools.compressor_row(GlobalLayerId(1), StateKind::kC4Attention, slots->c4_state, 5);
  EXPECT_EQ(row[0], 0.0f);
  EXPECT_TRUE(std::isinf(row[ring.row_floats / 2]) && row[ring.row_floats / 2] < 0);
  // Snapshots copy through it too.
  copies = 0;
  auto snapshot = pools.Capture(*slots, 256, 0);
  ASSERT_TRUE(snapshot.ok()) << snapshot.status();
  EXPECT_EQ(copies, pools.layers(PoolKind::kWindowKv) + pools.layers(PoolKind::kC4State) +
                        pools.layers(PoolKind::kC4IndexerState));
  // A failing copy: no slots taken, the error says why.
  fail = true;
  const auto refused = pools.AcquireSlots();
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInternal);
  EXPECT_NE(refused.status().message().find("copy engine fault"), std::string::npos) << refused.status();
  EXPECT_EQ(pools.window_pages().used(), 2) << "the source and the snapshot only";
  fail = false;
  ASSERT_TRUE(pools.ReleaseSnapshot(*snapshot).ok());
  ASSERT_TRUE(pools.ReleaseSlots(*slots).ok());
  EXPECT_TRUE(pools.CheckAccounting().ok());
}

}  // namespace
}  // namespace tandem::cache
