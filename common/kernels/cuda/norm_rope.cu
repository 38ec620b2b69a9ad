// RMSNorm and interleaved rotary embedding on the GPU, matching ../cpu/ops.cc: sums of squares in
// double, the same float operations in the same order (no FMA contraction), RoPE angles in double.
#include <cuda_runtime.h>

#include <algorithm>

#include "common/kernels/cuda/check.h"
#include "common/kernels/cuda/cuda_ops.h"

namespace tandem::kernels::cuda {
namespace {

constexpr int kNormVectorsPerThread = 4;

__device__ double BlockSum(double value, double* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = value;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += scratch[w];
    scratch[32] = total;
  }
  __syncthreads();
  return scratch[32];
}

__device__ float4 ScaleVector(float4 v, float inv, const float* weight, int64_t i) {
  float4 out = make_float4(__fmul_rn(v.x, inv), __fmul_rn(v.y, inv), __fmul_rn(v.z, inv), __fmul_rn(v.w, inv));
  if (weight) {
    const float4 w = reinterpret_cast<const float4*>(weight)[i];
    out = make_float4(__fmul_rn(out.x, w.x), __fmul_rn(out.y, w.y), __fmul_rn(out.z, w.z), __fmul_rn(out.w, w.w));
  }
  return out;
}

// One block per row; the row stays in registers between the reduction and the scaling (one read of x).
__global__ void RmsNormVectorKernel(const float* x, int64_t dim, const float* weight, float eps, float* y) {
  __shared__ double scratch[33];
  const int64_t vectors = dim / 4;
  const float4* row = reinterpret_cast<const float4*>(x + blockIdx.x * dim);
  float4 v[kNormVectorsPerThread];
  double sum = 0.0;
#pragma unroll
  for (int u = 0; u < kNormVectorsPerThread; ++u) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(u) * blockDim.x;
    v[u] = i < vectors ? row[i] : make_float4(0.f, 0.f, 0.f, 0.f);
    sum += static_cast<double>(v[u].x) * v[u].x + static_cast<double>(v[u].y) * v[u].y +
           static_cast<double>(v[u].z) * v[u].z + static_cast<double>(v[u].w) * v[u].w;
  }
  const double total = BlockSum(sum, scratch);
  const float inv = static_cast<float>(1.0 / sqrt(total / static_cast<double>(dim) + eps));
  float4* out = reinterpret_cast<float4*>(y + blockIdx.x * dim);
#pragma unroll
  for (int u = 0; u < kNormVectorsPerThread; ++u) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(u) * blockDim.x;
    if (i < vectors) out[i] = ScaleVector(v[u], inv, weight, i);
  }
}

// Any dim or alignment: two passes over the row.
__global__ void RmsNormScalarKernel(const float* x, int64_t dim, const float* weight, float eps, float* y) {
  __shared__ double scratch[33];
  const float* row = x + blockIdx.x * dim;
  float* out = y + blockIdx.x * dim;
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) sum += static_cast<double>(row[i]) * row[i];
  const double total = BlockSum(sum, scratch);
  const float inv = static_cast<float>(1.0 / sqrt(total / static_cast<double>(dim) + eps));
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    const float scaled = __fmul_rn(row[i], inv);
    out[i] = weight ? __fmul_rn(scaled, weight[i]) : scaled;
  }
}

// One block per row: the row's cos/sin table once in shared memory, then every head's pairs.
__global__ void RopeKernel(float* x, int64_t row_stride, int64_t heads, int64_t head_stride, int64_t offset,
                           int64_t half, const int64_t* positions, const double* inv_freq, double sign) {
  extern __shared__ float table[];  // [half] cos, then [half] sin
  const int64_t row = blockIdx.x;
  const double position = static_cast<double>(positions[row]);
  for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
    double s, c;
    sincos(position * inv_freq[i] * sign, &s, &c);
    table[i] = static_cast<float>(c);
    table[half + i] = static_cast<float>(s);
  }
  __syncthreads();
  float* base = x + row * row_stride + offset;
  for (int64_t p = threadIdx.x; p < heads * half; p += blockDim.x) {
    const int64_t h = p / half, i = p % half;
    float* pair = base + h * head_stride + 2 * i;
    const float a = pair[0], b = pair[1], c = table[i], s = table[half + i];
    pair[0] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    pair[1] = __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c));
  }
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

absl::Status RmsNorm(const float* x, int64_t rows, int64_t dim, const float* weight, float eps, float* y,
                     cudaStream_t stream) {
  if (rows < 0 || dim <= 0) return absl::InvalidArgumentError("RmsNorm: rows must be >= 0 and dim > 0");
  if (rows == 0) return absl::OkStatus();
  if (rows > 0x7fffffff) return absl::InvalidArgumentError("RmsNorm: more than 2^31-1 rows");
  const int64_t vectors = dim / 4;
  const bool vector = dim % 4 == 0 && vectors <= 1024 * kNormVectorsPerThread && Aligned16(x) && Aligned16(y) &&
                      (!weight || Aligned16(weight));
  if (vector) {
    const int64_t per_thread = (vectors + kNormVectorsPerThread - 1) / kNormVectorsPerThread;
    const int threads = static_cast<int>(std::max<int64_t>(32, (per_thread + 31) / 32 * 32));
    RmsNormVectorKernel<<<static_cast<unsigned>(rows), threads, 0, stream>>>(x, dim, weight, eps, y);
    TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("RmsNormVectorKernel");
  } else {
    RmsNormScalarKernel<<<static_cast<unsigned>(rows), 256, 0, stream>>>(x, dim, weight, eps, y);
    TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("RmsNormScalarKernel");
  }
  return absl::OkStatus();
}

absl::Status ApplyRope(float* x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_stride, int64_t offset,
                       int64_t rope_dim, const int64_t* positions, const double* inv_freq, bool inverse,
                       cudaStream_t stream) {
  if (rope_dim <= 0 || rope_dim % 2 != 0 || rope_dim > 4096) {
    return absl::InvalidArgumentError(absl::StrCat("ApplyRope: rope_dim ", rope_dim, " must be even, in (0, 4096]"));
  }
  if (rows < 0 || heads <= 0) return absl::InvalidArgumentError("ApplyRope: rows must be >= 0 and heads > 0");
  if (rows == 0) return absl::OkStatus();
  if (rows > 0x7fffffff) return absl::InvalidArgumentError("ApplyRope: more than 2^31-1 rows");
  const int64_t half = rope_dim / 2;
  const int threads = static_cast<int>(std::min<int64_t>(256, (heads * half + 31) / 32 * 32));
  RopeKernel<<<static_cast<unsigned>(rows), threads, static_cast<size_t>(rope_dim) * sizeof(float), stream>>>(
      x, row_stride, heads, head_stride, offset, half, positions, inv_freq, inverse ? -1.0 : 1.0);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("RopeKernel");
  return absl::OkStatus();
}

}  // namespace tandem::kernels::cuda
