// mHC pre/post and the block-FP8 linear path on the GPU against the CPU forward's own code
// (model::internal::HcPre/HcPost, kernels::QuantizedLinear). Fresh inputs every run.
#include <cmath>
#include <random>
#include <vector>

#include "common/core/dtype.h"
#include "common/kernels/kernels.h"
#include "common/model/layers.h"
#include "tests/gpu/gpu_test_util.h"

namespace tandem::kernels {
namespace {

using testing::AllClose;
using testing::CudaTest;
using testing::Must;
using testing::Normal;
using testing::Poisoned;
using testing::RelativeL2;
using testing::Sync;
using testing::ToDevice;
using testing::ToHost;

model::ModelConfig MhcConfig(int64_t hidden) {
  model::ModelConfig c;
  c.hidden_size = hidden;
  c.hc_mult = 4;
  c.hc_sinkhorn_iters = 20;
  c.hc_eps = 1e-6;
  c.rms_norm_eps = 1e-6;
  return c;
}

cuda::MhcShape ShapeOf(const model::ModelConfig& c) {
  cuda::MhcShape shape;
  shape.streams = c.hc_mult;
  shape.hidden = c.hidden_size;
  shape.sinkhorn_iters = c.hc_sinkhorn_iters;
  shape.hc_eps = c.hc_eps;
  shape.rms_norm_eps = c.rms_norm_eps;
  return shape;
}

// mix has ~unit spread (fn ~ N(0, 1/(M*D)) against x ~ N(0, 1)), so sigmoids and the softmax are not
// saturated and every branch of the Sinkhorn matters. f32 sums in another order than OpenBLAS: ~1e-7.
TEST_F(CudaTest, HcPreMatchesCpu) {
  // 1: decode; 37: a partial token tile; 300: several tiles and fewer K splits.
  for (const int64_t tokens : {int64_t{1}, int64_t{37}, int64_t{300}}) {
    SCOPED_TRACE(::testing::Message() << "tokens " << tokens);
    const auto c = MhcConfig(4096);
    const int64_t MD = c.hc_dim(), mixes = c.hc_mix_dim();
    model::MhcWeights w;
    w.fn = Normal(static_cast<size_t>(mixes * MD), rng_, static_cast<float>(1.0 / std::sqrt(static_cast<double>(MD))));
    w.base = Normal(static_cast<size_t>(mixes), rng_, 0.5f);
    w.scale = Normal(3, rng_, 0.5f);
    for (auto& s : w.scale) s = 1.0f + s;
    const auto x = Normal(static_cast<size_t>(tokens * MD), rng_, 1.5f);
    std::vector<float> y, post, comb;
    model::internal::HcPre(c, w, x, tokens, y, post, comb);

    auto dx = ToDevice(x);
    auto dfn = ToDevice(w.fn);
    auto dbase = ToDevice(w.base);
    auto dscale = ToDevice(w.scale);
    auto dy = Poisoned<float>(y.size());
    auto dpost = Poisoned<float>(post.size());
    auto dcomb = Poisoned<float>(comb.size());
    const auto shape = ShapeOf(c);
    const size_t workspace_bytes = cuda::HcPreWorkspaceBytes(shape, tokens);
    auto workspace = Poisoned<uint8_t>(workspace_bytes);
    TANDEM_ASSERT_OK(cuda::HcPre(shape, {dfn.get(), dbase.get(), dscale.get()}, dx.get(), tokens, dy.get(), dpost.get(),
                                 dcomb.get(), workspace.get(), workspace_bytes));
    TANDEM_ASSERT_OK(Sync());
    EXPECT_TRUE(AllClose(ToHost(dpost), post, 1e-5, 1e-5)) << "post";
    EXPECT_TRUE(AllClose(ToHost(dcomb), comb, 1e-5, 1e-5)) << "comb";
    EXPECT_TRUE(AllClose(ToHost(dy), y, 1e-5, 1e-5)) << "y";
  }
}

// Same products and sums in the same order as the CPU: equal to a few ulps.
TEST_F(CudaTest, HcPostMatchesCpu) {
  const auto c = MhcConfig(4096);
  const int64_t tokens = 37, M = c.hc_mult, D = c.hidden_size;
  const auto out = Normal(static_cast<size_t>(tokens * D), rng_);
  auto post = Normal(static_cast<size_t>(tokens * M), rng_);
  auto comb = Normal(static_cast<size_t>(tokens * M * M), rng_, 0.3f);
  for (auto& p : post) p = 1.0f + 0.5f * p;
  const auto x = Normal(static_cast<size_t>(tokens * M * D), rng_);
  std::vector<float> cpu = x;
  model::internal::HcPost(c, out, post, comb, tokens, cpu);
  auto dout = ToDevice(out);
  auto dpost = ToDevice(post);
  auto dcomb = ToDevice(comb);
  auto dx = ToDevice(x);
  TANDEM_ASSERT_OK(cuda::HcPost(ShapeOf(c), dout.get(), dpost.get(), dcomb.get(), tokens, dx.get()));
  TANDEM_ASSERT_OK(Sync());
  EXPECT_TRUE(AllClose(ToHost(dx), cpu, 1e-6, 1e-6));
}

struct Fp8Weight {
  std::vector<uint8_t> codes, scales;
  int64_t out, in;
  QuantizedWeight View() const { return {QuantizedWeight::Format::kFp8Block, codes.data(), scales.data(), out, in}; }
};

// Random finite e4m3 codes (0x7f/0xff are NaN) and scales 2^-10 .. 2^10 around unit weights.
Fp8Weight RandomFp8(int64_t out, int64_t in, std::mt19937& rng) {
  Fp8Weight w{{}, {}, out, in};
  std::uniform_int_distribution<int> code(0, 255), scale(117, 137);
  w.codes.resize(static_cast<size_t>(out * in));
  for (auto& b : w.codes) {
    do b = static_cast<uint8_t>(code(rng));
    while ((b & 0x7f) == 0x7f);
  }
  w.scales.resize(static_cast<size_t>(((out + 127) / 128) * ((in + 127) / 128)));
  for (auto& s : w.scales) s = static_cast<uint8_t>(scale(rng));
  return w;
}

// e4m3 times a power of two is exact in bf16: the device copy must equal the CPU's f32 dequantization.
TEST_F(CudaTest, Fp8DequantizeIsExact) {
  // (600, 1000): the vector path with partial scale blocks; (130, 1001): the scalar path.
  for (const auto& [out, in] : {std::pair<int64_t, int64_t>{600, 1000}, std::pair<int64_t, int64_t>{130, 1001}}) {
    SCOPED_TRACE(::testing::Message() << "out " << out << " in " << in);
    const auto w = RandomFp8(out, in, rng_);
    auto dcodes = ToDevice(w.codes);
    auto dscales = ToDevice(w.scales);
    auto dst = Poisoned<__nv_bfloat16>(static_cast<size_t>(out * in));
    TANDEM_ASSERT_OK(cuda::DequantizeFp8Block({dcodes.get(), dscales.get(), out, in}, dst.get()));
    TANDEM_ASSERT_OK(Sync());
    const auto bf16 = ToHost(dst);
    std::vector<float> gpu(bf16.size()), cpu(bf16.size());
    for (size_t i = 0; i < bf16.size(); ++i) gpu[i] = __bfloat162float(bf16[i]);
    DequantizeRows(w.View(), 0, out, cpu.data());
    EXPECT_TRUE(AllClose(gpu, cpu, 0.0, 0.0));
  }
}

// The GPU path: x -> bf16, W -> bf16 (exact), cuBLASLt with f32 accumulation. Against the CPU on the same
// bf16-rounded x only the summation order differs: |err| <= 1e-5 * sum_k |x_k w_k| per output. Against the
// CPU on f32 x (the CPU forward's own numerics) the bf16 cast of x costs ~2^-9 / sqrt(3) relative L2.
TEST_F(CudaTest, Fp8LinearMatchesCpu) {
  struct Case {
    int64_t rows, in, out;
  };
  // wq_a at decode and prefill-ish sizes, and a shape with partial 128-blocks on both sides.
  for (const Case c : {Case{1, 4096, 1024}, Case{64, 4096, 1024}, Case{37, 1152, 640}}) {
    SCOPED_TRACE(::testing::Message() << "rows " << c.rows << " in " << c.in << " out " << c.out);
    const auto w = RandomFp8(c.out, c.in, rng_);
    const auto x = Normal(static_cast<size_t>(c.rows * c.in), rng_);
    std::vector<float> x_rounded(x.size());
    for (size_t i = 0; i < x.size(); ++i) x_rounded[i] = RoundBf16(x[i]);

    auto gemm = Must(cuda::Gemm::Create());
    auto dx = ToDevice(x);
    auto dcodes = ToDevice(w.codes);
    auto dscales = ToDevice(w.scales);
    auto dx_bf16 = Poisoned<__nv_bfloat16>(x.size());
    auto dw_bf16 = Poisoned<__nv_bfloat16>(w.codes.size());
    auto dy = Poisoned<float>(static_cast<size_t>(c.rows * c.out));
    auto dy_bf16 = Poisoned<__nv_bfloat16>(static_cast<size_t>(c.rows * c.out));
    TANDEM_ASSERT_OK(cuda::FloatToBf16(dx.get(), static_cast<int64_t>(x.size()), dx_bf16.get()));
    TANDEM_ASSERT_OK(cuda::DequantizeFp8Block({dcodes.get(), dscales.get(), c.out, c.in}, dw_bf16.get()));
    TANDEM_ASSERT_OK(gemm->Linear(dx_bf16.get(), c.rows, c.in, dw_bf16.get(), c.out, dy.get(), cuda::Gemm::Output::kF32));
    TANDEM_ASSERT_OK(
        gemm->Linear(dx_bf16.get(), c.rows, c.in, dw_bf16.get(), c.out, dy_bf16.get(), cuda::Gemm::Output::kBf16));
    TANDEM_ASSERT_OK(Sync());
    const auto gpu = ToHost(dy);

    std::vector<float> cpu_rounded(gpu.size()), cpu_exact(gpu.size()), weight(static_cast<size_t>(c.out * c.in));
    QuantizedLinear(x_rounded.data(), c.rows, w.View(), cpu_rounded.data());
    QuantizedLinear(x.data(), c.rows, w.View(), cpu_exact.data());
    DequantizeRows(w.View(), 0, c.out, weight.data());
    int64_t bad = 0;
    for (int64_t r = 0; r < c.rows; ++r) {
      for (int64_t o = 0; o < c.out; ++o) {
        double magnitude = 0.0;
        for (int64_t k = 0; k < c.in; ++k) magnitude += std::fabs(x_rounded[r * c.in + k] * weight[o * c.in + k]);
        const size_t i = static_cast<size_t>(r * c.out + o);
        if (!(std::fabs(gpu[i] - cpu_rounded[i]) <= 1e-5 * magnitude + 1e-30)) {
          if (bad++ < 5) ADD_FAILURE() << "y[" << r << "][" << o << "] gpu " << gpu[i] << " cpu " << cpu_rounded[i];
        }
      }
    }
    EXPECT_EQ(bad, 0);
    EXPECT_LE(RelativeL2(gpu, cpu_exact), 5e-3) << "vs the f32-activation CPU forward";
    // bf16 output: one more rounding, 2^-9 relative per element.
    const auto half = ToHost(dy_bf16);
    std::vector<float> gpu_bf16(half.size());
    for (size_t i = 0; i < half.size(); ++i) gpu_bf16[i] = __bfloat162float(half[i]);
    EXPECT_TRUE(AllClose(gpu_bf16, gpu, 1e-30, 1.0 / 256)) << "bf16 output vs f32 output";
  }
}

// The serving default (DenseFormat::kBf16x2): x = hi + lo in two bf16s, so against the CPU on f32 x only the
// ~2^-17 residual of the split and the summation order remain: |err| <= 1e-5 * sum_k |x_k w_k| per output and a
// relative L2 far below one bf16 cast's ~1e-3 (which the bound would catch if lo were dropped). Row counts
// take both paths: stacked (one GEMM of 2 * rows, then AddRowHalves) and accumulating (beta = 1).
TEST_F(CudaTest, SplitBf16LinearMatchesTheF32Cpu) {
  struct Case {
    int64_t rows, in, out;
  };
  for (const Case c : {Case{1, 4096, 1024}, Case{64, 1152, 640}, Case{cuda::Gemm::kSplitStackRows, 512, 384},
                       Case{cuda::Gemm::kSplitStackRows + 1, 512, 384}, Case{200, 1024, 512}}) {
    SCOPED_TRACE(::testing::Message() << "rows " << c.rows << " in " << c.in << " out " << c.out);
    const auto w = RandomFp8(c.out, c.in, rng_);
    const auto x = Normal(static_cast<size_t>(c.rows * c.in), rng_);
    auto gemm = Must(cuda::Gemm::Create());
    auto dx = ToDevice(x);
    auto dcodes = ToDevice(w.codes);
    auto dscales = ToDevice(w.scales);
    auto dw = Poisoned<__nv_bfloat16>(w.codes.size());
    auto dxb = Poisoned<__nv_bfloat16>(static_cast<size_t>(cuda::Gemm::SplitScratchElements(c.rows, c.in)));
    auto dyb = Poisoned<float>(static_cast<size_t>(2 * c.rows * c.out));
    auto dy = Poisoned<float>(static_cast<size_t>(c.rows * c.out));
    TANDEM_ASSERT_OK(cuda::DequantizeFp8Block({dcodes.get(), dscales.get(), c.out, c.in}, dw.get()));
    TANDEM_ASSERT_OK(gemm->LinearSplit(dx.get(), c.rows, c.in, dw.get(), c.out, dy.get(), dxb.get(), dyb.get()));
    TANDEM_ASSERT_OK(Sync());
    const auto gpu = ToHost(dy);
    std::vector<float> cpu(gpu.size()), weight(static_cast<size_t>(c.out * c.in));
    QuantizedLinear(x.data(), c.rows, w.View(), cpu.data());
    DequantizeRows(w.View(), 0, c.out, weight.data());
    int64_t bad = 0;
    for (int64_t r = 0; r < c.rows; ++r) {
      for (int64_t o = 0; o < c.out; ++o) {
        double magnitude = 0.0;
        for (int64_t k = 0; k < c.in; ++k) magnitude += std::fabs(x[r * c.in + k] * weight[o * c.in + k]);
        const size_t i = static_cast<size_t>(r * c.out + o);
        if (!(std::fabs(gpu[i] - cpu[i]) <= 1e-5 * magnitude + 1e-30)) {
          if (bad++ < 5) ADD_FAILURE() << "y[" << r << "][" << o << "] gpu " << gpu[i] << " cpu " << cpu[i];
        }
      }
    }
    EXPECT_EQ(bad, 0);
    EXPECT_LE(RelativeL2(gpu, cpu), 5e-5) << "the lo half must count (one bf16 cast alone gives ~1e-3)";
  }
}

// LinearBatched over column blocks of one activation (the grouped wo_a): group g multiplies x[:, g*in:(g+1)*in]
// by weight rows [g*out, (g+1)*out) into y[:, g*out:(g+1)*out], all in one call; against a double reference.
TEST_F(CudaTest, LinearBatchedMatchesPerGroupProducts) {
  for (const int64_t rows : {int64_t{3}, int64_t{64}, int64_t{130}}) {
    const int64_t groups = 4, in = 256, out = 96;
    SCOPED_TRACE(::testing::Message() << "rows " << rows);
    std::vector<float> x = Normal(static_cast<size_t>(rows * groups * in), rng_);
    std::vector<float> w = Normal(static_cast<size_t>(groups * out * in), rng_);
    for (float& v : x) v = RoundBf16(v);
    for (float& v : w) v = RoundBf16(v);
    std::vector<__nv_bfloat16> xb(x.size()), wb(w.size());
    for (size_t i = 0; i < x.size(); ++i) xb[i] = __float2bfloat16_rn(x[i]);
    for (size_t i = 0; i < w.size(); ++i) wb[i] = __float2bfloat16_rn(w[i]);
    auto gemm = Must(cuda::Gemm::Create());
    auto dx = ToDevice(xb);
    auto dw = ToDevice(wb);
    auto dy = Poisoned<float>(static_cast<size_t>(rows * groups * out));
    TANDEM_ASSERT_OK(gemm->LinearBatched(dx.get(), rows, in, groups * in, in, dw.get(), out, out * in, dy.get(),
                                         groups * out, out, groups));
    TANDEM_ASSERT_OK(Sync());
    const auto gpu = ToHost(dy);
    int64_t bad = 0;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t o = 0; o < out; ++o) {
          double sum = 0.0, magnitude = 0.0;
          for (int64_t k = 0; k < in; ++k) {
            const double term = static_cast<double>(x[r * groups * in + g * in + k]) * w[(g * out + o) * in + k];
            sum += term;
            magnitude += std::fabs(term);
          }
          const float got = gpu[static_cast<size_t>(r * groups * out + g * out + o)];
          if (!(std::fabs(got - sum) <= 1e-5 * magnitude + 1e-30) && bad++ < 5) {
            ADD_FAILURE() << "y[" << r << "][" << g * out + o << "] gpu " << got << " want " << sum;
          }
        }
      }
    }
    EXPECT_EQ(bad, 0);
  }
  auto gemm = Must(cuda::Gemm::Create());
  EXPECT_FALSE(gemm->LinearBatched(nullptr, 4, 64, 32, 64, nullptr, 8, 512, nullptr, 8, 8, 2).ok()) << "ldx < in";
}

// accumulate = true adds to y (beta = 1) instead of overwriting it.
TEST_F(CudaTest, GemmAccumulateAddsToY) {
  const int64_t rows = 5, in = 256, out = 128;
  std::vector<float> x = Normal(static_cast<size_t>(rows * in), rng_), w = Normal(static_cast<size_t>(out * in), rng_);
  for (float& v : x) v = RoundBf16(v);
  for (float& v : w) v = RoundBf16(v);
  std::vector<__nv_bfloat16> xb(x.size()), wb(w.size());
  for (size_t i = 0; i < x.size(); ++i) xb[i] = __float2bfloat16_rn(x[i]);
  for (size_t i = 0; i < w.size(); ++i) wb[i] = __float2bfloat16_rn(w[i]);
  const std::vector<float> start = Normal(static_cast<size_t>(rows * out), rng_);
  auto gemm = Must(cuda::Gemm::Create());
  auto dx = ToDevice(xb);
  auto dw = ToDevice(wb);
  auto dy = ToDevice(start);
  TANDEM_ASSERT_OK(gemm->Linear(dx.get(), rows, in, dw.get(), out, dy.get(), cuda::Gemm::Output::kF32, nullptr,
                                /*tune=*/true, /*accumulate=*/true));
  TANDEM_ASSERT_OK(Sync());
  const auto gpu = ToHost(dy);
  std::vector<float> want(start);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t o = 0; o < out; ++o) {
      double sum = 0.0;
      for (int64_t k = 0; k < in; ++k) sum += static_cast<double>(x[r * in + k]) * w[o * in + k];
      want[static_cast<size_t>(r * out + o)] += static_cast<float>(sum);
    }
  }
  EXPECT_TRUE(AllClose(gpu, want, 1e-3, 1e-4));
  EXPECT_FALSE(gemm->Linear(dx.get(), rows, in, dw.get(), out, dy.get(), cuda::Gemm::Output::kBf16, nullptr, true, true).ok())
      << "accumulating into a bf16 output is refused";
}

}  // namespace
}  // namespace tandem::kernels
