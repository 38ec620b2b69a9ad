// Incremental, chunked, pipeline, batch and expert-format equivalence of the CPU forward on `tiny`.
#include "common/model/forward.h"

#include <cmath>
#include <cstdlib>
#include <random>
#include <set>

#include <gtest/gtest.h>

#include "common/kernels/kernels.h"

namespace tandem::model {
namespace {

std::string TinyDir() {
  const char* root = std::getenv("TANDEM_TEST_MODELS");
  return std::string(root ? root : "build/test-models") + "/tiny";
}

std::shared_ptr<const ModelWeights> LoadTiny(int begin = 0, int end = -1, std::optional<ExpertDType> experts = {}) {
  LoadOptions options;
  options.begin_layer = begin;
  options.end_layer = end;
  options.show_progress = false;
  options.expert_dtype = experts;
  auto weights = LoadModelWeights(TinyDir(), options);
  EXPECT_TRUE(weights.ok()) << weights.status();
  return weights.ok() ? std::shared_ptr<const ModelWeights>(std::move(*weights)) : nullptr;
}

const std::shared_ptr<const ModelWeights>& Tiny() {
  static const auto weights = LoadTiny();
  return weights;
}

std::vector<int32_t> Prompt(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (auto& id : ids) id = static_cast<int32_t>(rng() % 129280);
  ids[0] = 0;
  return ids;
}

struct FeedResult {
  std::vector<float> logits;  // [T, V]
  std::vector<float> hidden;  // [T, M*D]
};

// Feeds `ids` in chunks of the given sizes (cycled) and gathers every position's logits.
FeedResult Feed(const Dsv4Model& model, SequenceState& state, const std::vector<int32_t>& ids, std::vector<int64_t> chunks,
                bool all_logits = true) {
  FeedResult run;
  size_t next = 0;
  for (int64_t begin = 0; begin < static_cast<int64_t>(ids.size());) {
    const int64_t count = std::min<int64_t>(chunks[next++ % chunks.size()], static_cast<int64_t>(ids.size()) - begin);
    SequenceChunk chunk{&state, {ids.data() + begin, static_cast<size_t>(count)}, all_logits};
    ForwardResult result;
    auto status = model.Forward({&chunk, 1}, nullptr, nullptr, &result);
    EXPECT_TRUE(status.ok()) << status;
    run.logits.insert(run.logits.end(), result.logits.begin(), result.logits.end());
    run.hidden.insert(run.hidden.end(), result.pre_head_hidden.begin(), result.pre_head_hidden.end());
    begin += count;
  }
  return run;
}

// Relative L2 distance and the count of rows whose argmax differs.
struct Diff {
  double rel_l2 = 0;
  int64_t argmax_mismatch = 0;
};
Diff Compare(const std::vector<float>& a, const std::vector<float>& b, int64_t cols) {
  Diff d;
  EXPECT_EQ(a.size(), b.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  d.rel_l2 = std::sqrt(num / std::max(den, 1e-30));
  for (size_t r = 0; r < std::min(a.size(), b.size()) / cols; ++r) {
    auto ra = a.begin() + r * cols, rb = b.begin() + r * cols;
    if (std::max_element(ra, ra + cols) - ra != std::max_element(rb, rb + cols) - rb) ++d.argmax_mismatch;
  }
  return d;
}

// In deterministic mode every row is summed in one fixed order whatever the batch shape, so the
// equivalences below hold bit for bit.
constexpr double kSamePathTolerance = 0.0;

class ForwardTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    kernels::SetThreads(2);
    kernels::SetDeterministic(true);
  }
  static void TearDownTestSuite() { kernels::SetDeterministic(false); }
  const ModelConfig& config() { return Tiny()->config; }
  HostSequenceState NewState() { return HostSequenceState(config(), 0, static_cast<int>(config().num_hidden_layers), true); }
};

TEST_F(ForwardTest, LogitsAreFiniteAndNotCollapsed) {
  Dsv4Model model(Tiny());
  auto state = NewState();
  const auto ids = Prompt(300, 1);
  const FeedResult run = Feed(model, state, ids, {300});
  const int64_t V = config().vocab_size;
  ASSERT_EQ(run.logits.size(), ids.size() * V);
  std::set<int64_t> argmaxes;
  for (size_t r = 0; r < ids.size(); ++r) {
    auto row = run.logits.begin() + r * V;
    for (int64_t v = 0; v < V; ++v) ASSERT_TRUE(std::isfinite(row[v]));
    argmaxes.insert(std::max_element(row, row + V) - row);
  }
  EXPECT_GT(argmaxes.size(), ids.size() / 2) << "the random model predicts too few distinct tokens";
}

TEST_F(ForwardTest, PrefillThenDecodeEqualsOneForward) {
  Dsv4Model model(Tiny());
  const int64_t M = 9;
  for (int64_t N : {5, 131, 258, 383}) {
    const auto ids = Prompt(N + M, static_cast<uint32_t>(N));
    auto whole_state = NewState();
    const FeedResult whole = Feed(model, whole_state, ids, {N + M});
    auto state = NewState();
    std::vector<int64_t> steps = {N};
    steps.insert(steps.end(), M, 1);
    const FeedResult incremental = Feed(model, state, ids, steps);
    const Diff d = Compare(incremental.logits, whole.logits, config().vocab_size);
    EXPECT_LE(d.rel_l2, kSamePathTolerance) << "N=" << N;
    EXPECT_EQ(d.argmax_mismatch, 0) << "N=" << N;
    EXPECT_EQ(state.length(), N + M);
  }
}

TEST_F(ForwardTest, ChunkedPrefillGivesTheSameStatesAndLogits) {
  Dsv4Model model(Tiny());
  const auto ids = Prompt(300, 3);
  auto whole_state = NewState();
  const FeedResult whole = Feed(model, whole_state, ids, {300}, false);
  const int64_t V = config().vocab_size;
  for (int64_t chunk : {1, 3, 64, 257}) {  // 1 = decode steps; 257 crosses a 256-page and a C128 chunk
    auto state = NewState();
    const FeedResult chunked = Feed(model, state, ids, {chunk}, false);
    // Every position's mHC streams (which fix its logits) and the final logits match bit for bit.
    EXPECT_EQ(Compare(chunked.hidden, whole.hidden, config().hc_dim()).rel_l2, 0.0) << "chunk " << chunk;
    const std::vector<float> last(chunked.logits.end() - V, chunked.logits.end());
    EXPECT_EQ(Compare(last, whole.logits, V).rel_l2, 0.0) << "chunk " << chunk;
  }
}

// The default (OpenBLAS) kernels may round differently per batch shape; chunking must still stay within
// the reference-parity tolerance.
TEST_F(ForwardTest, BlasKernelsChunkedStayWithinParityTolerance) {
  kernels::SetDeterministic(false);
  Dsv4Model model(Tiny());
  const auto ids = Prompt(300, 11);
  auto whole_state = NewState(), state = NewState();
  const FeedResult whole = Feed(model, whole_state, ids, {300});
  const FeedResult chunked = Feed(model, state, ids, {64});
  kernels::SetDeterministic(true);
  const Diff d = Compare(chunked.logits, whole.logits, config().vocab_size);
  EXPECT_LT(d.rel_l2, 1e-2);
  EXPECT_LE(d.argmax_mismatch, 3);
}

TEST_F(ForwardTest, PipelineSlicesChainedEqualTheWholeModel) {
  Dsv4Model whole_model(Tiny());
  auto whole_state = NewState();
  const auto ids = Prompt(200, 4);
  const FeedResult whole = Feed(whole_model, whole_state, ids, {200});

  const std::vector<std::pair<int, int>> slices = {{0, 1}, {1, 3}, {3, 4}};
  std::vector<std::unique_ptr<Dsv4Model>> stages;
  std::vector<std::unique_ptr<HostSequenceState>> states;
  for (auto [begin, end] : slices) {
    auto weights = LoadTiny(begin, end);
    ASSERT_TRUE(weights);
    EXPECT_EQ(weights->layers.size(), static_cast<size_t>(end - begin));
    EXPECT_EQ(weights->embed.empty(), begin != 0 && end != 4);  // embed only where used (first stage, MTP)
    stages.push_back(std::make_unique<Dsv4Model>(weights));
    states.push_back(std::make_unique<HostSequenceState>(weights->config, begin, end, end == 4));
  }
  // Prefill 150 tokens, then decode the rest one by one through the chain.
  std::vector<float> logits;
  for (int64_t begin = 0; begin < 200;) {
    const int64_t count = begin == 0 ? 150 : 1;
    HiddenStates hidden, next;
    ForwardResult result;
    for (size_t s = 0; s < stages.size(); ++s) {
      SequenceChunk chunk{states[s].get(), {ids.data() + begin, static_cast<size_t>(count)}, true};
      const bool last = s + 1 == stages.size();
      ASSERT_TRUE(stages[s]->Forward({&chunk, 1}, s ? &hidden : nullptr, last ? nullptr : &next, last ? &result : nullptr).ok());
      std::swap(hidden, next);
    }
    logits.insert(logits.end(), result.logits.begin(), result.logits.end());
    begin += count;
  }
  const Diff d = Compare(logits, whole.logits, config().vocab_size);
  EXPECT_LE(d.rel_l2, kSamePathTolerance);
  EXPECT_EQ(d.argmax_mismatch, 0);
}

TEST_F(ForwardTest, BatchedSequencesMatchSeparateRuns) {
  Dsv4Model model(Tiny());
  const auto a = Prompt(140, 5), b = Prompt(37, 6);
  auto sa = NewState(), sb = NewState();
  const FeedResult ra = Feed(model, sa, a, {140}), rb = Feed(model, sb, b, {37});
  auto ba = NewState(), bb = NewState();
  SequenceChunk chunks[2] = {{&ba, a, true}, {&bb, b, false}};
  ForwardResult result;
  ASSERT_TRUE(model.Forward(chunks, nullptr, nullptr, &result).ok());
  const int64_t V = config().vocab_size;
  ASSERT_EQ(result.rows, 141);
  std::vector<float> got_a(result.logits.begin(), result.logits.begin() + 140 * V);
  std::vector<float> got_b(result.logits.begin() + 140 * V, result.logits.end());
  std::vector<float> want_b(rb.logits.end() - V, rb.logits.end());
  EXPECT_LE(Compare(got_a, ra.logits, V).rel_l2, kSamePathTolerance);
  EXPECT_LE(Compare(got_b, want_b, V).rel_l2, kSamePathTolerance);
  EXPECT_EQ(Compare(got_b, want_b, V).argmax_mismatch, 0);
}

TEST_F(ForwardTest, Fp8ExpertsConvertedFromMxfp4GiveTheSameLogits) {
  auto fp8 = LoadTiny(0, -1, ExpertDType::kFp8);
  ASSERT_TRUE(fp8);
  EXPECT_EQ(fp8->layers[0].ffn.experts[0].w1.view.format, kernels::QuantizedWeight::Format::kFp8Block);
  Dsv4Model fp4_model(Tiny()), fp8_model(fp8);
  const auto ids = Prompt(64, 8);
  auto s4 = NewState(), s8 = NewState();
  const FeedResult r4 = Feed(fp4_model, s4, ids, {64}), r8 = Feed(fp8_model, s8, ids, {64});
  const Diff d = Compare(r8.logits, r4.logits, config().vocab_size);
  EXPECT_LT(d.rel_l2, 1e-3) << "FP4 -> FP8 is exact; only the GEMM inputs' layout differs";
  EXPECT_EQ(d.argmax_mismatch, 0);
}

TEST_F(ForwardTest, MtpIncrementalEqualsOneShot) {
  Dsv4Model model(Tiny());
  const auto ids = Prompt(170, 9);
  auto state = NewState();
  const FeedResult run = Feed(model, state, ids, {170});
  const int64_t T = 169, MD = config().hc_dim(), V = config().vocab_size;
  std::vector<int32_t> next(ids.begin() + 1, ids.end());
  std::vector<float> hidden(run.hidden.begin(), run.hidden.begin() + T * MD);
  ForwardResult whole;
  {
    SequenceChunk chunk{&state, next, true};
    ASSERT_TRUE(model.ForwardMtp({&chunk, 1}, hidden, &whole).ok());
    EXPECT_EQ(state.mtp_length(), T);
  }
  auto state2 = NewState();
  Feed(model, state2, ids, {170});
  std::vector<float> pieces;
  for (int64_t begin = 0; begin < T;) {
    const int64_t count = begin == 0 ? 150 : 1;
    SequenceChunk chunk{&state2, {next.data() + begin, static_cast<size_t>(count)}, true};
    ForwardResult r;
    ASSERT_TRUE(model.ForwardMtp({&chunk, 1}, {hidden.data() + begin * MD, static_cast<size_t>(count * MD)}, &r).ok());
    pieces.insert(pieces.end(), r.logits.begin(), r.logits.end());
    begin += count;
  }
  const Diff d = Compare(pieces, whole.logits, V);
  EXPECT_LE(d.rel_l2, kSamePathTolerance);
  EXPECT_EQ(d.argmax_mismatch, 0);
}

TEST_F(ForwardTest, BadInputIsAnErrorNotACrash) {
  Dsv4Model model(Tiny());
  auto state = NewState();
  std::vector<int32_t> bad = {0, 129280};
  SequenceChunk chunk{&state, bad, false};
  ForwardResult result;
  auto status = model.Forward({&chunk, 1}, nullptr, nullptr, &result);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("token id 129280"), std::string::npos) << status;
  EXPECT_EQ(state.length(), 0);
  std::vector<int32_t> none;
  SequenceChunk empty{&state, none, false};
  EXPECT_FALSE(model.Forward({&empty, 1}, nullptr, nullptr, &result).ok());
  HiddenStates hidden;
  SequenceChunk ok_chunk{&state, {bad.data(), 1}, false};
  EXPECT_FALSE(model.Forward({&ok_chunk, 1}, &hidden, nullptr, &result).ok()) << "first stage must refuse hidden input";
}

}  // namespace
}  // namespace tandem::model
