// A request's state moved by its manifest alone: prefill on one set of pools, copy the segments into
// different pages of another set, and decoding there gives bit-identical logits. The checksum sees a
// single flipped byte.
#include "common/engine/state_manifest.h"

#include <cstdlib>
#include <cstring>
#include <random>

#include <gtest/gtest.h>

#include "common/kernels/kernels.h"
#include "common/model/forward.h"
#include "tests/unit/engine/tiny_model.h"

namespace tandem::engine {
namespace {

using testing::Tiny;
using testing::TinyDir;

std::unique_ptr<cache::StatePools> MakePools(const model::ModelConfig& config) {
  auto layout = StageLayoutFor(config, 0, static_cast<int>(config.num_hidden_layers), true);
  EXPECT_TRUE(layout.ok());
  auto pools = cache::StatePools::Create(CacheShapesFor(config, 256), *layout,
                                         {.token_pages = 12, .window_pages = 4, .c4_state_slots = 4, .c128_state_slots = 4});
  EXPECT_TRUE(pools.ok()) << pools.status();
  return std::move(*pools);
}

std::vector<float> Step(const model::Dsv4Model& model, model::SequenceState& state, std::span<const int32_t> tokens) {
  model::SequenceChunk chunk{&state, tokens, false};
  model::ForwardResult result;
  EXPECT_TRUE(model.Forward({&chunk, 1}, nullptr, nullptr, &result).ok());
  return result.logits;
}

TEST(StateManifestTest, CopiedStateDecodesBitForBit) {
  ASSERT_NE(Tiny(), nullptr);
  kernels::SetDeterministic(true);
  const model::Dsv4Model model(Tiny());
  const auto& config = Tiny()->config;
  auto source_pools = MakePools(config);
  auto target_pools = MakePools(config);
  // Different page ids on the target: another request holds the first pages and slots there.
  PagedSequenceState other(target_pools.get());
  ASSERT_TRUE(other.Reserve(700).ok());

  for (int64_t length : {1, 127, 389, 512, 770}) {
    std::mt19937 rng(static_cast<uint32_t>(length));
    std::vector<int32_t> prompt(static_cast<size_t>(length));
    for (auto& id : prompt) id = static_cast<int32_t>(2 + rng() % 129000);
    PagedSequenceState source(source_pools.get()), target(target_pools.get());
    ASSERT_TRUE(source.Reserve(length + 8).ok());
    ASSERT_TRUE(target.Reserve(length + 8).ok());
    auto logits = Step(model, source, prompt);
    auto from = StateManifest::Build(*source_pools, source, length);
    auto to = StateManifest::Build(*target_pools, target, length);
    ASSERT_TRUE(from.ok() && to.ok()) << from.status() << to.status();
    EXPECT_EQ(from->total_bytes(), to->total_bytes());
    EXPECT_EQ(from->TokenPageSegments(0, from->token_pages()).size() + from->TailSegments().size(), from->segments().size());
    ASSERT_TRUE(CopyState(*source_pools, *from, *target_pools, *to).ok());
    EXPECT_EQ(*from->Checksum(*source_pools), *to->Checksum(*target_pools));
    target.set_length(length);
    int32_t next = static_cast<int32_t>(std::max_element(logits.end() - config.vocab_size, logits.end()) - logits.end() + config.vocab_size);
    for (int step = 0; step < 6; ++step) {
      const auto a = Step(model, source, {&next, 1});
      const auto b = Step(model, target, {&next, 1});
      ASSERT_EQ(a.size(), b.size());
      ASSERT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << "length " << length << " step " << step;
      next = static_cast<int32_t>(std::max_element(a.begin(), a.end()) - a.begin());
    }
  }
  kernels::SetDeterministic(false);
}

TEST(StateManifestTest, ChecksumSeesOneFlippedByteAndMismatchedListsAreRefused) {
  ASSERT_NE(Tiny(), nullptr);
  const auto& config = Tiny()->config;
  auto pools = MakePools(config);
  PagedSequenceState a(pools.get()), b(pools.get());
  ASSERT_TRUE(a.Reserve(300).ok());
  ASSERT_TRUE(b.Reserve(600).ok());
  auto small = StateManifest::Build(*pools, a, 300);
  auto large = StateManifest::Build(*pools, b, 600);
  ASSERT_TRUE(small.ok() && large.ok());
  const uint64_t before = *small->Checksum(*pools);
  const auto& segment = small->segments()[small->segments().size() / 2];
  pools->region(segment.pool)[static_cast<size_t>(segment.offset + segment.length / 2)] ^= 0x10;
  EXPECT_NE(*small->Checksum(*pools), before);
  EXPECT_EQ(CopyState(*pools, *small, *pools, *large).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(StateManifest::Build(*pools, a, 600).status().code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace tandem::engine
