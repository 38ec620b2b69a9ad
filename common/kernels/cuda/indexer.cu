// The C4 indexer on the GPU: scores score[j] = sum_h w[h] * relu(q[h] . K_j) in f32 (the CPU sums in
// double, so near-ties may order differently), then an exact top-k per token by a 4-pass radix select
// on the scores' bits and a bitonic sort of the chosen (score, -index) keys.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/kernels/cuda/attention_device.cuh"
#include "common/kernels/cuda/check.h"
#include "common/kernels/cuda/cuda_attention.h"

namespace tandem::kernels::cuda {
namespace {

using internal::Fp8ToFloat;
using internal::kFullMask;
using internal::Load4;

// ---- Scores: one block per (token, 64 keys) ----
constexpr int kScoreThreads = 256;
constexpr int kScoreWarps = kScoreThreads / 32;
constexpr int kKeyTile = 64;            // a lane scores keys lane and lane + 32
constexpr int kKeyStride = kKeyTile + 1;
constexpr int kHeadsPerPass = 8;        // accumulators per key per thread (heads warp, warp + 8, ...)
constexpr int64_t kMaxTopK = 4096;
constexpr int kTopKThreads = 512;

size_t ScoreSharedBytes(int64_t heads, int64_t dim) {
  return static_cast<size_t>(heads * dim + dim * kKeyStride + kScoreWarps * kKeyTile) * sizeof(float);
}

__global__ void __launch_bounds__(kScoreThreads) IndexerScoreKernel(IndexerArgs a, float* scores) {
  extern __shared__ __align__(16) float smem[];
  const int dim = static_cast<int>(a.dim), heads = static_cast<int>(a.heads);
  float* q_s = smem;                    // [heads][dim]
  float* k_s = q_s + heads * dim;       // [dim][kKeyStride]: key columns
  float* part_s = k_s + dim * kKeyStride;  // [warp][key]
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int tile0 = static_cast<int>(blockIdx.x) * kKeyTile;
  for (int64_t t = blockIdx.y; t < a.tokens; t += gridDim.y) {
    const int n = min(max(a.visible[t], 0), a.max_visible);
    if (n <= a.topk || tile0 >= n) continue;  // uniform over the block
    __syncthreads();  // the previous token's readers are done with shared memory
    const float* q = a.q + t * heads * dim;
    for (int i = tid; i < heads * dim; i += kScoreThreads) q_s[i] = q[i];
    // Keys: a lane dequantizes 4 codes; a warp instruction covers 4 keys x 32 contiguous bytes, and the
    // transposed stores hit 32 distinct banks.
    const int chunks = dim / 4, chunk_groups = (chunks + 7) / 8;
    const uint8_t* const* keys = a.keys + a.key_begin[t];
    for (int item = warp; item < (kKeyTile / 4) * chunk_groups; item += kScoreWarps) {
      const int key = (item % (kKeyTile / 4)) * 4 + (lane & 3);
      const int chunk = (item / (kKeyTile / 4)) * 8 + (lane >> 2);
      if (chunk >= chunks) continue;
      float v[4] = {0.f, 0.f, 0.f, 0.f};
      if (tile0 + key < n) {
        const uint8_t* entry = keys[tile0 + key];
        const float scale = __uint_as_float(Load4(entry + dim));
        const uint32_t codes = Load4(entry + 4 * chunk);
#pragma unroll
        for (int i = 0; i < 4; ++i) v[i] = __fmul_rn(Fp8ToFloat((codes >> (8 * i)) & 0xffu), scale);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) k_s[(4 * chunk + i) * kKeyStride + key] = v[i];
    }
    __syncthreads();

    // A thread holds 8 heads x 2 keys of accumulators; q reads are warp broadcasts, key reads a column.
    float partial[2] = {0.f, 0.f};
    const float* w = a.weights + t * heads;
    for (int base = warp; base < heads; base += kScoreWarps * kHeadsPerPass) {
      float acc[kHeadsPerPass][2];
#pragma unroll
      for (int j = 0; j < kHeadsPerPass; ++j) acc[j][0] = acc[j][1] = 0.f;
      for (int d = 0; d < dim; d += 4) {
        float ka[4], kb[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          ka[i] = k_s[(d + i) * kKeyStride + lane];
          kb[i] = k_s[(d + i) * kKeyStride + lane + 32];
        }
#pragma unroll
        for (int j = 0; j < kHeadsPerPass; ++j) {
          const int h = base + kScoreWarps * j;
          if (h < heads) {
            const float4 qv = *reinterpret_cast<const float4*>(q_s + h * dim + d);
            acc[j][0] = fmaf(qv.w, ka[3], fmaf(qv.z, ka[2], fmaf(qv.y, ka[1], fmaf(qv.x, ka[0], acc[j][0]))));
            acc[j][1] = fmaf(qv.w, kb[3], fmaf(qv.z, kb[2], fmaf(qv.y, kb[1], fmaf(qv.x, kb[0], acc[j][1]))));
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kHeadsPerPass; ++j) {
        const int h = base + kScoreWarps * j;
        if (h < heads) {
          partial[0] = fmaf(w[h], fmaxf(acc[j][0], 0.f), partial[0]);
          partial[1] = fmaf(w[h], fmaxf(acc[j][1], 0.f), partial[1]);
        }
      }
    }
    part_s[warp * kKeyTile + lane] = partial[0];
    part_s[warp * kKeyTile + lane + 32] = partial[1];
    __syncthreads();
    if (tid < kKeyTile && tile0 + tid < n) {
      float score = 0.f;
      for (int w8 = 0; w8 < kScoreWarps; ++w8) score += part_s[w8 * kKeyTile + tid];
      scores[t * a.max_visible + tile0 + tid] = score;
    }
  }
}

// ---- Top-k: one block per token ----

// Order-preserving unsigned image of a float (-0 counts as +0, as the CPU's comparisons do).
__device__ __forceinline__ uint32_t OrderKey(float value) {
  const uint32_t bits = value == 0.0f ? 0u : __float_as_uint(value);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Larger key = higher score, then smaller index.
__device__ __forceinline__ unsigned long long SortKey(uint32_t order, int index) {
  return static_cast<unsigned long long>(order) << 32 | (0xffffffffu - static_cast<uint32_t>(index));
}

__global__ void __launch_bounds__(kTopKThreads) IndexerTopKKernel(const float* scores, int32_t max_visible,
                                                                  const int32_t* visible, int topk, int padded,
                                                                  int32_t* selected) {
  extern __shared__ unsigned long long sort_s[];  // [padded]
  __shared__ unsigned int histogram[256];
  __shared__ unsigned int digit_s, need_s;
  __shared__ int greater_count, equal_taken;
  __shared__ int warp_equal[kTopKThreads / 32];
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int64_t t = blockIdx.x;
  const int n = min(max(visible[t], 0), max_visible);
  int32_t* out = selected + t * topk;
  if (n <= topk) {  // all of them, in order (attention.cc takes every entry when visible <= index_topk)
    for (int i = tid; i < topk; i += kTopKThreads) out[i] = i < n ? i : -1;
    return;
  }
  const float* row = scores + t * max_visible;

  // Radix select, 8 bits a pass from the top: the exact order key of the k-th largest score and how many
  // entries equal to it still belong to the top k.
  uint32_t prefix = 0, mask = 0, need = static_cast<uint32_t>(topk);
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += kTopKThreads) histogram[i] = 0;
    __syncthreads();
    for (int i = tid; i < n; i += kTopKThreads) {
      const uint32_t u = OrderKey(row[i]);
      if ((u & mask) == prefix) atomicAdd(&histogram[(u >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (tid == 0) {
      uint32_t above = 0;
      int b = 255;
      for (; b > 0; --b) {
        if (above + histogram[b] >= need) break;
        above += histogram[b];
      }
      digit_s = static_cast<uint32_t>(b);
      need_s = need - above;
    }
    __syncthreads();
    prefix |= digit_s << shift;
    mask |= 255u << shift;
    need = need_s;
  }

  // Gather: every key above the threshold (any order: sorted next), and the first `need` equal ones by index.
  if (tid == 0) {
    greater_count = 0;
    equal_taken = 0;
  }
  __syncthreads();
  const int first_equal = topk - static_cast<int>(need);
  for (int base = 0; base < n; base += kTopKThreads) {
    const int i = base + tid;
    const uint32_t u = i < n ? OrderKey(row[i]) : 0u;
    const bool greater = i < n && u > prefix, equal = i < n && u == prefix;
    if (greater) sort_s[atomicAdd(&greater_count, 1)] = SortKey(u, i);
    const unsigned ballot = __ballot_sync(kFullMask, equal);
    if (lane == 0) warp_equal[warp] = __popc(ballot);
    __syncthreads();
    int rank = equal_taken + __popc(ballot & ((1u << lane) - 1u)), chunk_total = 0;
    for (int w = 0; w < kTopKThreads / 32; ++w) {
      if (w < warp) rank += warp_equal[w];
      chunk_total += warp_equal[w];
    }
    if (equal && rank < static_cast<int>(need)) sort_s[first_equal + rank] = SortKey(u, i);
    __syncthreads();
    if (tid == 0) equal_taken += chunk_total;
  }
  for (int i = topk + tid; i < padded; i += kTopKThreads) sort_s[i] = 0ull;  // below every real key
  __syncthreads();

  // Bitonic sort, descending.
  for (int k = 2; k <= padded; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = tid; i < padded; i += kTopKThreads) {
        const int partner = i ^ j;
        if (partner > i) {
          const unsigned long long x = sort_s[i], y = sort_s[partner];
          if ((i & k) == 0 ? x < y : x > y) {
            sort_s[i] = y;
            sort_s[partner] = x;
          }
        }
      }
      __syncthreads();
    }
  }
  for (int i = tid; i < topk; i += kTopKThreads) {
    out[i] = static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(sort_s[i] & 0xffffffffull));
  }
}

}  // namespace

size_t IndexerWorkspaceBytes(int64_t tokens, int64_t max_visible) {
  return static_cast<size_t>(std::max<int64_t>(tokens, 0)) * static_cast<size_t>(std::max<int64_t>(max_visible, 0)) *
             sizeof(float) +
         256;
}

absl::Status IndexerTopK(const IndexerArgs& a, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (a.tokens < 0 || a.tokens > 0x7fffffff) {
    return absl::InvalidArgumentError(absl::StrCat("IndexerTopK: tokens ", a.tokens, " out of range"));
  }
  if (a.heads <= 0 || a.dim <= 0 || a.dim % 4 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("IndexerTopK: heads ", a.heads, " must be > 0 and dim ", a.dim, " a positive multiple of 4"));
  }
  if (a.topk <= 0 || a.topk > kMaxTopK) {
    return absl::InvalidArgumentError(absl::StrCat("IndexerTopK: topk ", a.topk, " must be in [1, ", kMaxTopK, "]"));
  }
  if (a.max_visible < 0) return absl::InvalidArgumentError("IndexerTopK: max_visible must be >= 0");
  if (a.tokens == 0) return absl::OkStatus();
  if (!a.visible || !a.selected) return absl::InvalidArgumentError("IndexerTopK: visible and selected are required");
  if (workspace_bytes < IndexerWorkspaceBytes(a.tokens, a.max_visible)) {
    return absl::InvalidArgumentError(absl::StrCat("IndexerTopK: workspace of ", workspace_bytes, " bytes, needs ",
                                                   IndexerWorkspaceBytes(a.tokens, a.max_visible)));
  }
  float* scores = static_cast<float*>(workspace);
  if (a.max_visible > a.topk) {
    if (!a.q || !a.weights || !a.keys || !a.key_begin) {
      return absl::InvalidArgumentError("IndexerTopK: q, weights, keys and key_begin are required");
    }
    if ((reinterpret_cast<uintptr_t>(a.q) & 15u) != 0 || (reinterpret_cast<uintptr_t>(workspace) & 3u) != 0) {
      return absl::InvalidArgumentError("IndexerTopK: q must be 16-byte aligned and the workspace 4-byte aligned");
    }
    const size_t shared = ScoreSharedBytes(a.heads, a.dim);
    TANDEM_RETURN_IF_ERROR(internal::AllowSharedMemory(IndexerScoreKernel, shared, "IndexerTopK"));
    const dim3 grid(static_cast<unsigned>((a.max_visible + kKeyTile - 1) / kKeyTile),
                    static_cast<unsigned>(std::min<int64_t>(a.tokens, 65535)));
    IndexerScoreKernel<<<grid, kScoreThreads, shared, stream>>>(a, scores);
    TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("IndexerScoreKernel");
  }
  int padded = 1;
  while (padded < a.topk) padded *= 2;
  IndexerTopKKernel<<<static_cast<unsigned>(a.tokens), kTopKThreads, static_cast<size_t>(padded) * 8, stream>>>(
      scores, a.max_visible, a.visible, static_cast<int>(a.topk), padded, a.selected);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("IndexerTopKKernel");
  return absl::OkStatus();
}

}  // namespace tandem::kernels::cuda
