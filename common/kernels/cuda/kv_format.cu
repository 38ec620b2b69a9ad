// FP8 KV-entry quantization on the GPU, bit-compatible with the CPU version in ../cpu/ (same scale rule,
// same round-to-nearest-even e4m3 and bf16 casts).
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "common/kernels/cuda/check.h"
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

}  // namespace

absl::Status DeviceAvailable() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) return CudaStatus(err, "cudaGetDeviceCount", __FILE__, __LINE__);
  if (count == 0) return absl::UnavailableError("no CUDA device is visible");
  return absl::OkStatus();
}

absl::Status QuantizeKvEntries(const KvFormat& format, const float* x, int64_t count, uint8_t* entries,
                               cudaStream_t stream) {
  if (count <= 0) return absl::OkStatus();
  if (format.nope_dim % 64 != 0) return absl::InvalidArgumentError("QuantizeKvEntries: nope_dim must be a multiple of 64");
  QuantizeKvKernel<<<static_cast<unsigned>(count), 256, 0, stream>>>(x, format.nope_dim, format.rope_dim,
                                                                     format.data_bytes(), format.entry_bytes(), entries);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("QuantizeKvKernel");
  return absl::OkStatus();
}

}  // namespace tandem::kernels::cuda
