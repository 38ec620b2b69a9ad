// The paged SequenceState on `tiny` in deterministic mode: bit-identical to HostSequenceState across page
// boundaries, batches and the MTP layer; clean failure when pools run out; every page back after release;
// prefix-cache reuse that restores the boundary state exactly.
#include "common/engine/paged_state.h"

#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <random>

#include <gtest/gtest.h>

#include "common/kernels/kernels.h"
#include "common/model/forward.h"
#include "tests/unit/engine/tiny_model.h"

namespace tandem::engine {
namespace {

using model::Dsv4Model;
using model::ForwardResult;
using model::HostSequenceState;
using model::SequenceChunk;
using model::SequenceState;

using testing::Tiny;
using testing::TinyDir;

std::vector<int32_t> Prompt(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (auto& id : ids) id = static_cast<int32_t>(rng() % 129280);
  ids[0] = 0;
  return ids;
}

// Everything a run produces that must match bit for bit: the last token's logits of every step and the
// pre-head streams of every position (which fix every position's logits).
struct Outputs {
  std::vector<float> logits;
  std::vector<float> hidden;
};

bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Feeds `ids` in chunks of the given sizes (cycled); `after_step` runs after every step.
Outputs Feed(const Dsv4Model& model, SequenceState& state, std::span<const int32_t> ids, const std::vector<int64_t>& chunks,
         const std::function<void()>& after_step = {}) {
  Outputs run;
  size_t next = 0;
  for (int64_t begin = 0; begin < static_cast<int64_t>(ids.size());) {
    const int64_t count = std::min<int64_t>(chunks[next++ % chunks.size()], static_cast<int64_t>(ids.size()) - begin);
    SequenceChunk chunk{&state, ids.subspan(static_cast<size_t>(begin), static_cast<size_t>(count)), false};
    ForwardResult result;
    const auto status = model.Forward({&chunk, 1}, nullptr, nullptr, &result);
    EXPECT_TRUE(status.ok()) << status;
    if (!status.ok()) break;
    run.logits.insert(run.logits.end(), result.logits.begin(), result.logits.end());
    run.hidden.insert(run.hidden.end(), result.pre_head_hidden.begin(), result.pre_head_hidden.end());
    if (after_step) after_step();
    begin += count;
  }
  return run;
}

// Prompt chunks, then one decode step per remaining token.
std::vector<int64_t> PrefillThenDecode(std::vector<int64_t> prompt_chunks, int64_t decode_steps) {
  prompt_chunks.insert(prompt_chunks.end(), static_cast<size_t>(decode_steps), 1);
  return prompt_chunks;
}

struct KvSlotCheck {
  int layer;
  const char* state;
  std::string what() const { return std::string(state) + " layer " + std::to_string(layer); }
};

class PagedStateTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    kernels::SetThreads(2);
    kernels::SetDeterministic(true);
  }
  static void TearDownTestSuite() { kernels::SetDeterministic(false); }

  void SetUp() override { ASSERT_TRUE(Tiny()); }
  void TearDown() override { ExpectEveryPageBack(); }
  void ExpectEveryPageBack() {
    if (!pools_) return;
    for (const auto& usage : pools_->Usage()) {
      EXPECT_EQ(usage.free, initial_free_[usage.name]) << usage.name << " did not get every page back";
    }
    EXPECT_TRUE(pools_->CheckAccounting().ok());
  }

  const model::ModelConfig& config() { return Tiny()->config; }
  HostSequenceState NewHostState() {
    return HostSequenceState(config(), 0, static_cast<int>(config().num_hidden_layers), true);
  }
  void MakePools(cache::PoolCounts counts, int64_t page_size = 256) {
    auto layout = StageLayoutFor(config(), 0, static_cast<int>(config().num_hidden_layers), true);
    ASSERT_TRUE(layout.ok()) << layout.status();
    auto pools = cache::StatePools::Create(CacheShapesFor(config(), page_size), *layout, counts);
    ASSERT_TRUE(pools.ok()) << pools.status();
    pools_ = std::move(*pools);
    for (const auto& usage : pools_->Usage()) initial_free_[usage.name] = usage.free;
  }

  std::unique_ptr<cache::StatePools> pools_;
  std::map<std::string, int64_t> initial_free_;
};

TEST_F(PagedStateTest, PrefillAndDecodeMatchHostStateBitForBit) {
  const Dsv4Model model(Tiny());
  struct Case {
    int64_t page_size;
    int64_t prompt;
    std::vector<int64_t> chunks;  // prefill chunk sizes, cycled
  };
  // Chunks that end before, on and after 128/256-token page boundaries, and odd lengths.
  const std::vector<Case> cases = {
      {256, 300, {300}},
      {256, 333, {100, 200, 33}},
      {256, 517, {255, 2, 257}},
      {128, 389, {127, 130, 1, 131}},
  };
  for (const auto& c : cases) {
    MakePools({8, 2, 2, 1}, c.page_size);
    const auto ids = Prompt(c.prompt + 7, static_cast<uint32_t>(c.prompt));
    auto host = NewHostState();
    const Outputs want = Feed(model, host, ids, PrefillThenDecode({c.prompt}, 7));
    PagedSequenceState paged(pools_.get());
    // Same chunking for the prompt, then single-token decode steps.
    std::vector<int64_t> steps;
    for (int64_t done = 0; done < c.prompt;) {
      const int64_t n = std::min(c.chunks[steps.size() % c.chunks.size()], c.prompt - done);
      steps.push_back(n);
      done += n;
    }
    const Outputs got = Feed(model, paged, ids, PrefillThenDecode(steps, 7));
    EXPECT_TRUE(SameBits(got.hidden, want.hidden)) << "page " << c.page_size << " prompt " << c.prompt;
    // Logits: the last row of each step; compare the 7 decode rows and the prompt's last row.
    const int64_t V = config().vocab_size;
    const std::vector<float> got_tail(got.logits.end() - 8 * V, got.logits.end());
    const std::vector<float> want_tail(want.logits.end() - 8 * V, want.logits.end());
    EXPECT_TRUE(SameBits(got_tail, want_tail)) << "page " << c.page_size << " prompt " << c.prompt;
    EXPECT_EQ(paged.length(), c.prompt + 7);
    EXPECT_EQ(static_cast<int64_t>(paged.page_table().size()), (c.prompt + 7 + c.page_size - 1) / c.page_size);
    paged.Release();
    EXPECT_EQ(paged.length(), 0);
    ExpectEveryPageBack();
  }
}

TEST_F(PagedStateTest, SeveralSequencesInOneBatch) {
  MakePools({8, 3, 3, 3});
  const Dsv4Model model(Tiny());
  const std::vector<std::vector<int32_t>> prompts = {Prompt(310, 21), Prompt(140, 22), Prompt(37, 23)};
  const int64_t decode = 5;
  // Solo runs on the host state.
  std::vector<Outputs> want;
  for (const auto& p : prompts) {
    auto host = NewHostState();
    want.push_back(Feed(model, host, p, PrefillThenDecode({static_cast<int64_t>(p.size()) - decode}, decode)));
  }
  // Batched: two prefill steps with different splits per sequence, then decode steps together.
  std::vector<std::unique_ptr<PagedSequenceState>> states;
  for (size_t i = 0; i < prompts.size(); ++i) states.push_back(std::make_unique<PagedSequenceState>(pools_.get()));
  const std::vector<std::vector<int64_t>> splits = {{260, 45}, {100, 35}, {1, 31}};
  const int64_t V = config().vocab_size;
  std::vector<std::vector<float>> got_logits(prompts.size());
  std::vector<int64_t> offsets(prompts.size(), 0);
  auto step = [&](const std::vector<int64_t>& counts) {
    std::vector<SequenceChunk> batch;
    for (size_t i = 0; i < prompts.size(); ++i) {
      batch.push_back({states[i].get(), std::span(prompts[i]).subspan(static_cast<size_t>(offsets[i]), static_cast<size_t>(counts[i])), false});
    }
    ForwardResult result;
    ASSERT_TRUE(model.Forward(batch, nullptr, nullptr, &result).ok());
    ASSERT_EQ(result.rows, static_cast<int64_t>(prompts.size()));
    for (size_t i = 0; i < prompts.size(); ++i) {
      got_logits[i].insert(got_logits[i].end(), result.logits.begin() + static_cast<std::ptrdiff_t>(i) * V,
                           result.logits.begin() + static_cast<std::ptrdiff_t>(i + 1) * V);
      offsets[i] += counts[i];
    }
  };
  step({splits[0][0], splits[1][0], splits[2][0]});
  step({splits[0][1], splits[1][1], splits[2][1]});
  for (int64_t d = 0; d < decode; ++d) step({1, 1, 1});
  for (size_t i = 0; i < prompts.size(); ++i) {
    // Compare the prompt's last row and every decode row with the solo run.
    const std::vector<float> got_tail(got_logits[i].end() - (decode + 1) * V, got_logits[i].end());
    const std::vector<float> want_tail(want[i].logits.end() - (decode + 1) * V, want[i].logits.end());
    EXPECT_TRUE(SameBits(got_tail, want_tail)) << "sequence " << i;
    EXPECT_EQ(states[i]->length(), static_cast<int64_t>(prompts[i].size()));
  }
  EXPECT_EQ(pools_->token_pages().used(), 2 + 1 + 1);
  EXPECT_EQ(pools_->window_pages().used(), 3);
  states.clear();  // destructors return everything (checked in TearDown)
}

TEST_F(PagedStateTest, MtpLayerRunsOnThePagedWindow) {
  MakePools({4, 1, 1, 1});
  const Dsv4Model model(Tiny());
  const auto ids = Prompt(200, 31);
  auto host = NewHostState();
  PagedSequenceState paged(pools_.get());
  const Outputs host_run = Feed(model, host, ids, {200});
  const Outputs paged_run = Feed(model, paged, ids, {200});
  const int64_t MD = config().hc_dim(), T = 199;
  const std::vector<int32_t> next(ids.begin() + 1, ids.end());
  std::vector<std::vector<float>> drafts;
  for (SequenceState* state : {static_cast<SequenceState*>(&host), static_cast<SequenceState*>(&paged)}) {
    std::vector<float> logits;
    for (int64_t begin = 0; begin < T;) {
      const int64_t count = begin == 0 ? 150 : 1;
      SequenceChunk chunk{state, std::span(next).subspan(static_cast<size_t>(begin), static_cast<size_t>(count)), false};
      ForwardResult result;
      const auto& hidden = state == &host ? host_run.hidden : paged_run.hidden;
      ASSERT_TRUE(model.ForwardMtp({&chunk, 1}, std::span(hidden).subspan(static_cast<size_t>(begin * MD), static_cast<size_t>(count * MD)), &result).ok());
      logits.insert(logits.end(), result.logits.begin(), result.logits.end());
      begin += count;
    }
    EXPECT_EQ(state->mtp_length(), T);
    drafts.push_back(std::move(logits));
  }
  EXPECT_TRUE(SameBits(drafts[1], drafts[0]));
}

TEST_F(PagedStateTest, ReserveThatCannotBeSatisfiedFailsCleanly) {
  MakePools({4, 2, 2, 2});
  const Dsv4Model model(Tiny());
  PagedSequenceState first(pools_.get()), second(pools_.get()), third(pools_.get());
  ASSERT_TRUE(first.Reserve(300).ok());  // 2 token pages + window + rings
  EXPECT_EQ(pools_->token_pages().free(), 2);
  // More token pages than are free: nothing taken, not even the window and rings.
  const auto status = second.Reserve(1000);
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(status.message().find("need 4 more token pages"), std::string::npos) << status;
  EXPECT_EQ(pools_->token_pages().free(), 2);
  EXPECT_EQ(pools_->window_pages().free(), 1);
  EXPECT_TRUE(second.page_table().empty());
  EXPECT_EQ(second.slots().window, cache::kNoPage);
  // Through the forward: the error comes back as is and the state does not advance.
  const auto ids = Prompt(1000, 41);
  SequenceChunk chunk{&second, ids, false};
  ForwardResult result;
  EXPECT_EQ(model.Forward({&chunk, 1}, nullptr, nullptr, &result).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(second.length(), 0);
  // The window pool runs out first: the token page this call would have taken stays free.
  ASSERT_TRUE(second.Reserve(10).ok());
  EXPECT_EQ(pools_->window_pages().free(), 0);
  const auto no_window = third.Reserve(1);
  EXPECT_EQ(no_window.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(no_window.message().find("window_kv"), std::string::npos) << no_window;
  EXPECT_EQ(pools_->token_pages().free(), 1);
  EXPECT_EQ(pools_->c4_states().free(), 0) << "slots of a request go together";
  second.Release();
  ASSERT_TRUE(third.Reserve(1).ok());
  EXPECT_EQ(pools_->token_pages().free(), 1);
  // A request longer than the pools can ever hold.
  const auto too_long = third.Reserve(10000);
  EXPECT_EQ(too_long.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(third.page_table().size(), 1u) << "what the state held before stays, nothing more";
}

// The runs the GPU forward builds its address tables from name exactly the per-entry addresses: for the
// paged state (one run per page), the host state (one run) and the generic default (merged entry by entry).
TEST_F(PagedStateTest, EntryRunsNameTheSameAddressesAsTheEntries) {
  MakePools({8, 2, 2, 2});
  PagedSequenceState paged(pools_.get());
  HostSequenceState host = NewHostState();
  const int64_t length = 1100;  // 5 token pages of 256, the last partly used
  ASSERT_TRUE(paged.Reserve(length).ok());
  ASSERT_TRUE(host.Reserve(length).ok());
  // Only the per-entry methods: exercises SequenceState's default runs.
  struct PerEntry final : SequenceState {
    explicit PerEntry(SequenceState* s) : inner(s) {}
    SequenceState* inner;
    int64_t length() const override { return inner->length(); }
    int64_t mtp_length() const override { return inner->mtp_length(); }
    void set_length(int64_t l) override { inner->set_length(l); }
    void set_mtp_length(int64_t l) override { inner->set_mtp_length(l); }
    absl::Status Reserve(int64_t l) override { return inner->Reserve(l); }
    model::KvSlot window_kv(int layer, int64_t pos) override { return inner->window_kv(layer, pos); }
    model::KvSlot compressed_kv(int layer, int64_t index) override { return inner->compressed_kv(layer, index); }
    uint8_t* indexer_key(int layer, int64_t index) override { return inner->indexer_key(layer, index); }
    float* compressor_row(int layer, model::CompressorKind kind, int64_t pos) override {
      return inner->compressor_row(layer, kind, pos);
    }
  } generic(&paged);
  auto expect_same = [&](SequenceState& state, const char* name) {
    for (const auto& spec : config().layers) {
      if (spec.is_mtp) continue;
      const KvSlotCheck check{spec.layer_id, name};
      const model::EntryRun ring = state.WindowRing(spec.layer_id, config().sliding_window);
      for (int64_t pos = 0; pos < 300; pos += 37) {
        const model::KvSlot slot = state.window_kv(spec.layer_id, pos);
        const int64_t s = (ring.first + pos) % ring.count;
        EXPECT_EQ(ring.data + s * ring.data_stride, slot.data) << check.what() << " window pos " << pos;
        EXPECT_EQ(ring.scales + s * ring.scale_stride, slot.scales) << check.what() << " window pos " << pos;
      }
      if (spec.compress_ratio == 0) continue;
      const int64_t n = length / spec.compress_ratio;
      std::vector<model::EntryRun> runs;
      state.CompressedKvRuns(spec.layer_id, n, &runs);
      int64_t covered = 0;
      for (const auto& r : runs) {
        EXPECT_EQ(r.first, covered) << check.what() << ": runs in order, no gaps";
        for (int64_t i = 0; i < r.count; ++i) {
          const model::KvSlot slot = state.compressed_kv(spec.layer_id, r.first + i);
          ASSERT_EQ(r.data + i * r.data_stride, slot.data) << check.what() << " entry " << r.first + i;
          ASSERT_EQ(r.scales + i * r.scale_stride, slot.scales) << check.what() << " entry " << r.first + i;
        }
        covered += r.count;
      }
      EXPECT_EQ(covered, n) << check.what();
      if (spec.compress_ratio != 4) continue;
      runs.clear();
      state.IndexerKeyRuns(spec.layer_id, n, &runs);
      covered = 0;
      for (const auto& r : runs) {
        for (int64_t i = 0; i < r.count; ++i) {
          ASSERT_EQ(r.data + i * r.data_stride, state.indexer_key(spec.layer_id, r.first + i)) << check.what();
        }
        covered += r.count;
      }
      EXPECT_EQ(covered, n) << check.what() << " keys";
    }
  };
  expect_same(paged, "paged");
  expect_same(host, "host");
  expect_same(generic, "default");
  std::vector<model::EntryRun> runs;
  paged.CompressedKvRuns(1, length / 4, &runs);
  EXPECT_EQ(runs.size(), 5u) << "one run per token page";
  paged.Release();
}

// A second request sharing a >= 256-token prefix with a finished one resumes from its pages and boundary
// snapshot and produces the same bits as computing from scratch.
TEST_F(PagedStateTest, PrefixCacheReuseRestoresTheBoundaryStateExactly) {
  MakePools({8, 6, 6, 2});
  const Dsv4Model model(Tiny());
  const int64_t V = config().vocab_size;
  cache::RadixCache cache(pools_.get());
  const auto a = Prompt(605, 51);
  std::vector<cache::PageId> a_pages;
  {
    PagedSequenceState state(pools_.get());
    // Prefill in page-aligned chunks (so boundaries 256 and 512 are captured), then decode.
    Feed(model, state, a, PrefillThenDecode({256, 256, 88}, 5), [&] {
      if (state.length() % 256 == 0) {
        ASSERT_TRUE(state.CaptureBoundary().ok());
      }
    });
    EXPECT_EQ(state.captured_snapshots(), 2);
    a_pages.assign(state.page_table().begin(), state.page_table().end());
    const auto added = state.InsertInto(&cache, a);
    ASSERT_TRUE(added.ok()) << added.status();
    EXPECT_EQ(*added, 512);
  }
  EXPECT_EQ(cache.stats().cached_tokens, 512);
  EXPECT_EQ(pools_->token_pages().used(), 2) << "a's third page went back when it ended";

  for (const int64_t shared : {560, 300}) {
    // b: a's first `shared` tokens, then its own.
    std::vector<int32_t> b(a.begin(), a.begin() + shared);
    const auto tail = Prompt(700 - shared, static_cast<uint32_t>(shared));
    b.insert(b.end(), tail.begin() + 1, tail.end());
    b.push_back(7);
    const int64_t boundary = shared / 256 * 256;

    auto host = NewHostState();
    const Outputs want = Feed(model, host, b, PrefillThenDecode({static_cast<int64_t>(b.size()) - 4}, 4));

    PagedSequenceState state(pools_.get());
    const auto match = cache.MatchPrefix(std::span(b).first(b.size() - 1));
    ASSERT_EQ(match.tokens, boundary) << "shared " << shared;
    ASSERT_TRUE(state.AdoptPrefix(&cache, match).ok());
    EXPECT_EQ(state.length(), boundary);
    EXPECT_EQ(state.cached_prefix(), boundary);
    EXPECT_EQ(std::vector<cache::PageId>(state.page_table().begin(), state.page_table().end()),
              std::vector<cache::PageId>(a_pages.begin(), a_pages.begin() + boundary / 256));
    EXPECT_EQ(pools_->token_pages().refcount(a_pages[0]), 2) << "shared by the tree and the request";
    const auto rest = std::span(b).subspan(static_cast<size_t>(boundary));
    const Outputs got = Feed(model, state, rest, PrefillThenDecode({100, static_cast<int64_t>(rest.size()) - 104}, 4));
    // Every position from the boundary on, and the last rows' logits, bit for bit.
    const auto MD = static_cast<std::ptrdiff_t>(config().hc_dim());
    const std::vector<float> want_hidden(want.hidden.begin() + boundary * MD, want.hidden.end());
    EXPECT_TRUE(SameBits(got.hidden, want_hidden)) << "shared " << shared;
    const std::vector<float> got_tail(got.logits.end() - 5 * V, got.logits.end());
    const std::vector<float> want_tail(want.logits.end() - 5 * V, want.logits.end());
    EXPECT_TRUE(SameBits(got_tail, want_tail)) << "shared " << shared;
    EXPECT_EQ(cache.stats().locked_nodes, 1);
    state.Release();
    EXPECT_EQ(cache.stats().locked_nodes, 0);
  }

  // A match with no snapshot at its end is not reusable.
  std::vector<int32_t> c(a.begin(), a.begin() + 200);
  c.push_back(3);
  EXPECT_EQ(cache.MatchPrefix(c).tokens, 0);
  // Evicting the cache returns the last pages; TearDown checks every pool.
  cache.Evict(pools_->token_pages().total(), pools_->window_pages().total());
  EXPECT_EQ(cache.stats().nodes, 0);
}

TEST_F(PagedStateTest, BoundaryCaptureNeedsAPageAlignedLength) {
  MakePools({3, 2, 2, 1});
  const Dsv4Model model(Tiny());
  PagedSequenceState state(pools_.get());
  EXPECT_EQ(state.CaptureBoundary().code(), absl::StatusCode::kFailedPrecondition);
  const auto ids = Prompt(260, 61);
  Feed(model, state, ids, {260});
  EXPECT_EQ(state.CaptureBoundary().code(), absl::StatusCode::kFailedPrecondition);
  cache::RadixCache cache(pools_.get());
  PagedSequenceState other(pools_.get());
  cache::RadixCache::Match empty;
  EXPECT_TRUE(other.AdoptPrefix(&cache, empty).ok()) << "nothing to adopt is fine";
  other.set_length(5);
  EXPECT_EQ(other.AdoptPrefix(&cache, empty).code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace tandem::engine
