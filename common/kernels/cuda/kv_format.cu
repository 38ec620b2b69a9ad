// FP8 KV-entry quantization and RMSNorm on the GPU: the first CUDA kernels, bit-compatible with the
// CPU versions in ../cpu/ (same scale rule, same round-to-nearest-even e4m3 and bf16 casts).
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <vector>

#include "common/kernels/cuda/cuda_ops.h"

namespace tandem::kernels::cuda {
namespace {

// One block per entry, one warp per 64-wide tile: amax by warp shuffle, then a power-of-two scale.
__global__ void QuantizeKvKernel(const float* x, int64_t nope, int64_t rope, int64_t data_bytes, int64_t entry_bytes,
                                 uint8_t* out) {
  const int64_t entry = blockIdx.x;
  const float* v = x + entry * (nope + rope);
  uint8_t* e = out + entry * entry_bytes;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tiles = static_cast<int>(nope / 64);
  for (int t = warp; t < tiles; t += blockDim.x / 32) {
    const float a = v[t * 64 + lane], b = v[t * 64 + 32 + lane];
    float amax = fmaxf(fabsf(a), fabsf(b));
    for (int offset = 16; offset > 0; offset /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
    // 2^ceil(log2(max(amax/448, 1e-4))) computed exactly from the float's exponent bits.
    const float ratio = fmaxf(amax / 448.0f, 1e-4f);
    int exponent;
    const float mantissa = frexpf(ratio, &exponent);
    const int power = mantissa == 0.5f ? exponent - 1 : exponent;
    const float inverse = ldexpf(1.0f, -power);
    e[t * 64 + lane] = __nv_cvt_float_to_fp8(a * inverse, __NV_SATFINITE, __NV_E4M3);
    e[t * 64 + 32 + lane] = __nv_cvt_float_to_fp8(b * inverse, __NV_SATFINITE, __NV_E4M3);
    if (lane == 0) e[data_bytes + t] = static_cast<uint8_t>(power + 127);
  }
  for (int64_t i = threadIdx.x; i < rope; i += blockDim.x) {
    // bf16 by round-to-nearest-even on the bits, exactly as the CPU's FloatToBf16 (NaN kept quiet).
    const unsigned int f = __float_as_uint(v[nope + i]);
    const unsigned int bits = isnan(v[nope + i]) ? ((f >> 16) | 0x40u) : ((f + 0x7fffu + ((f >> 16) & 1u)) >> 16);
    e[nope + 2 * i] = static_cast<uint8_t>(bits & 0xff);
    e[nope + 2 * i + 1] = static_cast<uint8_t>(bits >> 8);
  }
  for (int64_t i = data_bytes + tiles + threadIdx.x; i < entry_bytes; i += blockDim.x) e[i] = 0;
}

__global__ void RmsNormKernel(const float* x, int64_t dim, const float* weight, float eps, float* y) {
  const float* row = x + blockIdx.x * dim;
  float* out = y + blockIdx.x * dim;
  __shared__ double partial[32];
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) sum += static_cast<double>(row[i]) * row[i];
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += partial[w];
    partial[0] = total;
  }
  __syncthreads();
  const float inv = static_cast<float>(1.0 / sqrt(partial[0] / static_cast<double>(dim) + eps));
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) out[i] = row[i] * inv * (weight ? weight[i] : 1.0f);
}

template <typename T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t count) { ok_ = cudaMalloc(&ptr_, count * sizeof(T) + 1) == cudaSuccess; }
  ~DeviceBuffer() { if (ptr_) cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* get() const { return ptr_; }
  bool ok() const { return ok_; }

 private:
  T* ptr_ = nullptr;
  bool ok_ = false;
};

}  // namespace

bool DeviceAvailable(std::string* why) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    if (why) *why = err != cudaSuccess ? cudaGetErrorString(err) : "no CUDA device";
    return false;
  }
  return true;
}

bool QuantizeKvEntries(const KvFormat& format, const float* host_x, int64_t count, uint8_t* host_entries) {
  const size_t in_floats = static_cast<size_t>(count * format.dim());
  const size_t out_bytes = static_cast<size_t>(count * format.entry_bytes());
  DeviceBuffer<float> x(in_floats);
  DeviceBuffer<uint8_t> out(out_bytes);
  if (!x.ok() || !out.ok()) return false;
  if (cudaMemcpy(x.get(), host_x, in_floats * sizeof(float), cudaMemcpyHostToDevice) != cudaSuccess) return false;
  QuantizeKvKernel<<<static_cast<unsigned>(count), 256>>>(x.get(), format.nope_dim, format.rope_dim, format.data_bytes(),
                                                          format.entry_bytes(), out.get());
  if (cudaGetLastError() != cudaSuccess) return false;
  return cudaMemcpy(host_entries, out.get(), out_bytes, cudaMemcpyDeviceToHost) == cudaSuccess;
}

bool RmsNorm(const float* host_x, int64_t rows, int64_t dim, const float* host_weight, float eps, float* host_y) {
  const size_t n = static_cast<size_t>(rows * dim);
  DeviceBuffer<float> x(n), y(n), w(static_cast<size_t>(dim));
  if (!x.ok() || !y.ok() || !w.ok()) return false;
  if (cudaMemcpy(x.get(), host_x, n * sizeof(float), cudaMemcpyHostToDevice) != cudaSuccess) return false;
  if (host_weight && cudaMemcpy(w.get(), host_weight, dim * sizeof(float), cudaMemcpyHostToDevice) != cudaSuccess) return false;
  RmsNormKernel<<<static_cast<unsigned>(rows), 256>>>(x.get(), dim, host_weight ? w.get() : nullptr, eps, y.get());
  if (cudaGetLastError() != cudaSuccess) return false;
  return cudaMemcpy(host_y, y.get(), n * sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess;
}

}  // namespace tandem::kernels::cuda
