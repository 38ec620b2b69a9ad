// What the sparse-attention kernels share (internal to this folder): the launch parameters, the split-KV
// partial layout the combine kernel reads, the selection compaction, and the launch description by which
// attention.cu picks a kernel (each kernel file hands out its own; cuda_attention.h is the API).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/kernels/cuda/cuda_attention.h"

namespace tandem::kernels::cuda::internal {

constexpr int kAttentionDim = 512;       // the DSV4 head_dim (448 e4m3 + 64 bf16); every kernel's q / o row
constexpr int64_t kMaxTopK = 4096;       // selected slots a block compacts into shared memory at most
constexpr int kMaxSplits = 32;           // split-KV: blocks per (token, head group) at most

struct AttentionParams {
  int64_t heads = 0;
  int groups = 0;
  int nope = 0;
  int chunks = 0;  // 8-byte chunks of an entry's data
  const float* q = nullptr;
  const float* sink = nullptr;
  float scale = 1.0f;
  const KvRef* window = nullptr;
  const int64_t* window_begin = nullptr;
  const int32_t* window_count = nullptr;
  const KvRef* compressed = nullptr;
  const int64_t* compressed_begin = nullptr;
  const int32_t* compressed_count = nullptr;
  const int32_t* selected = nullptr;
  int topk = 0;
  float* o = nullptr;
  // Split-KV: block (t, s, g) takes tiles [s * tiles / splits, (s + 1) * tiles / splits) of token t. With
  // splits > 1 it leaves the unnormalized accumulator and (max, denominator) without the sink in
  // partial_acc [t, s, head, kAttentionDim] and partial_ml [t, s, head, 2] for SparseAttentionCombineKernel; a
  // block with no tiles writes only (-inf, 0).
  int splits = 1;
  float* partial_acc = nullptr;
  float* partial_ml = nullptr;
};

// Rows (t, s, h) of the partial arrays.
__device__ __forceinline__ int64_t PartialRow(const AttentionParams& p, int64_t t, int split, int64_t h) {
  return (t * p.splits + split) * p.heads + h;
}
// Compacts the row's entries >= 0 into out in order (block-wide ballot scan); returns their count.
template <int kBlockThreads>
__device__ int CompactSelection(const int32_t* row, int topk, int32_t* out, int* warp_counts) {
  constexpr int kBlockWarps = kBlockThreads / 32;
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  int count = 0;
  for (int base = 0; base < topk; base += kBlockThreads) {
    const int n = base + tid;
    const int32_t v = n < topk ? row[n] : -1;
    const bool keep = v >= 0;
    const unsigned ballot = __ballot_sync(kFullMask, keep);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int offset = count, total = 0;
    for (int w = 0; w < kBlockWarps; ++w) {
      if (w < warp) offset += warp_counts[w];
      total += warp_counts[w];
    }
    if (keep) out[offset + __popc(ballot & ((1u << lane) - 1u))] = v;
    count += total;
    __syncthreads();
  }
  return count;
}
// A kernel that serves SparseAttentionArgs: its block size, the heads one block serves and its dynamic
// shared memory for a row of `selected_slots` (topk when the layer selects, else 0).
struct AttentionLaunch {
  void (*kernel)(AttentionParams) = nullptr;
  const char* name = nullptr;
  int threads = 0;
  int heads_per_block = 0;
  size_t shared = 0;
};

// The tensor-core kernel for the DSV4 entry (448 e4m3 + 64 bf16), 16 heads a block (attention_mma.cu).
// exact: q and the probabilities in three and two bf16 pieces (f32 accuracy); else one bf16 each.
AttentionLaunch MmaAttentionLaunch(bool exact, int64_t selected_slots);
// The DSV4 entry with bf16 q and probabilities, 64 heads a block: each entry is read and dequantized once
// per 64 heads instead of once per 16 (attention_wide.cu). heads must be a multiple of 64.
AttentionLaunch WideAttentionLaunch(int64_t selected_slots);

}  // namespace tandem::kernels::cuda::internal
