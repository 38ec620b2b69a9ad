// The glue kernels of cuda_model_ops.h: memory-bound element loops, grid-stride, no reductions.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "common/kernels/cuda/check.h"
#include "common/kernels/cuda/cuda_model_ops.h"

namespace tandem::kernels::cuda {
namespace {

constexpr int kThreads = 256;

unsigned GridFor(int64_t work) {
  return static_cast<unsigned>(std::clamp<int64_t>((work + kThreads - 1) / kThreads, 1, 132 * 16));
}

__device__ int64_t GlobalThread() { return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ int64_t GridStride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

__global__ void EmbedKernel(const uint16_t* table, int64_t vocab, int64_t hidden, const int32_t* ids, int64_t tokens,
                            int64_t streams, float* x) {
  const int64_t total = tokens * streams * hidden;
  for (int64_t i = GlobalThread(); i < total; i += GridStride()) {
    const int64_t t = i / (streams * hidden), d = i % hidden;
    const int32_t id = ids[t];
    float value = NAN;
    if (id >= 0 && id < vocab) value = __uint_as_float(static_cast<uint32_t>(table[id * hidden + d]) << 16);
    x[i] = value;
  }
}

__global__ void GatherRowsKernel(const float* x, const int32_t* rows, int64_t count, int64_t width, float* y) {
  const int64_t total = count * width;
  for (int64_t i = GlobalThread(); i < total; i += GridStride()) {
    y[i] = x[static_cast<int64_t>(rows[i / width]) * width + i % width];
  }
}

__global__ void CopyFloatRowsKernel(const float* const* src, float* const* dst, int64_t count, int64_t floats) {
  const int64_t total = count * floats;
  for (int64_t i = GlobalThread(); i < total; i += GridStride()) {
    const int64_t r = i / floats, c = i % floats;
    dst[r][c] = src[r][c];
  }
}

__global__ void ScaleKernel(float* x, int64_t count, float factor) {
  for (int64_t i = GlobalThread(); i < count; i += GridStride()) x[i] = __fmul_rn(x[i], factor);
}

__global__ void AddToStreamsKernel(const float* e, int64_t tokens, int64_t streams, int64_t hidden, float* x) {
  const int64_t total = tokens * streams * hidden;
  for (int64_t i = GlobalThread(); i < total; i += GridStride()) {
    const int64_t t = i / (streams * hidden), d = i % hidden;
    x[i] = __fadd_rn(x[i], e[t * hidden + d]);
  }
}

// One block per run: the runs are few (a handful per request and layer), their entries many.
__global__ void ExpandRunsKernel(const RefRun* runs, KvRef* refs, uint8_t** pointers) {
  const RefRun run = runs[blockIdx.x];
  for (int64_t i = threadIdx.x; i < run.count; i += blockDim.x) {
    const int64_t slot = run.ring > 0 ? (run.first + i) % run.ring : i;
    uint8_t* data = run.data + slot * run.data_stride;
    if (refs) {
      refs[run.out_offset + i] = KvRef{data, run.scales ? run.scales + slot * run.scale_stride : nullptr};
    } else {
      pointers[run.out_offset + i] = data;
    }
  }
}

}  // namespace

absl::Status ExpandKvRefs(const RefRun* runs, int64_t run_count, KvRef* out, cudaStream_t stream) {
  if (run_count < 0 || run_count > 0x7fffffff) return absl::InvalidArgumentError("ExpandKvRefs: run count out of range");
  if (run_count == 0) return absl::OkStatus();
  ExpandRunsKernel<<<static_cast<unsigned>(run_count), kThreads, 0, stream>>>(runs, out, nullptr);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("ExpandRunsKernel");
  return absl::OkStatus();
}

absl::Status ExpandPointers(const RefRun* runs, int64_t run_count, uint8_t** out, cudaStream_t stream) {
  if (run_count < 0 || run_count > 0x7fffffff) return absl::InvalidArgumentError("ExpandPointers: run count out of range");
  if (run_count == 0) return absl::OkStatus();
  ExpandRunsKernel<<<static_cast<unsigned>(run_count), kThreads, 0, stream>>>(runs, nullptr, out);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("ExpandRunsKernel");
  return absl::OkStatus();
}

absl::Status EmbedTokens(const uint16_t* table, int64_t vocab, int64_t hidden, const int32_t* ids, int64_t tokens,
                         int64_t streams, float* x, cudaStream_t stream) {
  if (tokens < 0 || hidden <= 0 || streams <= 0) return absl::InvalidArgumentError("EmbedTokens: bad shape");
  if (tokens == 0) return absl::OkStatus();
  EmbedKernel<<<GridFor(tokens * streams * hidden), kThreads, 0, stream>>>(table, vocab, hidden, ids, tokens, streams, x);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("EmbedKernel");
  return absl::OkStatus();
}

absl::Status GatherRows(const float* x, const int32_t* rows, int64_t count, int64_t width, float* y, cudaStream_t stream) {
  if (count < 0 || width <= 0) return absl::InvalidArgumentError("GatherRows: bad shape");
  if (count == 0) return absl::OkStatus();
  GatherRowsKernel<<<GridFor(count * width), kThreads, 0, stream>>>(x, rows, count, width, y);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("GatherRowsKernel");
  return absl::OkStatus();
}

absl::Status CopyFloatRows(const float* const* src, float* const* dst, int64_t count, int64_t floats,
                           cudaStream_t stream) {
  if (count < 0 || floats <= 0) return absl::InvalidArgumentError("CopyFloatRows: bad shape");
  if (count == 0) return absl::OkStatus();
  CopyFloatRowsKernel<<<GridFor(count * floats), kThreads, 0, stream>>>(src, dst, count, floats);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("CopyFloatRowsKernel");
  return absl::OkStatus();
}

absl::Status Scale(float* x, int64_t count, float factor, cudaStream_t stream) {
  if (count < 0) return absl::InvalidArgumentError("Scale: negative count");
  if (count == 0) return absl::OkStatus();
  ScaleKernel<<<GridFor(count), kThreads, 0, stream>>>(x, count, factor);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("ScaleKernel");
  return absl::OkStatus();
}

absl::Status AddToStreams(const float* e, int64_t tokens, int64_t streams, int64_t hidden, float* x, cudaStream_t stream) {
  if (tokens < 0 || streams <= 0 || hidden <= 0) return absl::InvalidArgumentError("AddToStreams: bad shape");
  if (tokens == 0) return absl::OkStatus();
  AddToStreamsKernel<<<GridFor(tokens * streams * hidden), kThreads, 0, stream>>>(e, tokens, streams, hidden, x);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("AddToStreamsKernel");
  return absl::OkStatus();
}

}  // namespace tandem::kernels::cuda
