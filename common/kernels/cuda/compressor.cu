// The C4/C128 compressors and the Hadamard transform on the GPU, mirroring RunCompressor in
// common/model/attention.cc: per-channel softmax pooling in double, RMSNorm with the sum of squares in
// double, RoPE with double angles and no FMA contraction, then the output's cache format.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "common/kernels/cuda/attention_device.cuh"
#include "common/kernels/cuda/check.h"
#include "common/kernels/cuda/cuda_attention.h"

namespace tandem::kernels::cuda {
namespace {

using internal::BlockMax;
using internal::BlockSum;
using internal::FloatToFp8;

constexpr int kEmitThreads = 256;
constexpr int kMaxRowsPerEmit = 128;

// Sylvester Hadamard of s[0, n) in shared memory by the whole block: the CPU's butterflies (same pairs,
// same adds in the same stage order, so the result is bit-identical), then the 1/sqrt(n) scale.
__device__ void BlockHadamard(float* s, int n, float scale) {
  for (int len = 1; len < n; len <<= 1) {
    __syncthreads();
    for (int p = threadIdx.x; p < n / 2; p += blockDim.x) {
      const int i = (p / len) * 2 * len + p % len;
      const float a = s[i], b = s[i + len];
      s[i] = __fadd_rn(a, b);
      s[i + len] = __fsub_rn(a, b);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = __fmul_rn(s[i], scale);
  __syncthreads();
}

// One block per row, the row staged in shared memory.
__global__ void HadamardKernel(float* x, int n, float scale) {
  extern __shared__ float row[];
  float* v = x + static_cast<int64_t>(blockIdx.x) * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) row[i] = v[i];
  BlockHadamard(row, n, scale);
  for (int i = threadIdx.x; i < n; i += blockDim.x) v[i] = row[i];
}

// One block per token: rows[t] <- [kv[t] | score[t] + ape[p % ratio]].
__global__ void WriteRowsKernel(const float* kv, const float* score, const float* ape, const int64_t* positions,
                                float* const* rows, int64_t width, int64_t ratio) {
  const int64_t t = blockIdx.x;
  float* row = rows[t];
  const float* k = kv + t * width;
  const float* s = score + t * width;
  const float* a = ape + (positions[t] % ratio) * width;
  for (int64_t ch = threadIdx.x; ch < width; ch += blockDim.x) {
    row[ch] = k[ch];
    row[width + ch] = __fadd_rn(s[ch], a[ch]);
  }
}

struct EmitParams {
  int ratio = 4;
  int rows_per_emit = 8;
  int64_t dim = 0, rope_dim = 0, width = 0;
  float eps = 1e-6f;
  const float* const* rows = nullptr;
  const int64_t* index = nullptr;
  const float* norm = nullptr;
  const double* inv_freq = nullptr;
  const KvRef* kv_out = nullptr;    // attention output, or null
  uint8_t* const* key_out = nullptr;  // indexer output, or null
  int64_t scale_bytes = 0;
  float hadamard_scale = 1.0f;
};

// One block per emitted entry; the pooled vector lives in shared memory from the pooling to the output.
__global__ void __launch_bounds__(kEmitThreads) EmitKernel(EmitParams p) {
  extern __shared__ float pooled[];  // [dim]
  __shared__ const float* rows[kMaxRowsPerEmit];
  __shared__ int64_t offsets[kMaxRowsPerEmit];
  __shared__ double sum_scratch[33];
  __shared__ float max_scratch[33];
  const int64_t e = blockIdx.x;
  const int64_t d = p.dim, width = p.width;
  for (int r = threadIdx.x; r < p.rows_per_emit; r += blockDim.x) {
    rows[r] = p.rows[e * p.rows_per_emit + r];
    // C4: rows 0..3 (previous chunk) pool channels [0, d), rows 4..7 channels [d, 2d).
    offsets[r] = (p.ratio == 4 && r >= 4) ? d : 0;
  }
  __syncthreads();

  // Per-channel softmax over the rows' scores (null rows: chunk 0 has no previous chunk), sums in double.
  double square_sum = 0.0;
  for (int64_t ch = threadIdx.x; ch < d; ch += blockDim.x) {
    float best = -INFINITY;
    for (int r = 0; r < p.rows_per_emit; ++r) {
      if (rows[r]) best = fmaxf(best, rows[r][width + offsets[r] + ch]);
    }
    double num = 0.0, den = 0.0;
    for (int r = 0; r < p.rows_per_emit; ++r) {
      if (!rows[r]) continue;
      const double weight = exp(static_cast<double>(rows[r][width + offsets[r] + ch]) - static_cast<double>(best));
      den += weight;
      num += weight * static_cast<double>(rows[r][offsets[r] + ch]);
    }
    const float value = static_cast<float>(num / den);
    pooled[ch] = value;
    square_sum += static_cast<double>(value) * value;
  }

  // RMSNorm (kernels::RmsNorm: x * inv * weight).
  const double total = BlockSum(square_sum, sum_scratch);
  const float inv = static_cast<float>(1.0 / sqrt(total / static_cast<double>(d) + static_cast<double>(p.eps)));
  for (int64_t ch = threadIdx.x; ch < d; ch += blockDim.x) {
    const float scaled = __fmul_rn(pooled[ch], inv);
    pooled[ch] = p.norm ? __fmul_rn(scaled, p.norm[ch]) : scaled;
  }
  __syncthreads();

  // RoPE on the last rope_dim dims at position ratio * index (kernels::ApplyRopeOne).
  const double position = static_cast<double>(p.ratio) * static_cast<double>(p.index[e]);
  float* rope = pooled + d - p.rope_dim;
  for (int64_t i = threadIdx.x; i < p.rope_dim / 2; i += blockDim.x) {
    double sine, cosine;
    sincos(position * p.inv_freq[i], &sine, &cosine);
    const float c = static_cast<float>(cosine), s = static_cast<float>(sine);
    const float a = rope[2 * i], b = rope[2 * i + 1];
    rope[2 * i] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    rope[2 * i + 1] = __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c));
  }
  __syncthreads();

  if (p.kv_out) {
    const KvRef out = p.kv_out[e];
    internal::QuantizeKvEntryBlock(pooled, d - p.rope_dim, p.rope_dim, p.scale_bytes, out.data, out.scales);
    return;
  }
  // Indexer: Hadamard, then kernels::QuantizeIndexerKey (scale = max(amax, 1e-4) / 448, code = e4m3(x / scale)).
  BlockHadamard(pooled, static_cast<int>(d), p.hadamard_scale);
  float amax = 0.0f;
  for (int64_t ch = threadIdx.x; ch < d; ch += blockDim.x) amax = fmaxf(amax, fabsf(pooled[ch]));
  amax = BlockMax(amax, max_scratch);
  const float scale = __fdiv_rn(fmaxf(amax, 1e-4f), 448.0f);
  uint8_t* key = p.key_out[e];
  for (int64_t ch = threadIdx.x; ch < d; ch += blockDim.x) key[ch] = FloatToFp8(__fdiv_rn(pooled[ch], scale));
  if (threadIdx.x < 4) key[d + threadIdx.x] = static_cast<uint8_t>(__float_as_uint(scale) >> (8 * threadIdx.x));
}

bool PowerOfTwo(int64_t n) { return n > 0 && (n & (n - 1)) == 0; }

}  // namespace

absl::Status Hadamard(float* x, int64_t rows, int64_t n, cudaStream_t stream) {
  if (!PowerOfTwo(n) || n > 1024) {
    return absl::InvalidArgumentError(absl::StrCat("Hadamard: n ", n, " must be a power of two <= 1024"));
  }
  if (rows < 0 || rows > 0x7fffffff) return absl::InvalidArgumentError(absl::StrCat("Hadamard: rows ", rows, " out of range"));
  if (rows == 0) return absl::OkStatus();
  const int threads = static_cast<int>(std::clamp<int64_t>((n / 2 + 31) / 32 * 32, 32, 512));
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));
  HadamardKernel<<<static_cast<unsigned>(rows), threads, static_cast<size_t>(n) * sizeof(float), stream>>>(
      x, static_cast<int>(n), scale);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("HadamardKernel");
  return absl::OkStatus();
}

absl::Status CompressorWriteRows(const CompressorShape& shape, const float* kv, const float* score, const float* ape,
                                 const int64_t* positions, float* const* rows, int64_t tokens, cudaStream_t stream) {
  if (shape.ratio != 4 && shape.ratio != 128) {
    return absl::InvalidArgumentError(absl::StrCat("CompressorWriteRows: ratio ", shape.ratio, " must be 4 or 128"));
  }
  if (shape.dim <= 0) return absl::InvalidArgumentError("CompressorWriteRows: dim must be > 0");
  if (tokens < 0 || tokens > 0x7fffffff) {
    return absl::InvalidArgumentError(absl::StrCat("CompressorWriteRows: tokens ", tokens, " out of range"));
  }
  if (tokens == 0) return absl::OkStatus();
  WriteRowsKernel<<<static_cast<unsigned>(tokens), 256, 0, stream>>>(kv, score, ape, positions, rows, shape.width(),
                                                                      shape.ratio);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("WriteRowsKernel");
  return absl::OkStatus();
}

absl::Status CompressorEmit(const CompressorShape& shape, const float* const* rows, const int64_t* index, int64_t emits,
                            const float* norm, const double* inv_freq, const KvRef* kv_out, uint8_t* const* key_out,
                            cudaStream_t stream) {
  if (shape.ratio != 4 && shape.ratio != 128) {
    return absl::InvalidArgumentError(absl::StrCat("CompressorEmit: ratio ", shape.ratio, " must be 4 or 128"));
  }
  if ((kv_out == nullptr) == (key_out == nullptr)) {
    return absl::InvalidArgumentError("CompressorEmit: exactly one of kv_out (attention) and key_out (indexer) is needed");
  }
  if (shape.rope_dim < 0 || shape.rope_dim % 2 != 0 || shape.rope_dim > shape.dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("CompressorEmit: rope_dim ", shape.rope_dim, " must be even and <= dim ", shape.dim));
  }
  const KvFormat format{shape.dim - shape.rope_dim, shape.rope_dim};
  if (kv_out && (format.nope_dim <= 0 || format.nope_dim % 64 != 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("CompressorEmit: dim - rope_dim = ", format.nope_dim, " must be a positive multiple of 64"));
  }
  if (key_out && (!PowerOfTwo(shape.dim) || shape.dim > 1024)) {
    return absl::InvalidArgumentError(
        absl::StrCat("CompressorEmit: the indexer's dim ", shape.dim, " must be a power of two <= 1024 (Hadamard)"));
  }
  if (shape.dim > 8192) return absl::InvalidArgumentError(absl::StrCat("CompressorEmit: dim ", shape.dim, " > 8192"));
  if (emits < 0 || emits > 0x7fffffff) {
    return absl::InvalidArgumentError(absl::StrCat("CompressorEmit: emits ", emits, " out of range"));
  }
  if (emits == 0) return absl::OkStatus();
  EmitParams p;
  p.ratio = shape.ratio;
  p.rows_per_emit = static_cast<int>(shape.rows_per_emit());
  p.dim = shape.dim;
  p.rope_dim = shape.rope_dim;
  p.width = shape.width();
  p.eps = shape.eps;
  p.rows = rows;
  p.index = index;
  p.norm = norm;
  p.inv_freq = inv_freq;
  p.kv_out = kv_out;
  p.key_out = key_out;
  p.scale_bytes = format.scale_bytes();
  p.hadamard_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(shape.dim)));
  EmitKernel<<<static_cast<unsigned>(emits), kEmitThreads, static_cast<size_t>(shape.dim) * sizeof(float), stream>>>(p);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("EmitKernel");
  return absl::OkStatus();
}

}  // namespace tandem::kernels::cuda
