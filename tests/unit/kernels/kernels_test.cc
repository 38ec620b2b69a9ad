// CPU kernels against plain loops and against their mathematical properties.
#include "common/kernels/kernels.h"

#include <cmath>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "common/core/dtype.h"
#include "common/model/config.h"
#include "common/model/forward.h"

namespace tandem::kernels {
namespace {

std::vector<float> Random(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

double MaxRelError(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = 0, norm = 1e-30;
  for (size_t i = 0; i < a.size(); ++i) {
    worst = std::max(worst, std::fabs(static_cast<double>(a[i]) - b[i]));
    norm = std::max(norm, std::fabs(static_cast<double>(b[i])));
  }
  return worst / norm;
}

TEST(Kernels, LinearMatchesReferenceInBothModes) {
  SetThreads(2);
  for (int64_t rows : {1, 3, 17}) {
    const int64_t in = 300, out = 129;
    const auto x = Random(rows * in, 1), w = Random(out * in, 2);
    std::vector<float> want(rows * out), got(rows * out);
    LinearReference(x.data(), rows, in, w.data(), out, want.data());
    for (bool deterministic : {false, true}) {
      SetDeterministic(deterministic);
      Linear(x.data(), rows, in, w.data(), out, got.data());
      EXPECT_LT(MaxRelError(got, want), 1e-5) << "rows " << rows << " deterministic " << deterministic;
    }
  }
  SetDeterministic(false);
}

TEST(Kernels, DeterministicLinearIsBatchInvariant) {
  SetDeterministic(true);
  const int64_t in = 259, out = 67;
  const auto x = Random(40 * in, 3), w = Random(out * in, 4);
  std::vector<float> all(40 * out), one(out);
  Linear(x.data(), 40, in, w.data(), out, all.data());
  for (int64_t r = 0; r < 40; ++r) {
    Linear(x.data() + r * in, 1, in, w.data(), out, one.data());
    for (int64_t o = 0; o < out; ++o) ASSERT_EQ(one[o], all[r * out + o]) << r << "," << o;
  }
  SetDeterministic(false);
}

TEST(Kernels, QuantizedLinearEqualsDequantizedDense) {
  const int64_t out = 600, in = 256, rows = 5;  // more rows than one 512-row block
  const auto w = Random(out * in, 5, 0.1f), x = Random(rows * in, 6);
  std::vector<uint8_t> packed(out * in / 2), mx_scales(out * in / 32), codes(out * in), scales(5 * 2);
  QuantizeMxfp4(w, out, in, packed, mx_scales);
  QuantizeFp8Blocks(w, out, in, codes, scales);
  const QuantizedWeight formats[] = {{QuantizedWeight::Format::kMxfp4, packed.data(), mx_scales.data(), out, in},
                                     {QuantizedWeight::Format::kFp8Block, codes.data(), scales.data(), out, in}};
  for (const auto& q : formats) {
    std::vector<float> dense(out * in), want(rows * out), got(rows * out);
    DequantizeRows(q, 0, out, dense.data());
    LinearReference(x.data(), rows, in, dense.data(), out, want.data());
    for (bool deterministic : {false, true}) {
      SetDeterministic(deterministic);
      QuantizedLinear(x.data(), rows, q, got.data());
      EXPECT_LT(MaxRelError(got, want), 1e-5);
    }
  }
  SetDeterministic(false);
  // MXFP4 and FP8 approximate the same weights.
  std::vector<float> a(out * in), b(out * in);
  DequantizeRows(formats[0], 0, out, a.data());
  DequantizeRows(formats[1], 0, out, b.data());
  EXPECT_LT(MaxRelError(a, w), 0.3);
  EXPECT_LT(MaxRelError(b, w), 0.07);
}

TEST(Kernels, HadamardIsOrthogonalAndSylvesterOrdered) {
  std::vector<float> e(128, 0.0f);
  e[5] = 1.0f;
  Hadamard(e.data(), 128);
  for (int j = 0; j < 128; ++j) {
    const float sign = (__builtin_popcount(5 & j) % 2) ? -1.0f : 1.0f;
    EXPECT_FLOAT_EQ(e[j], sign / std::sqrt(128.0f));
  }
  auto x = Random(128, 7);
  auto y = x;
  Hadamard(y.data(), 128);
  Hadamard(y.data(), 128);  // H/sqrt(n) is its own inverse
  EXPECT_LT(MaxRelError(y, x), 1e-6);
}

TEST(Kernels, RopeInverseUndoesRope) {
  const auto inv = model::RopeInverseFrequencies(64, 10000.0, nullptr);
  auto x = Random(2 * 512, 8);
  auto y = x;
  const int64_t positions[] = {0, 777};
  ApplyRope(y.data(), 2, 512, 1, 512, 448, 64, positions, inv.data(), false);
  for (int i = 0; i < 448; ++i) EXPECT_EQ(y[512 + i], x[512 + i]);  // only the last 64 dims turn
  EXPECT_NE(y[512 + 448], x[512 + 448]);
  for (int i = 0; i < 512; ++i) EXPECT_FLOAT_EQ(y[i], x[i]) << "position 0 is the identity";
  ApplyRope(y.data(), 2, 512, 1, 512, 448, 64, positions, inv.data(), true);
  EXPECT_LT(MaxRelError(y, x), 1e-5);
}

TEST(Kernels, YarnCorrectionRangeOfTheRealConfig) {
  // reference/dsv4-model.md §2.4: low = 15, high = 25 for theta 160000, factor 16, original 65536.
  model::RopeScaling yarn{16.0, 32.0, 1.0, 65536};
  const auto plain = model::RopeInverseFrequencies(64, 160000.0, nullptr);
  const auto scaled = model::RopeInverseFrequencies(64, 160000.0, &yarn);
  for (int i = 0; i <= 15; ++i) EXPECT_DOUBLE_EQ(scaled[i], plain[i]) << i;
  for (int i = 25; i < 32; ++i) EXPECT_DOUBLE_EQ(scaled[i], plain[i] / 16.0) << i;
  EXPECT_DOUBLE_EQ(scaled[20], plain[20] / 16.0 * 0.5 + plain[20] * 0.5);
}

TEST(Kernels, KvEntryLayoutAndError) {
  const KvFormat format;
  EXPECT_EQ(format.entry_bytes(), 584);
  EXPECT_EQ(format.data_bytes(), 576);
  auto x = Random(512, 9, 3.0f);
  x[3] = 1000.0f;  // one large value only coarsens its own 64-wide tile
  std::vector<uint8_t> entry(584);
  QuantizeKvEntry(format, x.data(), entry.data(), entry.data() + 576);
  std::vector<float> back(512);
  DequantizeKvEntry(format, entry.data(), entry.data() + 576, back.data());
  for (int t = 0; t < 7; ++t) {
    float amax = 0;
    for (int i = 0; i < 64; ++i) amax = std::max(amax, std::fabs(x[t * 64 + i]));
    EXPECT_EQ(Ue8m0ToFloat(entry[576 + t]), std::exp2(std::ceil(std::log2(amax / 448.0f)))) << "tile " << t;
    for (int i = 0; i < 64; ++i) EXPECT_LE(std::fabs(back[t * 64 + i] - x[t * 64 + i]), amax / 16) << t << "," << i;
  }
  EXPECT_EQ(entry[583], 0) << "pad byte";
  for (int i = 448; i < 512; ++i) EXPECT_EQ(back[i], RoundBf16(x[i]));
  std::vector<float> key(128), key_back(128);
  for (int i = 0; i < 128; ++i) key[i] = std::sin(i * 0.3f) * 5;
  std::vector<uint8_t> key_entry(IndexerKeyBytes(128));
  QuantizeIndexerKey(key.data(), 128, key_entry.data());
  DequantizeIndexerKey(key_entry.data(), 128, key_back.data());
  EXPECT_LT(MaxRelError(key_back, key), 1.0 / 16);
}

}  // namespace
}  // namespace tandem::kernels
