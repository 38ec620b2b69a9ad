// CPU element-wise and small ops: RMSNorm, rotary embedding, Hadamard.
#include <cmath>

#include "common/core/threads.h"
#include "common/kernels/kernels.h"

namespace tandem::kernels {

void RmsNorm(const float* x, int64_t rows, int64_t dim, const float* weight, float eps, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* in = x + r * dim;
    float* out = y + r * dim;
    double sum = 0.0;
    for (int64_t i = 0; i < dim; ++i) sum += static_cast<double>(in[i]) * in[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(sum / static_cast<double>(dim) + eps));
    if (weight) {
      for (int64_t i = 0; i < dim; ++i) out[i] = in[i] * inv * weight[i];
    } else {
      for (int64_t i = 0; i < dim; ++i) out[i] = in[i] * inv;
    }
  }
}

void ApplyRopeOne(float* x, int64_t rope_dim, int64_t position, const double* inv_freq, bool inverse) {
  for (int64_t i = 0; i < rope_dim / 2; ++i) {
    const double angle = static_cast<double>(position) * inv_freq[i] * (inverse ? -1.0 : 1.0);
    const float c = static_cast<float>(std::cos(angle));
    const float s = static_cast<float>(std::sin(angle));
    const float a = x[2 * i], b = x[2 * i + 1];
    x[2 * i] = a * c - b * s;
    x[2 * i + 1] = a * s + b * c;
  }
}

void ApplyRope(float* x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_stride, int64_t offset,
               int64_t rope_dim, const int64_t* positions, const double* inv_freq, bool inverse) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t h = 0; h < heads; ++h) {
      ApplyRopeOne(x + r * row_stride + h * head_stride + offset, rope_dim, positions[r], inv_freq, inverse);
    }
  }
}

void Hadamard(float* x, int64_t n) {
  for (int64_t len = 1; len < n; len <<= 1) {
    for (int64_t i = 0; i < n; i += 2 * len) {
      for (int64_t j = i; j < i + len; ++j) {
        const float a = x[j], b = x[j + len];
        x[j] = a + b;
        x[j + len] = a - b;
      }
    }
  }
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));
  for (int64_t i = 0; i < n; ++i) x[i] *= scale;
}

}  // namespace tandem::kernels
