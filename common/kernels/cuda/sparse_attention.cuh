// What the sparse-attention kernels share (internal to this folder): the launch parameters, the split-KV
// partial layout the combine kernel reads, the selection compaction, and the launch description by which
// attention.cu picks a kernel (each kernel file hands out its own; cuda_attention.h is the API).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/kernels/cuda/attention_device.cuh"
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
// Block (t, split, head group) of a launch over tokens x groups x splits, heads_per_block heads a group.
struct BlockCoordinates {
  int64_t t = 0;
  int split = 0;
  int64_t h0 = 0;  // the group's first head
  int hn = 0;      // its heads that exist (the last group may be partial)
};
__device__ __forceinline__ BlockCoordinates CoordinatesOf(const AttentionParams& p, int heads_per_block) {
  BlockCoordinates b;
  b.t = blockIdx.x / (p.groups * p.splits);
  b.split = static_cast<int>(blockIdx.x / p.groups % p.splits);
  b.h0 = static_cast<int64_t>(blockIdx.x % p.groups) * heads_per_block;
  b.hn = static_cast<int>(min(static_cast<int64_t>(heads_per_block), p.heads - b.h0));
  return b;
}

// Token t's candidates (window first, then compressed: a row's entries >= 0 in order, compacted into
// sel_s, or the first compressed_count) and this block's share of them: tiles [tile_begin, tile_end) of
// `tile` candidates, cut by split.
struct BlockCandidates {
  int n_window = 0;
  int64_t window_begin = 0;
  int n_compressed = 0;
  int64_t compressed_begin = 0;
  int tile_begin = 0;
  int tile_end = 0;
  // Candidate i (0 <= i < n_window + n_compressed).
  __device__ __forceinline__ KvRef Ref(const AttentionParams& p, const int32_t* sel_s, int i) const {
    return i < n_window ? p.window[window_begin + i]
                        : p.compressed[compressed_begin + (p.selected ? sel_s[i - n_window] : i - n_window)];
  }
  // Candidate c of the tile of `tile` candidates at tile0, or an empty KvRef past this block's range.
  __device__ __forceinline__ KvRef RefInTile(const AttentionParams& p, const int32_t* sel_s, int tile0, int tile,
                                             int c) const {
    return tile0 < tile_end && c < min(tile, tile_end - tile0) ? Ref(p, sel_s, tile0 + c) : KvRef{};
  }
};

// The start every sparse-attention block shares: seeds the running max and denominator of its heads in
// m_s / l_s (the sink and 1 unsplit; -inf and 0 when split, the combine adding the sink once), finds its
// candidates and ends with a barrier (sel_s, m_s and l_s are then visible to the whole block).
template <int kBlockThreads>
__device__ BlockCandidates StartBlock(const AttentionParams& p, const BlockCoordinates& b, int heads_per_block, int tile,
                                      float* m_s, float* l_s, int32_t* sel_s, int* warp_counts) {
  const int tid = static_cast<int>(threadIdx.x);
  for (int h = tid; h < heads_per_block; h += kBlockThreads) {
    if (p.splits == 1) {
      m_s[h] = h < b.hn ? p.sink[b.h0 + h] : 0.0f;
      l_s[h] = 1.0f;  // exp(sink - max) with the running max at the sink
    } else {
      m_s[h] = -INFINITY;
      l_s[h] = 0.0f;
    }
  }
  BlockCandidates c;
  c.n_window = p.window ? max(p.window_count[b.t], 0) : 0;
  c.window_begin = c.n_window > 0 ? p.window_begin[b.t] : 0;
  if (p.compressed) {
    c.compressed_begin = p.compressed_begin[b.t];
    c.n_compressed = p.selected ? CompactSelection<kBlockThreads>(p.selected + b.t * p.topk, p.topk, sel_s, warp_counts)
                                : max(p.compressed_count[b.t], 0);
  }
  __syncthreads();
  const int total = c.n_window + c.n_compressed;
  const int64_t tiles = (total + tile - 1) / tile;
  c.tile_begin = static_cast<int>(b.split * tiles / p.splits) * tile;
  c.tile_end = static_cast<int>(min(static_cast<int64_t>(total), (b.split + 1) * tiles / p.splits * tile));
  return c;
}

// A split block's (max, denominator) per head for the combine; returns whether it saw any tile (a block
// without one leaves its accumulator rows unwritten: (-inf, 0) tells the combine to skip them).
__device__ __forceinline__ bool WritePartialState(const AttentionParams& p, const BlockCoordinates& b,
                                                  const BlockCandidates& c, const float* m_s, const float* l_s) {
  const int tid = static_cast<int>(threadIdx.x);
  if (tid < b.hn) {
    const int64_t row = PartialRow(p, b.t, b.split, b.h0 + tid);
    p.partial_ml[row * 2] = m_s[tid];
    p.partial_ml[row * 2 + 1] = l_s[tid];
  }
  return c.tile_begin < c.tile_end;
}

// The DSV4 entry on the tensor-core kernels: 448 e4m3 codes + 64 bf16 rope dims (576 data bytes, 36
// chunks of 16), then 8 scale bytes (7 ue8m0 tile scales and a pad byte).
constexpr int kEntryDataBytes = 576;
constexpr int kEntryChunks = kEntryDataBytes / 16;

// Starts copying one entry into a raw shared row (the data, then the scale bytes at kEntryDataBytes; 16-byte
// aligned): thread `sub` of the entry's kCopiers takes the 16-byte chunks sub + kCopiers j. cp.async of 16 or
// 8 bytes as the entry is aligned (8: interleaved 584-byte entries, a sequence state's window or a chunk's
// fresh entries), else loads and a plain store that a later barrier publishes; sub 0 copies the scales.
template <int kCopiers>
__device__ __forceinline__ void IssueEntryCopy(uint8_t* dst, const KvRef& ref, int sub) {
  constexpr int kSteps = (kEntryChunks + kCopiers - 1) / kCopiers;
  const uintptr_t address = reinterpret_cast<uintptr_t>(ref.data);
  if ((address & 15u) == 0) {
#pragma unroll
    for (int j = 0; j < kSteps; ++j) {
      const int k = sub + kCopiers * j;
      if (k < kEntryChunks) CopyAsync16(SharedAddress(dst + 16 * k), ref.data + 16 * k);
    }
  } else if ((address & 7u) == 0) {
#pragma unroll
    for (int j = 0; j < kSteps; ++j) {
      const int k = sub + kCopiers * j;
      if (k < kEntryChunks) {
        CopyAsync8(SharedAddress(dst + 16 * k), ref.data + 16 * k);
        CopyAsync8(SharedAddress(dst + 16 * k + 8), ref.data + 16 * k + 8);
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < kSteps; ++j) {
      const int k = sub + kCopiers * j;
      if (k < kEntryChunks) {
        const uint2 lo = Load8(ref.data + 16 * k), hi = Load8(ref.data + 16 * k + 8);
        *reinterpret_cast<uint4*>(dst + 16 * k) = make_uint4(lo.x, lo.y, hi.x, hi.y);
      }
    }
  }
  if (sub == 0) {
    if ((reinterpret_cast<uintptr_t>(ref.scales) & 7u) == 0) {
      CopyAsync8(SharedAddress(dst + kEntryDataBytes), ref.scales);
    } else {
      *reinterpret_cast<uint2*>(dst + kEntryDataBytes) = Load8(ref.scales);
    }
  }
}

// The online-softmax step over a tile for kHeads consecutive heads h0.. of a warp, a lane per candidate (the
// whole warp calls it): head j's score sums kParts partial rows part_s[(w * heads + h0 + j) * stride + lane]
// in order and is scaled; prob[j] <- exp(score - new max) (0 past valid). The heads' reductions run
// interleaved (one dependent shuffle chain for all of them, not one per head). Lane 0 then moves each head's
// running max, denominator (plus the tile's probabilities) and the accumulator's correction in m_s / l_s /
// corr_s. kRoundBf16: each probability is rounded to bf16 before it is summed and returned, so the
// denominator adds exactly the weights PV multiplies (else a head's output carries their rounding as one
// coherent scale error, up to 2^-8 when a few candidates hold the mass).
template <int kParts, int kHeads, bool kRoundBf16>
__device__ __forceinline__ void SoftmaxTileStep(const float* part_s, int heads, int stride, int h0, int valid,
                                                float scale, float* m_s, float* l_s, float* corr_s,
                                                float (&prob)[kHeads]) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  float score[kHeads], top[kHeads], sum[kHeads];
#pragma unroll
  for (int j = 0; j < kHeads; ++j) {
    score[j] = -INFINITY;
    if (lane < valid) {
      float s = part_s[(h0 + j) * stride + lane];
#pragma unroll
      for (int w = 1; w < kParts; ++w) s = __fadd_rn(s, part_s[(w * heads + h0 + j) * stride + lane]);
      score[j] = __fmul_rn(s, scale);
    }
    top[j] = score[j];
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
#pragma unroll
    for (int j = 0; j < kHeads; ++j) top[j] = fmaxf(top[j], __shfl_xor_sync(kFullMask, top[j], offset));
  }
#pragma unroll
  for (int j = 0; j < kHeads; ++j) {
    top[j] = fmaxf(m_s[h0 + j], top[j]);  // the new running max
    prob[j] = lane < valid ? expf(score[j] - top[j]) : 0.0f;
    if constexpr (kRoundBf16) prob[j] = __bfloat162float(__float2bfloat16_rn(prob[j]));
    sum[j] = prob[j];
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
#pragma unroll
    for (int j = 0; j < kHeads; ++j) sum[j] += __shfl_xor_sync(kFullMask, sum[j], offset);
  }
  __syncwarp();  // every lane's m_s read is ordered before lane 0 overwrites it (shuffles do not order memory)
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
      const float correction = expf(m_s[h0 + j] - top[j]);
      m_s[h0 + j] = top[j];
      l_s[h0 + j] = fmaf(l_s[h0 + j], correction, sum[j]);
      corr_s[h0 + j] = correction;
    }
  }
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
// The same math on Hopper's warpgroup MMA, 64 heads a block (attention_wgmma.cu): sm_90a only, heads a
// multiple of 64; its shared memory grows with selected_slots (the 64-head kernel's fallback past the limit).
AttentionLaunch WgmmaAttentionLaunch(int64_t selected_slots);

}  // namespace tandem::kernels::cuda::internal
