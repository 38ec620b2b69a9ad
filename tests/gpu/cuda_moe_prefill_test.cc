// The prefill expert path on the GPU (MXFP4 dequantization, GroupedExpertGemm, SwiGluStacked) against the
// CPU's own code (kernels::DequantizeRows, kernels::QuantizedLinear). Fresh inputs every run.
#include <cmath>
#include <cstring>
#include <random>
#include <span>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/core/dtype.h"
#include "common/kernels/cuda/cuda_model_ops.h"
#include "common/kernels/cuda/cuda_moe_prefill.h"
#include "common/kernels/kernels.h"
#include "tests/gpu/gpu_test_util.h"

namespace tandem::kernels {
namespace {

using Format = QuantizedWeight::Format;
using testing::AllClose;
using testing::CudaTest;
using testing::DeviceIsSm90;
using testing::Must;
using testing::Normal;
using testing::Poisoned;
using testing::RelativeL2;
using testing::Sync;
using testing::ToDevice;
using testing::ToHost;

std::vector<float> ToFloat(const std::vector<__nv_bfloat16>& values) {
  std::vector<float> out(values.size());
  for (size_t i = 0; i < values.size(); ++i) out[i] = __bfloat162float(values[i]);
  return out;
}

// Random codes (every e2m1 code; finite e4m3 only, 0x7f/0xff are NaN) with scales 2^-10 .. 2^10.
void RandomCodes(Format format, int64_t out, int64_t in, std::mt19937& rng, std::vector<uint8_t>& codes,
                 std::vector<uint8_t>& scales) {
  std::uniform_int_distribution<int> byte(0, 255), scale(117, 137);
  codes.resize(static_cast<size_t>(format == Format::kMxfp4 ? out * in / 2 : out * in));
  for (auto& b : codes) {
    do b = static_cast<uint8_t>(byte(rng));
    while (format == Format::kFp8Block && (b & 0x7f) == 0x7f);
  }
  scales.resize(static_cast<size_t>(format == Format::kMxfp4 ? out * (in / 32) : ((out + 127) / 128) * ((in + 127) / 128)));
  for (auto& s : scales) s = static_cast<uint8_t>(scale(rng));
}

// One grouped weight: per-expert host copies (for the CPU) and device copies (for the GPU).
struct Experts {
  Format format;
  int64_t out, in;
  std::vector<std::vector<uint8_t>> codes, scales;
  std::vector<cuda::DeviceArray<uint8_t>> device_codes, device_scales;
  std::vector<const uint8_t*> code_pointers, scale_pointers;  // host arrays of device pointers

  Experts(Format f, int64_t experts, int64_t o, int64_t i, std::mt19937& rng) : format(f), out(o), in(i) {
    codes.resize(static_cast<size_t>(experts));
    scales.resize(static_cast<size_t>(experts));
    for (int64_t e = 0; e < experts; ++e) {
      RandomCodes(format, out, in, rng, codes[e], scales[e]);
      device_codes.push_back(ToDevice(codes[e]));
      device_scales.push_back(ToDevice(scales[e]));
      code_pointers.push_back(device_codes.back().get());
      scale_pointers.push_back(device_scales.back().get());
    }
  }
  QuantizedWeight View(size_t e) const { return {format, codes[e].data(), scales[e].data(), out, in}; }
  // Scale byte `index` of expert e set to `value`, on the host and the device.
  void SetScale(size_t e, size_t index, uint8_t value) {
    scales[e][index] = value;
    device_scales[e] = ToDevice(scales[e]);
    scale_pointers[e] = device_scales[e].get();
  }
  cuda::HostExpertWeights Host() const {
    return {format, code_pointers.data(), scale_pointers.data(), static_cast<int64_t>(codes.size()), out, in};
  }
};

std::vector<int64_t> Offsets(const std::vector<int64_t>& counts) {
  std::vector<int64_t> offsets{0};
  for (const int64_t c : counts) offsets.push_back(offsets.back() + c);
  return offsets;
}

// y [R, sum out] from the GPU against the CPU per expert and stacked part. On the same bf16-rounded x only
// the summation order differs: |err| <= 1e-5 * sum_k |x_k w_k|. Against f32 x (the CPU forward's numerics)
// each x_k carries a rounding of at most 2^-9 relative: |err| <= 2^-8 * sum_k |x_k w_k|.
void ExpectMatchesCpu(const std::vector<const Experts*>& stacked, const std::vector<float>& x,
                      const std::vector<int64_t>& offsets, const std::vector<float>& gpu) {
  const int64_t in = stacked[0]->in;
  int64_t total_out = 0;
  for (const Experts* w : stacked) total_out += w->out;
  ASSERT_EQ(gpu.size(), static_cast<size_t>(offsets.back() * total_out));
  std::vector<float> x_rounded(x.size());
  for (size_t i = 0; i < x.size(); ++i) x_rounded[i] = RoundBf16(x[i]);
  int64_t bad = 0;
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    const int64_t row0 = offsets[e], rows = offsets[e + 1] - offsets[e];
    if (rows == 0) continue;
    int64_t column0 = 0;
    for (const Experts* w : stacked) {
      const QuantizedWeight view = w->View(e);
      std::vector<float> rounded(static_cast<size_t>(rows * w->out)), exact(rounded.size()),
          weight(static_cast<size_t>(w->out * in));
      QuantizedLinear(x_rounded.data() + row0 * in, rows, view, rounded.data());
      QuantizedLinear(x.data() + row0 * in, rows, view, exact.data());
      DequantizeRows(view, 0, w->out, weight.data());
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t o = 0; o < w->out; ++o) {
          double magnitude = 0.0;
          for (int64_t k = 0; k < in; ++k) {
            magnitude += std::fabs(static_cast<double>(x_rounded[(row0 + r) * in + k]) * weight[o * in + k]);
          }
          const float got = gpu[static_cast<size_t>((row0 + r) * total_out + column0 + o)];
          const float want = rounded[static_cast<size_t>(r * w->out + o)], want_f32 = exact[static_cast<size_t>(r * w->out + o)];
          if (std::isnan(want) && std::isnan(got)) continue;  // a NaN group scale: NaN on both sides
          if (!(std::fabs(got - want) <= 1e-5 * magnitude + 1e-30) ||
              !(std::fabs(got - want_f32) <= std::ldexp(magnitude, -8) + 1e-30)) {
            if (bad++ < 5) {
              ADD_FAILURE() << "expert " << e << " y[" << row0 + r << "][" << column0 + o << "] gpu " << got << " cpu "
                            << want << " (f32 x: " << want_f32 << ", sum |xw| " << magnitude << ")";
            }
          }
        }
      }
      column0 += w->out;
    }
  }
  EXPECT_EQ(bad, 0);
}

// e2m1 times a power of two is exact in bf16: the device copy must equal the CPU's f32 dequantization.
TEST_F(CudaTest, Mxfp4DequantizeIsExact) {
  // (96, 512): the vector path; offset by one byte / one element: the scalar path.
  for (const int64_t shift : {int64_t{0}, int64_t{1}}) {
    SCOPED_TRACE(::testing::Message() << "shift " << shift);
    const int64_t out = shift ? 5 : 96, in = shift ? 96 : 512;
    std::vector<uint8_t> codes, scales;
    RandomCodes(Format::kMxfp4, out, in, rng_, codes, scales);
    std::vector<uint8_t> shifted(static_cast<size_t>(shift));
    shifted.insert(shifted.end(), codes.begin(), codes.end());
    auto dcodes = ToDevice(shifted);
    auto dscales = ToDevice(scales);
    auto dst = Poisoned<__nv_bfloat16>(static_cast<size_t>(out * in + shift));
    TANDEM_ASSERT_OK(cuda::DequantizeMxfp4(dcodes.get() + shift, dscales.get(), out, in, dst.get() + shift));
    TANDEM_ASSERT_OK(Sync());
    auto gpu = ToFloat(ToHost(dst));
    gpu.erase(gpu.begin(), gpu.begin() + shift);
    std::vector<float> cpu(static_cast<size_t>(out * in));
    DequantizeRows({Format::kMxfp4, codes.data(), scales.data(), out, in}, 0, out, cpu.data());
    EXPECT_TRUE(AllClose(gpu, cpu, 0.0, 0.0));
  }
  EXPECT_FALSE(cuda::DequantizeMxfp4(nullptr, nullptr, 4, 48, nullptr).ok()) << "in not a multiple of 32";
}

// Experts of 37, 0, 300 and 1 rows (unaligned block starts, an empty expert, a single row; for the fused kernel
// row tiles of 37, 128, 128, 44 and 1, so warpgroups with and without rows), on two lanes or fused.
TEST_F(CudaTest, GroupedExpertGemmMatchesCpu) {
  struct Case {
    Format format;
    int64_t out, in;
    bool fused;
  };
  // MXFP4 w1-like (fused on Hopper, and on the lanes); FP8 with partial 128-blocks on both sides (the lanes).
  for (const Case c : {Case{Format::kMxfp4, 256, 512, true}, Case{Format::kMxfp4, 256, 512, false},
                       Case{Format::kFp8Block, 320, 640, true}}) {
    SCOPED_TRACE(::testing::Message() << (c.format == Format::kMxfp4 ? "mxfp4" : "fp8") << " out " << c.out << " in "
                                      << c.in << (c.fused ? " fused allowed" : " lanes"));
    const std::vector<int64_t> offsets = Offsets({37, 0, 300, 1});
    const Experts w(c.format, 4, c.out, c.in, rng_);
    const auto x = Normal(static_cast<size_t>(offsets.back() * c.in), rng_);
    auto grouped = Must(
        cuda::GroupedExpertGemm::Create({.max_weight_elements = c.out * c.in, .lanes = 2, .fused_mxfp4 = c.fused}));
    auto dx = ToDevice(x);
    auto dy = Poisoned<float>(static_cast<size_t>(offsets.back() * c.out));
    cuda::GroupedWeights weights;  // Run reads its format and shape; the pointers come from the host arrays
    weights.format = c.format;
    weights.experts = 4;
    weights.out = c.out;
    weights.in = c.in;
    // Twice: the second run reuses the cached plans and scratch.
    for (int pass = 0; pass < 2; ++pass) {
      TANDEM_ASSERT_OK(grouped->Run(weights, w.code_pointers.data(), w.scale_pointers.data(), dx.get(), offsets, dy.get()));
    }
    TANDEM_ASSERT_OK(Sync());
    // On Hopper the fused kernel must be what served MXFP4 when allowed (a silent fallback fails here).
    EXPECT_EQ(grouped->last_run_fused(), c.fused && c.format == Format::kMxfp4 && DeviceIsSm90());
    ExpectMatchesCpu({&w}, x, offsets, ToHost(dy));
  }
}

// w1 and w3 stacked into one GEMM: y [R, 2I] = [x.w1^T | x.w3^T]; SwiGluStacked on it equals SwiGlu on the halves.
// I = 192: the fused kernel's first 256-column tile holds columns of both weights, its second is partial.
TEST_F(CudaTest, GroupedExpertGemmStacksWeights) {
  const int64_t inter = 192, in = 256, experts = 3;
  const std::vector<int64_t> offsets = Offsets({1, 300, 37});
  const Experts w1(Format::kMxfp4, experts, inter, in, rng_), w3(Format::kMxfp4, experts, inter, in, rng_);
  const auto x = Normal(static_cast<size_t>(offsets.back() * in), rng_);
  auto grouped = Must(cuda::GroupedExpertGemm::Create({.max_weight_elements = 2 * inter * in, .lanes = 3}));
  auto dx = ToDevice(x);
  const int64_t rows = offsets.back();
  auto dy = Poisoned<float>(static_cast<size_t>(rows * 2 * inter));
  const cuda::HostExpertWeights stacked[] = {w1.Host(), w3.Host()};
  TANDEM_ASSERT_OK(grouped->Run(stacked, dx.get(), offsets, dy.get()));
  TANDEM_ASSERT_OK(Sync());
  EXPECT_EQ(grouped->last_run_fused(), DeviceIsSm90());
  const auto y = ToHost(dy);
  ExpectMatchesCpu({&w1, &w3}, x, offsets, y);

  std::vector<float> gate(static_cast<size_t>(rows * inter)), up(gate.size());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < inter; ++i) {
      gate[r * inter + i] = y[r * 2 * inter + i];
      up[r * inter + i] = y[r * 2 * inter + inter + i];
    }
  }
  auto dgate = ToDevice(gate);
  auto dup = ToDevice(up);
  auto dh = Poisoned<float>(gate.size());
  auto dh_stacked = Poisoned<float>(gate.size());
  const float limit = 2.0f;  // clamps most of the (large, scaled) gate and up values
  TANDEM_ASSERT_OK(cuda::SwiGlu(dgate.get(), dup.get(), static_cast<int64_t>(gate.size()), limit, dh.get()));
  TANDEM_ASSERT_OK(cuda::SwiGluStacked(dy.get(), rows, inter, limit, dh_stacked.get()));
  TANDEM_ASSERT_OK(Sync());
  EXPECT_TRUE(AllClose(ToHost(dh_stacked), ToHost(dh), 0.0, 1e-6));
}

// x by TMA (x_cluster 1, 2, 4: fetched once a cluster of column tiles and multicast) computes the same bits as
// the cp.async kernel, one bf16 pass and split. Stacked outs of 2 x 384 make 3 column tiles (a partial cluster
// of 2 and of 4: the padding tile fetches its share without storing); experts of 1 .. 300 rows give tiles of 64
// rows or less (one TMA half), and the last tile reads past x's rows (zeros from the tensor map).
TEST_F(CudaTest, GroupedExpertGemmXByTmaMatchesCpAsync) {
  if (!DeviceIsSm90()) GTEST_SKIP() << "the fused kernel needs compute capability 9.0";
  const int64_t inter = 384, in = 256, experts = 6;
  const std::vector<int64_t> offsets = Offsets({37, 0, 300, 64, 65, 1});
  const int64_t rows = offsets.back();
  const Experts w1(Format::kMxfp4, experts, inter, in, rng_), w3(Format::kMxfp4, experts, inter, in, rng_);
  const auto x = Normal(static_cast<size_t>(rows * in), rng_);
  auto dx = ToDevice(x);
  const cuda::HostExpertWeights stacked[] = {w1.Host(), w3.Host()};
  for (const bool split : {false, true}) {
    SCOPED_TRACE(split ? "split x" : "one bf16 pass");
    std::vector<float> reference;
    for (const int cluster : {0, 1, 2, 4}) {
      SCOPED_TRACE(::testing::Message() << "x_cluster " << cluster);
      auto grouped = Must(cuda::GroupedExpertGemm::Create(
          {.max_weight_elements = 2 * inter * in, .lanes = 1, .split_x = split, .x_cluster = cluster}));
      auto dy = Poisoned<float>(static_cast<size_t>(rows * 2 * inter));
      for (int pass = 0; pass < 2; ++pass) TANDEM_ASSERT_OK(grouped->Run(stacked, dx.get(), offsets, dy.get()));
      TANDEM_ASSERT_OK(Sync());
      ASSERT_TRUE(grouped->last_run_fused());
      const auto y = ToHost(dy);
      if (cluster == 0) {
        if (!split) ExpectMatchesCpu({&w1, &w3}, x, offsets, y);
        reference = y;
        continue;
      }
      int64_t differ = 0;
      for (size_t i = 0; i < y.size(); ++i) {
        if (std::memcmp(&y[i], &reference[i], sizeof(float)) != 0 && differ++ < 5) {
          ADD_FAILURE() << "y[" << i / (2 * inter) << "][" << i % (2 * inter) << "] " << y[i] << " vs cp.async "
                        << reference[i];
        }
      }
      EXPECT_EQ(differ, 0);
    }
  }
}

// y [rows, sum of outs] from two Runs of a fresh GroupedExpertGemm (the second reuses its scratch and tile
// table) into a poisoned y, on the fused kernel.
std::vector<float> RunFusedTwice(const cuda::GroupedExpertGemm::Options& options,
                                 std::span<const cuda::HostExpertWeights> stacked, const float* x,
                                 const std::vector<int64_t>& offsets, size_t y_size) {
  auto grouped = Must(cuda::GroupedExpertGemm::Create(options));
  auto dy = Poisoned<float>(y_size);
  for (int pass = 0; pass < 2; ++pass) EXPECT_TRUE(grouped->Run(stacked, x, offsets, dy.get()).ok());
  EXPECT_TRUE(Sync().ok());
  EXPECT_TRUE(grouped->last_run_fused());
  return ToHost(dy);
}

// The producer warpgroup (the warp-specialized kernel): the same wgmmas in the same order as the default, so the
// same bits, one bf16 pass and split, and one pass against the CPU. Stacked outs of 2 x 320 (a partial third
// column tile, part 1 starting inside a tile); tiles of 37, 128, 128, 44, 64, 65 and 1 rows (one or two consumer
// warpgroups with rows); in = 640 (10 K steps: every ring wraps); a group scale of 255 (NaN) and one above 128
// (the slow dequantization).
TEST_F(CudaTest, GroupedExpertGemmProducerWarpgroupMatchesWeightTile) {
  if (!DeviceIsSm90()) GTEST_SKIP() << "the fused kernel needs compute capability 9.0";
  const int64_t inter = 320, in = 640, experts = 6;
  const std::vector<int64_t> offsets = Offsets({37, 0, 300, 64, 65, 1});
  const int64_t rows = offsets.back();
  Experts w1(Format::kMxfp4, experts, inter, in, rng_), w3(Format::kMxfp4, experts, inter, in, rng_);
  w1.SetScale(2, 7 * (in / 32) + 3, 255);
  w3.SetScale(4, 9 * (in / 32) + 18, 131);
  const auto x = Normal(static_cast<size_t>(rows * in), rng_);
  auto dx = ToDevice(x);
  const cuda::HostExpertWeights stacked[] = {w1.Host(), w3.Host()};
  auto run = [&](bool split, bool producer) {
    return RunFusedTwice(
        {.max_weight_elements = 2 * inter * in, .lanes = 1, .split_x = split, .producer_warpgroup = producer}, stacked,
        dx.get(), offsets, static_cast<size_t>(rows * 2 * inter));
  };
  for (const bool split : {false, true}) {
    SCOPED_TRACE(split ? "split x" : "one bf16 pass");
    const std::vector<float> reference = run(split, false), y = run(split, true);
    if (!split) {
      for (int64_t r = offsets[2]; r < offsets[3]; ++r) EXPECT_TRUE(std::isnan(y[r * 2 * inter + 7])) << "row " << r;
      ExpectMatchesCpu({&w1, &w3}, x, offsets, y);
    }
    int64_t differ = 0;
    for (size_t i = 0; i < y.size(); ++i) {
      if (std::memcmp(&y[i], &reference[i], sizeof(float)) != 0 && differ++ < 5) {
        ADD_FAILURE() << "y[" << i / (2 * inter) << "][" << i % (2 * inter) << "] " << y[i] << " vs the default "
                      << reference[i];
      }
    }
    EXPECT_EQ(differ, 0);
  }
}

// Wide tiles (the weights as the wgmma A operand, up to 256 rows of an expert a block): against the CPU, and both
// x forms against the weight-tile kernel (the same products, summed in another order). Experts of 37, 0, 300 (a
// tile of 256 and one of 44), 356 (256 + 100), 130, 170, 256, 193 and 1 rows: N = 256, 64, 128, 160, 192 and 224
// on the wide kernel, the experts of 37 and 1 rows (one weight tile: the tile of 1 row reads past x's end) on the
// weight-tile kernel's launch after it; a group scale of 255 (NaN) and one above 128 (the slow dequantization).
// In = 640 (10 K steps: the x ring wraps, the loop's last round of four steps is half) with stacked outs of
// 2 x 320 (5 column tiles of 128, part 1 starting inside the third), and in = 512 (8 steps: whole rounds) with
// 2 x 321 (part 1 starting at an odd column, y's rows 8-byte aligned only).
TEST_F(CudaTest, GroupedExpertGemmWideTilesMatchCpu) {
  if (!DeviceIsSm90()) GTEST_SKIP() << "the fused kernel needs compute capability 9.0";
  const int64_t experts = 9;
  const std::vector<int64_t> offsets = Offsets({37, 0, 300, 356, 130, 170, 256, 193, 1});
  const int64_t rows = offsets.back();
  for (const auto& [in, inter] : {std::pair<int64_t, int64_t>{640, 320}, {512, 321}}) {
    Experts w1(Format::kMxfp4, experts, inter, in, rng_), w3(Format::kMxfp4, experts, inter, in, rng_);
    w1.SetScale(2, 7 * (in / 32) + 3, 255);
    w3.SetScale(5, 9 * (in / 32) + 18, 131);
    const auto x = Normal(static_cast<size_t>(rows * in), rng_);
    auto dx = ToDevice(x);
    const cuda::HostExpertWeights stacked[] = {w1.Host(), w3.Host()};
    auto run = [&](bool split, bool wide) {
      return RunFusedTwice({.max_weight_elements = 2 * inter * in, .lanes = 1, .split_x = split, .wide_tiles = wide},
                           stacked, dx.get(), offsets, static_cast<size_t>(rows * 2 * inter));
    };
    for (const bool split : {false, true}) {
      const std::vector<float> reference = run(split, false);
      SCOPED_TRACE(absl::StrCat("in ", in, ", inter ", inter, split ? ", split x" : ", one bf16 pass"));
      const std::vector<float> y = run(split, true);
      // Expert 2's weight row 7 of w1 is NaN for all its rows (ExpectMatchesCpu accepts NaN where the CPU has it).
      for (int64_t r = offsets[2]; r < offsets[3]; ++r) EXPECT_TRUE(std::isnan(y[r * 2 * inter + 7])) << "row " << r;
      if (!split) ExpectMatchesCpu({&w1, &w3}, x, offsets, y);
      double num = 0.0, den = 0.0;
      for (size_t i = 0; i < reference.size(); ++i) {
        if (std::isnan(reference[i])) {
          EXPECT_TRUE(std::isnan(y[i])) << i;
          continue;
        }
        ASSERT_TRUE(std::isfinite(y[i])) << "y[" << i / (2 * inter) << "][" << i % (2 * inter) << "]";
        num += std::pow(static_cast<double>(y[i]) - reference[i], 2);
        den += std::pow(static_cast<double>(reference[i]), 2);
      }
      EXPECT_LT(std::sqrt(num / den), 1e-6) << "wide tiles vs the weight tile";
    }
  }
}

// Weights dequantized into the wgmma A fragments (register_weights): against the CPU, and split x against the
// weight-tile kernel's split result. Stacked outs of 2 x 320: a 640-column tile row (a partial third tile, and
// part 1 starting inside a thread's rows); tiles of 37, 128, 128, 44, 64, 65 and 1 rows (N = 64 and N = 128);
// in = 384 (6 K steps: the x stages wrap); a group scale of 255 (NaN) and one above 128 (the slow path).
TEST_F(CudaTest, GroupedExpertGemmRegisterWeightsMatchesCpu) {
  if (!DeviceIsSm90()) GTEST_SKIP() << "the fused kernel needs compute capability 9.0";
  const int64_t inter = 320, in = 384, experts = 6;
  const std::vector<int64_t> offsets = Offsets({37, 0, 300, 64, 65, 1});
  const int64_t rows = offsets.back();
  Experts w1(Format::kMxfp4, experts, inter, in, rng_), w3(Format::kMxfp4, experts, inter, in, rng_);
  w1.SetScale(2, 7 * (in / 32) + 3, 255);
  w3.SetScale(2, 9 * (in / 32) + 5, 131);
  const auto x = Normal(static_cast<size_t>(rows * in), rng_);
  auto dx = ToDevice(x);
  const cuda::HostExpertWeights stacked[] = {w1.Host(), w3.Host()};
  auto run = [&](bool split, bool registers) {
    return RunFusedTwice(
        {.max_weight_elements = 2 * inter * in, .lanes = 1, .split_x = split, .register_weights = registers}, stacked,
        dx.get(), offsets, static_cast<size_t>(rows * 2 * inter));
  };
  const std::vector<float> y = run(false, true);
  // Expert 2's weight row 7 of w1 is NaN for all its rows (ExpectMatchesCpu accepts NaN where the CPU has it).
  for (int64_t r = offsets[2]; r < offsets[3]; ++r) EXPECT_TRUE(std::isnan(y[r * 2 * inter + 7])) << "row " << r;
  ExpectMatchesCpu({&w1, &w3}, x, offsets, y);
  const std::vector<float> split_tile = run(true, false), split_registers = run(true, true);
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < split_tile.size(); ++i) {
    if (std::isnan(split_tile[i])) {
      EXPECT_TRUE(std::isnan(split_registers[i])) << i;
      continue;
    }
    num += std::pow(static_cast<double>(split_registers[i]) - split_tile[i], 2);
    den += std::pow(static_cast<double>(split_tile[i]), 2);
  }
  EXPECT_LT(std::sqrt(num / den), 1e-6) << "split x: register weights vs the weight tile";
}

// ExpertInput: x gathered from token rows, or the SwiGLU of a stacked gate | up output, on the way in. On both
// paths (fused, lanes) and one pass or split, the same bits as materializing x in f32 (GatherRows /
// SwiGluStacked) and running on it.
TEST_F(CudaTest, GroupedExpertGemmDerivedInputsMatchTwoSteps) {
  const int64_t out = 256, in = 256, experts = 3, tokens = 50;
  const std::vector<int64_t> offsets = Offsets({70, 0, 80});
  const int64_t rows = offsets.back();
  const Experts w(Format::kMxfp4, experts, out, in, rng_);
  std::vector<int32_t> gather(static_cast<size_t>(rows));
  std::uniform_int_distribution<int32_t> token(0, tokens - 1);
  for (int32_t& g : gather) g = token(rng_);
  auto dtokens = ToDevice(Normal(static_cast<size_t>(tokens * in), rng_));
  auto dgather = ToDevice(gather);
  // Gate | up values around the clamp (limit 1.5), so the SwiGLU's clamps are exercised.
  std::vector<float> gate_up = Normal(static_cast<size_t>(rows * 2 * in), rng_);
  for (float& v : gate_up) v *= 2.0f;
  auto dgate_up = ToDevice(gate_up);
  const float limit = 1.5f;
  const cuda::HostExpertWeights one[] = {w.Host()};
  // Paths: the weight-tile kernel, the register-weights kernel (its own K order of x), the lanes.
  for (const auto& [fused, registers] : {std::pair{true, false}, {true, true}, {false, false}}) {
    for (const bool split : {false, true}) {
      SCOPED_TRACE(::testing::Message() << (fused ? "fused allowed" : "lanes") << (registers ? ", register weights" : "")
                                        << (split ? ", split x" : ""));
      auto grouped = Must(cuda::GroupedExpertGemm::Create({.max_weight_elements = out * in,
                                                           .lanes = 2,
                                                           .split_x = split,
                                                           .fused_mxfp4 = fused,
                                                           .register_weights = registers}));
      auto dx = Poisoned<float>(static_cast<size_t>(rows * in));
      auto dy_ref = Poisoned<float>(static_cast<size_t>(rows * out));
      auto dy = Poisoned<float>(static_cast<size_t>(rows * out));
      // Gathered.
      TANDEM_ASSERT_OK(cuda::GatherRows(dtokens.get(), dgather.get(), rows, in, dx.get()));
      TANDEM_ASSERT_OK(grouped->Run(one, dx.get(), offsets, dy_ref.get()));
      TANDEM_ASSERT_OK(grouped->Run(one, cuda::ExpertInput::Gathered(dtokens.get(), dgather.get()), offsets, dy.get()));
      TANDEM_ASSERT_OK(Sync());
      EXPECT_EQ(grouped->last_run_fused(), fused && DeviceIsSm90());
      EXPECT_EQ(ToHost(dy), ToHost(dy_ref)) << "gathered";
      // SwiGLU.
      TANDEM_ASSERT_OK(cuda::SwiGluStacked(dgate_up.get(), rows, in, limit, dx.get()));
      TANDEM_ASSERT_OK(grouped->Run(one, dx.get(), offsets, dy_ref.get()));
      TANDEM_ASSERT_OK(grouped->Run(one, cuda::ExpertInput::SwiGlu(dgate_up.get(), limit), offsets, dy.get()));
      TANDEM_ASSERT_OK(Sync());
      EXPECT_EQ(ToHost(dy), ToHost(dy_ref)) << "SwiGLU";
    }
  }
  auto grouped = Must(cuda::GroupedExpertGemm::Create({.max_weight_elements = out * in}));
  auto dy = Poisoned<float>(static_cast<size_t>(rows * out));
  cuda::ExpertInput both = cuda::ExpertInput::Gathered(dgate_up.get(), dgather.get());
  both.swiglu_limit = limit;
  EXPECT_FALSE(grouped->Run(one, both, offsets, dy.get()).ok()) << "gathered and SwiGLU at once";
}

// split_x (x as bf16 hi + lo) on both paths: every output within 3e-5 of the f32-x result (relative to
// sum |x w|), and its error well under the one-bf16 run's (which misses lo's product: ~2^-9 relative per term).
TEST_F(CudaTest, GroupedExpertGemmSplitXMatchesF32) {
  const int64_t out = 256, in = 512;
  const std::vector<int64_t> offsets = Offsets({130, 64, 0, 65, 3});
  const int64_t rows = offsets.back(), experts = 5;
  const Experts w(Format::kMxfp4, experts, out, in, rng_);
  const auto x = Normal(static_cast<size_t>(rows * in), rng_);
  auto dx = ToDevice(x);
  std::vector<float> exact(static_cast<size_t>(rows * out)), magnitude(exact.size());
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t row0 = offsets[e], n = offsets[e + 1] - offsets[e];
    if (n == 0) continue;
    QuantizedLinear(x.data() + row0 * in, n, w.View(static_cast<size_t>(e)), exact.data() + row0 * out);
    std::vector<float> weight(static_cast<size_t>(out * in));
    DequantizeRows(w.View(static_cast<size_t>(e)), 0, out, weight.data());
    for (int64_t r = row0; r < row0 + n; ++r) {
      for (int64_t o = 0; o < out; ++o) {
        double m = 0.0;
        for (int64_t k = 0; k < in; ++k) m += std::fabs(static_cast<double>(x[r * in + k]) * weight[o * in + k]);
        magnitude[r * out + o] = static_cast<float>(m);
      }
    }
  }
  const cuda::HostExpertWeights one[] = {w.Host()};
  for (const bool fused : {true, false}) {
    SCOPED_TRACE(fused ? "fused allowed" : "lanes");
    double error[2] = {0.0, 0.0};  // squared, [split, one bf16]
    for (const bool split : {true, false}) {
      auto grouped = Must(cuda::GroupedExpertGemm::Create(
          {.max_weight_elements = out * in, .lanes = 2, .split_x = split, .fused_mxfp4 = fused}));
      auto dy = Poisoned<float>(static_cast<size_t>(rows * out));
      TANDEM_ASSERT_OK(grouped->Run(one, dx.get(), offsets, dy.get()));
      TANDEM_ASSERT_OK(Sync());
      EXPECT_EQ(grouped->last_run_fused(), fused && DeviceIsSm90());
      const auto y = ToHost(dy);
      int64_t bad = 0;
      for (size_t i = 0; i < y.size(); ++i) {
        const double diff = static_cast<double>(y[i]) - exact[i];
        error[split ? 0 : 1] += diff * diff;
        if (split && !(std::fabs(diff) <= 3e-5 * magnitude[i]) && bad++ < 5) {
          ADD_FAILURE() << "y[" << i / out << "][" << i % out << "] split " << y[i] << " f32 " << exact[i] << " (sum |xw| "
                        << magnitude[i] << ")";
        }
      }
      EXPECT_EQ(bad, 0);
    }
    EXPECT_LT(error[0], error[1] / 256) << "the lo part's product is missing";
  }
}

// A group scale of 255 (NaN) makes its weight row's outputs NaN for every row, as on the CPU; a scale of 0
// (2^-127) is a value like any other. Fused on Hopper.
TEST_F(CudaTest, GroupedExpertGemmScaleEdges) {
  const int64_t out = 256, in = 128;
  Experts w(Format::kMxfp4, 1, out, in, rng_);
  w.SetScale(0, 5 * (in / 32) + 1, 255);
  w.SetScale(0, 6 * (in / 32) + 2, 0);
  const std::vector<int64_t> offsets = {0, 3};
  const auto x = Normal(static_cast<size_t>(3 * in), rng_);
  auto dx = ToDevice(x);
  auto grouped = Must(cuda::GroupedExpertGemm::Create({.max_weight_elements = out * in, .lanes = 1}));
  auto dy = Poisoned<float>(static_cast<size_t>(3 * out));
  const cuda::HostExpertWeights one[] = {w.Host()};
  TANDEM_ASSERT_OK(grouped->Run(one, dx.get(), offsets, dy.get()));
  TANDEM_ASSERT_OK(Sync());
  EXPECT_EQ(grouped->last_run_fused(), DeviceIsSm90());
  std::vector<float> y = ToHost(dy);
  for (int64_t r = 0; r < 3; ++r) {
    EXPECT_TRUE(std::isnan(y[r * out + 5])) << "row " << r;
    y[r * out + 5] = 0.0f;  // the rest against the CPU, which agrees on NaN there
  }
  std::vector<float> cpu(y.size());
  QuantizedLinear(x.data(), 3, w.View(0), cpu.data());
  for (int64_t r = 0; r < 3; ++r) {
    EXPECT_TRUE(std::isnan(cpu[r * out + 5]));
    cpu[r * out + 5] = 0.0f;
  }
  // bf16 x against the CPU's f32 x: ~2^-9 relative per term, so a relative L2 of a few 1e-3.
  EXPECT_LT(RelativeL2(y, cpu), 1e-2);
}

// Shapes off the fast path: in % 8 != 0 (padded bf16 row blocks) and out = 42 (y blocks not 16-byte aligned,
// staged and copied); FP8 only (MXFP4 needs in % 32 == 0).
TEST_F(CudaTest, GroupedExpertGemmUnalignedShapes) {
  const int64_t out = 42, in = 100;
  const std::vector<int64_t> offsets = Offsets({37, 1, 0, 300});
  const Experts w(Format::kFp8Block, 4, out, in, rng_);
  const auto x = Normal(static_cast<size_t>(offsets.back() * in), rng_);
  auto grouped = Must(cuda::GroupedExpertGemm::Create({.max_weight_elements = out * in, .lanes = 1}));
  auto dx = ToDevice(x);
  auto dy = Poisoned<float>(static_cast<size_t>(offsets.back() * out));
  const cuda::HostExpertWeights one[] = {w.Host()};
  TANDEM_ASSERT_OK(grouped->Run(one, dx.get(), offsets, dy.get()));
  TANDEM_ASSERT_OK(Sync());
  ExpectMatchesCpu({&w}, x, offsets, ToHost(dy));
}

TEST_F(CudaTest, GroupedExpertGemmRejectsBadInput) {
  const Experts w(Format::kMxfp4, 2, 64, 64, rng_);
  auto grouped = Must(cuda::GroupedExpertGemm::Create({.max_weight_elements = 64 * 64, .lanes = 1}));
  auto dx = Poisoned<float>(64 * 4);
  auto dy = Poisoned<float>(64 * 4);
  const cuda::HostExpertWeights one[] = {w.Host()};
  const std::vector<int64_t> wrong_count = {0, 4}, decreasing = {0, 3, 2}, good = {0, 1, 4};
  EXPECT_FALSE(grouped->Run(one, dx.get(), wrong_count, dy.get()).ok());
  EXPECT_FALSE(grouped->Run(one, dx.get(), decreasing, dy.get()).ok());
  const cuda::HostExpertWeights two[] = {w.Host(), w.Host()};  // 128 x 64 > max_weight_elements
  EXPECT_FALSE(grouped->Run(two, dx.get(), good, dy.get()).ok());
  TANDEM_ASSERT_OK(grouped->Run(one, dx.get(), std::vector<int64_t>{0, 0, 0}, dy.get()));  // no rows: nothing to do
  // Timing probes: 1..3 only, and only on the fused kernel with x in one pass.
  EXPECT_FALSE(cuda::GroupedExpertGemm::Create({.max_weight_elements = 64 * 64, .timing_probe = 4}).ok());
  EXPECT_FALSE(cuda::GroupedExpertGemm::Create({.max_weight_elements = 64 * 64, .timing_probe = -1}).ok());
  EXPECT_FALSE(
      cuda::GroupedExpertGemm::Create({.max_weight_elements = 64 * 64, .split_x = true, .timing_probe = 1}).ok());
  EXPECT_FALSE(
      cuda::GroupedExpertGemm::Create({.max_weight_elements = 64 * 64, .fused_mxfp4 = false, .timing_probe = 2}).ok());
  TANDEM_ASSERT_OK(cuda::GroupedExpertGemm::Create({.max_weight_elements = 64 * 64, .timing_probe = 3}).status());
  EXPECT_FALSE(cuda::GroupedExpertGemm::Create({.max_weight_elements = 64 * 64, .x_cluster = 3}).ok());
  EXPECT_FALSE(cuda::GroupedExpertGemm::Create({.max_weight_elements = 64 * 64, .x_cluster = 8}).ok());
  EXPECT_FALSE(cuda::GroupedExpertGemm::Create({.max_weight_elements = 64 * 64, .x_cluster = -1}).ok());
  EXPECT_FALSE(
      cuda::GroupedExpertGemm::Create({.max_weight_elements = 64 * 64, .x_cluster = 2, .register_weights = true}).ok());
  EXPECT_FALSE(
      cuda::GroupedExpertGemm::Create({.max_weight_elements = 64 * 64, .x_cluster = 0, .register_weights = true}).ok());
  EXPECT_FALSE(
      cuda::GroupedExpertGemm::Create({.max_weight_elements = 64 * 64, .timing_probe = 1, .register_weights = true}).ok());
  // The producer warpgroup: x by TMA a block, no probe, not with register weights.
  TANDEM_ASSERT_OK(cuda::GroupedExpertGemm::Create({.max_weight_elements = 64 * 64, .producer_warpgroup = true}).status());
  EXPECT_FALSE(
      cuda::GroupedExpertGemm::Create({.max_weight_elements = 64 * 64, .x_cluster = 0, .producer_warpgroup = true}).ok());
  EXPECT_FALSE(
      cuda::GroupedExpertGemm::Create({.max_weight_elements = 64 * 64, .x_cluster = 2, .producer_warpgroup = true}).ok());
  EXPECT_FALSE(
      cuda::GroupedExpertGemm::Create({.max_weight_elements = 64 * 64, .timing_probe = 2, .producer_warpgroup = true}).ok());
  EXPECT_FALSE(cuda::GroupedExpertGemm::Create(
                   {.max_weight_elements = 64 * 64, .register_weights = true, .producer_warpgroup = true})
                   .ok());
  // Wide tiles: x by TMA a block, no probe, neither of the other two forms.
  TANDEM_ASSERT_OK(cuda::GroupedExpertGemm::Create({.max_weight_elements = 64 * 64, .wide_tiles = true}).status());
  EXPECT_FALSE(cuda::GroupedExpertGemm::Create({.max_weight_elements = 64 * 64, .x_cluster = 0, .wide_tiles = true}).ok());
  EXPECT_FALSE(cuda::GroupedExpertGemm::Create({.max_weight_elements = 64 * 64, .x_cluster = 2, .wide_tiles = true}).ok());
  EXPECT_FALSE(cuda::GroupedExpertGemm::Create({.max_weight_elements = 64 * 64, .timing_probe = 1, .wide_tiles = true}).ok());
  EXPECT_FALSE(
      cuda::GroupedExpertGemm::Create({.max_weight_elements = 64 * 64, .register_weights = true, .wide_tiles = true}).ok());
  EXPECT_FALSE(
      cuda::GroupedExpertGemm::Create({.max_weight_elements = 64 * 64, .producer_warpgroup = true, .wide_tiles = true})
          .ok());
}

}  // namespace
}  // namespace tandem::kernels
