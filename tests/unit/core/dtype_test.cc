#include "common/core/dtype.h"

#include <cmath>
#include <vector>

#include <gtest/gtest.h>

namespace tandem {
namespace {

TEST(DType, NamesRoundTrip) {
  for (auto name : {"F32", "BF16", "F8_E4M3", "F8_E8M0", "I8", "I64", "U8"}) {
    auto dtype = DTypeFromName(name);
    ASSERT_TRUE(dtype.has_value()) << name;
    EXPECT_EQ(DTypeName(*dtype), name);
  }
  EXPECT_FALSE(DTypeFromName("F4_E2M1X").has_value());
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
}

TEST(DType, Bf16RoundsToNearestEven) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  // 1 + 2^-8 is exactly between two bf16 values: ties go to the even mantissa (1.0).
  EXPECT_EQ(FloatToBf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  EXPECT_EQ(FloatToBf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(NAN))));
}

TEST(DType, Fp8E4M3KnownValues) {
  EXPECT_EQ(Fp8E4M3ToFloat(0x00), 0.0f);
  EXPECT_EQ(Fp8E4M3ToFloat(0x38), 1.0f);
  EXPECT_EQ(Fp8E4M3ToFloat(0x7e), 448.0f);
  EXPECT_EQ(Fp8E4M3ToFloat(0x01), std::ldexp(1.0f, -9));
  EXPECT_TRUE(std::isnan(Fp8E4M3ToFloat(0x7f)));
  EXPECT_EQ(Fp8E4M3ToFloat(0xb8), -1.0f);
  EXPECT_EQ(FloatToFp8E4M3(1000.0f), 0x7e);   // saturates
  EXPECT_EQ(FloatToFp8E4M3(-1000.0f), 0xfe);
  EXPECT_EQ(FloatToFp8E4M3(1.0625f), 0x38);   // tie between 1.0 and 1.125 goes to even (1.0)
  EXPECT_EQ(FloatToFp8E4M3(1.1875f), 0x3a);   // tie between 1.125 and 1.25 goes to even (1.25)
  for (int code = 0; code < 256; ++code) {
    if ((code & 0x7f) == 0x7f) continue;
    const float v = Fp8E4M3ToFloat(static_cast<uint8_t>(code));
    if (v == 0.0f) continue;
    EXPECT_EQ(FloatToFp8E4M3(v), code) << code;
  }
}

TEST(DType, Ue8m0AndE2m1) {
  EXPECT_EQ(Ue8m0ToFloat(127), 1.0f);
  EXPECT_EQ(Ue8m0ToFloat(120), std::ldexp(1.0f, -7));
  EXPECT_TRUE(std::isnan(Ue8m0ToFloat(255)));
  EXPECT_EQ(Ue8m0CeilPow2(1.0f), 127);
  EXPECT_EQ(Ue8m0CeilPow2(1.5f), 128);
  EXPECT_EQ(Ue8m0CeilPow2(0.25f), 125);
  // Byte 0x2F: low nibble 0xF = -6.0 (element 0), high nibble 0x2 = 1.0 (element 1).
  std::vector<uint8_t> packed(16, 0), scales(1, 127);
  packed[0] = 0x2f;
  std::vector<float> out(32);
  DequantizeMxfp4(packed, scales, 1, 32, out);
  EXPECT_EQ(out[0], -6.0f);
  EXPECT_EQ(out[1], 1.0f);
  EXPECT_EQ(FloatToE2m1(2.5f), 0x4);  // tie between 2 (code 4) and 3 (code 5): even code
  EXPECT_EQ(FloatToE2m1(-7.0f), 0xf);
}

TEST(DType, Fp8BlocksRoundTripWithinHalfUlp) {
  const int64_t rows = 130, cols = 260;  // partial edge blocks on both axes
  std::vector<float> values(rows * cols), back(rows * cols);
  for (int64_t i = 0; i < rows * cols; ++i) values[i] = std::sin(0.1f * i) * (1 + (i % 7) * 10.0f);
  std::vector<uint8_t> codes(rows * cols), scales(2 * 3);
  QuantizeFp8Blocks(values, rows, cols, codes, scales);
  DequantizeFp8Blocks(codes, scales, rows, cols, back);
  for (int64_t i = 0; i < rows * cols; ++i) {
    EXPECT_LE(std::fabs(back[i] - values[i]), std::fabs(values[i]) / 16 + 1e-3f) << i;
  }
}

}  // namespace
}  // namespace tandem
