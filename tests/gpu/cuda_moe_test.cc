// MoE and output-head kernels on the GPU against the CPU forward's rules: routing and grouping exactly as
// model::internal::Moe, the grouped expert GEMMs against kernels::QuantizedLinear (MXFP4 and block FP8),
// SwiGLU and the combine as moe.cc writes them, hc_head against model::internal::HcHead, argmax, the
// sampler's logit edits and its sampling rule (engine::RequestSampler, re-stated below: common/engine is not
// in this build).
// Fresh inputs every run.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string_view>
#include <vector>

#include "common/core/dtype.h"
#include "common/kernels/cuda/cuda_moe.h"
#include "common/kernels/kernels.h"
#include "common/model/layers.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/unit/engine/row_draw_reference.h"

namespace tandem::kernels {
namespace {

using testing::AllClose;
using testing::CudaTest;
using testing::Normal;
using testing::Poisoned;
using testing::Sync;
using testing::ToDevice;
using testing::ToHost;

struct MoeShape {
  const char* name;
  int64_t hidden, experts, k, intermediate;
};
// The tiny preset (dsv4-model.md §6.1) and DeepSeek-V4-Flash.
constexpr MoeShape kTiny{"tiny", 256, 8, 2, 128};
constexpr MoeShape kFlash{"flash", 4096, 256, 6, 2048};

double SqrtSoftplus(double v) { return std::sqrt(v > 20.0 ? v : std::log1p(std::exp(v))); }

// moe.cc's routing for one token.
void CpuRoute(const float* logits, int64_t E, int64_t k, const float* bias, const int32_t* hash_row, double scaling,
              int32_t* chosen, float* weights) {
  std::vector<double> score(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) score[e] = SqrtSoftplus(logits[e]);
  if (hash_row) {
    for (int64_t i = 0; i < k; ++i) chosen[i] = hash_row[i];
  } else {
    std::vector<int64_t> order(static_cast<size_t>(E));
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
      const double sa = score[a] + bias[a], sb = score[b] + bias[b];
      return sa > sb || (sa == sb && a < b);
    });
    for (int64_t i = 0; i < k; ++i) chosen[i] = static_cast<int32_t>(order[i]);
  }
  double sum = 0.0;
  for (int64_t i = 0; i < k; ++i) sum += score[chosen[i]];
  for (int64_t i = 0; i < k; ++i) weights[i] = static_cast<float>(score[chosen[i]] / sum * scaling);
}

void ExpectRouteMatches(const MoeShape& shape, int64_t tokens, bool hash, std::mt19937& rng) {
  SCOPED_TRACE(::testing::Message() << shape.name << (hash ? " hash" : " learned gate") << " tokens " << tokens);
  const int64_t E = shape.experts, k = shape.k, vocab = 1000;
  auto logits = Normal(static_cast<size_t>(tokens * E), rng, 2.0f);
  auto bias = Normal(static_cast<size_t>(E), rng, 0.3f);
  // Ties: a few experts share the score and bias of another, so the order falls to the expert id.
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t e = 1; e < E; e += 3) logits[t * E + e] = logits[t * E + e - 1];
  }
  for (int64_t e = 1; e < E; e += 3) bias[e] = bias[e - 1];
  std::vector<int32_t> tid2eid(static_cast<size_t>(vocab * k)), token_ids(static_cast<size_t>(tokens));
  for (int64_t v = 0; v < vocab; ++v) {
    std::vector<int32_t> ids(static_cast<size_t>(E));
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    std::copy_n(ids.begin(), k, tid2eid.begin() + v * k);
  }
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(vocab - 1));
  for (auto& t : token_ids) t = token(rng);
  const double scaling = 1.5;
  std::vector<int32_t> chosen(static_cast<size_t>(tokens * k));
  std::vector<float> weights(chosen.size());
  for (int64_t t = 0; t < tokens; ++t) {
    CpuRoute(logits.data() + t * E, E, k, bias.data(), hash ? tid2eid.data() + token_ids[t] * k : nullptr, scaling,
             chosen.data() + t * k, weights.data() + t * k);
  }
  auto dlogits = ToDevice(logits);
  auto dbias = ToDevice(bias);
  auto dtid2eid = ToDevice(tid2eid);
  auto dtokens = ToDevice(token_ids);
  auto dchosen = Poisoned<int32_t>(chosen.size());
  auto dweights = Poisoned<float>(weights.size());
  cuda::MoeRouteArgs args;
  args.tokens = tokens;
  args.experts = E;
  args.k = k;
  args.logits = dlogits.get();
  args.bias = hash ? nullptr : dbias.get();
  args.tid2eid = hash ? dtid2eid.get() : nullptr;
  args.token_ids = dtokens.get();
  args.routed_scaling = static_cast<float>(scaling);
  args.chosen = dchosen.get();
  args.weights = dweights.get();
  TANDEM_ASSERT_OK(cuda::MoeRoute(args));
  TANDEM_ASSERT_OK(Sync());
  const auto got = ToHost(dchosen);
  int64_t bad = 0;
  for (size_t i = 0; i < chosen.size(); ++i) {
    if (got[i] != chosen[i] && bad++ < 5) {
      ADD_FAILURE() << "token " << i / k << " slot " << i % k << ": gpu expert " << got[i] << " cpu " << chosen[i];
    }
  }
  EXPECT_EQ(bad, 0);
  // Double scores on both sides: only the last f32 rounding can differ.
  EXPECT_TRUE(AllClose(ToHost(dweights), weights, 1e-7, 1e-6)) << "weights";
}

TEST_F(CudaTest, MoeRouteMatchesCpu) {
  for (const MoeShape& shape : {kTiny, kFlash}) {
    for (const int64_t tokens : {int64_t{1}, int64_t{64}, int64_t{517}}) {
      ExpectRouteMatches(shape, tokens, false, rng_);
      ExpectRouteMatches(shape, tokens, true, rng_);
    }
  }
}

// The CPU's grouping: pairs in order, appended to their expert.
struct Grouping {
  std::vector<int64_t> offsets;
  std::vector<int32_t> rows, position;
};
Grouping CpuGroup(const std::vector<int32_t>& chosen, int64_t k, int64_t E) {
  Grouping g;
  g.offsets.assign(static_cast<size_t>(E + 1), 0);
  for (int32_t e : chosen) ++g.offsets[e + 1];
  for (int64_t e = 0; e < E; ++e) g.offsets[e + 1] += g.offsets[e];
  std::vector<int64_t> next(g.offsets.begin(), g.offsets.end() - 1);
  g.rows.resize(chosen.size());
  g.position.resize(chosen.size());
  for (size_t p = 0; p < chosen.size(); ++p) {
    const int64_t pos = next[chosen[p]]++;
    g.rows[pos] = static_cast<int32_t>(static_cast<int64_t>(p) / k);
    g.position[p] = static_cast<int32_t>(pos);
  }
  return g;
}

// Distinct experts per token, drawn with a skew so that some experts get many rows and some none.
std::vector<int32_t> RandomChoice(int64_t tokens, int64_t k, int64_t E, std::mt19937& rng) {
  std::vector<int32_t> chosen(static_cast<size_t>(tokens * k));
  std::vector<double> popularity(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) popularity[e] = std::pow(0.97, static_cast<double>(e));
  std::discrete_distribution<int32_t> expert(popularity.begin(), popularity.end());
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t i = 0; i < k; ++i) {
      int32_t e;
      do e = expert(rng);
      while (std::find(chosen.begin() + t * k, chosen.begin() + t * k + i, e) != chosen.begin() + t * k + i);
      chosen[t * k + i] = e;
    }
  }
  return chosen;
}

TEST_F(CudaTest, MoeGroupIsStableAndConsistent) {
  for (const MoeShape& shape : {kTiny, kFlash}) {
    // 1 and 64: decode; 3001: several 512-pair units per block and a partial one.
    for (const int64_t tokens : {int64_t{1}, int64_t{64}, int64_t{3001}}) {
      SCOPED_TRACE(::testing::Message() << shape.name << " tokens " << tokens);
      const int64_t k = shape.k, E = shape.experts;
      const auto chosen = RandomChoice(tokens, k, E, rng_);
      const Grouping cpu = CpuGroup(chosen, k, E);
      auto dchosen = ToDevice(chosen);
      auto doffsets = Poisoned<int64_t>(static_cast<size_t>(E + 1));
      auto drows = Poisoned<int32_t>(chosen.size());
      auto dposition = Poisoned<int32_t>(chosen.size());
      const size_t bytes = cuda::MoeGroupWorkspaceBytes(tokens, k, E);
      auto workspace = Poisoned<uint8_t>(bytes);
      TANDEM_ASSERT_OK(cuda::MoeGroup(dchosen.get(), tokens, k, E, doffsets.get(), drows.get(), dposition.get(),
                                      workspace.get(), bytes));
      TANDEM_ASSERT_OK(Sync());
      EXPECT_EQ(ToHost(doffsets), cpu.offsets);
      EXPECT_EQ(ToHost(drows), cpu.rows);
      EXPECT_EQ(ToHost(dposition), cpu.position);
    }
  }
}

// Random checkpoint-format experts: MXFP4 codes with scales 2^-8 .. 2^2 (or the ue8m0 range given), or finite
// e4m3 codes with block scales 2^-10 .. 2^2 (values up to ~6 and ~1800: the subnormal codes and the exponent
// range all occur).
struct Expert {
  std::vector<uint8_t> codes, scales;
};
struct ScaleRange {
  int lo = 119, hi = 129;
};
Expert RandomExpert(QuantizedWeight::Format format, int64_t out, int64_t in, std::mt19937& rng,
                    ScaleRange mxfp4_scales = {}) {
  std::uniform_int_distribution<int> byte(0, 255);
  Expert e;
  if (format == QuantizedWeight::Format::kMxfp4) {
    std::uniform_int_distribution<int> scale(mxfp4_scales.lo, mxfp4_scales.hi);
    e.codes.resize(static_cast<size_t>(out * in / 2));
    e.scales.resize(static_cast<size_t>(out * in / 32));
    for (auto& c : e.codes) c = static_cast<uint8_t>(byte(rng));
    for (auto& s : e.scales) s = static_cast<uint8_t>(scale(rng));
  } else {
    std::uniform_int_distribution<int> scale(117, 129);
    e.codes.resize(static_cast<size_t>(out * in));
    e.scales.resize(static_cast<size_t>(((out + 127) / 128) * ((in + 127) / 128)));
    for (auto& c : e.codes) {
      do c = static_cast<uint8_t>(byte(rng));
      while ((c & 0x7f) == 0x7f);
    }
    for (auto& s : e.scales) s = static_cast<uint8_t>(scale(rng));
  }
  return e;
}

// Experts on the device as one GroupedWeights (the arrays live as long as this).
struct DeviceExperts {
  std::vector<cuda::DeviceArray<uint8_t>> storage;
  cuda::DeviceArray<const uint8_t*> codes, scales;
  cuda::GroupedWeights weights;
};
DeviceExperts UploadExperts(QuantizedWeight::Format format, const std::vector<Expert>& experts, int64_t out,
                            int64_t in) {
  DeviceExperts d;
  std::vector<const uint8_t*> code_ptrs, scale_ptrs;
  for (const Expert& ex : experts) {
    d.storage.push_back(ToDevice(ex.codes));
    code_ptrs.push_back(d.storage.back().get());
    d.storage.push_back(ToDevice(ex.scales));
    scale_ptrs.push_back(d.storage.back().get());
  }
  d.codes = ToDevice(code_ptrs);
  d.scales = ToDevice(scale_ptrs);
  d.weights.format = format;
  d.weights.codes = d.codes.get();
  d.weights.scales = d.scales.get();
  d.weights.experts = static_cast<int64_t>(experts.size());
  d.weights.out = out;
  d.weights.in = in;
  return d;
}

void ExpectGroupedLinearMatches(QuantizedWeight::Format format, int64_t out, int64_t in,
                                const std::vector<int64_t>& counts, bool gather, int64_t max_rows_bound,
                                std::mt19937& rng, ScaleRange mxfp4_scales = {}) {
  const bool fp4 = format == QuantizedWeight::Format::kMxfp4;
  SCOPED_TRACE(::testing::Message() << (fp4 ? "MXFP4" : "FP8") << " out " << out << " in " << in
                                    << (gather ? " gathered" : " contiguous") << " bound " << max_rows_bound
                                    << " scales " << mxfp4_scales.lo << ".." << mxfp4_scales.hi);
  const int64_t E = static_cast<int64_t>(counts.size());
  std::vector<int64_t> offsets(static_cast<size_t>(E + 1), 0);
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + counts[e];
  const int64_t rows = offsets[E];
  const int64_t x_rows = gather ? 37 : rows;
  const auto x = Normal(static_cast<size_t>(std::max<int64_t>(1, x_rows) * in), rng);
  std::vector<int32_t> gather_rows(static_cast<size_t>(std::max<int64_t>(1, rows)));
  std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(x_rows - 1));
  for (auto& g : gather_rows) g = gather ? pick(rng) : 0;
  std::vector<Expert> experts;
  for (int64_t e = 0; e < E; ++e) experts.push_back(RandomExpert(format, out, in, rng, mxfp4_scales));

  // CPU: per expert, gather its rows and run kernels::QuantizedLinear.
  std::vector<float> cpu(static_cast<size_t>(rows * out)), magnitude(cpu.size());
  std::vector<float> dense(static_cast<size_t>(out * in));
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = counts[e];
    if (n == 0) continue;
    const QuantizedWeight view{format, experts[e].codes.data(), experts[e].scales.data(), out, in};
    std::vector<float> xe(static_cast<size_t>(n * in));
    for (int64_t r = 0; r < n; ++r) {
      const int64_t src = gather ? gather_rows[offsets[e] + r] : offsets[e] + r;
      std::copy_n(x.data() + src * in, in, xe.data() + r * in);
    }
    QuantizedLinear(xe.data(), n, view, cpu.data() + offsets[e] * out);
    DequantizeRows(view, 0, out, dense.data());
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t o = 0; o < out; ++o) {
        double m = 0.0;
        for (int64_t i = 0; i < in; ++i) m += std::fabs(static_cast<double>(xe[r * in + i]) * dense[o * in + i]);
        magnitude[(offsets[e] + r) * out + o] = static_cast<float>(m);
      }
    }
  }

  const DeviceExperts device = UploadExperts(format, experts, out, in);
  const cuda::GroupedWeights& w = device.weights;
  auto dx = ToDevice(x);
  auto dgather = ToDevice(gather_rows);
  auto doffsets = ToDevice(offsets);
  auto dy = Poisoned<float>(static_cast<size_t>(rows * out));
  TANDEM_ASSERT_OK(cuda::GroupedQuantizedLinear(w, dx.get(), gather ? dgather.get() : nullptr, doffsets.get(),
                                                max_rows_bound, dy.get()));
  TANDEM_ASSERT_OK(Sync());
  const auto gpu = ToHost(dy);
  // f32 sums in another order than OpenBLAS: within 1e-5 of the sum of |terms| (an indexing bug is ~1e-2).
  int64_t bad = 0;
  for (size_t i = 0; i < gpu.size(); ++i) {
    if (!(std::fabs(gpu[i] - cpu[i]) <= 1e-5 * magnitude[i] + 1e-30)) {
      const int64_t row = static_cast<int64_t>(i) / out;
      const int64_t e = std::upper_bound(offsets.begin(), offsets.end(), row) - offsets.begin() - 1;
      if (bad++ < 5) {
        ADD_FAILURE() << "y[" << row << "][" << static_cast<int64_t>(i) % out << "] (expert " << e << " with "
                      << counts[e] << " rows): gpu " << gpu[i] << " cpu " << cpu[i] << " |terms| " << magnitude[i];
      }
    }
  }
  EXPECT_EQ(bad, 0);
}

// Restores the process-wide switch whatever the test does.
struct TensorCores {
  explicit TensorCores(bool on) { cuda::SetGroupedLinearTensorCores(on); }
  ~TensorCores() { cuda::SetGroupedLinearTensorCores(true); }
};

TEST_F(CudaTest, GroupedQuantizedLinearMatchesCpu) {
  // Experts with 0 rows, 1 to 8 (MXFP4: the tensor-core unit, 4 or 8 rows staged), 9 to 32 (the GEMV path:
  // groups of 4, the last one partial), 33 and more (the tiled path: 70 two row tiles, 150 three). With the
  // tensor cores off, the GEMV takes the small experts too.
  const std::vector<int64_t> counts = {0, 1, 3, 0, 2, 4, 5, 70, 1, 150, 8, 13, 32, 33, 6};
  for (const bool tensor_cores : {true, false}) {
    SCOPED_TRACE(tensor_cores ? "tensor cores on" : "tensor cores off");
    const TensorCores scope(tensor_cores);
    for (const auto format : {QuantizedWeight::Format::kMxfp4, QuantizedWeight::Format::kFp8Block}) {
      // Tiny w1/w3 and w2, a shape with partial output tiles and K chunks, and the flash expert w1.
      ExpectGroupedLinearMatches(format, kTiny.intermediate, kTiny.hidden, counts, true, 150, rng_);
      ExpectGroupedLinearMatches(format, kTiny.hidden, kTiny.intermediate, counts, false, 150, rng_);
      ExpectGroupedLinearMatches(format, 100, 192, counts, true, 150, rng_);
      // A bound below the real maximum costs parallelism only.
      ExpectGroupedLinearMatches(format, 100, 192, counts, false, 1, rng_);
      // The flash w1 (7 rows: x staged in two K phases).
      ExpectGroupedLinearMatches(format, kFlash.intermediate, kFlash.hidden, {1, 0, 2, 9, 4, 1, 7}, true, 64, rng_);
      // K an odd number of 128s (the tensor-core unit's steps are 256: a last step with a slice past in), in one
      // phase and as the short last of two (4 rows staged) or three (8 rows) phases.
      ExpectGroupedLinearMatches(format, 100, 384, counts, true, 150, rng_);
      ExpectGroupedLinearMatches(format, 72, 4224, {7, 0, 3, 8}, false, 64, rng_);
    }
    // Flash w2 at decode (one to three rows per expert, and six: two phases); every expert within the tensor
    // cores' 8 rows (the f32 launch finds no units); a bound below 24 (one token: the f32 GEMV).
    ExpectGroupedLinearMatches(QuantizedWeight::Format::kMxfp4, kFlash.hidden, kFlash.intermediate, {1, 1, 3, 6}, false,
                               64, rng_);
    ExpectGroupedLinearMatches(QuantizedWeight::Format::kMxfp4, kFlash.hidden, kFlash.intermediate, {2, 0, 8}, false, 24,
                               rng_);
    ExpectGroupedLinearMatches(QuantizedWeight::Format::kMxfp4, kFlash.hidden, kFlash.intermediate, {1, 2, 1}, false, 6,
                               rng_);
    // More units than blocks (40 experts x 16 units of the flash w1 over ~264 blocks): a block runs several
    // units in a row, of one expert or across two, keeping x staged across one expert's units (up to 4 rows:
    // one K phase) or restaging it for each (5 to 8 rows: two phases).
    std::vector<int64_t> many(40);
    for (size_t e = 0; e < many.size(); ++e) many[e] = std::vector<int64_t>{1, 2, 4, 3, 1, 6, 2, 8}[e % 8];
    ExpectGroupedLinearMatches(QuantizedWeight::Format::kMxfp4, kFlash.intermediate, kFlash.hidden, many, true, 64, rng_);
    // The tensor-core unit scales by one multiply while every scale of a warp's step (128 of them) is at most
    // 2^1 and by two otherwise, so the default range 2^-8 .. 2^2 takes the two-multiply steps nearly always.
    // One multiply everywhere: scales 2^-7 .. 2^1 (every group's share of a sum is checked) and 2^-127 .. 2^1
    // (the smallest groups run, e.g. the 2^-127 factor, but their terms fall under the tolerance of the row's
    // sum); two everywhere: 2^2 .. 2^5.
    ExpectGroupedLinearMatches(QuantizedWeight::Format::kMxfp4, kFlash.hidden, kFlash.intermediate, {1, 4, 0, 7}, false,
                               64, rng_, {0, 128});
    ExpectGroupedLinearMatches(QuantizedWeight::Format::kMxfp4, kFlash.intermediate, kFlash.hidden, {2, 8}, true, 64,
                               rng_, {120, 128});
    ExpectGroupedLinearMatches(QuantizedWeight::Format::kMxfp4, kFlash.intermediate, kFlash.hidden, {3, 1}, false, 64,
                               rng_, {129, 132});
  }
}

// A scale byte of 255 is NaN (Ue8m0ToFloat): the outputs of that weight row are NaN in every row of that expert,
// and only those, on every path (the tensor-core unit takes its two-multiply steps there).
void ExpectNanScaleStaysInItsRow(int64_t out, int64_t in, int64_t bad_row, int64_t bad_group, std::mt19937& rng) {
  const std::vector<int64_t> counts = {2, 5, 1};
  const int64_t bad_expert = 1;
  std::vector<int64_t> offsets = {0};
  for (const int64_t c : counts) offsets.push_back(offsets.back() + c);
  const int64_t rows = offsets.back();
  const auto x = Normal(static_cast<size_t>(rows * in), rng);
  std::vector<Expert> experts;
  for (size_t e = 0; e < counts.size(); ++e) {
    experts.push_back(RandomExpert(QuantizedWeight::Format::kMxfp4, out, in, rng, {120, 128}));
    if (static_cast<int64_t>(e) == bad_expert) {
      experts.back().scales[static_cast<size_t>(bad_row * (in / 32) + bad_group)] = 255;
    }
  }
  const DeviceExperts device = UploadExperts(QuantizedWeight::Format::kMxfp4, experts, out, in);
  const cuda::GroupedWeights& w = device.weights;
  auto dx = ToDevice(x);
  auto doffsets = ToDevice(offsets);
  for (const bool tensor_cores : {true, false}) {
    SCOPED_TRACE(tensor_cores ? "tensor cores on" : "tensor cores off");
    const TensorCores scope(tensor_cores);
    auto dy = Poisoned<float>(static_cast<size_t>(rows * out));
    TANDEM_ASSERT_OK(cuda::GroupedQuantizedLinear(w, dx.get(), nullptr, doffsets.get(), 64, dy.get()));
    TANDEM_ASSERT_OK(Sync());
    const auto y = ToHost(dy);
    int64_t wrong = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const bool bad_rows = r >= offsets[bad_expert] && r < offsets[bad_expert + 1];
      for (int64_t o = 0; o < out; ++o) {
        const bool want_nan = bad_rows && o == bad_row;
        if (std::isnan(y[static_cast<size_t>(r * out + o)]) != want_nan && wrong++ < 5) {
          ADD_FAILURE() << "y[" << r << "][" << o << "] = " << y[static_cast<size_t>(r * out + o)]
                        << (want_nan ? ": want NaN" : ": want a number");
        }
      }
    }
    EXPECT_EQ(wrong, 0);
  }
}

// The flash w2 shape, and one of 3 K steps of 128 with the NaN in the last group: the tensor-core unit's last
// step of 256 has a slice past in, which re-reads that group. The NaN must stay in its row; the past slice's zero
// factor itself is not seen here (it re-reads the same row's groups; it matters for weights that overflow to Inf,
// which no test makes).
TEST_F(CudaTest, GroupedQuantizedLinearNanScale) {
  struct Case {
    int64_t out, in, bad_row, bad_group;
  };
  for (const Case& c : {Case{kFlash.hidden, kFlash.intermediate, 777, 9}, Case{200, 384, 150, 11}}) {
    SCOPED_TRACE(absl::StrCat("out ", c.out, " in ", c.in));
    ExpectNanScaleStaysInItsRow(c.out, c.in, c.bad_row, c.bad_group, rng_);
  }
}

// Bad calls are refused with the parameter named, and nothing is launched: the output keeps its poison.
TEST_F(CudaTest, GroupedLinearRefusesBadArguments) {
  const int64_t out = 256, in = 128;
  const DeviceExperts device = UploadExperts(QuantizedWeight::Format::kMxfp4,
                                             {RandomExpert(QuantizedWeight::Format::kMxfp4, out, in, rng_),
                                              RandomExpert(QuantizedWeight::Format::kMxfp4, out, in, rng_)},
                                             out, in);
  const cuda::GroupedWeights& w = device.weights;
  auto dx = ToDevice(Normal(static_cast<size_t>(4 * in), rng_));
  auto doffsets = ToDevice(std::vector<int64_t>{0, 2, 4});
  auto dy = Poisoned<float>(static_cast<size_t>(4 * out));
  auto refused = [](const absl::Status& status, const char* says) {
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    EXPECT_NE(status.message().find(says), std::string_view::npos) << status << " (want: " << says << ")";
  };
  const float* x = dx.get();
  const int64_t* offsets = doffsets.get();
  float* y = dy.get();
  refused(cuda::GroupedQuantizedLinear(w, nullptr, nullptr, offsets, 8, y), "null x, offsets or y");
  refused(cuda::GroupedQuantizedLinear(w, x + 1, nullptr, offsets, 8, y), "x must be 16-byte aligned");
  refused(cuda::GroupedQuantizedLinear(w, x, nullptr, offsets, -1, y), "negative max_rows_per_expert");
  cuda::GroupedWeights odd_in = w, no_codes = w, other_out = w;
  odd_in.in = 100;
  no_codes.codes = nullptr;
  other_out.out = 128;
  refused(cuda::GroupedQuantizedLinear(odd_in, x, nullptr, offsets, 8, y), "in a positive multiple of");
  refused(cuda::GroupedQuantizedLinear(no_codes, x, nullptr, offsets, 8, y), "null weights");
  refused(cuda::GroupedSwiGluLinear(w, other_out, x, nullptr, offsets, 8, 7.0f, y), "w1 and w3 differ");
  refused(cuda::GroupedSwiGluLinear(w, w, x, nullptr, offsets, 8, 7.0f, nullptr), "null x, offsets or h");
  refused(cuda::GroupedSwiGluLinear(w, w, x, nullptr, offsets, -2, 7.0f, y), "GroupedSwiGluLinear: negative");
  TANDEM_ASSERT_OK(Sync());
  for (const float v : ToHost(dy)) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    ASSERT_EQ(bits, 0xffffffffu) << "a refused call wrote y";
  }
}

// The fused w1/w3 + SwiGlu pass against the separate calls it replaces: the same sums, so equal bits.
void ExpectSwiGluLinearMatchesSeparate(QuantizedWeight::Format format, int64_t out, int64_t in,
                                       const std::vector<int64_t>& counts, bool gather, std::mt19937& rng) {
  SCOPED_TRACE(::testing::Message() << (format == QuantizedWeight::Format::kMxfp4 ? "MXFP4" : "FP8") << " out "
                                    << out << " in " << in << (gather ? " gathered" : " contiguous"));
  const int64_t E = static_cast<int64_t>(counts.size());
  std::vector<int64_t> offsets(static_cast<size_t>(E + 1), 0);
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + counts[e];
  const int64_t rows = offsets[E];
  const int64_t x_rows = gather ? 29 : std::max<int64_t>(1, rows);
  // Spread 3: some SwiGlu inputs beyond the clamp.
  const auto x = Normal(static_cast<size_t>(x_rows * in), rng, 3.0f);
  std::vector<int32_t> gather_rows(static_cast<size_t>(std::max<int64_t>(1, rows)));
  std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(x_rows - 1));
  for (auto& g : gather_rows) g = gather ? pick(rng) : 0;
  auto upload = [&] {  // E random experts (w1's draws, then w3's)
    std::vector<Expert> experts;
    for (int64_t e = 0; e < E; ++e) experts.push_back(RandomExpert(format, out, in, rng));
    return UploadExperts(format, experts, out, in);
  };
  const DeviceExperts d1 = upload();
  const DeviceExperts d3 = upload();
  const cuda::GroupedWeights &w1 = d1.weights, &w3 = d3.weights;
  auto dx = ToDevice(x);
  auto dgather = ToDevice(gather_rows);
  auto doffsets = ToDevice(offsets);
  const size_t n = static_cast<size_t>(std::max<int64_t>(1, rows * out));
  auto da = Poisoned<float>(n);
  auto db = Poisoned<float>(n);
  auto dh = Poisoned<float>(n);
  const float limit = 7.0f;
  const int32_t* g = gather ? dgather.get() : nullptr;
  TANDEM_ASSERT_OK(cuda::GroupedQuantizedLinear(w1, dx.get(), g, doffsets.get(), 64, da.get()));
  TANDEM_ASSERT_OK(cuda::GroupedQuantizedLinear(w3, dx.get(), g, doffsets.get(), 64, db.get()));
  TANDEM_ASSERT_OK(cuda::SwiGlu(da.get(), db.get(), rows * out, limit, da.get()));
  TANDEM_ASSERT_OK(cuda::GroupedSwiGluLinear(w1, w3, dx.get(), g, doffsets.get(), 64, limit, dh.get()));
  TANDEM_ASSERT_OK(Sync());
  const auto separate = ToHost(da), fused = ToHost(dh);
  int64_t bad = 0;
  for (size_t i = 0; i < static_cast<size_t>(rows * out); ++i) {
    if (std::memcmp(&separate[i], &fused[i], sizeof(float)) != 0 && bad++ < 5) {
      ADD_FAILURE() << "h[" << static_cast<int64_t>(i) / out << "][" << static_cast<int64_t>(i) % out << "]: fused "
                    << fused[i] << " separate " << separate[i];
    }
  }
  EXPECT_EQ(bad, 0);
}

TEST_F(CudaTest, GroupedSwiGluLinearMatchesSeparateCalls) {
  for (const bool tensor_cores : {true, false}) {
    SCOPED_TRACE(tensor_cores ? "tensor cores on" : "tensor cores off");
    const TensorCores scope(tensor_cores);
    for (const auto format : {QuantizedWeight::Format::kMxfp4, QuantizedWeight::Format::kFp8Block}) {
      // GEMV groups, partial output units, the tiled path (40 rows), experts without rows.
      ExpectSwiGluLinearMatchesSeparate(format, kTiny.intermediate, kTiny.hidden, {0, 1, 2, 3, 4, 7, 0, 40, 1}, true,
                                        rng_);
      ExpectSwiGluLinearMatchesSeparate(format, 100, 192, {2, 0, 5, 1, 40}, false, rng_);
      // Flash w1/w3 at decode.
      ExpectSwiGluLinearMatchesSeparate(format, kFlash.intermediate, kFlash.hidden, {1, 0, 2, 1, 7}, true, rng_);
      // K an odd number of 128s: the fused tensor-core unit's last step has a slice past in.
      ExpectSwiGluLinearMatchesSeparate(format, 100, 384, {2, 0, 5, 1, 8}, true, rng_);
    }
  }
  // No expert has rows: nothing to write, and the call still succeeds.
  ExpectSwiGluLinearMatchesSeparate(QuantizedWeight::Format::kMxfp4, 64, 128, {0, 0, 0}, true, rng_);
}

float CpuSwiGlu(float a, float b, float limit) {
  const float g = std::min(a, limit);
  const float u = std::clamp(b, -limit, limit);
  return g / (1.0f + std::exp(-g)) * u;
}

TEST_F(CudaTest, SwiGluMatchesCpu) {
  const float limit = 10.0f;
  // Spread 8: many values beyond the clamp on both sides. Offset 1: the unaligned (scalar) path.
  for (const int64_t offset : {int64_t{0}, int64_t{1}}) {
    const int64_t count = 10007;
    const auto a = Normal(static_cast<size_t>(count + 1), rng_, 8.0f);
    const auto b = Normal(static_cast<size_t>(count + 1), rng_, 8.0f);
    std::vector<float> cpu(static_cast<size_t>(count));
    int64_t clamped = 0;
    for (int64_t i = 0; i < count; ++i) {
      cpu[i] = CpuSwiGlu(a[offset + i], b[offset + i], limit);
      clamped += a[offset + i] > limit || std::fabs(b[offset + i]) > limit;
    }
    ASSERT_GT(clamped, count / 10);
    auto da = ToDevice(a);
    auto db = ToDevice(b);
    auto dh = Poisoned<float>(static_cast<size_t>(count + 1));
    TANDEM_ASSERT_OK(cuda::SwiGlu(da.get() + offset, db.get() + offset, count, limit, dh.get() + offset));
    TANDEM_ASSERT_OK(Sync());
    auto got = ToHost(dh);
    got.erase(got.begin(), got.begin() + offset);
    got.resize(static_cast<size_t>(count));
    EXPECT_TRUE(AllClose(got, cpu, 1e-6, 1e-6)) << "offset " << offset;
  }
  // In place into a.
  const int64_t count = 4096;
  const auto a = Normal(static_cast<size_t>(count), rng_, 8.0f);
  const auto b = Normal(static_cast<size_t>(count), rng_, 8.0f);
  std::vector<float> cpu(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) cpu[i] = CpuSwiGlu(a[i], b[i], limit);
  auto da = ToDevice(a);
  auto db = ToDevice(b);
  TANDEM_ASSERT_OK(cuda::SwiGlu(da.get(), db.get(), count, limit, da.get()));
  TANDEM_ASSERT_OK(Sync());
  EXPECT_TRUE(AllClose(ToHost(da), cpu, 1e-6, 1e-6)) << "in place";
}

TEST_F(CudaTest, MoeCombineMatchesCpu) {
  for (const MoeShape& shape : {kTiny, kFlash}) {
    const int64_t tokens = 67, k = shape.k, E = shape.experts, D = shape.hidden;
    SCOPED_TRACE(shape.name);
    const auto chosen = RandomChoice(tokens, k, E, rng_);
    const Grouping g = CpuGroup(chosen, k, E);
    const auto shared = Normal(static_cast<size_t>(tokens * D), rng_);
    const auto routed = Normal(static_cast<size_t>(tokens * k * D), rng_);
    auto weights = Normal(static_cast<size_t>(tokens * k), rng_);
    for (auto& w : weights) w = std::fabs(w);
    // moe.cc: out = shared, then for each expert in order, each of its rows: out += weight * result.
    std::vector<float> cpu = shared;
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t r = g.offsets[e]; r < g.offsets[e + 1]; ++r) {
        const int64_t t = g.rows[r];
        int64_t slot = 0;
        while (g.position[t * k + slot] != r) ++slot;
        for (int64_t d = 0; d < D; ++d) cpu[t * D + d] += weights[t * k + slot] * routed[r * D + d];
      }
    }
    auto dshared = ToDevice(shared);
    auto drouted = ToDevice(routed);
    auto dposition = ToDevice(g.position);
    auto dweights = ToDevice(weights);
    auto dout = Poisoned<float>(cpu.size());
    TANDEM_ASSERT_OK(cuda::MoeCombine(dshared.get(), drouted.get(), dposition.get(), dweights.get(), tokens, k, D,
                                      dout.get()));
    TANDEM_ASSERT_OK(Sync());
    EXPECT_TRUE(AllClose(ToHost(dout), cpu, 1e-6, 1e-6));
  }
}

TEST_F(CudaTest, HcHeadMatchesCpu) {
  for (const int64_t hidden : {kTiny.hidden, kFlash.hidden}) {
    for (const int64_t tokens : {int64_t{1}, int64_t{37}}) {
      SCOPED_TRACE(::testing::Message() << "hidden " << hidden << " tokens " << tokens);
      model::ModelConfig c;
      c.hidden_size = hidden;
      c.hc_mult = 4;
      c.hc_eps = 1e-6;
      c.rms_norm_eps = 1e-6;
      const int64_t MD = c.hc_dim();
      model::HcHeadWeights w;
      w.fn = Normal(static_cast<size_t>(4 * MD), rng_, static_cast<float>(1.0 / std::sqrt(static_cast<double>(MD))));
      w.base = Normal(4, rng_, 0.5f);
      w.scale = {1.0f + Normal(1, rng_, 0.3f)[0]};
      const auto x = Normal(static_cast<size_t>(tokens * MD), rng_, 1.5f);
      std::vector<float> cpu(static_cast<size_t>(tokens * hidden));
      model::internal::HcHead(c, w, x.data(), tokens, cpu.data());
      auto dfn = ToDevice(w.fn);
      auto dbase = ToDevice(w.base);
      auto dscale = ToDevice(w.scale);
      auto dx = ToDevice(x);
      auto dy = Poisoned<float>(cpu.size());
      TANDEM_ASSERT_OK(cuda::HcHead(dfn.get(), dbase.get(), dscale.get(), 4, hidden, c.hc_eps, c.rms_norm_eps, dx.get(),
                                    tokens, dy.get()));
      TANDEM_ASSERT_OK(Sync());
      EXPECT_TRUE(AllClose(ToHost(dy), cpu, 1e-5, 1e-5));
    }
  }
}

// First index of the largest non-NaN value (0 when there is none).
int32_t CpuArgmax(const float* row, int64_t vocab) {
  int32_t best = -1;
  for (int64_t i = 0; i < vocab; ++i) {
    if (std::isnan(row[i])) continue;
    if (best < 0 || row[i] > row[best]) best = static_cast<int32_t>(i);
  }
  return best < 0 ? 0 : best;
}

TEST_F(CudaTest, ArgmaxRowsTiesAndNan) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  for (const int64_t vocab : {int64_t{1000}, int64_t{129280}}) {
    const int64_t rows = 40;
    auto logits = Normal(static_cast<size_t>(rows * vocab), rng_, 3.0f);
    std::uniform_int_distribution<int64_t> id(0, vocab - 1);
    for (int64_t r = 0; r < rows; ++r) {
      float* row = logits.data() + r * vocab;
      const int32_t top = CpuArgmax(row, vocab);
      switch (r % 5) {
        case 0: row[id(rng_)] = row[top]; row[id(rng_)] = row[top]; break;  // ties: the smaller id wins
        case 1: row[0] = nan; row[id(rng_)] = nan; break;                   // NaN never wins
        case 2: for (int64_t i = 0; i < vocab; ++i) row[i] = i % 3 ? -inf : nan; break;  // only -inf: the first
        case 3: for (int64_t i = 0; i < vocab; ++i) row[i] = 1.0f; break;    // all equal: id 0
        default: break;
      }
    }
    std::vector<int32_t> cpu(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) cpu[r] = CpuArgmax(logits.data() + r * vocab, vocab);
    auto dlogits = ToDevice(logits);
    auto dids = Poisoned<int32_t>(static_cast<size_t>(rows));
    TANDEM_ASSERT_OK(cuda::ArgmaxRows(dlogits.get(), rows, vocab, dids.get()));
    TANDEM_ASSERT_OK(Sync());
    EXPECT_EQ(ToHost(dids), cpu) << "vocab " << vocab;
  }
}

// engine::RequestSampler::Sample after its penalties and biases, with the draw u given: the engine tests'
// host statement of the rule (tests/unit/engine/row_draw_reference.h).
int32_t CpuSample(std::vector<float> logits, const cuda::SampleRow& p) {
  model::RowDraw draw;
  draw.greedy = p.temperature < 1e-6 || p.top_k == 1;
  draw.temperature = p.temperature;
  draw.top_k = p.top_k;
  draw.top_p = p.top_p;
  draw.min_p = p.min_p;
  draw.uniform = p.u;
  return engine::testing::DrawOnHost(draw, std::move(logits));
}

TEST_F(CudaTest, SampleRowsFollowsTheSamplerRule) {
  struct Setting {
    float temperature;
    int32_t top_k;
    float top_p, min_p;
  };
  // Whole vocabulary (the draw walks many chunks), top-k below and above one chunk, top-p and min-p cuts,
  // a low temperature, and the greedy cases.
  const std::vector<Setting> settings = {{1.0f, -1, 1.0f, 0.0f},  {0.7f, 50, 0.9f, 0.0f},  {1.3f, -1, 0.95f, 0.05f},
                                         {1.0f, 3000, 1.0f, 0.0f}, {0.5f, -1, 0.5f, 0.0f}, {1.0f, 20, 1.0f, 0.2f},
                                         {0.0f, -1, 1.0f, 0.0f},  {1.0f, 1, 1.0f, 0.0f},  {2.0f, 5000, 0.99f, 0.0f}};
  for (const int64_t vocab : {int64_t{5000}, int64_t{129280}}) {
    const int64_t rows = vocab > 100000 ? 18 : 180;
    SCOPED_TRACE(::testing::Message() << "vocab " << vocab);
    std::vector<float> logits;
    std::vector<cuda::SampleRow> params(static_cast<size_t>(rows));
    std::uniform_real_distribution<double> uniform(0.0, 1.0);
    std::uniform_int_distribution<int64_t> id(0, vocab - 1);
    for (int64_t r = 0; r < rows; ++r) {
      // Flat rows (spread 1) and peaked ones (spread 4); ties by copying values around.
      auto row = Normal(static_cast<size_t>(vocab), rng_, r % 2 ? 4.0f : 1.0f);
      for (int i = 0; i < 200; ++i) row[id(rng_)] = row[id(rng_)];
      logits.insert(logits.end(), row.begin(), row.end());
      const Setting& s = settings[r % settings.size()];
      auto& p = params[r];
      p.temperature = s.temperature;
      p.top_k = s.top_k;
      p.top_p = s.top_p;
      p.min_p = s.min_p;
      p.u = r % 13 == 0 ? 0.0 : r % 13 == 1 ? 1.0 - 1e-6 : uniform(rng_);
    }
    std::vector<int32_t> cpu(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) {
      cpu[r] = CpuSample(std::vector<float>(logits.begin() + r * vocab, logits.begin() + (r + 1) * vocab), params[r]);
    }
    auto dlogits = ToDevice(logits);
    auto dparams = ToDevice(params);
    auto dids = Poisoned<int32_t>(static_cast<size_t>(rows));
    const size_t bytes = cuda::SampleWorkspaceBytes(rows, vocab);
    auto workspace = Poisoned<uint8_t>(bytes);
    TANDEM_ASSERT_OK(cuda::SampleRows(dlogits.get(), rows, vocab, dparams.get(), dids.get(), workspace.get(), bytes));
    TANDEM_ASSERT_OK(Sync());
    const auto got = ToHost(dids);
    for (int64_t r = 0; r < rows; ++r) {
      const auto& p = params[r];
      EXPECT_EQ(got[r], cpu[r]) << "row " << r << ": temperature " << p.temperature << " top_k " << p.top_k
                                << " top_p " << p.top_p << " min_p " << p.min_p << " u " << p.u;
    }
  }
}

// engine::RequestSampler::Draw's edits to one logit, as it writes them (float l, double penalties).
float CpuEdit(float l, const cuda::LogitEdit& e) {
  if (e.flags & cuda::kEditPenalize) {
    l -= e.subtract;
    if (e.repetition != 1.0) l = l < 0 ? static_cast<float>(l * e.repetition) : static_cast<float>(l / e.repetition);
  }
  if (e.flags & cuda::kEditBias) l += e.bias;
  if (e.flags & cuda::kEditMask) l = -INFINITY;
  return l;
}

TEST_F(CudaTest, ApplyLogitEditsIsTheSamplersArithmetic) {
  const int64_t rows = 7, vocab = 129280;
  auto logits = Normal(static_cast<size_t>(rows * vocab), rng_, 6.0f);
  logits[5] = -0.0f;
  logits[6] = 0.0f;
  std::vector<cuda::LogitEdit> edits;
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(vocab) - 1);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (int32_t r = 0; r < rows; ++r) {
    std::vector<int32_t> tokens = {5, 6};
    for (int i = 0; i < 3000; ++i) tokens.push_back(token(rng_));
    std::sort(tokens.begin(), tokens.end());
    tokens.erase(std::unique(tokens.begin(), tokens.end()), tokens.end());
    for (const int32_t t : tokens) {
      cuda::LogitEdit e;
      e.row = r;
      e.token = t;
      e.flags = static_cast<uint32_t>(1 + (t + r) % 7);  // every combination of the three
      e.subtract = static_cast<float>(0.37 * (1 + t % 9) + (r % 2 ? -1.1 : 0.2));  // f * count + p, either sign
      e.repetition = r == 0 ? 1.0 : 0.05 + 1.95 * unit(rng_);
      e.bias = static_cast<float>(unit(rng_) * 20.0 - 10.0);
      edits.push_back(e);
    }
  }
  // Edits outside the rows or vocabulary are skipped.
  edits.push_back({.row = static_cast<int32_t>(rows), .token = 0, .flags = cuda::kEditMask});
  edits.push_back({.row = 0, .token = static_cast<int32_t>(vocab), .flags = cuda::kEditMask});
  edits.push_back({.row = -1, .token = -1, .flags = cuda::kEditMask});
  std::vector<float> cpu = logits;
  for (const auto& e : edits) {
    if (e.row < 0 || e.row >= rows || e.token < 0 || e.token >= vocab) continue;
    float& l = cpu[static_cast<size_t>(e.row * vocab + e.token)];
    l = CpuEdit(l, e);
  }
  auto dlogits = ToDevice(logits);
  auto dedits = ToDevice(edits);
  TANDEM_ASSERT_OK(cuda::ApplyLogitEdits(dlogits.get(), rows, vocab, dedits.get(), static_cast<int64_t>(edits.size())));
  TANDEM_ASSERT_OK(Sync());
  const auto got = ToHost(dlogits);
  int64_t wrong = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::memcmp(&got[i], &cpu[i], sizeof(float)) != 0) {
      if (++wrong <= 10) {
        ADD_FAILURE() << "row " << i / vocab << " token " << i % vocab << ": device " << got[i] << " cpu " << cpu[i]
                      << " (from " << logits[i] << ")";
      }
    }
  }
  EXPECT_EQ(wrong, 0) << "of " << edits.size() << " edits";
}

}  // namespace
}  // namespace tandem::kernels
