// Element types of DSV4 checkpoints and caches: f32, bf16, FP8 e4m3 with ue8m0 power-of-two scales,
// and MXFP4 (e2m1 codes, two per byte, low nibble first, one ue8m0 scale per 32 values).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>

namespace tandem {

enum class DType : uint8_t {
  kBool, kU8, kI8, kI16, kU16, kF16, kBF16, kI32, kU32, kF32, kF64, kI64, kU64,
  kF8E4M3, kF8E5M2, kF8E8M0,
};

// Safetensors name ("F8_E4M3", "BF16", ...) <-> DType. Unknown names give nullopt.
std::optional<DType> DTypeFromName(std::string_view name);
std::string_view DTypeName(DType dtype);
size_t DTypeSize(DType dtype);

// ---- bf16 (round to nearest even, NaN kept quiet) ----
uint16_t FloatToBf16(float value);
float Bf16ToFloat(uint16_t bits);
inline float RoundBf16(float value) { return Bf16ToFloat(FloatToBf16(value)); }

// ---- FP8 e4m3fn: bias 7, no infinities, max finite 448, 0x7f/0xff are NaN ----
inline constexpr float kFp8E4M3Max = 448.0f;
float Fp8E4M3ToFloat(uint8_t bits);
// Round to nearest even, saturating to +-448 (the behaviour of a saturating hardware cast).
uint8_t FloatToFp8E4M3(float value);

// ---- ue8m0: unsigned power-of-two scale, byte b means 2^(b-127); 255 is NaN ----
float Ue8m0ToFloat(uint8_t bits);
// Smallest power of two >= value (value > 0), as a ue8m0 byte; clamps to the representable range.
uint8_t Ue8m0CeilPow2(float value);

// ---- e2m1 (FP4): codes 0..7 = 0, .5, 1, 1.5, 2, 3, 4, 6; codes 8..15 their negatives ----
float E2m1ToFloat(uint8_t code);
uint8_t FloatToE2m1(float value);  // nearest code, ties to the even code; saturates at +-6

// ---- Block FP8 weights: e4m3 [rows, cols] with ue8m0 scales [ceil(rows/128), ceil(cols/128)] ----
inline constexpr int kFp8WeightBlock = 128;
// Quantizes a row-major f32 matrix; scale per block = 2^ceil(log2(amax/448)).
void QuantizeFp8Blocks(std::span<const float> values, int64_t rows, int64_t cols,
                       std::span<uint8_t> codes, std::span<uint8_t> scales);
void DequantizeFp8Blocks(std::span<const uint8_t> codes, std::span<const uint8_t> scales,
                         int64_t rows, int64_t cols, std::span<float> out);

// ---- MXFP4 rows: packed [rows, cols/2], scales [rows, cols/32]; cols must be a multiple of 32 ----
inline constexpr int kMxfp4Block = 32;
void QuantizeMxfp4(std::span<const float> values, int64_t rows, int64_t cols,
                   std::span<uint8_t> packed, std::span<uint8_t> scales);
void DequantizeMxfp4(std::span<const uint8_t> packed, std::span<const uint8_t> scales,
                     int64_t rows, int64_t cols, std::span<float> out);

}  // namespace tandem
