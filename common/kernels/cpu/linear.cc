// CPU linear layers: OpenBLAS sgemm for dense weights, tiled dequantize-then-sgemm for MXFP4/FP8.
#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "common/core/dtype.h"
#include "common/core/threads.h"
#include "common/kernels/kernels.h"

namespace tandem::kernels {

void SetThreads(int num_threads) {
  SetNumThreads(num_threads);
  openblas_set_num_threads(NumThreads());
}

namespace {
std::atomic<bool> g_deterministic{false};

// Each output is summed over 8 lanes in a fixed pattern and reduced pairwise, whatever the batch:
// SIMD-friendly and order-stable. Four outputs at a time share the input loads.
typedef float Float4 __attribute__((vector_size(16)));

inline Float4 Load4(const float* p) {
  Float4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline float Reduce8(Float4 lo, Float4 hi, const float* a, const float* b, int64_t i, int64_t n) {
  float lanes[8];
  std::memcpy(lanes, &lo, 16);
  std::memcpy(lanes + 4, &hi, 16);
  for (int k = 0; i < n; ++i, ++k) lanes[k] += a[i] * b[i];
  for (int width = 4; width >= 1; width /= 2) {
    for (int k = 0; k < width; ++k) lanes[k] += lanes[k + width];
  }
  return lanes[0];
}

inline float FixedOrderDot(const float* a, const float* b, int64_t n) {
  Float4 lo = {}, hi = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    lo += Load4(a + i) * Load4(b + i);
    hi += Load4(a + i + 4) * Load4(b + i + 4);
  }
  return Reduce8(lo, hi, a, b, i, n);
}

inline void FixedOrderDot4(const float* a, const float* b, int64_t stride, int64_t n, float* out) {
  Float4 lo[4] = {}, hi[4] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const Float4 a0 = Load4(a + i), a1 = Load4(a + i + 4);
    for (int k = 0; k < 4; ++k) {
      lo[k] += a0 * Load4(b + k * stride + i);
      hi[k] += a1 * Load4(b + k * stride + i + 4);
    }
  }
  for (int k = 0; k < 4; ++k) out[k] = Reduce8(lo[k], hi[k], a, b + k * stride, i, n);
}
}  // namespace

void SetDeterministic(bool deterministic) { g_deterministic = deterministic; }
bool Deterministic() { return g_deterministic; }

void LinearFixedOrder(const float* x, int64_t rows, int64_t in, const float* weight, int64_t out, float* y) {
  // Tiles of weight rows small enough to stay in L2 while every input row streams past them.
  const int64_t tile = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, in * 4));
  const int64_t tiles = (out + tile - 1) / tile;
  ParallelFor(tiles, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o0 = t * tile, o1 = std::min(out, o0 + tile);
      for (int64_t r = 0; r < rows; ++r) {
        int64_t o = o0;
        for (; o + 4 <= o1; o += 4) FixedOrderDot4(x + r * in, weight + o * in, in, in, y + r * out + o);
        for (; o < o1; ++o) y[r * out + o] = FixedOrderDot(x + r * in, weight + o * in, in);
      }
    }
  });
}

void Linear(const float* x, int64_t rows, int64_t in, const float* weight, int64_t out, float* y) {
  if (rows == 0 || out == 0) return;
  if (g_deterministic) {
    LinearFixedOrder(x, rows, in, weight, out, y);
    return;
  }
  if (in == 0) {
    std::fill(y, y + rows * out, 0.0f);
    return;
  }
  if (rows == 1) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<blasint>(out), static_cast<blasint>(in), 1.0f, weight,
                static_cast<blasint>(in), x, 1, 0.0f, y, 1);
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(rows), static_cast<blasint>(out),
              static_cast<blasint>(in), 1.0f, x, static_cast<blasint>(in), weight, static_cast<blasint>(in), 0.0f, y,
              static_cast<blasint>(out));
}

void LinearReference(const float* x, int64_t rows, int64_t in, const float* weight, int64_t out, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t o = 0; o < out; ++o) {
      double acc = 0.0;
      for (int64_t i = 0; i < in; ++i) acc += static_cast<double>(x[r * in + i]) * weight[o * in + i];
      y[r * out + o] = static_cast<float>(acc);
    }
  }
}

void DequantizeRows(const QuantizedWeight& w, int64_t row_begin, int64_t rows_count, float* dst) {
  if (w.format == QuantizedWeight::Format::kMxfp4) {
    const int64_t groups = w.in / kMxfp4Block;
    for (int64_t r = 0; r < rows_count; ++r) {
      const int64_t row = row_begin + r;
      const uint8_t* codes = w.codes + row * (w.in / 2);
      const uint8_t* scales = w.scales + row * groups;
      float* out = dst + r * w.in;
      for (int64_t g = 0; g < groups; ++g) {
        const float scale = Ue8m0ToFloat(scales[g]);
        for (int64_t i = 0; i < kMxfp4Block / 2; ++i) {
          const uint8_t byte = codes[g * (kMxfp4Block / 2) + i];
          out[g * kMxfp4Block + 2 * i] = E2m1ToFloat(byte & 0xf) * scale;
          out[g * kMxfp4Block + 2 * i + 1] = E2m1ToFloat(byte >> 4) * scale;
        }
      }
    }
    return;
  }
  const int64_t block_cols = (w.in + kFp8WeightBlock - 1) / kFp8WeightBlock;
  for (int64_t r = 0; r < rows_count; ++r) {
    const int64_t row = row_begin + r;
    const uint8_t* codes = w.codes + row * w.in;
    const uint8_t* scales = w.scales + (row / kFp8WeightBlock) * block_cols;
    float* out = dst + r * w.in;
    for (int64_t c = 0; c < w.in; ++c) out[c] = Fp8E4M3ToFloat(codes[c]) * Ue8m0ToFloat(scales[c / kFp8WeightBlock]);
  }
}

void QuantizedLinear(const float* x, int64_t rows, const QuantizedWeight& w, float* y) {
  if (rows == 0) return;
  // Dequantize a block of weight rows on our threads, then one sgemm on OpenBLAS's threads. OpenBLAS
  // is never entered from two of our threads at once.
  constexpr int64_t kBlock = 512;
  const int64_t block = std::min(kBlock, w.out);
  std::vector<float> scratch(static_cast<size_t>(block * w.in));
  for (int64_t row0 = 0; row0 < w.out; row0 += block) {
    const int64_t count = std::min(block, w.out - row0);
    ParallelFor(count, [&](int64_t begin, int64_t end) {
      DequantizeRows(w, row0 + begin, end - begin, scratch.data() + begin * w.in);
    });
    if (g_deterministic) {
      std::vector<float> part(static_cast<size_t>(rows * count));
      LinearFixedOrder(x, rows, w.in, scratch.data(), count, part.data());
      for (int64_t r = 0; r < rows; ++r) std::copy_n(part.data() + r * count, count, y + r * w.out + row0);
      continue;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(rows), static_cast<blasint>(count),
                static_cast<blasint>(w.in), 1.0f, x, static_cast<blasint>(w.in), scratch.data(),
                static_cast<blasint>(w.in), 0.0f, y + row0, static_cast<blasint>(w.out));
  }
}

}  // namespace tandem::kernels
