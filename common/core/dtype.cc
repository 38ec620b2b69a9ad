#include "common/core/dtype.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <limits>

namespace tandem {
namespace {

struct DTypeInfo {
  DType dtype;
  std::string_view name;
  size_t size;
};

constexpr std::array<DTypeInfo, 16> kDTypes = {{
    {DType::kBool, "BOOL", 1},     {DType::kU8, "U8", 1},           {DType::kI8, "I8", 1},
    {DType::kI16, "I16", 2},       {DType::kU16, "U16", 2},         {DType::kF16, "F16", 2},
    {DType::kBF16, "BF16", 2},     {DType::kI32, "I32", 4},         {DType::kU32, "U32", 4},
    {DType::kF32, "F32", 4},       {DType::kF64, "F64", 8},         {DType::kI64, "I64", 8},
    {DType::kU64, "U64", 8},       {DType::kF8E4M3, "F8_E4M3", 1},  {DType::kF8E5M2, "F8_E5M2", 1},
    {DType::kF8E8M0, "F8_E8M0", 1},
}};

std::array<float, 256> MakeFp8Table() {
  std::array<float, 256> table{};
  for (int bits = 0; bits < 256; ++bits) {
    const int sign = bits >> 7;
    const int exponent = (bits >> 3) & 0xf;
    const int mantissa = bits & 0x7;
    float value;
    if (exponent == 0xf && mantissa == 0x7) {
      value = std::numeric_limits<float>::quiet_NaN();
    } else if (exponent == 0) {
      value = std::ldexp(static_cast<float>(mantissa) / 8.0f, -6);
    } else {
      value = std::ldexp(1.0f + static_cast<float>(mantissa) / 8.0f, exponent - 7);
    }
    table[bits] = sign ? -value : value;
  }
  return table;
}

const std::array<float, 256>& Fp8Table() {
  static const std::array<float, 256> table = MakeFp8Table();
  return table;
}

constexpr std::array<float, 8> kE2m1Magnitudes = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};

}  // namespace

std::optional<DType> DTypeFromName(std::string_view name) {
  for (const auto& info : kDTypes) {
    if (info.name == name) return info.dtype;
  }
  return std::nullopt;
}

std::string_view DTypeName(DType dtype) {
  for (const auto& info : kDTypes) {
    if (info.dtype == dtype) return info.name;
  }
  return "?";
}

size_t DTypeSize(DType dtype) {
  for (const auto& info : kDTypes) {
    if (info.dtype == dtype) return info.size;
  }
  return 0;
}

uint16_t FloatToBf16(float value) {
  uint32_t bits = std::bit_cast<uint32_t>(value);
  if (std::isnan(value)) return static_cast<uint16_t>((bits >> 16) | 0x40);
  const uint32_t rounding = 0x7fff + ((bits >> 16) & 1);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

float Bf16ToFloat(uint16_t bits) { return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16); }

float Fp8E4M3ToFloat(uint8_t bits) { return Fp8Table()[bits]; }

uint8_t FloatToFp8E4M3(float value) {
  if (std::isnan(value)) return 0x7f;
  const uint8_t sign = std::signbit(value) ? 0x80 : 0x00;
  float magnitude = std::min(std::fabs(value), kFp8E4M3Max);
  // The 127 non-negative finite codes are monotonic in value: binary search, then round to even.
  const auto& table = Fp8Table();
  int lo = 0, hi = 0x7e;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table[mid] <= magnitude) lo = mid; else hi = mid - 1;
  }
  int code = lo;
  if (code < 0x7e) {
    const float below = table[code], above = table[code + 1];
    const float to_below = magnitude - below, to_above = above - magnitude;
    if (to_above < to_below || (to_above == to_below && (code & 1))) code += 1;
  }
  return static_cast<uint8_t>(sign | code);
}

float Ue8m0ToFloat(uint8_t bits) {
  if (bits == 0xff) return std::numeric_limits<float>::quiet_NaN();
  return std::ldexp(1.0f, static_cast<int>(bits) - 127);
}

uint8_t Ue8m0CeilPow2(float value) {
  if (!(value > 0.0f)) return 0;
  int exponent = 0;
  const float mantissa = std::frexp(value, &exponent);  // value = mantissa * 2^exponent, mantissa in [0.5, 1)
  int power = (mantissa == 0.5f) ? exponent - 1 : exponent;
  power = std::clamp(power, -127, 127);
  return static_cast<uint8_t>(power + 127);
}

float E2m1ToFloat(uint8_t code) {
  const float magnitude = kE2m1Magnitudes[code & 0x7];
  return (code & 0x8) ? -magnitude : magnitude;
}

uint8_t FloatToE2m1(float value) {
  const uint8_t sign = std::signbit(value) ? 0x8 : 0x0;
  const float magnitude = std::min(std::fabs(value), 6.0f);  // saturate (also +-inf)
  int best = 0;
  float best_distance = std::numeric_limits<float>::infinity();
  for (int code = 0; code < 8; ++code) {
    const float distance = std::fabs(kE2m1Magnitudes[code] - magnitude);
    if (distance < best_distance || (distance == best_distance && (code & 1) == 0)) {
      best = code;
      best_distance = distance;
    }
  }
  return static_cast<uint8_t>(sign | best);
}

void QuantizeFp8Blocks(std::span<const float> values, int64_t rows, int64_t cols,
                       std::span<uint8_t> codes, std::span<uint8_t> scales) {
  const int64_t block_rows = (rows + kFp8WeightBlock - 1) / kFp8WeightBlock;
  const int64_t block_cols = (cols + kFp8WeightBlock - 1) / kFp8WeightBlock;
  for (int64_t br = 0; br < block_rows; ++br) {
    for (int64_t bc = 0; bc < block_cols; ++bc) {
      const int64_t r0 = br * kFp8WeightBlock, r1 = std::min(rows, r0 + kFp8WeightBlock);
      const int64_t c0 = bc * kFp8WeightBlock, c1 = std::min(cols, c0 + kFp8WeightBlock);
      float amax = 0.0f;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(values[r * cols + c]));
      const uint8_t scale_bits = Ue8m0CeilPow2(std::max(amax / kFp8E4M3Max, 1e-30f));
      const float inverse = 1.0f / Ue8m0ToFloat(scale_bits);
      scales[br * block_cols + bc] = scale_bits;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) codes[r * cols + c] = FloatToFp8E4M3(values[r * cols + c] * inverse);
    }
  }
}

void DequantizeFp8Blocks(std::span<const uint8_t> codes, std::span<const uint8_t> scales,
                         int64_t rows, int64_t cols, std::span<float> out) {
  const int64_t block_cols = (cols + kFp8WeightBlock - 1) / kFp8WeightBlock;
  const auto& table = Fp8Table();
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* scale_row = scales.data() + (r / kFp8WeightBlock) * block_cols;
    for (int64_t c = 0; c < cols; ++c) {
      out[r * cols + c] = table[codes[r * cols + c]] * Ue8m0ToFloat(scale_row[c / kFp8WeightBlock]);
    }
  }
}

void QuantizeMxfp4(std::span<const float> values, int64_t rows, int64_t cols,
                   std::span<uint8_t> packed, std::span<uint8_t> scales) {
  const int64_t groups = cols / kMxfp4Block;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* group = values.data() + r * cols + g * kMxfp4Block;
      float amax = 0.0f;
      for (int i = 0; i < kMxfp4Block; ++i) amax = std::max(amax, std::fabs(group[i]));
      const uint8_t scale_bits = Ue8m0CeilPow2(std::max(amax / 6.0f, 1e-30f));
      const float inverse = 1.0f / Ue8m0ToFloat(scale_bits);
      scales[r * groups + g] = scale_bits;
      uint8_t* out = packed.data() + r * (cols / 2) + g * (kMxfp4Block / 2);
      for (int i = 0; i < kMxfp4Block; i += 2) {
        const uint8_t low = FloatToE2m1(group[i] * inverse);
        const uint8_t high = FloatToE2m1(group[i + 1] * inverse);
        out[i / 2] = static_cast<uint8_t>(low | (high << 4));
      }
    }
  }
}

void DequantizeMxfp4(std::span<const uint8_t> packed, std::span<const uint8_t> scales,
                     int64_t rows, int64_t cols, std::span<float> out) {
  const int64_t groups = cols / kMxfp4Block;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; c += 2) {
      const uint8_t byte = packed[r * (cols / 2) + c / 2];
      const float scale = Ue8m0ToFloat(scales[r * groups + c / kMxfp4Block]);
      out[r * cols + c] = E2m1ToFloat(byte & 0xf) * scale;
      out[r * cols + c + 1] = E2m1ToFloat(byte >> 4) * scale;
    }
  }
}

}  // namespace tandem
