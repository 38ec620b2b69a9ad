// The C4 indexer on the GPU: scores score[j] = sum_h w[h] * relu(q[h] . K_j) (the CPU sums in double, so
// near-ties may order differently): on tensor cores for the V4 shapes (64 heads x 128 dims; q as an f16
// pair, ~22 bits), else in f32 on the SIMT cores; then an exact top-k per token by a 4-pass radix select
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
using internal::Fp8PairToF16;
using internal::LoadMatrixX4;
using internal::MmaF16;
using internal::Load4;
using internal::SharedAddress;
using internal::SplitF16x2;

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

// ---- Scores on tensor cores (index_n_heads 64, index_head_dim 128: the V4 shapes) ----
// Block (key chunk, token): keys as the MMA's M (4 m16 tiles of a 64-key tile), heads as its N (warp w
// owns heads [16w, 16w + 16): two n8 tiles), dims as K. The keys' e4m3 codes become f16 exactly (no
// scale: each key's one f32 scale multiplies its dot products after the MMA). q is held in registers as
// f16 hi + lo after a power-of-two shift per head that puts the head's largest |q| in [2^13, 2^14) (the
// f16 pair then keeps ~22 bits of every element; the shift goes into the head's weight, as
// w relu(c x) = c w relu(x) for c > 0).
namespace tcx {
constexpr int kHeads = 64, kDim = 128;
constexpr int kThreads = 128, kWarps = kThreads / 32;
constexpr int kTile = 64;                    // keys per tile
constexpr int kRawStride = 144;              // bytes per key in raw_s: 128 codes, the 4 scale bytes, pad
constexpr int kKeyHalves = kDim + 8;         // f16 per key row of k_s (272 bytes: ldmatrix rows on distinct banks)
constexpr int kMaxTilesPerBlock = 8;
static_assert(kHeads == 16 * kWarps, "a warp per 16 heads");
constexpr size_t kRawBytes = size_t{kTile} * kRawStride;
constexpr size_t kKeyBytes = size_t{kTile} * kKeyHalves * 2;
constexpr size_t kSharedBytes = kRawBytes + kKeyBytes + kTile * 4 + size_t{kWarps} * kTile * 4;
}  // namespace tcx

__global__ void __launch_bounds__(tcx::kThreads) IndexerScoreMmaKernel(IndexerArgs a, float* scores, int tiles_per_block) {
  using tcx::kDim, tcx::kHeads, tcx::kKeyBytes, tcx::kKeyHalves, tcx::kRawBytes, tcx::kRawStride, tcx::kThreads, tcx::kTile,
      tcx::kWarps;
  extern __shared__ __align__(16) uint8_t shared[];
  uint8_t* raw_s = shared;                                            // [key][kRawStride]
  uint16_t* k_s = reinterpret_cast<uint16_t*>(shared + kRawBytes);    // [key][kKeyHalves] f16
  float* scale_s = reinterpret_cast<float*>(shared + kRawBytes + kKeyBytes);  // [key]
  float* part_s = scale_s + kTile;                                    // [warp][key]
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, tq = lane & 3;
  const int chunk0 = static_cast<int>(blockIdx.x) * tiles_per_block * kTile;
  for (int64_t t = blockIdx.y; t < a.tokens; t += gridDim.y) {
    const int n = min(max(a.visible[t], 0), a.max_visible);
    if (n <= a.topk || chunk0 >= n) continue;  // uniform over the block
    const int chunk_end = min(n, chunk0 + tiles_per_block * kTile);
    const uint8_t* const* keys = a.keys + a.key_begin[t];

    // Copies keys [tile0, tile0 + valid) into raw_s: two threads per key, 4-byte cp.async (entries are
    // 132 bytes apart), the second thread also the scale.
    const auto issue = [&](int tile0) {
      const int key = tid >> 1, half = tid & 1;
      if (tile0 + key < chunk_end) {
        const uint8_t* entry = keys[tile0 + key];
        uint8_t* dst = raw_s + key * kRawStride;
        if ((reinterpret_cast<uintptr_t>(entry) & 3u) == 0) {
#pragma unroll
          for (int i = 0; i < 16; ++i) internal::CopyAsync4(SharedAddress(dst + 64 * half + 4 * i), entry + 64 * half + 4 * i);
          if (half) internal::CopyAsync4(SharedAddress(dst + kDim), entry + kDim);
        } else {
          for (int i = 0; i < 16; ++i) *reinterpret_cast<uint32_t*>(dst + 64 * half + 4 * i) = Load4(entry + 64 * half + 4 * i);
          if (half) *reinterpret_cast<uint32_t*>(dst + kDim) = Load4(entry + kDim);
        }
      }
      internal::CopyAsyncCommit();
    };
    __syncthreads();  // the previous token's readers are done with shared memory
    issue(chunk0);

    // q of this warp's heads as B fragments (head 16 warp + 8 nt + g; dims 16 ks + 2 tq (+1, +8, +9)),
    // shifted per head and split f16 hi + lo; the weights with the shift folded in.
    uint32_t q_hi[2][kDim / 16][2], q_lo[2][kDim / 16][2];
    float weight[2];
    {
      const float* q = a.q + t * kHeads * kDim;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int h = 16 * warp + 8 * nt + g;
        float2 v[kDim / 16][2];
        float top = 0.0f;
#pragma unroll
        for (int ks = 0; ks < kDim / 16; ++ks) {
          v[ks][0] = *reinterpret_cast<const float2*>(q + h * kDim + 16 * ks + 2 * tq);
          v[ks][1] = *reinterpret_cast<const float2*>(q + h * kDim + 16 * ks + 2 * tq + 8);
          top = fmaxf(top, fmaxf(fmaxf(fabsf(v[ks][0].x), fabsf(v[ks][0].y)), fmaxf(fabsf(v[ks][1].x), fabsf(v[ks][1].y))));
        }
        top = fmaxf(top, __shfl_xor_sync(internal::kFullMask, top, 1));
        top = fmaxf(top, __shfl_xor_sync(internal::kFullMask, top, 2));
        // 2^shift with top * 2^-shift in [2^13, 2^14); a zero, subnormal or non-finite head keeps 2^0.
        int shift = 0;
        if (top >= 1e-30f && top <= 3e38f) shift = ((__float_as_int(top) >> 23) & 0xff) - 127 - 13;
        const float down = ldexpf(1.0f, -shift);
        weight[nt] = a.weights[t * kHeads + h] * ldexpf(1.0f, shift);
#pragma unroll
        for (int ks = 0; ks < kDim / 16; ++ks) {
          SplitF16x2(v[ks][0].x * down, v[ks][0].y * down, q_hi[nt][ks][0], q_lo[nt][ks][0]);
          SplitF16x2(v[ks][1].x * down, v[ks][1].y * down, q_hi[nt][ks][1], q_lo[nt][ks][1]);
        }
      }
    }
    // Columns 2 tq, 2 tq + 1 of each n8 tile are heads 16 warp + 8 nt + 2 tq (+1): their weights.
    float w_col[2][2];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      w_col[nt][0] = __shfl_sync(internal::kFullMask, weight[nt], (2 * tq) * 4);
      w_col[nt][1] = __shfl_sync(internal::kFullMask, weight[nt], (2 * tq + 1) * 4);
    }

    const uint32_t key_base = SharedAddress(k_s);
    const uint32_t a_address = key_base + ((lane & 15) * kKeyHalves + 8 * (lane >> 4)) * 2;
    for (int tile0 = chunk0; tile0 < chunk_end; tile0 += kTile) {
      const int valid = min(kTile, chunk_end - tile0);
      internal::CopyAsyncWaitAll();
      __syncthreads();  // raw_s holds the tile; the previous tile's MMAs are done with k_s and part_s
      // Codes -> f16 rows (zeros past `valid`): a thread per (key, 16 codes), 4 items each.
      for (int item = tid; item < kTile * (kDim / 16); item += kThreads) {
        const int key = item / (kDim / 16), c = item % (kDim / 16);
        uint4 lo = make_uint4(0u, 0u, 0u, 0u), hi = lo;
        if (key < valid) {
          const uint4 raw = *reinterpret_cast<const uint4*>(raw_s + key * kRawStride + 16 * c);
          lo = make_uint4(Fp8PairToF16(raw.x), Fp8PairToF16(raw.x >> 16), Fp8PairToF16(raw.y), Fp8PairToF16(raw.y >> 16));
          hi = make_uint4(Fp8PairToF16(raw.z), Fp8PairToF16(raw.z >> 16), Fp8PairToF16(raw.w), Fp8PairToF16(raw.w >> 16));
        }
        *reinterpret_cast<uint4*>(k_s + key * kKeyHalves + 16 * c) = lo;
        *reinterpret_cast<uint4*>(k_s + key * kKeyHalves + 16 * c + 8) = hi;
        if (c == 0) scale_s[key] = key < valid ? *reinterpret_cast<const float*>(raw_s + key * kRawStride + kDim) : 0.0f;
      }
      __syncthreads();  // k_s ready, raw_s free
      if (tile0 + kTile < chunk_end) issue(tile0 + kTile);

      // acc[m][nt]: keys 16 m + g (+8) x heads 16 warp + 8 nt + 2 tq (+1); hi and lo products apart.
      float acc[4][2][4], acc_lo[4][2][4];
#pragma unroll
      for (int m = 0; m < 4; ++m) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[m][nt][r] = acc_lo[m][nt][r] = 0.0f;
        }
      }
#pragma unroll
      for (int ks = 0; ks < kDim / 16; ++ks) {
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          uint32_t k_frag[4];
          LoadMatrixX4(k_frag, a_address + (m * 16 * kKeyHalves + ks * 16) * 2);
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            MmaF16(acc_lo[m][nt], k_frag, q_lo[nt][ks][0], q_lo[nt][ks][1]);
            MmaF16(acc[m][nt], k_frag, q_hi[nt][ks][0], q_hi[nt][ks][1]);
          }
        }
      }
      // score partial over this warp's heads: sum of w relu(scale * dot) over 4 heads a thread, then the 4
      // lanes of a row group.
#pragma unroll
      for (int m = 0; m < 4; ++m) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int key = 16 * m + g + 8 * half;
          const float scale = scale_s[key];
          float sum = 0.0f;
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float dot = acc[m][nt][2 * half + e] + acc_lo[m][nt][2 * half + e];
              sum = fmaf(w_col[nt][e], fmaxf(__fmul_rn(scale, dot), 0.0f), sum);
            }
          }
          sum += __shfl_xor_sync(internal::kFullMask, sum, 1);
          sum += __shfl_xor_sync(internal::kFullMask, sum, 2);
          if (tq == 0) part_s[warp * kTile + key] = sum;
        }
      }
      __syncthreads();
      if (tid < valid) {
        float score = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) score += part_s[w * kTile + tid];
        scores[t * a.max_visible + tile0 + tid] = score;
      }
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
    if (warp == 0) {
      // The digit: the largest b with S(b) = sum of histogram[b..255] >= need (S(0) = all entries left, >=
      // need). Lane l holds bins 8l..8l+7; `above` = the bins of the lanes above it.
      uint32_t bins[8], mine = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        bins[i] = histogram[8 * lane + i];
        mine += bins[i];
      }
      uint32_t suffix = mine;  // inclusive suffix sum over lanes lane..31
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const uint32_t other = __shfl_down_sync(kFullMask, suffix, d);
        if (lane + d < 32) suffix += other;
      }
      const uint32_t above_lane = suffix - mine;
      int found = -1;
      uint32_t above_found = 0, s_b = above_lane;
#pragma unroll
      for (int i = 7; i >= 0; --i) {
        const uint32_t above_b = s_b;  // sum of the bins above 8 lane + i
        s_b += bins[i];
        if (found < 0 && s_b >= need) {
          found = 8 * lane + i;
          above_found = above_b;
        }
      }
      const unsigned lanes = __ballot_sync(kFullMask, found >= 0);
      const int top_lane = 31 - __clz(lanes);  // the highest bins that reach `need`
      if (lane == top_lane) {
        digit_s = static_cast<uint32_t>(found);
        need_s = need - above_found;
      } else if (lanes == 0 && lane == 0) {  // cannot happen (S(0) >= need); as the serial scan would: b = 0
        digit_s = 0;
        need_s = need - (suffix - bins[0]);
      }
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
    if (a.heads == tcx::kHeads && a.dim == tcx::kDim) {
      // Enough key chunks per token that the blocks about fill the device three deep, up to 8 tiles a block.
      int device = 0, sms = 0;
      TANDEM_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
      TANDEM_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
      const int64_t tiles = (a.max_visible + tcx::kTile - 1) / tcx::kTile;
      const int64_t per_block = std::clamp<int64_t>(tiles * a.tokens / (3 * static_cast<int64_t>(sms)), 1, tcx::kMaxTilesPerBlock);
      const dim3 grid(static_cast<unsigned>((tiles + per_block - 1) / per_block),
                      static_cast<unsigned>(std::min<int64_t>(a.tokens, 65535)));
      IndexerScoreMmaKernel<<<grid, tcx::kThreads, tcx::kSharedBytes, stream>>>(a, scores, static_cast<int>(per_block));
      TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("IndexerScoreMmaKernel");
    } else {
      const size_t shared = ScoreSharedBytes(a.heads, a.dim);
      TANDEM_RETURN_IF_ERROR(internal::AllowSharedMemory(IndexerScoreKernel, shared, "IndexerTopK"));
      const dim3 grid(static_cast<unsigned>((a.max_visible + kKeyTile - 1) / kKeyTile),
                      static_cast<unsigned>(std::min<int64_t>(a.tokens, 65535)));
      IndexerScoreKernel<<<grid, kScoreThreads, shared, stream>>>(a, scores);
      TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("IndexerScoreKernel");
    }
  }
  int padded = 1;
  while (padded < a.topk) padded *= 2;
  IndexerTopKKernel<<<static_cast<unsigned>(a.tokens), kTopKThreads, static_cast<size_t>(padded) * 8, stream>>>(
      scores, a.max_visible, a.visible, static_cast<int>(a.topk), padded, a.selected);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("IndexerTopKKernel");
  return absl::OkStatus();
}

}  // namespace tandem::kernels::cuda
