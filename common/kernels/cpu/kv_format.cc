// The cache byte formats shared by the CPU forward, the cache pools, CUDA and the transfer engine.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/core/dtype.h"
#include "common/kernels/kernels.h"

namespace tandem::kernels {

void QuantizeKvEntry(const KvFormat& format, const float* x, uint8_t* data, uint8_t* scales) {
  const int64_t tiles = format.nope_dim / 64;
  for (int64_t t = 0; t < tiles; ++t) {
    float amax = 0.0f;
    for (int64_t i = 0; i < 64; ++i) amax = std::max(amax, std::fabs(x[t * 64 + i]));
    const uint8_t scale_bits = Ue8m0CeilPow2(std::max(amax / kFp8E4M3Max, 1e-4f));
    const float inverse = 1.0f / Ue8m0ToFloat(scale_bits);
    scales[t] = scale_bits;
    for (int64_t i = 0; i < 64; ++i) data[t * 64 + i] = FloatToFp8E4M3(x[t * 64 + i] * inverse);
  }
  for (int64_t t = tiles; t < format.scale_bytes(); ++t) scales[t] = 0;
  uint8_t* rope = data + format.nope_dim;
  for (int64_t i = 0; i < format.rope_dim; ++i) {
    const uint16_t bits = FloatToBf16(x[format.nope_dim + i]);
    std::memcpy(rope + 2 * i, &bits, 2);
  }
}

void DequantizeKvEntry(const KvFormat& format, const uint8_t* data, const uint8_t* scales, float* x) {
  const int64_t tiles = format.nope_dim / 64;
  for (int64_t t = 0; t < tiles; ++t) {
    const float scale = Ue8m0ToFloat(scales[t]);
    for (int64_t i = 0; i < 64; ++i) x[t * 64 + i] = Fp8E4M3ToFloat(data[t * 64 + i]) * scale;
  }
  const uint8_t* rope = data + format.nope_dim;
  for (int64_t i = 0; i < format.rope_dim; ++i) {
    uint16_t bits;
    std::memcpy(&bits, rope + 2 * i, 2);
    x[format.nope_dim + i] = Bf16ToFloat(bits);
  }
}

void QuantizeIndexerKey(const float* x, int64_t dim, uint8_t* entry) {
  float amax = 0.0f;
  for (int64_t i = 0; i < dim; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float scale = std::max(amax, 1e-4f) / kFp8E4M3Max;
  for (int64_t i = 0; i < dim; ++i) entry[i] = FloatToFp8E4M3(x[i] / scale);
  std::memcpy(entry + dim, &scale, 4);
}

void DequantizeIndexerKey(const uint8_t* entry, int64_t dim, float* x) {
  float scale;
  std::memcpy(&scale, entry + dim, 4);
  for (int64_t i = 0; i < dim; ++i) x[i] = Fp8E4M3ToFloat(entry[i]) * scale;
}

}  // namespace tandem::kernels
