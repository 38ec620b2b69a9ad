// The C4 indexer's top-k and sparse MQA on the GPU against loops copied from common/model/attention.cc
// (its index scores in double, its attention with f32 dots and double softmax sums), on the flash
// (64 heads, index 64 x 128, topk 512) and tiny (4 heads, index 4 x 128, topk 16) shapes. Fresh inputs
// every run.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "common/core/dtype.h"
#include "common/kernels/cuda/cuda_attention.h"
#include "common/kernels/kernels.h"
#include "tests/gpu/attention_test_util.h"
#include "tests/gpu/gpu_test_util.h"

namespace tandem::kernels {
namespace {

using testing::AllClose;
using testing::CudaTest;
using testing::DeviceIsSm90;
using testing::DequantizeEntries;
using testing::KvPool;
using testing::Normal;
using testing::Poisoned;
using testing::QuantizeEntries;
using testing::RelativeL2;
using testing::Sync;
using testing::ToDevice;
using testing::ToHost;

constexpr int64_t kIndexDim = 128;
constexpr int32_t kUnwritten = 0x5eed5eed;  // selected[] before the launch: a value no kernel writes

// ---- Indexer ----

struct IndexerCase {
  const char* name;
  int64_t heads;
  int64_t topk;
  std::vector<int32_t> visible;  // per token
  int64_t distinct = 0;          // > 0: keys are copies of this many vectors (exact score ties)
};

// The GPU sums scores in f32, the CPU in double, so two entries whose scores differ by less than the
// f32 error may swap places. Allowed, and only then: an entry chosen instead of the CPU's is within
// `tolerance` of the CPU's k-th score, the order is descending within `tolerance`, and copies of one key
// (bitwise-equal scores on both sides) always go to the smaller index.
::testing::AssertionResult SameTopK(const std::vector<int32_t>& gpu, const std::vector<int64_t>& cpu,
                                    const std::vector<float>& scores, const std::vector<int64_t>& identity,
                                    double tolerance) {
  const int64_t n = static_cast<int64_t>(scores.size()), k = static_cast<int64_t>(cpu.size());
  std::set<int64_t> gpu_set, cpu_set(cpu.begin(), cpu.end());
  for (const int32_t j : gpu) {
    if (j < 0 || j >= n) return ::testing::AssertionFailure() << "index " << j << " outside [0, " << n << ")";
    if (!gpu_set.insert(j).second) return ::testing::AssertionFailure() << "index " << j << " chosen twice";
  }
  const double kth = scores[cpu.back()];
  int64_t swapped = 0;
  for (const int64_t x : gpu_set) {
    if (cpu_set.count(x)) continue;
    ++swapped;
    if (scores[x] < kth - tolerance) {
      return ::testing::AssertionFailure() << "chose " << x << " (score " << scores[x] << ") below the k-th score " << kth
                                           << " by more than " << tolerance;
    }
    for (const int64_t y : cpu_set) {
      if (!gpu_set.count(y) && identity[y] == identity[x] && y < x) {
        return ::testing::AssertionFailure() << "of two copies of one key chose " << x << " over the smaller " << y;
      }
    }
  }
  for (const int64_t y : cpu_set) {
    if (!gpu_set.count(y) && scores[y] > kth + tolerance) {
      return ::testing::AssertionFailure() << "left out " << y << " (score " << scores[y] << ") above the k-th score " << kth
                                           << " by more than " << tolerance;
    }
  }
  for (int64_t i = 1; i < k; ++i) {
    const int32_t a = gpu[i - 1], b = gpu[i];
    if (scores[b] > scores[a] + tolerance) {
      return ::testing::AssertionFailure() << "not descending at " << i << ": " << a << " (" << scores[a] << ") then " << b
                                           << " (" << scores[b] << ")";
    }
    if (identity[a] == identity[b] && b < a) {
      return ::testing::AssertionFailure() << "copies of one key out of index order at " << i << ": " << a << " then " << b;
    }
  }
  return ::testing::AssertionSuccess() << swapped << " near-tie swaps";
}

void CheckIndexer(std::mt19937& rng, const IndexerCase& c) {
  SCOPED_TRACE(c.name);
  const int64_t tokens = static_cast<int64_t>(c.visible.size()), heads = c.heads, dim = kIndexDim;
  const int64_t key_bytes = IndexerKeyBytes(dim);
  // Token t's keys sit at pointer slots key_begin[t] ..; the pointers reach a shuffled key buffer.
  std::vector<int64_t> key_begin(static_cast<size_t>(tokens));
  int64_t slots = 3;
  for (int64_t t = 0; t < tokens; ++t) {
    key_begin[t] = slots;
    slots += c.visible[t] + 5;
  }
  std::vector<int64_t> physical(static_cast<size_t>(slots)), identity(static_cast<size_t>(slots));
  std::iota(physical.begin(), physical.end(), 0);
  std::shuffle(physical.begin(), physical.end(), rng);
  const int64_t vectors = c.distinct > 0 ? c.distinct : slots;
  const auto base = Normal(static_cast<size_t>(vectors * dim), rng);
  std::vector<uint8_t> key_host(static_cast<size_t>(slots * key_bytes));
  for (int64_t s = 0; s < slots; ++s) {
    identity[s] = c.distinct > 0 ? static_cast<int64_t>(rng() % static_cast<uint32_t>(c.distinct)) : s;
    QuantizeIndexerKey(base.data() + identity[s] * dim, dim, key_host.data() + physical[s] * key_bytes);
  }
  const auto q = Normal(static_cast<size_t>(tokens * heads * dim), rng);
  auto weights = Normal(static_cast<size_t>(tokens * heads), rng);
  const float weight_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dim * heads)));
  for (auto& w : weights) w *= weight_scale;

  auto device_keys = ToDevice(key_host);
  std::vector<const uint8_t*> pointers(static_cast<size_t>(slots));
  for (int64_t s = 0; s < slots; ++s) pointers[s] = device_keys.get() + physical[s] * key_bytes;
  auto device_pointers = ToDevice(pointers);
  auto device_key_begin = ToDevice(key_begin);
  auto device_visible = ToDevice(c.visible);
  auto device_q = ToDevice(q);
  auto device_weights = ToDevice(weights);
  auto device_selected = ToDevice(std::vector<int32_t>(static_cast<size_t>(tokens * c.topk), kUnwritten));
  cuda::IndexerArgs args;
  args.tokens = tokens;
  args.heads = heads;
  args.dim = dim;
  args.topk = c.topk;
  args.q = device_q.get();
  args.weights = device_weights.get();
  args.keys = device_pointers.get();
  args.key_begin = device_key_begin.get();
  args.visible = device_visible.get();
  args.max_visible = *std::max_element(c.visible.begin(), c.visible.end());
  args.selected = device_selected.get();
  auto workspace = Poisoned<uint8_t>(cuda::IndexerWorkspaceBytes(tokens, args.max_visible));
  TANDEM_ASSERT_OK(cuda::IndexerTopK(args, workspace.get(), workspace.size()));
  TANDEM_ASSERT_OK(Sync());
  const auto selected = ToHost(device_selected);

  std::vector<float> keys(static_cast<size_t>(slots * dim));
  for (int64_t s = 0; s < slots; ++s) DequantizeIndexerKey(key_host.data() + physical[s] * key_bytes, dim, keys.data() + s * dim);
  for (int64_t t = 0; t < tokens; ++t) {
    SCOPED_TRACE(::testing::Message() << "token " << t << " visible " << c.visible[t] << " topk " << c.topk);
    const int64_t n = c.visible[t];
    const std::vector<int32_t> gpu(selected.begin() + t * c.topk, selected.begin() + (t + 1) * c.topk);
    if (n <= c.topk) {  // attention.cc takes every entry, in order
      std::vector<int32_t> expected(static_cast<size_t>(c.topk), -1);
      std::iota(expected.begin(), expected.begin() + n, 0);
      EXPECT_EQ(gpu, expected);
      continue;
    }
    // attention.cc's index scores and TopK.
    std::vector<float> scores(static_cast<size_t>(n));
    float largest = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
      double s = 0.0;
      for (int64_t h = 0; h < heads; ++h) {
        const float* qh = q.data() + (t * heads + h) * dim;
        const float* kj = keys.data() + (key_begin[t] + j) * dim;
        double dot = 0.0;
        for (int64_t e = 0; e < dim; ++e) dot += static_cast<double>(qh[e]) * kj[e];
        s += static_cast<double>(weights[t * heads + h]) * std::max(dot, 0.0);
      }
      scores[j] = static_cast<float>(s);
      largest = std::max(largest, std::fabs(scores[j]));
    }
    std::vector<int64_t> order(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + c.topk, order.end(), [&](int64_t a, int64_t b) {
      return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
    });
    order.resize(static_cast<size_t>(c.topk));
    const std::vector<int64_t> token_identity(identity.begin() + key_begin[t], identity.begin() + key_begin[t] + n);
    // f32 sums of 64 x 128 products: ~1e-6 relative; 1e-5 of the largest score leaves a margin.
    EXPECT_TRUE(SameTopK(gpu, order, scores, token_identity, 1e-5 * largest));
  }
}

TEST_F(CudaTest, IndexerTopKFlash) {
  // Fewer, exactly, one more than, and several times topk.
  CheckIndexer(rng_, {"flash", 64, 512, {0, 100, 512, 513, 3000, 1500}});
}

TEST_F(CudaTest, IndexerTopKTiny) { CheckIndexer(rng_, {"tiny", 4, 16, {0, 5, 16, 17, 40, 333}}); }

// Copies of a few hundred keys: groups of equal scores straddle the k-th place.
TEST_F(CudaTest, IndexerTopKTies) {
  CheckIndexer(rng_, {"flash ties", 64, 512, {2000, 2600}, 300});
  CheckIndexer(rng_, {"tiny ties", 4, 16, {100, 257}, 6});
}

// ---- Sparse attention ----

enum class Compressed { kNone, kAll, kSelected };

struct AttentionCase {
  const char* name;
  int64_t heads;
  std::vector<int32_t> window;      // window candidates per token
  Compressed mode = Compressed::kNone;
  std::vector<int32_t> compressed;  // kAll: entries per token; kSelected: entries >= 0 in the token's row
  int64_t topk = 0;
  bool scatter_invalid = false;     // kSelected: -1 between the chosen entries, not only after them
  float q_scale = 1.0f;
  float sink_mean = 0.0f, sink_spread = 1.0f;
  bool split = false;       // pass the workspace SparseAttentionWorkspaceBytes asks for (poisoned)
  size_t pool_offset = 0;   // 1: every entry misaligned (the kernels' byte-wise fallback)
  KvFormat format = {};     // 448 + 64 runs on the tensor cores; any other the scalar kernel
  cuda::AttentionMath math = cuda::AttentionMath::kF32;  // kBf16: 64 heads a block when heads % 64 == 0
};

// Runs case c on fresh inputs drawn from rng and checks it against the reference; the output goes to *out
// when given (the same rng state gives the same inputs: two kernels can be compared on them).
void CheckAttention(std::mt19937& rng, const AttentionCase& c, std::vector<float>* out = nullptr,
                    std::string* kernel = nullptr) {
  SCOPED_TRACE(c.name);
  const KvFormat format = c.format;
  const int64_t tokens = static_cast<int64_t>(c.window.size()), heads = c.heads, dim = format.dim();
  const int64_t window_entries = 200, compressed_entries = 1000, row_entries = 700;
  // kv after kv_norm / the compressor's norm: ~N(0, 1) per dim.
  const auto window_cpu = QuantizeEntries(format, Normal(static_cast<size_t>(window_entries * dim), rng));
  const auto compressed_cpu = QuantizeEntries(format, Normal(static_cast<size_t>(compressed_entries * dim), rng));
  const auto window_values = DequantizeEntries(format, window_cpu);
  const auto compressed_values = DequantizeEntries(format, compressed_cpu);
  KvPool window_pool = KvPool::Create(format, window_entries, c.pool_offset);
  KvPool compressed_pool = KvPool::Create(format, compressed_entries, c.pool_offset);
  window_pool.Upload(window_cpu);
  compressed_pool.Upload(compressed_cpu);

  // Reference lists: window[window_begin[t] + i] and compressed[compressed_begin[t] + j] name random slots.
  std::vector<cuda::KvRef> window_refs, compressed_refs;
  std::vector<int64_t> window_slot, compressed_slot, window_begin, compressed_begin;
  std::vector<int32_t> selected;
  std::vector<std::vector<const float*>> candidates(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t) {
    window_begin.push_back(static_cast<int64_t>(window_refs.size()));
    for (int32_t i = 0; i < c.window[t]; ++i) {
      const int64_t slot = rng() % window_entries;
      window_refs.push_back(window_pool.Ref(slot));
      candidates[t].push_back(window_values.data() + slot * dim);
    }
    compressed_begin.push_back(static_cast<int64_t>(compressed_refs.size()));
    if (c.mode == Compressed::kNone) continue;
    const int64_t listed = c.mode == Compressed::kAll ? c.compressed[t] : row_entries;
    for (int64_t j = 0; j < listed; ++j) {
      const int64_t slot = rng() % compressed_entries;
      compressed_refs.push_back(compressed_pool.Ref(slot));
      compressed_slot.push_back(slot);
    }
    const int64_t first = compressed_begin[t];
    if (c.mode == Compressed::kAll) {
      for (int64_t j = 0; j < listed; ++j) candidates[t].push_back(compressed_values.data() + compressed_slot[first + j] * dim);
      continue;
    }
    // A row of topk: c.compressed[t] distinct indices into the token's list, -1 elsewhere.
    std::vector<int32_t> pick(static_cast<size_t>(row_entries));
    std::iota(pick.begin(), pick.end(), 0);
    std::shuffle(pick.begin(), pick.end(), rng);
    std::vector<int32_t> row(static_cast<size_t>(c.topk), -1);
    std::vector<int64_t> places(static_cast<size_t>(c.topk));
    std::iota(places.begin(), places.end(), 0);
    if (c.scatter_invalid) std::shuffle(places.begin(), places.end(), rng);
    places.resize(static_cast<size_t>(c.compressed[t]));
    std::sort(places.begin(), places.end());
    for (size_t n = 0; n < places.size(); ++n) row[places[n]] = pick[n];
    for (const int32_t j : row) {
      if (j >= 0) candidates[t].push_back(compressed_values.data() + compressed_slot[first + j] * dim);
    }
    selected.insert(selected.end(), row.begin(), row.end());
  }
  auto q = Normal(static_cast<size_t>(tokens * heads * dim), rng, c.q_scale);
  auto sink = Normal(static_cast<size_t>(heads), rng, c.sink_spread);
  for (auto& s : sink) s += c.sink_mean;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dim)));

  auto device_q = ToDevice(q);
  auto device_sink = ToDevice(sink);
  auto device_window = ToDevice(window_refs);
  auto device_window_begin = ToDevice(window_begin);
  auto device_window_count = ToDevice(c.window);
  auto device_compressed = ToDevice(compressed_refs);
  auto device_compressed_begin = ToDevice(compressed_begin);
  auto device_compressed_count = ToDevice(c.mode == Compressed::kAll ? c.compressed : std::vector<int32_t>(tokens, 0));
  auto device_selected = ToDevice(selected);
  auto device_o = Poisoned<float>(q.size());
  cuda::SparseAttentionArgs args;
  args.format = format;
  args.tokens = tokens;
  args.heads = heads;
  args.q = device_q.get();
  args.sink = device_sink.get();
  args.scale = scale;
  args.math = c.math;
  args.window = device_window.get();
  args.window_begin = device_window_begin.get();
  args.window_count = device_window_count.get();
  if (c.mode != Compressed::kNone) {
    args.compressed = device_compressed.get();
    args.compressed_begin = device_compressed_begin.get();
    args.compressed_count = c.mode == Compressed::kAll ? device_compressed_count.get() : nullptr;
    args.selected = c.mode == Compressed::kSelected ? device_selected.get() : nullptr;
    args.topk = c.topk;
  }
  args.o = device_o.get();
  cuda::DeviceArray<uint8_t> workspace;
  if (c.split) {
    const size_t bytes = cuda::SparseAttentionWorkspaceBytes(args);
    ASSERT_GT(bytes, 0u) << "a batch this small should split";
    workspace = Poisoned<uint8_t>(bytes);
    args.workspace = workspace.get();
    args.workspace_bytes = workspace.size();
  }
  if (kernel) *kernel = cuda::SparseAttentionKernelName(args);
  TANDEM_ASSERT_OK(cuda::SparseAttention(args));
  TANDEM_ASSERT_OK(Sync());
  const auto gpu = ToHost(device_o);
  if (out) *out = gpu;

  // attention.cc: f32 dots, double softmax with the sink in the denominator only. bf16 math rounds q to bf16
  // first (the reference takes the rounded q; what remains is the bf16 probabilities and the order of sums).
  const bool bf16 = c.math == cuda::AttentionMath::kBf16 && format.nope_dim == 448 && format.rope_dim == 64;
  if (bf16) {
    for (float& v : q) v = RoundBf16(v);
  }
  std::vector<float> cpu(q.size());
  // bf16 math: per element, what rounding every probability by up to 2^-8 can move it when the denominator
  // sums the rounded ones: sum_k w_k |v_kd| (the numerator) + |o_d| sum_k w_k (the denominator).
  std::vector<double> spread(q.size(), 0.0);
  for (int64_t t = 0; t < tokens; ++t) {
    const auto& cand = candidates[t];
    std::vector<float> scores(cand.size());
    for (int64_t h = 0; h < heads; ++h) {
      const float* qh = q.data() + (t * heads + h) * dim;
      float best = sink[h];
      for (size_t k = 0; k < cand.size(); ++k) {
        float dot = 0.0f;
        for (int64_t e = 0; e < dim; ++e) dot += qh[e] * cand[k][e];
        scores[k] = dot * scale;
        best = std::max(best, scores[k]);
      }
      const double sink_term = std::exp(static_cast<double>(sink[h]) - best);
      double den = sink_term;
      std::vector<double> acc(static_cast<size_t>(dim), 0.0), magnitude(static_cast<size_t>(dim), 0.0);
      for (size_t k = 0; k < cand.size(); ++k) {
        const double e = std::exp(static_cast<double>(scores[k]) - best);
        den += e;
        for (int64_t d = 0; d < dim; ++d) {
          acc[d] += e * cand[k][d];
          magnitude[d] += e * std::fabs(cand[k][d]);
        }
      }
      for (int64_t d = 0; d < dim; ++d) {
        cpu[(t * heads + h) * dim + d] = static_cast<float>(acc[d] / den);
        spread[(t * heads + h) * dim + d] = magnitude[d] / den + std::fabs(acc[d] / den) * (den - sink_term) / den;
      }
    }
    if (cand.empty()) {  // no candidates: exactly 0
      for (int64_t i = t * heads * dim; i < (t + 1) * heads * dim; ++i) {
        if (gpu[i] != 0.0f) {
          ADD_FAILURE() << "token " << t << " has no candidates but o[" << i << "] = " << gpu[i];
          break;
        }
      }
    }
  }
  if (bf16) {
    // Each probability rounded to bf16 (up to 2^-8 relative) before PV, and the denominator sums the rounded
    // ones: |o_d - ref_d| <= 2^-8 (sum_k w_k |v_kd| + |o_d| sum_k w_k) (+ f32 rounding; 25% margin for the f32
    // scores). A cancelling sum near 0 may use all of it, so no plain atol / rtol: the bound follows each
    // element's terms.
    int64_t outside = 0, first = -1;
    for (size_t i = 0; i < cpu.size(); ++i) {
      const double limit = 2e-5 + 2e-4 * std::fabs(cpu[i]) + 1.25 * std::ldexp(spread[i], -8);
      if (!(std::fabs(static_cast<double>(gpu[i]) - cpu[i]) <= limit)) {
        if (first < 0) first = static_cast<int64_t>(i);
        ++outside;
      }
    }
    EXPECT_EQ(outside, 0) << "first at " << first << ": gpu " << gpu[std::max<int64_t>(first, 0)] << ", reference "
                          << cpu[std::max<int64_t>(first, 0)] << ", bound from sum w|v| " << spread[std::max<int64_t>(first, 0)];
    EXPECT_LT(RelativeL2(gpu, cpu), 3e-3);
    return;
  }
  // f32 dots in another order and an f32 online softmax against double sums: ~1e-6 relative.
  EXPECT_TRUE(AllClose(gpu, cpu, 2e-5, 2e-4));
  EXPECT_LT(RelativeL2(gpu, cpu), 1e-5);
}

TEST_F(CudaTest, SparseAttentionWindowOnly) {
  // A ratio-0 layer: 1 .. 128 window tokens, and a token with none (output 0).
  CheckAttention(rng_, {"flash window", 64, {1, 37, 128, 128, 0, 64}});
  // 20 heads: a second, partial group of heads.
  CheckAttention(rng_, {"20 heads", 20, {128, 7, 33}});
}

TEST_F(CudaTest, SparseAttentionWindowAndAllCompressed) {
  // A C128 layer: every compressed entry so far; token 3 has no candidates at all.
  CheckAttention(rng_, {"flash C128", 64, {128, 20, 128, 0, 128}, Compressed::kAll, {0, 5, 300, 0, 33}});
}

TEST_F(CudaTest, SparseAttentionWindowAndSelected) {
  // A C4 layer: full rows, short rows (-1 after), rows of -1 only; token 3 has no candidates.
  CheckAttention(rng_, {"flash C4", 64, {128, 128, 50, 0, 128}, Compressed::kSelected, {512, 100, 511, 0, 0}, 512});
  CheckAttention(rng_, {"flash C4 scattered", 64, {128, 3}, Compressed::kSelected, {300, 17}, 512, true});
  CheckAttention(rng_, {"tiny C4", 4, {1, 16, 128}, Compressed::kSelected, {16, 3, 0}, 16, true});
}

// Sinks large against the scores take most of the mass (and peaky q makes the online rescaling work).
TEST_F(CudaTest, SparseAttentionSink) {
  CheckAttention(rng_, {"heavy sink", 64, {128, 3, 60}, Compressed::kAll, {64, 0, 200}, 0, false, 3.0f, 4.0f, 3.0f});
  CheckAttention(rng_, {"negligible sink", 64, {128, 40}, Compressed::kAll, {64, 1}, 0, false, 1.0f, -30.0f, 1.0f});
}

// Split-KV: a decode token's 640 candidates over many blocks, merged with the sink once; tokens with
// fewer candidates than splits (empty splits), none at all, a partial head group, a heavy sink.
TEST_F(CudaTest, SparseAttentionSplit) {
  AttentionCase flash = {"split flash C4", 64, {128}, Compressed::kSelected, {512}, 512};
  flash.split = true;
  CheckAttention(rng_, flash);
  AttentionCase few = {"split few candidates", 64, {3, 0, 1}};
  few.split = true;
  CheckAttention(rng_, few);
  AttentionCase mixed = {"split C128", 64, {128, 0, 7, 128}, Compressed::kAll, {900, 0, 1, 33}};
  mixed.split = true;
  CheckAttention(rng_, mixed);
  AttentionCase partial = {"split 20 heads", 20, {128, 7, 33}, Compressed::kSelected, {16, 3, 0}, 16, true};
  partial.split = true;
  CheckAttention(rng_, partial);
  AttentionCase sink = {"split heavy sink", 64, {128, 3}, Compressed::kAll, {64, 0}, 0, false, 3.0f, 4.0f, 3.0f};
  sink.split = true;
  CheckAttention(rng_, sink);
}

// A 384 + 128 entry (the scalar kernel, which serves every format but the DSV4 one), unsplit and split.
TEST_F(CudaTest, SparseAttentionOtherFormat) {
  AttentionCase unsplit = {"384 + 128", 64, {128, 5, 0}, Compressed::kSelected, {512, 30, 0}, 512, true};
  unsplit.format = KvFormat{384, 128};
  CheckAttention(rng_, unsplit);
  AttentionCase split = unsplit;
  split.name = "384 + 128 split";
  split.split = true;
  CheckAttention(rng_, split);
}

// Entries at odd addresses (no 8-byte loads or copies), split and unsplit.
TEST_F(CudaTest, SparseAttentionMisaligned) {
  AttentionCase unsplit = {"misaligned", 64, {128, 40}, Compressed::kSelected, {512, 9}, 512, true};
  unsplit.pool_offset = 1;
  CheckAttention(rng_, unsplit);
  AttentionCase split = unsplit;
  split.name = "misaligned split";
  split.split = true;
  CheckAttention(rng_, split);
}

// bf16 math (AttentionMath::kBf16), every case on the 64-head kernels (forced on at any token count): the
// warpgroup-MMA one (Hopper; the mma.sync one past its shared memory, at topk 4096) and the mma.sync one, and on
// the 16-head kernel's bf16 form (forced): 64 and 128 heads (one and two groups; 20 and 4 heads always take the
// 16-head kernel), window-only, all compressed, selected rows with -1 between, splits (empty ones too), a heavy
// sink, topk 4096 and misaligned entries. q comes in unrounded: the kernel rounds it.
class WideAttention {
 public:
  explicit WideAttention(int64_t min_tokens, bool wgmma = true) {
    cuda::SetWideAttentionMinTokens(min_tokens);
    cuda::SetWgmmaAttention(wgmma);
  }
  ~WideAttention() {
    cuda::SetWideAttentionMinTokens(saved_);
    cuda::SetWgmmaAttention(saved_wgmma_);
  }

 private:
  int64_t saved_ = cuda::WideAttentionMinTokens();
  bool saved_wgmma_ = cuda::WgmmaAttention();
};

TEST_F(CudaTest, SparseAttentionBf16Math) {
  // Each case on the same inputs through the three kernels: each against the reference (its per-element
  // bound), and unsplit the two mma.sync ones against each other. Those two have the same score bits and bf16
  // probabilities (the same k-order, partial sums and tiles); only PV's accumulation differs (in place vs a
  // fresh tile accumulator; the tensor cores may truncate each add): ~1e-6 relative. The warpgroup kernel sums
  // each score in its own order over all 512 dims, so a few probabilities round to the other bf16 neighbour:
  // it is held to the reference's bound and, against the mma.sync kernel, to a relative L2 of 2e-3.
  // (Split, the kernels plan different splits, whose running maxima round other probabilities.)
  const bool hopper = DeviceIsSm90();
  const auto check = [&](AttentionCase c, bool split = false) {
    c.math = cuda::AttentionMath::kBf16;
    c.split = split;
    std::vector<float> wgmma_out, wide_out, narrow_out;
    std::string wgmma_kernel, wide_kernel, narrow_kernel;
    std::mt19937 wide_inputs = rng_, narrow_inputs = rng_;
    {
      SCOPED_TRACE("64-head warpgroup kernel");
      WideAttention wgmma(0, true);
      CheckAttention(rng_, c, &wgmma_out, &wgmma_kernel);
    }
    {
      SCOPED_TRACE("64-head mma.sync kernel");
      WideAttention wide(0, false);
      CheckAttention(wide_inputs, c, &wide_out, &wide_kernel);
    }
    {
      SCOPED_TRACE("16-head kernel");
      WideAttention narrow(std::numeric_limits<int64_t>::max());
      CheckAttention(narrow_inputs, c, &narrow_out, &narrow_kernel);
    }
    SCOPED_TRACE(c.name);
    // The warpgroup kernel serves 64-head groups on Hopper up to its shared-memory ceiling.
    if (hopper && c.heads % 64 == 0 && c.topk <= 512) {
      EXPECT_NE(wgmma_kernel.find("Wgmma"), std::string::npos) << wgmma_kernel;
    }
    if (c.heads % 64 == 0) {
      EXPECT_NE(wide_kernel.find("Wide"), std::string::npos) << wide_kernel;
    }
    EXPECT_NE(narrow_kernel.find("Mma"), std::string::npos) << narrow_kernel;
    if (split) return;
    ASSERT_EQ(wide_out.size(), narrow_out.size());
    EXPECT_TRUE(AllClose(wide_out, narrow_out, 1e-5, 1e-4)) << "64-head vs 16-head kernel";
    EXPECT_LT(RelativeL2(wide_out, narrow_out), 2e-5) << "64-head vs 16-head kernel";
    ASSERT_EQ(wgmma_out.size(), wide_out.size());
    EXPECT_LT(RelativeL2(wgmma_out, wide_out), 2e-3) << "warpgroup vs mma.sync 64-head kernel";
  };
  check({"bf16 flash window", 64, {1, 37, 128, 128, 0, 64}});
  check({"bf16 flash C4", 64, {128, 128, 50, 0, 128}, Compressed::kSelected, {512, 100, 511, 0, 0}, 512});
  check({"bf16 flash C4 scattered", 64, {128, 3}, Compressed::kSelected, {300, 17}, 512, true});
  check({"bf16 flash C128", 64, {128, 20, 128, 0, 128}, Compressed::kAll, {0, 5, 300, 0, 33}});
  check({"bf16 split flash C4", 64, {128}, Compressed::kSelected, {512}, 512}, true);
  check({"bf16 split few candidates", 64, {3, 0, 1}}, true);
  check({"bf16 split C128", 64, {128, 0, 7, 128}, Compressed::kAll, {900, 0, 1, 33}}, true);
  // A token long enough that every split block walks several tiles (a split's second tile rescales from its
  // (-inf, 0) start; the ring's second stage in split mode).
  check({"bf16 split long", 64, {128}, Compressed::kAll, {4000}}, true);
  check({"bf16 128 heads", 128, {128, 9}, Compressed::kSelected, {512, 40}, 512, true});
  check({"bf16 128 heads split", 128, {128, 9}, Compressed::kSelected, {512, 40}, 512, true}, true);
  check({"bf16 20 heads", 20, {128, 7, 33}, Compressed::kSelected, {16, 3, 0}, 16, true});
  check({"bf16 20 heads split", 20, {128, 7, 33}, Compressed::kSelected, {16, 3, 0}, 16, true}, true);
  check({"bf16 tiny C4", 4, {1, 16, 128}, Compressed::kSelected, {16, 3, 0}, 16, true});
  check({"bf16 heavy sink", 64, {128, 3, 60}, Compressed::kAll, {64, 0, 200}, 0, false, 3.0f, 4.0f, 3.0f});
  check({"bf16 heavy sink split", 64, {128, 3}, Compressed::kAll, {64, 0}, 0, false, 3.0f, 4.0f, 3.0f}, true);
  // The largest selection a block compacts into shared memory (the 64-head kernel's shared-memory ceiling).
  check({"bf16 topk 4096", 64, {128, 2}, Compressed::kSelected, {700, 5}, 4096, true});
  AttentionCase misaligned = {"bf16 misaligned", 64, {128, 40}, Compressed::kSelected, {512, 9}, 512, true};
  misaligned.pool_offset = 1;
  check(misaligned);
  misaligned.name = "bf16 misaligned split";
  check(misaligned, true);
}

// A NaN in the cache (the quantizer writes the code 0x7f for a NaN value) reaches every output of the token
// that attends it, on every kernel and both maths, as on the CPU; the other token stays finite. The warpgroup
// kernel's bit-move dequantization alone would read the code as +-480. The outputs start at 0, not the NaN
// poison, so a kernel that skipped the token fails too.
TEST_F(CudaTest, SparseAttentionPropagatesANaNEntry) {
  const KvFormat format{448, 64};
  const int64_t heads = 64, dim = format.dim(), entries = 128, tokens = 2;
  auto host = QuantizeEntries(format, Normal(static_cast<size_t>(entries * dim), rng_));
  host[static_cast<size_t>(5 * format.entry_bytes() + 10)] = 0x7f;  // a code of entry 5, seen by token 0 only
  KvPool pool = KvPool::Create(format, entries);
  pool.Upload(host);
  std::vector<cuda::KvRef> refs;
  for (int64_t i = 0; i < entries; ++i) refs.push_back(pool.Ref(i));
  const std::vector<int64_t> begin = {0, entries / 2};
  const std::vector<int32_t> count = {static_cast<int32_t>(entries / 2), static_cast<int32_t>(entries / 2)};
  auto device_refs = ToDevice(refs);
  auto device_begin = ToDevice(begin);
  auto device_count = ToDevice(count);
  auto device_q = ToDevice(Normal(static_cast<size_t>(tokens * heads * dim), rng_));
  auto device_sink = ToDevice(Normal(static_cast<size_t>(heads), rng_));
  struct Variant {
    const char* name;
    cuda::AttentionMath math;
    int64_t min_tokens;
    bool wgmma;
  };
  const int64_t never = std::numeric_limits<int64_t>::max();
  for (const Variant& v : {Variant{"f32", cuda::AttentionMath::kF32, never, true},
                           Variant{"bf16 16-head", cuda::AttentionMath::kBf16, never, true},
                           Variant{"bf16 64-head mma.sync", cuda::AttentionMath::kBf16, 0, false},
                           Variant{"bf16 64-head warpgroup", cuda::AttentionMath::kBf16, 0, true}}) {
    SCOPED_TRACE(v.name);
    WideAttention kernel(v.min_tokens, v.wgmma);
    auto device_o = ToDevice(std::vector<float>(static_cast<size_t>(tokens * heads * dim), 0.0f));
    cuda::SparseAttentionArgs args;
    args.format = format;
    args.tokens = tokens;
    args.heads = heads;
    args.q = device_q.get();
    args.sink = device_sink.get();
    args.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dim)));
    args.math = v.math;
    args.window = device_refs.get();
    args.window_begin = device_begin.get();
    args.window_count = device_count.get();
    args.o = device_o.get();
    TANDEM_ASSERT_OK(cuda::SparseAttention(args));
    TANDEM_ASSERT_OK(Sync());
    const auto out = ToHost(device_o);
    int64_t finite_in_token0 = 0, nonfinite_in_token1 = 0;
    for (int64_t i = 0; i < heads * dim; ++i) {
      finite_in_token0 += std::isfinite(out[static_cast<size_t>(i)]) ? 1 : 0;
      nonfinite_in_token1 += std::isfinite(out[static_cast<size_t>(heads * dim + i)]) ? 0 : 1;
    }
    EXPECT_EQ(finite_in_token0, 0) << "token 0 attends the NaN entry";
    EXPECT_EQ(nonfinite_in_token1, 0) << "token 1 does not";
  }
}

}  // namespace
}  // namespace tandem::kernels
