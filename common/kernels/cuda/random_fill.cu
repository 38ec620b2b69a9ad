// Device-side random fills for tests and benchmarks: gigabytes of inputs without a host round trip.
// Counter-based (splitmix64 of seed and index), so a fill is reproducible and independent of the launch shape.
#include <cuda_runtime.h>

#include <algorithm>

#include "common/kernels/cuda/check.h"
#include "common/kernels/cuda/cuda_ops.h"

namespace tandem::kernels::cuda {
namespace {

__device__ uint64_t Mix(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

__global__ void FillUniformKernel(float* x, int64_t count, uint64_t seed, float lo, float hi) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    const float u = static_cast<float>(Mix(seed * 0x100000001b3ull + static_cast<uint64_t>(i)) >> 40) * (1.0f / 16777216.0f);
    x[i] = lo + (hi - lo) * u;
  }
}

__global__ void FillFp8Kernel(uint8_t* codes, int64_t count, uint64_t seed) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    uint8_t b = static_cast<uint8_t>(Mix(seed * 0x100000001b3ull + static_cast<uint64_t>(i)) >> 56);
    if ((b & 0x7f) == 0x7f) b ^= 0x01;  // 0x7f / 0xff are NaN in e4m3fn
    codes[i] = b;
  }
}

unsigned GridFor(int64_t count) {
  return static_cast<unsigned>(std::clamp<int64_t>((count + 255) / 256, 1, 132 * 16));
}

}  // namespace

absl::Status FillUniform(float* x, int64_t count, uint64_t seed, float lo, float hi, cudaStream_t stream) {
  if (count < 0) return absl::InvalidArgumentError("FillUniform: negative count");
  if (count == 0) return absl::OkStatus();
  FillUniformKernel<<<GridFor(count), 256, 0, stream>>>(x, count, seed, lo, hi);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("FillUniformKernel");
  return absl::OkStatus();
}

absl::Status FillFp8Codes(uint8_t* codes, int64_t count, uint64_t seed, cudaStream_t stream) {
  if (count < 0) return absl::InvalidArgumentError("FillFp8Codes: negative count");
  if (count == 0) return absl::OkStatus();
  FillFp8Kernel<<<GridFor(count), 256, 0, stream>>>(codes, count, seed);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("FillFp8Kernel");
  return absl::OkStatus();
}

}  // namespace tandem::kernels::cuda
