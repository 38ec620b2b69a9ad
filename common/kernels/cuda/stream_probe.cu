// StreamRead (cuda_ops.h): a load-only kernel that reads a buffer in one of the weight-streaming patterns of
// the expert kernels, so a benchmark can put each pattern's rate next to the copy rate. Not used by the model.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "common/kernels/cuda/check.h"
#include "common/kernels/cuda/cuda_ops.h"

namespace tandem::kernels::cuda {
namespace {

constexpr int kRowBytes = 2048, kUnitRows = 256, kThreads = 256;
constexpr int kSteps = kRowBytes / 64;  // a warp's 32 rows x 2 KB in steps of 4 loads of 16 bytes a lane

__device__ __forceinline__ uint4 LoadStreamed(const uint8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Byte offset in the unit of this lane's load i (0..3) of step s.
template <StreamPattern P>
__device__ __forceinline__ int64_t StreamOffset(int warp, int lane, int i, int s) {
  const int64_t first_row = int64_t{warp} * 32;
  if constexpr (P == StreamPattern::kQuad64) {
    const int g = lane / 4, t = lane % 4;
    return (first_row + 8 * i + g) * kRowBytes + 64 * s + 16 * t;
  } else if constexpr (P == StreamPattern::kQuad64x2) {
    const int g = lane / 4, t = lane % 4;
    return (first_row + 16 * (s / 16) + 8 * (i / 2) + g) * kRowBytes + 128 * (s % 16) + 64 * (i % 2) + 16 * t;
  } else if constexpr (P == StreamPattern::kHalf256) {
    const int h = lane / 16, c = lane % 16;
    return (first_row + 8 * (s / 8) + 2 * i + h) * kRowBytes + 256 * (s % 8) + 16 * c;
  } else {
    return first_row * kRowBytes + int64_t{4 * s + i} * 512 + 16 * lane;
  }
}

template <StreamPattern P>
__global__ void __launch_bounds__(kThreads, 2) StreamReadKernel(const uint8_t* buffer, int64_t units, uint32_t* sink) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint32_t acc = 0;
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const uint8_t* base = buffer + u * kUnitRows * kRowBytes;
    uint4 next[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) next[i] = LoadStreamed(base + StreamOffset<P>(warp, lane, i, 0));
    for (int s = 0; s < kSteps; ++s) {
      uint4 current[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) current[i] = next[i];
      if (s + 1 < kSteps) {
#pragma unroll
        for (int i = 0; i < 4; ++i) next[i] = LoadStreamed(base + StreamOffset<P>(warp, lane, i, s + 1));
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) acc ^= current[i].x + 3u * current[i].y + 5u * current[i].z + 7u * current[i].w;
    }
  }
  atomicXor(sink, acc);  // (so no load is dead, and a test can check every piece was read once)
}

template <StreamPattern P>
absl::Status Launch(const uint8_t* buffer, int64_t units, uint32_t* sink, cudaStream_t stream) {
  int device = 0, sms = 0;
  TANDEM_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  TANDEM_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t blocks = std::min<int64_t>(units, 2 * std::max(1, sms));
  StreamReadKernel<P><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(buffer, units, sink);
  return CudaStatus(cudaGetLastError(), "StreamReadKernel", __FILE__, __LINE__);
}

}  // namespace

const char* StreamPatternName(StreamPattern pattern) {
  switch (pattern) {
    case StreamPattern::kQuad64: return "quad64";
    case StreamPattern::kQuad64x2: return "quad64x2";
    case StreamPattern::kHalf256: return "half256";
    case StreamPattern::kSequential: return "sequential";
  }
  return "unknown";
}

absl::Status StreamRead(StreamPattern pattern, const uint8_t* buffer, size_t bytes, uint32_t* sink, cudaStream_t stream) {
  if (!buffer || !sink) return absl::InvalidArgumentError("StreamRead: null buffer or sink");
  if (bytes == 0 || bytes % kStreamUnitBytes != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("StreamRead: bytes must be a positive multiple of ", kStreamUnitBytes, "; got ", bytes));
  }
  if ((reinterpret_cast<uintptr_t>(buffer) & 15u) != 0) {
    return absl::InvalidArgumentError("StreamRead: buffer must be 16-byte aligned");
  }
  const int64_t units = static_cast<int64_t>(bytes / kStreamUnitBytes);
  switch (pattern) {
    case StreamPattern::kQuad64: return Launch<StreamPattern::kQuad64>(buffer, units, sink, stream);
    case StreamPattern::kQuad64x2: return Launch<StreamPattern::kQuad64x2>(buffer, units, sink, stream);
    case StreamPattern::kHalf256: return Launch<StreamPattern::kHalf256>(buffer, units, sink, stream);
    case StreamPattern::kSequential: return Launch<StreamPattern::kSequential>(buffer, units, sink, stream);
  }
  return absl::InvalidArgumentError("StreamRead: unknown pattern");
}

}  // namespace tandem::kernels::cuda
