// The whole tiny model on the GPU against the CPU forward: logits (relative L2, argmax agreement),
// expert and indexer choices, and the GPU's own equivalences (incremental decode, chunked prefill,
// batching) as on the CPU. Prompts are fresh random ids each run (seed printed).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <iterator>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"

#include "common/kernels/cuda/cuda_attention.h"
#include "common/kernels/cuda/cuda_ops.h"
#include "common/kernels/kernels.h"
#include "common/model/config.h"
#include "common/model/cuda/device_model.h"
#include "common/model/cuda/device_state.h"
#include "common/model/forward.h"
#include "common/model/generator.h"
#include "tests/gpu/tiny_checkpoint.h"
#include "common/model/weights.h"

namespace tandem::model {
namespace {

using cuda::DenseFormat;
using cuda::DeviceModel;
using cuda::DeviceSequenceState;

#define ASSERT_OK(expr)                                  \
  do {                                                   \
    const ::absl::Status s_ = (expr);                    \
    ASSERT_TRUE(s_.ok()) << s_.ToString();               \
  } while (0)

// The tiny checkpoint: the test build's fixture when present, else generated here (seed 1).
std::string TinyDir() { return testing::TinyCheckpointDir(); }

std::shared_ptr<const ModelWeights> Tiny() { return testing::TinyCheckpointWeights(/*load_mtp=*/false); }

// The same checkpoint with its MTP layer.
std::shared_ptr<const ModelWeights> TinyWithMtp() { return testing::TinyCheckpointWeights(); }

// The tiny model with V4-Flash's 64 attention heads (seed 1, generated once into the temp directory): the
// model the 64-head attention kernel serves (the tiny model's 4 heads take the 16-head kernel).
std::shared_ptr<const ModelWeights> Tiny64Heads() {
  static const std::shared_ptr<const ModelWeights> weights = [] {
    const std::string dir = (std::filesystem::temp_directory_path() / "tandem-gpu-test-tiny-64-heads").string();
    if (!std::filesystem::exists(dir + "/config.json")) {
      auto config = model::PresetConfig("tiny");
      if (!config.ok()) throw std::runtime_error(config.status().ToString());
      config->num_attention_heads = 64;
      auto parsed = model::ParseConfig(model::ConfigToJson(*config));
      if (!parsed.ok()) throw std::runtime_error(parsed.status().ToString());
      model::GenerateOptions options;
      options.quiet = true;
      const absl::Status status = model::GenerateCheckpoint(*parsed, dir, options);
      if (!status.ok()) throw std::runtime_error(status.ToString());
    }
    model::LoadOptions load;
    load.show_progress = false;
    load.load_mtp = false;
    auto loaded = model::LoadModelWeights(dir, load);
    if (!loaded.ok()) throw std::runtime_error(loaded.status().ToString());
    return std::shared_ptr<const ModelWeights>(std::move(*loaded));
  }();
  return weights;
}

uint32_t Seed() {
  static const uint32_t seed = [] {
    const char* env = std::getenv("TANDEM_TEST_SEED");
    const uint32_t s = env ? static_cast<uint32_t>(std::strtoul(env, nullptr, 10)) : std::random_device{}();
    std::printf("[ seed     ] %u (TANDEM_TEST_SEED=%u replays it)\n", s, s);
    return s;
  }();
  return seed;
}

std::vector<int32_t> Prompt(int64_t n, uint32_t salt) {
  std::mt19937 rng(Seed() * 7919u + salt);
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (auto& id : ids) id = static_cast<int32_t>(rng() % 129280);
  ids[0] = 0;
  return ids;
}

struct Diff {
  double rel_l2 = 0;
  double argmax_agreement = 1;
  int64_t rows = 0;
  double squared_error = 0;      // sum of (got - expected)^2: pooled over lengths by the callers
  double squared_reference = 0;  // sum of expected^2
};

Diff Compare(const std::vector<float>& got, const std::vector<float>& expected, int64_t cols) {
  Diff d;
  double num = 0, den = 0;
  for (size_t i = 0; i < std::min(got.size(), expected.size()); ++i) {
    const double e = static_cast<double>(got[i]) - expected[i];
    num += std::isnan(got[i]) ? 1e30 : e * e;
    den += static_cast<double>(expected[i]) * expected[i];
  }
  d.rel_l2 = got.size() == expected.size() ? std::sqrt(num / std::max(den, 1e-30)) : INFINITY;
  d.squared_error = got.size() == expected.size() ? num : INFINITY;
  d.squared_reference = den;
  d.rows = static_cast<int64_t>(expected.size()) / cols;
  int64_t same = 0;
  for (int64_t r = 0; r < d.rows && got.size() == expected.size(); ++r) {
    auto g = got.begin() + r * cols, x = expected.begin() + r * cols;
    same += (std::max_element(g, g + cols) - g) == (std::max_element(x, x + cols) - x);
  }
  d.argmax_agreement = d.rows ? static_cast<double>(same) / d.rows : 1.0;
  return d;
}

// Diffs pooled over lengths (and prefill/decode): the argmax agreement over all positions, and the rel-L2 of
// all positions together. A 7-row prompt's own rel-L2 is an average over 7 rows, where one discrete flip
// that random weights make likely (an expert or FP8 code at a near-tie) reads as a few percent; pooled, it
// is weighed by its rows, and a broken kernel or path still shows rel-L2 near 1 at its own length.
struct Pooled {
  double agreeing = 0, rows = 0, squared_error = 0, squared_reference = 0;
  void Add(const Diff& d) {
    agreeing += d.argmax_agreement * static_cast<double>(d.rows);
    rows += static_cast<double>(d.rows);
    squared_error += d.squared_error;
    squared_reference += d.squared_reference;
  }
  double agreement() const { return rows > 0 ? agreeing / rows : 1.0; }
  double rel_l2() const { return std::sqrt(squared_error / std::max(squared_reference, 1e-30)); }
};
// Each length alone: loose enough for one flipped row of 7, far below a broken path's ~1.
constexpr double kLengthRelL2 = 1e-1;

// Feeds `ids` through `forward` in chunks of the given sizes (cycled), gathering every row's logits.
template <typename ForwardFn>
std::vector<float> Feed(ForwardFn&& forward, SequenceState& state, const std::vector<int32_t>& ids,
                        std::vector<int64_t> chunks) {
  std::vector<float> logits;
  size_t next = 0;
  for (int64_t begin = 0; begin < static_cast<int64_t>(ids.size());) {
    const int64_t count = std::min<int64_t>(chunks[next++ % chunks.size()], static_cast<int64_t>(ids.size()) - begin);
    SequenceChunk chunk{&state, {ids.data() + begin, static_cast<size_t>(count)}, true};
    ForwardResult result;
    const absl::Status status = forward(chunk, &result);
    EXPECT_TRUE(status.ok()) << status;
    if (!status.ok()) return {};
    logits.insert(logits.end(), result.logits.begin(), result.logits.end());
    begin += count;
  }
  return logits;
}

class GpuModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { kernels::SetThreads(0); }
  void SetUp() override {
    const absl::Status status = kernels::cuda::DeviceAvailable();
    if (!status.ok()) GTEST_FAIL() << "no usable CUDA device: " << status.ToString();
    Seed();
  }
  const ModelConfig& config() { return Tiny()->config; }

  std::unique_ptr<DeviceModel> Gpu(DenseFormat dense, int64_t prefill_expert_pairs = 2048, bool attention_bf16 = false) {
    cuda::DeviceModelOptions options;
    options.dense = dense;
    options.prefill_expert_pairs = prefill_expert_pairs;
    options.attention_bf16 = attention_bf16;
    auto model = DeviceModel::Create(Tiny(), options);
    if (!model.ok()) throw std::runtime_error(model.status().ToString());
    return std::move(*model);
  }
  std::unique_ptr<DeviceSequenceState> GpuState(int64_t capacity = 4096) {
    auto state = DeviceSequenceState::Create(config(), capacity, false);
    if (!state.ok()) throw std::runtime_error(state.status().ToString());
    return std::move(*state);
  }
  std::vector<float> CpuLogits(const std::vector<int32_t>& ids, ForwardTrace* trace = nullptr) {
    Dsv4Model model(Tiny());
    HostSequenceState state(config(), 0, static_cast<int>(config().num_hidden_layers), false);
    return Feed([&](SequenceChunk& c, ForwardResult* r) { return model.Forward({&c, 1}, nullptr, nullptr, r, trace); },
                state, ids, {static_cast<int64_t>(ids.size())});
  }
  std::vector<float> GpuLogits(DeviceModel& model, const std::vector<int32_t>& ids, std::vector<int64_t> chunks,
                               ForwardTrace* trace = nullptr) {
    auto state = GpuState();
    return Feed([&](SequenceChunk& c, ForwardResult* r) { return model.Forward({&c, 1}, r, trace); }, *state, ids,
                std::move(chunks));
  }
};

// Lengths cross the window (128), the C4 top-k (16 entries = 64 tokens) and C128 boundaries. The tiny
// model's random weights leave many near-tied top-2 logits, so the argmax bound is over all positions
// of a format.
// bf16x2 (the serving default) and f32 must meet the bounds (99% argmax, rel-L2 <= 2e-2) at every
// length. Plain bf16 (one bf16 per activation, an opt-in faster prefill) sat at 0.9875-0.995 agreement and
// 2.8e-3..4.1e-2 rel-L2 per length on this random model; the worst were the 7-row prompts (4.08e-2 at seed
// 284223573, its 130..600-row lengths at <= 8.7e-3, 8.4e-3 pooled). So plain bf16 is held to 98% agreement
// and 4e-2 rel-L2 pooled (Pooled), each length to kLengthRelL2.
TEST_F(GpuModelTest, WholeModelMatchesTheCpu) {
  for (const DenseFormat dense : {DenseFormat::kBf16x2, DenseFormat::kF32, DenseFormat::kBf16}) {
    auto gpu = Gpu(dense);
    const bool plain = dense == DenseFormat::kBf16;
    const char* name = dense == DenseFormat::kBf16x2 ? "bf16x2" : plain ? "bf16  " : "f32   ";
    const double bound = plain ? 0.98 : 0.99;
    const double pooled_l2_bound = plain ? 4e-2 : 2e-2;
    const double length_l2_bound = plain ? kLengthRelL2 : 2e-2;
    Pooled pooled;
    for (const int64_t n : {1, 7, 130, 300, 600}) {
      const auto ids = Prompt(n, static_cast<uint32_t>(n));
      const auto cpu = CpuLogits(ids);
      const auto got = GpuLogits(*gpu, ids, {n});
      const Diff d = Compare(got, cpu, config().vocab_size);
      std::printf("[ parity   ] %s T=%ld: rel-L2 %.3e, argmax agreement %.4f over %ld rows\n", name,
                  static_cast<long>(n), d.rel_l2, d.argmax_agreement, static_cast<long>(d.rows));
      EXPECT_LE(d.rel_l2, length_l2_bound) << name << " T=" << n;
      pooled.Add(d);
    }
    std::printf("[ parity   ] %s: argmax agreement %.4f, rel-L2 %.3e over all %.0f positions\n", name,
                pooled.agreement(), pooled.rel_l2(), pooled.rows);
    EXPECT_GE(pooled.agreement(), bound) << name;
    EXPECT_LE(pooled.rel_l2(), pooled_l2_bound) << name;
  }
}

// --cuda-attention bf16 (q and the probabilities rounded to bf16) with the default dense format: the issue's
// bounds hold over all positions (Pooled). Prefill (one forward) and decode (token by token after a prompt)
// both. The 7-row prompts alone reached 5.4e-2 once on the 64-head model below, identically through all three
// kernels (so not a kernel's error), with every other length at <= 1.4e-2.
TEST_F(GpuModelTest, Bf16AttentionMatchesTheCpu) {
  auto gpu = Gpu(DenseFormat::kBf16x2, 2048, /*attention_bf16=*/true);
  Pooled pooled;
  for (const int64_t n : {7, 130, 300, 600}) {
    const auto ids = Prompt(n, static_cast<uint32_t>(n) + 2000);
    const auto cpu = CpuLogits(ids);
    for (const bool decode : {false, true}) {
      const Diff d = Compare(GpuLogits(*gpu, ids, {decode ? 1 : n}), cpu, config().vocab_size);
      std::printf("[ bf16 attn] %s T=%ld: rel-L2 %.3e, argmax agreement %.4f\n", decode ? "decode " : "prefill",
                  static_cast<long>(n), d.rel_l2, d.argmax_agreement);
      EXPECT_LE(d.rel_l2, kLengthRelL2) << (decode ? "decode" : "prefill") << " T=" << n;
      pooled.Add(d);
    }
  }
  std::printf("[ bf16 attn] all: rel-L2 %.3e, argmax agreement %.4f over %.0f positions\n", pooled.rel_l2(),
              pooled.agreement(), pooled.rows);
  EXPECT_GE(pooled.agreement(), 0.99);
  EXPECT_LE(pooled.rel_l2(), 2e-2);
}

// The same on the 64-head tiny model, through the 64-head kernels at every batch (forced, decode's single
// tokens included: the warpgroup-MMA one, then the mma.sync one) and then through the 16-head kernel: the
// whole forward's paged window rings, compressed pages and selections on the kernels V4-Flash runs.
TEST_F(GpuModelTest, Bf16AttentionOn64HeadsMatchesTheCpu) {
  const auto weights = Tiny64Heads();
  const ModelConfig& c = weights->config;
  ASSERT_EQ(c.num_attention_heads, 64);
  // The process-wide kernel switches come back however the test ends.
  struct Restore {
    int64_t min_tokens = kernels::cuda::WideAttentionMinTokens();
    bool wgmma = kernels::cuda::WgmmaAttention();
    ~Restore() {
      kernels::cuda::SetWideAttentionMinTokens(min_tokens);
      kernels::cuda::SetWgmmaAttention(wgmma);
    }
  } restore;
  struct Variant {
    const char* kernel;
    int64_t min_tokens;
    bool wgmma;
  };
  for (const Variant& v : {Variant{"64-head warpgroup kernel", 0, true}, Variant{"64-head mma.sync kernel", 0, false},
                           Variant{"16-head kernel", std::numeric_limits<int64_t>::max(), true}}) {
    const char* kernel = v.kernel;
    kernels::cuda::SetWideAttentionMinTokens(v.min_tokens);
    kernels::cuda::SetWgmmaAttention(v.wgmma);
    cuda::DeviceModelOptions options;
    options.attention_bf16 = true;
    auto gpu = DeviceModel::Create(weights, options);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    Pooled pooled;
    for (const int64_t n : {7, 130, 300}) {
      const auto ids = Prompt(n, static_cast<uint32_t>(n) + 3000);
      Dsv4Model cpu_model(weights);
      HostSequenceState cpu_state(c, 0, static_cast<int>(c.num_hidden_layers), false);
      const auto cpu = Feed([&](SequenceChunk& chunk, ForwardResult* r) {
        return cpu_model.Forward({&chunk, 1}, nullptr, nullptr, r, nullptr);
      }, cpu_state, ids, {n});
      for (const bool decode : {false, true}) {
        auto state = DeviceSequenceState::Create(c, 4096, false);
        ASSERT_TRUE(state.ok()) << state.status();
        const auto got = Feed([&](SequenceChunk& chunk, ForwardResult* r) { return (*gpu)->Forward({&chunk, 1}, r); },
                              **state, ids, {decode ? 1 : n});
        const Diff d = Compare(got, cpu, c.vocab_size);
        std::printf("[ 64 heads ] %s, %s T=%ld: rel-L2 %.3e, argmax agreement %.4f\n", kernel,
                    decode ? "decode " : "prefill", static_cast<long>(n), d.rel_l2, d.argmax_agreement);
        EXPECT_LE(d.rel_l2, kLengthRelL2) << kernel << (decode ? " decode" : " prefill") << " T=" << n;
        pooled.Add(d);
      }
    }
    std::printf("[ 64 heads ] %s, all: rel-L2 %.3e, argmax agreement %.4f over %.0f positions\n", kernel,
                pooled.rel_l2(), pooled.agreement(), pooled.rows);
    EXPECT_GE(pooled.agreement(), 0.99) << kernel;
    EXPECT_LE(pooled.rel_l2(), 2e-2) << kernel;
  }
}

// The prefill path of the routed experts (bf16 cuBLASLt per expert, x split hi + lo) forced on at every size.
TEST_F(GpuModelTest, PrefillExpertPathMatchesTheCpu) {
  auto gpu = Gpu(DenseFormat::kBf16x2, /*prefill_expert_pairs=*/1);
  Pooled pooled;
  for (const int64_t n : {7, 130, 300}) {
    const auto ids = Prompt(n, static_cast<uint32_t>(n) + 1000);
    const Diff d = Compare(GpuLogits(*gpu, ids, {n}), CpuLogits(ids), config().vocab_size);
    std::printf("[ prefill  ] experts via cuBLASLt, T=%ld: rel-L2 %.3e, argmax agreement %.4f\n", static_cast<long>(n),
                d.rel_l2, d.argmax_agreement);
    EXPECT_LE(d.rel_l2, 2e-2) << "T=" << n;
    pooled.Add(d);
  }
  EXPECT_GE(pooled.agreement(), 0.99);
}

// The GPU takes the same discrete decisions as the CPU (experts per token, indexer top-k sets) except
// at near-ties. The first layers see nearly identical inputs and must agree on >= 98% of rows; a flipped
// choice changes what later layers see, so deeper layers get a looser bound (a broken kernel agrees on
// almost nothing, so both still catch one).
TEST_F(GpuModelTest, ExpertAndIndexerChoicesMatchTheCpu) {
  const auto ids = Prompt(600, 11);
  ForwardTrace cpu_trace, gpu_trace;
  CpuLogits(ids, &cpu_trace);
  auto gpu = Gpu(DenseFormat::kF32);
  GpuLogits(*gpu, ids, {600}, &gpu_trace);
  ASSERT_EQ(cpu_trace.tables.size(), gpu_trace.tables.size());
  for (const auto& [name, cpu_table] : cpu_trace.tables) {
    ASSERT_TRUE(gpu_trace.tables.count(name)) << name;
    const auto& gpu_table = gpu_trace.tables.at(name);
    ASSERT_EQ(cpu_table.values.size(), gpu_table.values.size()) << name;
    const int64_t cols = cpu_table.cols, rows = static_cast<int64_t>(cpu_table.values.size()) / cols;
    int64_t same_rows = 0;
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<int32_t> a(cpu_table.values.begin() + r * cols, cpu_table.values.begin() + (r + 1) * cols);
      std::vector<int32_t> b(gpu_table.values.begin() + r * cols, gpu_table.values.begin() + (r + 1) * cols);
      std::sort(a.begin(), a.end());
      std::sort(b.begin(), b.end());
      same_rows += a == b;
    }
    const double agreement = static_cast<double>(same_rows) / rows;
    const bool early = name.rfind("layers.0.", 0) == 0 || name.rfind("layers.1.", 0) == 0;
    std::printf("[ choices  ] %s: %ld/%ld rows choose the same set (%.4f)\n", name.c_str(), static_cast<long>(same_rows),
                static_cast<long>(rows), agreement);
    EXPECT_GE(agreement, early ? 0.98 : 0.9) << name;
  }
}

// The first position at which two traces take a different discrete decision (an indexer top-k set or a
// token's experts, compared as sets), and how many rows of each table differ.
struct ChoiceFlips {
  int64_t first_row = INT64_MAX;
  int64_t rows = 0, flipped = 0;
  double worst_table_fraction = 0;
  // At first_row every table that differs there swaps exactly one choice for another (what a near-tie
  // does; a chunking bug that moves a token's inputs changes many).
  bool first_is_single_swap = true;
};
ChoiceFlips CompareChoices(const ForwardTrace& a, const ForwardTrace& b) {
  ChoiceFlips f;
  for (const auto& [name, ta] : a.tables) {
    const auto it = b.tables.find(name);
    if (it == b.tables.end() || it->second.values.size() != ta.values.size() || ta.cols <= 0) {
      f.first_row = 0;
      f.worst_table_fraction = 1;
      continue;
    }
    const int64_t cols = ta.cols, rows = static_cast<int64_t>(ta.values.size()) / cols;
    int64_t flipped = 0;
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<int32_t> x(ta.values.begin() + r * cols, ta.values.begin() + (r + 1) * cols);
      std::vector<int32_t> y(it->second.values.begin() + r * cols, it->second.values.begin() + (r + 1) * cols);
      std::sort(x.begin(), x.end());
      std::sort(y.begin(), y.end());
      if (x != y) {
        if (flipped++ == 0 && r <= f.first_row) {
          std::vector<int32_t> only;
          std::set_symmetric_difference(x.begin(), x.end(), y.begin(), y.end(), std::back_inserter(only));
          const bool single = only.size() == 2;
          f.first_is_single_swap = r < f.first_row ? single : f.first_is_single_swap && single;
          f.first_row = r;
        }
      }
    }
    f.rows += rows;
    f.flipped += flipped;
    f.worst_table_fraction = std::max(f.worst_table_fraction, static_cast<double>(flipped) / std::max<int64_t>(rows, 1));
  }
  return f;
}

// `got` against `expected` (the same tokens run another way on the GPU): rel-L2 <= `tight` up to the first
// position where the traces' discrete choices differ, that first difference a one-for-one swap (a near-tie),
// at most 2% of any table's rows flipped, and from the first flip on the model tolerance (2e-2, 99% argmax).
void ExpectSameUpToNearTies(const char* name, const std::vector<float>& got, const std::vector<float>& expected,
                            const ForwardTrace& got_trace, const ForwardTrace& expected_trace, int64_t vocab,
                            double tight) {
  const ChoiceFlips flips = CompareChoices(expected_trace, got_trace);
  const Diff d = Compare(got, expected, vocab);
  const int64_t tight_rows = std::min<int64_t>(flips.first_row, d.rows);
  const size_t tight_values = static_cast<size_t>(tight_rows * vocab);
  const Diff before = Compare(std::vector<float>(got.begin(), got.begin() + std::min(got.size(), tight_values)),
                              std::vector<float>(expected.begin(), expected.begin() + std::min(expected.size(), tight_values)),
                              vocab);
  std::printf("[ same-gpu ] %s: rel-L2 %.3e, argmax agreement %.4f; %ld/%ld choice rows flipped (first at row %ld), "
              "rel-L2 %.3e over the %ld rows before\n",
              name, d.rel_l2, d.argmax_agreement, static_cast<long>(flips.flipped), static_cast<long>(flips.rows),
              static_cast<long>(flips.first_row == INT64_MAX ? -1 : flips.first_row), before.rel_l2,
              static_cast<long>(tight_rows));
  EXPECT_LE(flips.worst_table_fraction, 0.02) << name;
  EXPECT_TRUE(flips.first_is_single_swap) << name << ": the first flipped choice (row " << flips.first_row
                                          << ") is not a one-for-one swap at a near-tie";
  EXPECT_LE(before.rel_l2, tight) << name;
  EXPECT_LE(d.rel_l2, flips.flipped == 0 ? tight : 2e-2) << name;
  EXPECT_GE(d.argmax_agreement, 0.99) << name;
}

// On the GPU itself: prefill then one-token decode steps, and chunked prefill, give the logits of one
// whole-prompt forward. Only GEMM shapes differ, so up to the first position where a discrete decision
// flips at a near-tie (one choice swapped for one other, checked) (an indexer top-k set or an expert set: the GEMMs of other row counts round
// differently) the tolerance is tight; from there on a flipped choice legitimately moves that position and,
// through the cache, later ones, so the rest is held to the model tolerance. A chunking bug flips choices on
// many rows (and moves the logits far), which the bounds on the flipped fraction and on rel-L2 catch.
TEST_F(GpuModelTest, IncrementalAndChunkedMatchOneForward) {
  auto gpu = Gpu(DenseFormat::kF32);
  const auto ids = Prompt(300, 5);
  ForwardTrace whole_trace;
  const auto whole = GpuLogits(*gpu, ids, {300}, &whole_trace);
  const int64_t vocab = config().vocab_size;
  struct Case {
    const char* name;
    std::vector<int64_t> chunks;  // cycled by Feed
  };
  std::vector<int64_t> decode = {200};
  decode.resize(101, 1);  // then 100 one-token steps
  const std::vector<Case> cases = {{"prefill 200 then decode", decode}, {"chunks 37/64/5", {37, 64, 5}}, {"chunks of 129", {129}}};
  for (const auto& c : cases) {
    ForwardTrace trace;
    const auto got = GpuLogits(*gpu, ids, c.chunks, &trace);
    ExpectSameUpToNearTies(c.name, got, whole, trace, whole_trace, vocab, 1e-3);
  }
}

// Three sequences at different lengths in one batch give what each gives alone.
TEST_F(GpuModelTest, BatchedSequencesMatchSeparateRuns) {
  auto gpu = Gpu(DenseFormat::kF32);
  const std::vector<int64_t> lengths = {150, 9, 260};
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::unique_ptr<DeviceSequenceState>> states;
  for (size_t i = 0; i < lengths.size(); ++i) {
    prompts.push_back(Prompt(lengths[i] + 3, 100 + static_cast<uint32_t>(i)));
    states.push_back(GpuState());
  }
  // Prefill each alone, then three decode steps batched together.
  std::vector<std::vector<float>> batched(lengths.size());
  for (size_t i = 0; i < lengths.size(); ++i) {
    SequenceChunk chunk{states[i].get(), {prompts[i].data(), static_cast<size_t>(lengths[i])}, false};
    ASSERT_OK(gpu->Forward({&chunk, 1}, nullptr));
  }
  for (int step = 0; step < 3; ++step) {
    std::vector<SequenceChunk> batch;
    for (size_t i = 0; i < lengths.size(); ++i) {
      batch.push_back({states[i].get(), {prompts[i].data() + lengths[i] + step, 1}, false});
    }
    ForwardResult r;
    ASSERT_OK(gpu->Forward(batch, &r));
    ASSERT_EQ(r.rows, 3);
    for (size_t i = 0; i < lengths.size(); ++i) {
      batched[i].insert(batched[i].end(), r.logits.begin() + i * config().vocab_size,
                        r.logits.begin() + (i + 1) * config().vocab_size);
    }
  }
  for (size_t i = 0; i < lengths.size(); ++i) {
    auto state = GpuState();
    std::vector<float> alone;
    SequenceChunk prefill{state.get(), {prompts[i].data(), static_cast<size_t>(lengths[i])}, false};
    ASSERT_OK(gpu->Forward({&prefill, 1}, nullptr));
    for (int step = 0; step < 3; ++step) {
      SequenceChunk chunk{state.get(), {prompts[i].data() + lengths[i] + step, 1}, false};
      ForwardResult r;
      ASSERT_OK(gpu->Forward({&chunk, 1}, &r));
      alone.insert(alone.end(), r.logits.begin(), r.logits.end());
    }
    const Diff d = Compare(batched[i], alone, config().vocab_size);
    std::printf("[ batched  ] sequence %zu (prompt %ld): rel-L2 %.3e\n", i, static_cast<long>(lengths[i]), d.rel_l2);
    EXPECT_LE(d.rel_l2, 1e-3);
    EXPECT_EQ(d.argmax_agreement, 1.0);
  }
}

// Greedy ids from the device argmax equal the argmax of the copied logits.
TEST_F(GpuModelTest, DeviceArgmaxMatchesHostArgmax) {
  auto gpu = Gpu(DenseFormat::kBf16x2);
  auto state = GpuState();
  const auto ids = Prompt(77, 3);
  SequenceChunk chunk{state.get(), {ids.data(), ids.size()}, true};
  ForwardResult r;
  ASSERT_OK(gpu->Forward({&chunk, 1}, &r));
  auto device_ids = gpu->ArgmaxLast();
  ASSERT_TRUE(device_ids.ok()) << device_ids.status();
  ASSERT_EQ(static_cast<int64_t>(device_ids->size()), r.rows);
  for (int64_t row = 0; row < r.rows; ++row) {
    auto begin = r.logits.begin() + row * config().vocab_size;
    EXPECT_EQ((*device_ids)[row], std::max_element(begin, begin + config().vocab_size) - begin) << "row " << row;
  }
}

TEST_F(GpuModelTest, BadInputIsAnErrorNotACrash) {
  auto gpu = Gpu(DenseFormat::kBf16x2);
  auto state = GpuState(64);
  std::vector<int32_t> bad = {0, 5, static_cast<int32_t>(config().vocab_size)};
  SequenceChunk chunk{state.get(), {bad.data(), bad.size()}, false};
  const absl::Status vocab = gpu->Forward({&chunk, 1}, nullptr);
  EXPECT_EQ(vocab.code(), absl::StatusCode::kInvalidArgument) << vocab;
  EXPECT_NE(vocab.message().find("outside the vocabulary"), std::string::npos) << vocab;
  const auto long_prompt = Prompt(65, 1);
  SequenceChunk too_long{state.get(), {long_prompt.data(), long_prompt.size()}, false};
  const absl::Status capacity = gpu->Forward({&too_long, 1}, nullptr);
  EXPECT_EQ(capacity.code(), absl::StatusCode::kResourceExhausted) << capacity;
  EXPECT_EQ(state->length(), 0);
  // The model still works after refusing.
  SequenceChunk ok{state.get(), {long_prompt.data(), 64}, false};
  ASSERT_OK(gpu->Forward({&ok, 1}, nullptr));
  EXPECT_EQ(state->length(), 64);
}

// The MTP draft step on the GPU against the CPU's, both fed the CPU target's pre-head streams (so the MTP
// layer alone is compared): prompt 170 crosses the window; then the GPU in pieces (150, then 1 at a time)
// against its own one shot, and the refusals.
TEST_F(GpuModelTest, MtpDraftMatchesTheCpu) {
  const auto weights = TinyWithMtp();
  ASSERT_TRUE(weights->mtp) << "the tiny checkpoint has an MTP layer";
  const auto& c = weights->config;
  const int64_t T = 169, MD = c.hc_dim(), L = c.num_hidden_layers;
  // Three prompts (507 draft rows: the random model's near-ties make single rows flip at ~0.2%).
  struct Case {
    std::vector<int32_t> next;
    std::vector<float> hidden;
    ForwardResult want;
  };
  std::vector<Case> cases;
  Dsv4Model cpu(weights);
  for (const uint32_t seed : {11u, 12u, 13u}) {
    const auto ids = Prompt(T + 1, seed);
    Case k;
    k.next.assign(ids.begin() + 1, ids.end());
    HostSequenceState target(c, 0, static_cast<int>(L), true);
    ForwardResult main;
    SequenceChunk chunk{&target, {ids.data(), ids.size()}, true};
    ASSERT_OK(cpu.Forward({&chunk, 1}, nullptr, nullptr, &main));
    k.hidden.assign(main.pre_head_hidden.begin(), main.pre_head_hidden.begin() + T * MD);
    HostSequenceState draft(c, 0, static_cast<int>(L), true);
    SequenceChunk step{&draft, k.next, true};
    ASSERT_OK(cpu.ForwardMtp({&step, 1}, k.hidden, &k.want));
    cases.push_back(std::move(k));
  }
  for (const DenseFormat dense : {DenseFormat::kBf16x2, DenseFormat::kF32}) {
    const char* name = dense == DenseFormat::kF32 ? "f32" : "bf16x2";
    cuda::DeviceModelOptions options;
    options.dense = dense;
    auto gpu = DeviceModel::Create(weights, options);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    Pooled pooled;
    std::vector<float> first_shot;
    for (const Case& k : cases) {
      auto state = DeviceSequenceState::Create(c, 4096, true);
      ASSERT_TRUE(state.ok()) << state.status();
      ForwardResult got;
      SequenceChunk chunk{state->get(), k.next, true};
      ASSERT_OK((*gpu)->ForwardMtp({&chunk, 1}, k.hidden, &got));
      EXPECT_EQ((*state)->mtp_length(), T);
      EXPECT_EQ((*state)->length(), 0) << "the draft step leaves the target's length alone";
      const Diff d = Compare(got.logits, k.want.logits, c.vocab_size);
      std::printf("[ mtp      ] %s: rel-L2 %.3e, argmax agreement %.4f over %ld rows\n", name, d.rel_l2,
                  d.argmax_agreement, static_cast<long>(d.rows));
      EXPECT_LE(d.rel_l2, 2e-2) << name;
      pooled.Add(d);
      if (first_shot.empty()) first_shot = got.logits;
      // A hidden block of the wrong size is refused; nothing advances.
      SequenceChunk one{state->get(), {k.next.data(), 1}, true};
      const absl::Status bad = (*gpu)->ForwardMtp({&one, 1}, {k.hidden.data(), static_cast<size_t>(MD - 1)}, nullptr);
      EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument) << bad;
      EXPECT_EQ((*state)->mtp_length(), T);
    }
    std::printf("[ mtp      ] %s: argmax agreement %.4f over all %.0f rows\n", name, pooled.agreement(), pooled.rows);
    EXPECT_GE(pooled.agreement(), 0.99) << name;

    // The first prompt in pieces (150, then one at a time) against its one shot.
    const Case& k = cases[0];
    auto pieces_state = DeviceSequenceState::Create(c, 4096, true);
    ASSERT_TRUE(pieces_state.ok());
    std::vector<float> pieces;
    for (int64_t begin = 0; begin < T;) {
      const int64_t count = begin == 0 ? 150 : 1;
      SequenceChunk piece{pieces_state->get(), {k.next.data() + begin, static_cast<size_t>(count)}, true};
      ForwardResult r;
      ASSERT_OK((*gpu)->ForwardMtp({&piece, 1}, {k.hidden.data() + begin * MD, static_cast<size_t>(count * MD)}, &r));
      pieces.insert(pieces.end(), r.logits.begin(), r.logits.end());
      begin += count;
    }
    const Diff same = Compare(pieces, first_shot, c.vocab_size);
    std::printf("[ mtp      ] %s pieces vs one shot: rel-L2 %.3e, argmax agreement %.4f\n", name, same.rel_l2,
                same.argmax_agreement);
    EXPECT_LE(same.rel_l2, 1e-3) << name;
    EXPECT_GE(same.argmax_agreement, 0.995) << name;
  }
  // A model loaded without its MTP layer says so.
  auto plain = Gpu(DenseFormat::kBf16x2);
  auto state = GpuState(64);
  SequenceChunk chunk{state.get(), {cases[0].next.data(), 1}, true};
  const absl::Status missing =
      plain->ForwardMtp({&chunk, 1}, {cases[0].hidden.data(), static_cast<size_t>(MD)}, nullptr);
  EXPECT_EQ(missing.code(), absl::StatusCode::kFailedPrecondition) << missing;
}

// Two pipeline stages on the GPU (layers [0, L/2) with the embedding, [L/2, L) with the head), the streams
// handed over through the host in f32, give the whole model's logits bit for bit: a prompt in two chunks,
// then decode steps. The GEMMs are not timed (tune_gemms = false), so all three models run the same cuBLASLt
// algorithm for each shape; timed picks may differ between models (seen: rel-L2 up to 1.7e-4 in f32).
TEST_F(GpuModelTest, PipelineStagesMatchTheWholeModel) {
  const auto& c = config();
  const int split = static_cast<int>(c.num_hidden_layers / 2);
  auto load = [&](int begin, int end) {
    LoadOptions options;
    options.show_progress = false;
    options.load_mtp = false;
    options.begin_layer = begin;
    options.end_layer = end;
    auto loaded = LoadModelWeights(TinyDir(), options);
    if (!loaded.ok()) throw std::runtime_error(loaded.status().ToString());
    return std::shared_ptr<const ModelWeights>(std::move(*loaded));
  };
  cuda::DeviceModelOptions options;
  options.dense = DenseFormat::kF32;
  options.tune_gemms = false;
  auto first = DeviceModel::Create(load(0, split), options);
  auto second = DeviceModel::Create(load(split, static_cast<int>(c.num_hidden_layers)), options);
  auto whole_or = DeviceModel::Create(Tiny(), options);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_TRUE(whole_or.ok()) << whole_or.status();
  auto& whole = *whole_or;
  auto s_whole = GpuState(), s_first = GpuState(), s_second = GpuState();
  const auto ids = Prompt(305, 21);
  std::vector<float> staged, direct;
  ForwardTrace staged_trace, whole_trace;  // layer tables by global layer index: the stages' fill one
  int64_t begin = 0;
  for (const int64_t count : {200, 100, 1, 1, 1, 1, 1}) {
    const std::span<const int32_t> tokens(ids.data() + begin, static_cast<size_t>(count));
    SequenceChunk a{s_first.get(), tokens, true}, b{s_second.get(), tokens, true}, w{s_whole.get(), tokens, true};
    HiddenStates hidden;
    ForwardResult r_staged, r_whole;
    ASSERT_OK((*first)->ForwardStage({&a, 1}, nullptr, &hidden, nullptr, &staged_trace));
    ASSERT_EQ(hidden.tokens, count);
    ASSERT_OK((*second)->ForwardStage({&b, 1}, &hidden, nullptr, &r_staged, &staged_trace));
    ASSERT_OK(whole->Forward({&w, 1}, &r_whole, &whole_trace));
    staged.insert(staged.end(), r_staged.logits.begin(), r_staged.logits.end());
    direct.insert(direct.end(), r_whole.logits.begin(), r_whole.logits.end());
    begin += count;
  }
  EXPECT_EQ(s_first->length(), 305);
  EXPECT_EQ(s_second->length(), 305);
  const std::string name = absl::StrCat("stages [0, ", split, ") + [", split, ", ", c.num_hidden_layers, ") vs whole");
  ExpectSameUpToNearTies(name.c_str(), staged, direct, staged_trace, whole_trace, c.vocab_size, 0.0);
  EXPECT_TRUE(staged == direct) << name << ": not bit-identical";

  // Misuse is refused with the reason; nothing advances.
  const auto more = Prompt(3, 22);
  SequenceChunk a{s_first.get(), {more.data(), more.size()}, false}, b{s_second.get(), {more.data(), more.size()}, false};
  HiddenStates hidden;
  EXPECT_EQ((*first)->Forward({&a, 1}, nullptr).code(), absl::StatusCode::kInvalidArgument) << "a stage is not a model";
  EXPECT_EQ((*second)->ForwardStage({&b, 1}, nullptr, nullptr, nullptr).code(), absl::StatusCode::kInvalidArgument);
  ForwardResult r;
  EXPECT_EQ((*second)->ForwardStage({&b, 1}, &hidden, nullptr, &r).code(), absl::StatusCode::kInvalidArgument)
      << "hidden states of the wrong token count";
  EXPECT_EQ((*first)->ForwardStage({&a, 1}, nullptr, nullptr, nullptr).code(), absl::StatusCode::kInvalidArgument)
      << "the first stage needs an output";
  EXPECT_EQ(s_first->length(), 305);
  EXPECT_EQ(s_second->length(), 305);
}

// CUDA graphs of decode steps (DeviceModelOptions::graphs) against the same model's eager launches (one
// model, so both use the cuBLASLt plans its first eager run tuned). Three runs, each on fresh states:
// one sequence (prompt 230, then 48 one-token steps: the indexer's visible bound crosses its bucket of 64
// entries at context 260, a second signature mid-run); three sequences decoding as a batch that a fourth
// joins after 20 steps (a new signature); and a cache of one graph with two alternating shapes (evictions,
// re-captures). The graph runs give the eager runs' logits, bit for bit whenever eager runs repeat bit
// for bit, and most steps replay.
TEST_F(GpuModelTest, CudaGraphDecodeMatchesEagerLaunches) {
  const int64_t vocab = config().vocab_size;
  // Runs `steps` (fresh states each time, the logits it gathers returned) eagerly twice (is the eager
  // forward itself bit-reproducible?) and once with graphs on; checks the graph run against the first and
  // returns the graph counters of that run.
  auto check = [&](DeviceModel& gpu, const char* name, auto&& steps) {
    gpu.SetGraphs(false);
    const auto eager = steps();
    const auto again = steps();
    gpu.SetGraphs(true);
    const cuda::GraphStats before = gpu.graph_stats();
    const auto graphed = steps();
    gpu.SetGraphs(false);
    cuda::GraphStats after = gpu.graph_stats();
    after.captures -= before.captures;
    after.replays -= before.replays;
    after.eager -= before.eager;
    after.capture_failures -= before.capture_failures;
    after.evictions -= before.evictions;
    const bool reproducible = eager == again;
    const Diff d = Compare(graphed, eager, vocab);
    std::printf("[ graphs   ] %s: %ld captures, %ld replays, %ld eager steps, %ld failed captures, %ld evictions; "
                "rel-L2 %.3e vs eager (%s; eager runs %s)\n",
                name, static_cast<long>(after.captures), static_cast<long>(after.replays), static_cast<long>(after.eager),
                static_cast<long>(after.capture_failures), static_cast<long>(after.evictions), d.rel_l2,
                graphed == eager ? "bit-identical" : "NOT bit-identical", reproducible ? "repeat bit for bit" : "differ");
    EXPECT_EQ(graphed.size(), eager.size()) << name;
    EXPECT_LE(d.rel_l2, 1e-6) << name;
    EXPECT_EQ(d.argmax_agreement, 1.0) << name;
    if (reproducible) {
      EXPECT_TRUE(graphed == eager) << name << ": eager launches repeat bit for bit, replays must too";
    }
    EXPECT_EQ(after.capture_failures, 0) << name;
    return after;
  };
  auto forward = [&](DeviceModel& gpu, std::vector<SequenceChunk> batch, std::vector<float>* logits) {
    ForwardResult r;
    const absl::Status status = gpu.Forward(batch, &r);
    EXPECT_TRUE(status.ok()) << status;
    if (logits) logits->insert(logits->end(), r.logits.begin(), r.logits.end());
  };
  auto gpu = Gpu(DenseFormat::kBf16x2);

  // One sequence.
  {
    const int64_t prompt = 230, steps = 48;
    const auto ids = Prompt(prompt + steps, 41);
    const cuda::GraphStats s = check(*gpu, "one sequence", [&] {
      auto state = GpuState();
      std::vector<float> logits;
      forward(*gpu, {{state.get(), {ids.data(), static_cast<size_t>(prompt)}, false}}, nullptr);
      for (int64_t i = 0; i < steps; ++i) {
        forward(*gpu, {{state.get(), {ids.data() + prompt + i, 1}, false}}, &logits);
      }
      return logits;
    });
    EXPECT_GT(s.replays, steps / 2);
    EXPECT_GE(s.captures, 2) << "context 260 crosses the indexer bound's bucket: a second signature";
  }

  // Three sequences as one batch, a fourth joining after 20 steps.
  {
    const std::vector<int64_t> lengths = {150, 9, 260, 40};
    const int64_t steps = 40, join = 20;
    std::vector<std::vector<int32_t>> prompts;
    for (size_t i = 0; i < lengths.size(); ++i) prompts.push_back(Prompt(lengths[i] + steps, 200 + static_cast<uint32_t>(i)));
    const cuda::GraphStats s = check(*gpu, "batch of 3, then 4", [&] {
      std::vector<std::unique_ptr<DeviceSequenceState>> states;
      for (size_t i = 0; i < lengths.size(); ++i) states.push_back(GpuState());
      auto prefill = [&](size_t i) {
        forward(*gpu, {{states[i].get(), {prompts[i].data(), static_cast<size_t>(lengths[i])}, false}}, nullptr);
      };
      for (size_t i = 0; i < 3; ++i) prefill(i);
      std::vector<float> logits;
      for (int64_t step = 0; step < steps; ++step) {
        if (step == join) prefill(3);
        std::vector<SequenceChunk> batch;
        for (size_t i = 0; i < (step < join ? 3u : 4u); ++i) {
          const int64_t at = lengths[i] + (i < 3 ? step : step - join);
          batch.push_back({states[i].get(), {prompts[i].data() + at, 1}, false});
        }
        forward(*gpu, batch, &logits);
      }
      return logits;
    });
    EXPECT_GT(s.replays, steps / 2);
    EXPECT_GE(s.captures, 2) << "the fourth sequence joining is a new signature";
  }

  // One graph cached, two shapes in turn (3 steps of one sequence, 3 of two): each shape evicts the other's
  // graph and is captured again.
  {
    cuda::DeviceModelOptions options;
    options.dense = DenseFormat::kBf16x2;
    options.max_graphs = 1;
    auto made = DeviceModel::Create(Tiny(), options);
    ASSERT_TRUE(made.ok()) << made.status();
    DeviceModel& small = **made;
    const auto a = Prompt(100 + 24, 51), b = Prompt(70 + 24, 52);
    const cuda::GraphStats s = check(small, "one cached graph, two shapes", [&] {
      auto sa = GpuState(), sb = GpuState();
      forward(small, {{sa.get(), {a.data(), 100}, false}}, nullptr);
      forward(small, {{sb.get(), {b.data(), 70}, false}}, nullptr);
      std::vector<float> logits;
      for (int64_t step = 0, ia = 100, ib = 70; step < 24; ++step) {
        std::vector<SequenceChunk> batch = {{sa.get(), {a.data() + ia++, 1}, false}};
        if ((step / 3) % 2 == 1) batch.push_back({sb.get(), {b.data() + ib++, 1}, false});
        forward(small, batch, &logits);
      }
      return logits;
    });
    EXPECT_GT(s.evictions, 0);
    EXPECT_GT(s.captures, 2);
    EXPECT_GT(s.replays, 0);
    EXPECT_LE(small.graph_stats().cached, 1);
  }
}

}  // namespace
}  // namespace tandem::model
