// Small CUDA kernels the whole-model forward glues the big ones with: the embedding lookup, row gathers
// and pointer-list copies (ring rows, cache entries moved between buffers), scaling and adds. Every call
// launches asynchronously on `stream`; pointers are device pointers.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "common/core/status.h"
#include "common/kernels/cuda/cuda_attention.h"

namespace tandem::kernels::cuda {

// x[t, m, :] = float(table[ids[t], :]) for every stream m < streams (table bf16 bits [vocab, hidden]).
// An id outside [0, vocab) writes NaN rows (callers validate ids on the host first).
absl::Status EmbedTokens(const uint16_t* table, int64_t vocab, int64_t hidden, const int32_t* ids, int64_t tokens,
                         int64_t streams, float* x, cudaStream_t stream = nullptr);

// y[i, :] = x[rows[i], :] for i < count (rows of `width` floats).
absl::Status GatherRows(const float* x, const int32_t* rows, int64_t count, int64_t width, float* y,
                        cudaStream_t stream = nullptr);

// dst[i][0, floats) = src[i][0, floats) for i < count (pointer lists in device memory).
absl::Status CopyFloatRows(const float* const* src, float* const* dst, int64_t count, int64_t floats,
                           cudaStream_t stream = nullptr);

// x[i] *= factor for i < count.
absl::Status Scale(float* x, int64_t count, float factor, cudaStream_t stream = nullptr);

// x[t, m, :] += e[t, :] for every stream m (x [tokens, streams, hidden], e [tokens, hidden]).
absl::Status AddToStreams(const float* e, int64_t tokens, int64_t streams, int64_t hidden, float* x,
                          cudaStream_t stream = nullptr);

// One run of cache entries to expand into an address table on the device (so a step uploads a few
// runs per request and layer, not one address per entry): entry i < count goes to out[out_offset + i]
// and lives at slot s = (first + i) % ring when ring > 0 (the window ring), else s = i: data + s *
// data_stride, scales + s * scale_stride.
struct RefRun {
  int64_t out_offset = 0;
  int64_t count = 0;
  int64_t first = 0;
  int64_t ring = 0;
  uint8_t* data = nullptr;
  int64_t data_stride = 0;
  uint8_t* scales = nullptr;
  int64_t scale_stride = 0;
};
// out[...] = KvRef{data, scales} of every entry of every run.
absl::Status ExpandKvRefs(const RefRun* runs, int64_t run_count, KvRef* out, cudaStream_t stream = nullptr);
// out[...] = data of every entry of every run (indexer keys).
absl::Status ExpandPointers(const RefRun* runs, int64_t run_count, uint8_t** out, cudaStream_t stream = nullptr);

}  // namespace tandem::kernels::cuda
