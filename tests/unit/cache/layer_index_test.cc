// Layer index spaces pinned on the real V4-Flash schedule ([0,0] + [4,128]*20 + [4,0]), whole and split
// into pipeline stages (runtime-features.md §2 and §4).
#include "common/cache/layer_index.h"

#include <type_traits>

#include <gtest/gtest.h>

namespace tandem::cache {
namespace {

static_assert(!std::is_convertible_v<StageLayerIndex, GlobalLayerId>);
static_assert(!std::is_convertible_v<GlobalLayerId, StageLayerIndex>);
static_assert(!std::is_convertible_v<CompressedLayerIndex<4>, CompressedLayerIndex<128>>);
static_assert(!std::is_convertible_v<StateOrdinal, CompressedLayerIndex<4>>);
static_assert(!std::is_convertible_v<int, GlobalLayerId>, "no implicit construction from a bare int");

std::vector<int> FlashRatios() {
  std::vector<int> ratios = {0, 0};
  for (int i = 0; i < 20; ++i) {
    ratios.push_back(4);
    ratios.push_back(128);
  }
  ratios.push_back(4);
  ratios.push_back(0);  // MTP
  return ratios;
}

LayerSchedule Flash() {
  auto schedule = LayerSchedule::FromRatios(FlashRatios(), 43);
  EXPECT_TRUE(schedule.ok()) << schedule.status();
  return *schedule;
}

StageLayout Layout(StageRange stage, bool with_mtp = false) {
  auto layout = StageLayout::Create(Flash(), stage, with_mtp);
  EXPECT_TRUE(layout.ok()) << layout.status();
  return *layout;
}

std::vector<int> Values(std::span<const GlobalLayerId> layers) {
  std::vector<int> out;
  for (auto g : layers) out.push_back(g.value());
  return out;
}

std::vector<int> Range(int begin, int end, int step = 1) {
  std::vector<int> out;
  for (int i = begin; i < end; i += step) out.push_back(i);
  return out;
}

TEST(LayerIndexTest, FlashScheduleParses) {
  const LayerSchedule flash = Flash();
  EXPECT_EQ(flash.num_layers(), 43);
  EXPECT_TRUE(flash.has_mtp);
  const std::vector<int> bad = {0, 4, 7};
  const auto status = LayerSchedule::FromRatios(bad, 3).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("compress_ratios[2] must be 0, 4 or 128, got 7"), std::string::npos) << status;
  EXPECT_FALSE(LayerSchedule::FromRatios(bad, 4).ok());
}

TEST(LayerIndexTest, SplitFollowsSglangRule) {
  auto ranges = [](int pp) {
    auto stages = SplitStages(43, pp);
    EXPECT_TRUE(stages.ok());
    std::vector<std::pair<int, int>> out;
    for (auto s : *stages) out.emplace_back(s.begin, s.end);
    return out;
  };
  using R = std::vector<std::pair<int, int>>;
  EXPECT_EQ(ranges(1), (R{{0, 43}}));
  EXPECT_EQ(ranges(2), (R{{0, 21}, {21, 43}}));
  EXPECT_EQ(ranges(3), (R{{0, 14}, {14, 28}, {28, 43}}));
  EXPECT_EQ(ranges(4), (R{{0, 10}, {10, 21}, {21, 32}, {32, 43}}));
  EXPECT_EQ(ranges(8), (R{{0, 5}, {5, 10}, {10, 15}, {15, 20}, {20, 25}, {25, 31}, {31, 37}, {37, 43}}));
  EXPECT_FALSE(SplitStages(43, 0).ok());
  EXPECT_FALSE(SplitStages(43, 44).ok());
  const std::vector<int> short_sum = {20, 20}, empty_stage = {43, 0}, custom = {10, 33};
  EXPECT_NE(SplitStages(43, short_sum).status().message().find("sums to 40"), std::string::npos);
  EXPECT_FALSE(SplitStages(43, empty_stage).ok());
  ASSERT_TRUE(SplitStages(43, custom).ok());
  EXPECT_EQ(SplitStages(43, custom)->back(), (StageRange{10, 43}));
}

TEST(LayerIndexTest, WholeFlashModel) {
  const StageLayout layout = Layout({0, 43}, /*with_mtp=*/true);
  EXPECT_EQ(layout.num_stage_layers(), 44);
  EXPECT_EQ(layout.num_compressed<4>(), 21);
  EXPECT_EQ(layout.num_compressed<128>(), 20);
  EXPECT_EQ(layout.num_state_layers(), 41);
  EXPECT_EQ(Values(layout.c4_layers()), Range(2, 43, 2));
  EXPECT_EQ(Values(layout.c128_layers()), Range(3, 42, 2));
  // sglang's compress_layer_id: C4 layers 2,4,...,42 -> 0..20; C128 layers 3..41 -> 0..19.
  EXPECT_EQ(layout.ToCompressed<4>(GlobalLayerId(2))->value(), 0);
  EXPECT_EQ(layout.ToCompressed<4>(GlobalLayerId(42))->value(), 20);
  EXPECT_EQ(layout.ToCompressed<128>(GlobalLayerId(3))->value(), 0);
  EXPECT_EQ(layout.ToCompressed<128>(GlobalLayerId(41))->value(), 19);
  EXPECT_FALSE(layout.ToCompressed<4>(GlobalLayerId(3)));
  EXPECT_FALSE(layout.ToCompressed<128>(GlobalLayerId(0)));
  // State ordinals run over every compressed layer in layer order.
  EXPECT_EQ(layout.ToStateOrdinal(GlobalLayerId(2))->value(), 0);
  EXPECT_EQ(layout.ToStateOrdinal(GlobalLayerId(3))->value(), 1);
  EXPECT_EQ(layout.ToStateOrdinal(GlobalLayerId(42))->value(), 40);
  EXPECT_FALSE(layout.ToStateOrdinal(GlobalLayerId(1)));
  // The MTP layer (global id 43) follows the main layers in the stage and has only a window.
  EXPECT_EQ(layout.ToStage(GlobalLayerId(43))->value(), 43);
  EXPECT_EQ(layout.compress_ratio(GlobalLayerId(43)), 0);
  EXPECT_FALSE(layout.ToStateOrdinal(GlobalLayerId(43)));
}

TEST(LayerIndexTest, FlashInTwoStages) {
  const StageLayout first = Layout({0, 21}), second = Layout({21, 43}, true);
  EXPECT_EQ(Values(first.c4_layers()), Range(2, 21, 2));
  EXPECT_EQ(Values(first.c128_layers()), Range(3, 21, 2));
  EXPECT_EQ(first.num_state_layers(), 19);
  EXPECT_EQ(Values(second.c4_layers()), Range(22, 43, 2));
  EXPECT_EQ(Values(second.c128_layers()), Range(21, 43, 2));
  EXPECT_EQ(second.num_stage_layers(), 23);  // 22 layers + MTP
  // Every counter restarts on the second stage.
  EXPECT_EQ(second.ToStage(GlobalLayerId(21))->value(), 0);
  EXPECT_EQ(second.ToStage(GlobalLayerId(42))->value(), 21);
  EXPECT_EQ(second.ToStage(GlobalLayerId(43))->value(), 22);
  EXPECT_EQ(second.ToCompressed<128>(GlobalLayerId(21))->value(), 0);
  EXPECT_EQ(second.ToCompressed<4>(GlobalLayerId(22))->value(), 0);
  EXPECT_EQ(second.ToCompressed<4>(GlobalLayerId(42))->value(), 10);
  EXPECT_EQ(second.ToStateOrdinal(GlobalLayerId(21))->value(), 0);
  EXPECT_EQ(second.ToStateOrdinal(GlobalLayerId(42))->value(), 21);
  EXPECT_EQ(second.ToGlobal(CompressedLayerIndex<4>(10)), GlobalLayerId(42));
  EXPECT_EQ(second.ToGlobal(StageLayerIndex(0)), GlobalLayerId(21));
  // Layers of the other stage have no index here.
  EXPECT_FALSE(second.ToStage(GlobalLayerId(20)));
  EXPECT_FALSE(first.ToCompressed<4>(GlobalLayerId(22)));
  EXPECT_FALSE(first.ToStage(GlobalLayerId(43))) << "the MTP layer lives on the last stage only";
}

TEST(LayerIndexTest, FlashInThreeStages) {
  const StageLayout a = Layout({0, 14}), b = Layout({14, 28}), c = Layout({28, 43}, true);
  EXPECT_EQ(Values(a.c4_layers()), Range(2, 14, 2));
  EXPECT_EQ(Values(a.c128_layers()), Range(3, 14, 2));
  EXPECT_EQ(Values(b.c4_layers()), Range(14, 28, 2));
  EXPECT_EQ(Values(b.c128_layers()), Range(15, 28, 2));
  EXPECT_EQ(Values(c.c4_layers()), Range(28, 43, 2));
  EXPECT_EQ(Values(c.c128_layers()), Range(29, 43, 2));
  EXPECT_EQ(b.ToCompressed<4>(GlobalLayerId(14))->value(), 0);
  EXPECT_EQ(b.ToCompressed<4>(GlobalLayerId(26))->value(), 6);
  EXPECT_EQ(b.ToCompressed<128>(GlobalLayerId(27))->value(), 6);
  EXPECT_EQ(b.ToStage(GlobalLayerId(27))->value(), 13);
  EXPECT_EQ(b.ToStateOrdinal(GlobalLayerId(15))->value(), 1);
  EXPECT_EQ(c.ToCompressed<4>(GlobalLayerId(42))->value(), 7);
  EXPECT_EQ(c.ToCompressed<128>(GlobalLayerId(41))->value(), 6);
  EXPECT_EQ(c.ToStateOrdinal(GlobalLayerId(42))->value(), 14);
  EXPECT_EQ(a.num_compressed<4>() + b.num_compressed<4>() + c.num_compressed<4>(), 21);
  EXPECT_EQ(a.num_compressed<128>() + b.num_compressed<128>() + c.num_compressed<128>(), 20);
}

// runtime-features.md §2, test 1: PP4 stage [21, 32). The enumeration index of a C4 layer inside the
// stage (1,3,5,7,9) is the transfer key; used as a global id it names no C4 layer at all (sglang #25477).
TEST(LayerIndexTest, Pp4StageKeepsLocalKeysAndGlobalStateIds) {
  const StageLayout layout = Layout({21, 32});
  EXPECT_EQ(Values(layout.c4_layers()), (std::vector<int>{22, 24, 26, 28, 30}));
  for (int k = 0; k < 5; ++k) {
    const GlobalLayerId g(22 + 2 * k);
    EXPECT_EQ(layout.ToStage(g)->value(), 1 + 2 * k);
    EXPECT_EQ(layout.ToCompressed<4>(g)->value(), k);
    EXPECT_EQ(layout.ToGlobal(CompressedLayerIndex<4>(k)), g);
    // The buggy lookup: stage-local index taken as a global id.
    EXPECT_FALSE(layout.ToCompressed<4>(GlobalLayerId(1 + 2 * k)));
  }
  for (int k = 0; k < 6; ++k) {
    const GlobalLayerId g(21 + 2 * k);
    EXPECT_EQ(layout.ToStage(g)->value(), 2 * k);
    EXPECT_EQ(layout.ToCompressed<128>(g)->value(), k);
  }
}

TEST(LayerIndexTest, EverySplitRoundTripsEverySpace) {
  const LayerSchedule flash = Flash();
  for (int pp : {1, 2, 3, 4, 8}) {
    const auto stages = *SplitStages(43, pp);
    int c4 = 0, c128 = 0, windows = 0;
    for (size_t s = 0; s < stages.size(); ++s) {
      const bool last = s + 1 == stages.size();
      const StageLayout layout = *StageLayout::Create(flash, stages[s], last);
      windows += layout.num_stage_layers();
      c4 += layout.num_compressed<4>();
      c128 += layout.num_compressed<128>();
      for (int i = 0; i < layout.num_stage_layers(); ++i) {
        const GlobalLayerId g = layout.ToGlobal(StageLayerIndex(i));
        ASSERT_EQ(layout.ToStage(g)->value(), i);
        if (auto c = layout.ToCompressed<4>(g)) {
          ASSERT_EQ(layout.ToGlobal(*c), g);
        }
        if (auto c = layout.ToCompressed<128>(g)) {
          ASSERT_EQ(layout.ToGlobal(*c), g);
        }
        if (auto o = layout.ToStateOrdinal(g)) {
          ASSERT_EQ(layout.ToGlobal(*o), g);
        }
        ASSERT_EQ(layout.ToStateOrdinal(g).has_value(), layout.compress_ratio(g) > 0);
      }
    }
    EXPECT_EQ(c4, 21) << "pp " << pp;
    EXPECT_EQ(c128, 20) << "pp " << pp;
    EXPECT_EQ(windows, 44) << "pp " << pp;
  }
}

TEST(LayerIndexTest, BadStagesAreRejected) {
  const LayerSchedule flash = Flash();
  EXPECT_FALSE(StageLayout::Create(flash, {0, 44}, false).ok());
  EXPECT_FALSE(StageLayout::Create(flash, {5, 5}, false).ok());
  EXPECT_FALSE(StageLayout::Create(flash, {-1, 3}, false).ok());
  const auto mtp = StageLayout::Create(flash, {0, 21}, true).status();
  EXPECT_EQ(mtp.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(mtp.message().find("MTP layer belongs to the last stage"), std::string::npos) << mtp;
}

// runtime-features.md §4: Flash, prefill PP2 -> decode PP1 (state list 43 + 41 + 21 = 105).
TEST(LayerIndexTest, ReceiverSlicesForPp2PrefillIntoPp1Decode) {
  const LayerSchedule flash = Flash();
  const ReceiverSlices first = *SlicesInWholeModel(flash, {0, 21});
  EXPECT_EQ(first.kv_count(), 29);
  EXPECT_EQ(first.c4_kv, (IndexRange{0, 10}));
  EXPECT_EQ(first.c4_indexer, (IndexRange{21, 31}));
  EXPECT_EQ(first.c128_kv, (IndexRange{42, 51}));
  EXPECT_EQ(first.state_count(), 50);
  EXPECT_EQ(first.kv_list_size, 62);
  EXPECT_EQ(first.state_list_size, 105);

  const ReceiverSlices second = *SlicesInWholeModel(flash, {21, 43});
  EXPECT_EQ(second.kv_count(), 33);
  EXPECT_EQ(second.c4_kv, (IndexRange{10, 21}));
  EXPECT_EQ(second.c4_indexer, (IndexRange{31, 42}));
  EXPECT_EQ(second.c128_kv, (IndexRange{51, 62}));
  EXPECT_EQ(second.state_count(), 55);
  EXPECT_EQ(second.window, (IndexRange{21, 43}));
  EXPECT_EQ(second.compressor_state, (IndexRange{62, 84}));
  EXPECT_EQ(second.indexer_state, (IndexRange{94, 105}));
  EXPECT_FALSE(SlicesInWholeModel(flash, {21, 44}).ok());
}

}  // namespace
}  // namespace tandem::cache
