// KV-entry moves and sparse MQA over window + compressed entries with the attention sink (NUMERICS.md
// "Attention"). SparseAttention runs one block per (token, group of heads, split): each candidate entry is
// loaded once per group, dequantized into shared memory as bf16 (exact: e4m3 times a power of two and the
// bf16 rope dims both fit bf16) and serves the group's heads. The DSV4 entry goes through the tensor cores
// (attention_mma.cu: 16 heads a block, f32-exact or bf16 math; attention_wide.cu: 64 heads a block, bf16
// math), any other format through the scalar f32 kernel here. With a workspace, small batches split each
// token's candidates over several blocks and a combine kernel merges them; unsplit, the sink seeds the
// running max and denominator.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "common/kernels/cuda/attention_device.cuh"
#include "common/kernels/cuda/check.h"
#include "common/kernels/cuda/cuda_attention.h"
#include "common/kernels/cuda/sparse_attention.cuh"

namespace tandem::kernels::cuda {
namespace {

using internal::AttentionLaunch;
using internal::AttentionParams;
using internal::BlockCandidates;
using internal::BlockCoordinates;
using internal::CoordinatesOf;
using internal::StartBlock;
using internal::WritePartialState;
using internal::Bf16BitsToFloat;
using internal::kMaxSplits;
using internal::kMaxTopK;
using internal::PartialRow;
using internal::FloatToBf16Bits;
using internal::Fp8ToFloat;
using internal::kFullMask;
using internal::Load8;
using internal::Ue8m0ToFloat;
using internal::WarpMax;
using internal::WarpSum;

// ---- Entry moves: one block per entry ----

__global__ void StoreKvKernel(const float* x, int64_t nope, int64_t rope, int64_t scale_bytes, const KvRef* dst) {
  const int64_t entry = blockIdx.x;
  const KvRef out = dst[entry];
  internal::QuantizeKvEntryBlock(x + entry * (nope + rope), nope, rope, scale_bytes, out.data, out.scales);
}

__global__ void LoadKvKernel(const KvRef* src, int64_t nope, int64_t rope, float* x) {
  const int64_t entry = blockIdx.x;
  const KvRef in = src[entry];
  float* v = x + entry * (nope + rope);
  for (int64_t i = threadIdx.x; i < nope; i += blockDim.x) {
    v[i] = __fmul_rn(Fp8ToFloat(in.data[i]), Ue8m0ToFloat(in.scales[i / 64]));
  }
  for (int64_t i = threadIdx.x; i < rope; i += blockDim.x) {
    const uint32_t bits = static_cast<uint32_t>(in.data[nope + 2 * i]) | static_cast<uint32_t>(in.data[nope + 2 * i + 1]) << 8;
    v[nope + i] = Bf16BitsToFloat(bits);
  }
}

__global__ void CopyKvKernel(const KvRef* src, const KvRef* dst, int64_t data_bytes, int64_t scale_bytes) {
  const int64_t entry = blockIdx.x;
  const KvRef from = src[entry], to = dst[entry];
  const bool wide = data_bytes % 8 == 0 && ((reinterpret_cast<uintptr_t>(from.data) | reinterpret_cast<uintptr_t>(to.data)) & 7u) == 0;
  if (wide) {
    const uint2* in = reinterpret_cast<const uint2*>(from.data);
    uint2* out = reinterpret_cast<uint2*>(to.data);
    for (int64_t i = threadIdx.x; i < data_bytes / 8; i += blockDim.x) out[i] = in[i];
  } else {
    for (int64_t i = threadIdx.x; i < data_bytes; i += blockDim.x) to.data[i] = from.data[i];
  }
  for (int64_t i = threadIdx.x; i < scale_bytes; i += blockDim.x) to.scales[i] = from.scales[i];
}

// ---- Sparse MQA ----

constexpr int kDim = internal::kAttentionDim;
constexpr int kPairs = kDim / 2;        // shared memory holds each candidate as bf16 pairs
constexpr int kGroupHeads = 16;         // heads served per block from one copy of the candidates
constexpr int kTile = 32;               // candidates per shared-memory tile
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kStride = kTile + 1;      // words between pair rows: conflict-free by column and by row
static_assert(kTile == 32, "the softmax maps one candidate to one lane");
static_assert(kGroupHeads == 2 * kWarps, "the softmax gives each warp two heads");
static_assert(kGroupHeads / 4 * 2 == kWarps, "QK and PV: a warp per (quad of heads, half)");
static_assert(kPairs == 64 * 4, "PV: each thread owns 4 pair columns of 64");

// o[t, h] from the splits' partial states, the sink joining the denominator once. One block of 128
// threads per (t, h), 4 dims a thread. The splits' rows are read kCombineBatch at a time, every load of a
// batch in flight together (their addresses do not depend on the states); the sums still run in split order.
constexpr int kCombineBatch = 4;
__global__ void __launch_bounds__(128) SparseAttentionCombineKernel(AttentionParams p) {
  const int64_t t = blockIdx.x / p.heads, h = blockIdx.x % p.heads;
  const float sink = p.sink[h];
  float top = sink;
  for (int s = 0; s < p.splits; ++s) top = fmaxf(top, p.partial_ml[PartialRow(p, t, s, h) * 2]);
  // top = -inf only when the sink is -inf and no split saw a candidate: the output is 0, as unsplit.
  float denominator = top == -INFINITY ? 1.0f : expf(sink - top);
  float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int s0 = 0; s0 < p.splits; s0 += kCombineBatch) {
    float m[kCombineBatch], l[kCombineBatch];
    float4 a[kCombineBatch];
#pragma unroll
    for (int i = 0; i < kCombineBatch; ++i) {
      m[i] = -INFINITY;
      l[i] = 0.0f;
      if (s0 + i < p.splits) {
        const int64_t row = PartialRow(p, t, s0 + i, h);
        m[i] = p.partial_ml[row * 2];
        l[i] = p.partial_ml[row * 2 + 1];
        a[i] = reinterpret_cast<const float4*>(p.partial_acc + row * kDim)[threadIdx.x];  // unused when empty
      }
    }
#pragma unroll
    for (int i = 0; i < kCombineBatch; ++i) {
      if (m[i] == -INFINITY && l[i] == 0.0f) continue;  // an empty split (or past the last): never written
      const float weight = expf(m[i] - top);
      denominator = fmaf(l[i], weight, denominator);
      sum.x = fmaf(a[i].x, weight, sum.x);
      sum.y = fmaf(a[i].y, weight, sum.y);
      sum.z = fmaf(a[i].z, weight, sum.z);
      sum.w = fmaf(a[i].w, weight, sum.w);
    }
  }
  reinterpret_cast<float4*>(p.o + (t * p.heads + h) * kDim)[threadIdx.x] =
      make_float4(__fdiv_rn(sum.x, denominator), __fdiv_rn(sum.y, denominator), __fdiv_rn(sum.z, denominator),
                  __fdiv_rn(sum.w, denominator));
}
static_assert(kDim == 128 * 4, "the combine gives each of 128 threads 4 dims");

size_t AttentionSharedBytes(int64_t selected_slots) {
  const size_t words = static_cast<size_t>(kGroupHeads) * kDim    // q of the group
                       + static_cast<size_t>(kPairs) * kStride    // the tile's candidates, bf16 pairs [pair][candidate]
                       + 2 * kGroupHeads * kTile                  // partial scores of the two dim halves
                       + kTile * kGroupHeads                      // probabilities [candidate][head]
                       + 3 * kGroupHeads;                         // running max, denominator, correction
  return words * 4 + static_cast<size_t>(selected_slots) * 4;    // + the compacted selection
}

__global__ void __launch_bounds__(kThreads, 2) SparseAttentionKernel(AttentionParams p) {
  extern __shared__ __align__(16) float smem[];
  float* q_s = smem;
  uint32_t* kv_s = reinterpret_cast<uint32_t*>(q_s + kGroupHeads * kDim);
  float* part_s = reinterpret_cast<float*>(kv_s + kPairs * kStride);
  float* p_s = part_s + 2 * kGroupHeads * kTile;
  float* m_s = p_s + kTile * kGroupHeads;
  float* l_s = m_s + kGroupHeads;
  float* corr_s = l_s + kGroupHeads;
  int32_t* sel_s = reinterpret_cast<int32_t*>(corr_s + kGroupHeads);
  __shared__ int warp_counts[kWarps];

  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const BlockCoordinates block = CoordinatesOf(p, kGroupHeads);
  const int64_t t = block.t, h0 = block.h0;
  const int hn = block.hn;

  const float4* q4 = reinterpret_cast<const float4*>(p.q + (t * p.heads + h0) * kDim);
  for (int i = tid; i < kGroupHeads * kDim / 4; i += kThreads) {
    reinterpret_cast<float4*>(q_s)[i] = i / (kDim / 4) < hn ? q4[i] : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  const BlockCandidates cand = StartBlock<kThreads>(p, block, kGroupHeads, kTile, m_s, l_s, sel_s, warp_counts);
  const int total = cand.n_window + cand.n_compressed;
  const int tile_begin = cand.tile_begin, tile_end = cand.tile_end;
  const int quad = warp >> 1;  // QK and PV: heads 4 * quad .. + 3
  float acc[4][8];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[j][e] = 0.0f;
  }
  const int chunk_groups = (p.chunks + 7) / 8;
  for (int tile0 = tile_begin; tile0 < tile_end; tile0 += kTile) {
    const int valid = min(kTile, total - tile0);

    // 1. Dequantize the tile: a lane takes one 8-byte chunk; a warp instruction covers 4 candidates x 64
    // contiguous bytes (whole sectors), and the stores hit 32 distinct banks.
    for (int item = warp; item < (kTile / 4) * chunk_groups; item += kWarps) {
      const int c = (item % (kTile / 4)) * 4 + (lane & 3);
      const int k = (item / (kTile / 4)) * 8 + (lane >> 2);
      if (k >= p.chunks) continue;
      const bool nope = 8 * k < p.nope;
      uint2 raw = make_uint2(0u, 0u);
      float tile_scale = 1.0f;
      if (c < valid) {
        const int i = tile0 + c;
        const KvRef ref = cand.Ref(p, sel_s, i);
        raw = Load8(ref.data + 8 * k);
        if (nope) tile_scale = Ue8m0ToFloat(ref.scales[k / 8]);
      }
      if (nope) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint32_t word = (j < 2 ? raw.x : raw.y) >> (16 * (j & 1));
          const float a = __fmul_rn(Fp8ToFloat(word & 0xffu), tile_scale);
          const float b = __fmul_rn(Fp8ToFloat((word >> 8) & 0xffu), tile_scale);
          kv_s[(4 * k + j) * kStride + c] = FloatToBf16Bits(a) | FloatToBf16Bits(b) << 16;
        }
      } else {
        const int pair = p.nope / 2 + 2 * (k - p.nope / 8);
        kv_s[pair * kStride + c] = raw.x;
        kv_s[(pair + 1) * kStride + c] = raw.y;
      }
    }
    __syncthreads();

    // 2. Scores: a thread takes 4 heads x 2 candidates over a quarter of the pairs; the quarters meet by
    // one shuffle and one add in shared memory.
    {
      const int half = warp & 1, low = lane & 1, cp = lane >> 1;
      const int quarter = low + 2 * half;
      float s[4][2];
#pragma unroll
      for (int j = 0; j < 4; ++j) s[j][0] = s[j][1] = 0.0f;
      const float* qh = q_s + 4 * quad * kDim;
#pragma unroll 4
      for (int i = 0; i < kPairs / 4; ++i) {
        const int pair = quarter + 4 * i;
        const uint32_t u0 = kv_s[pair * kStride + 2 * cp], u1 = kv_s[pair * kStride + 2 * cp + 1];
        const float k00 = Bf16BitsToFloat(u0 & 0xffffu), k01 = __uint_as_float(u0 & 0xffff0000u);
        const float k10 = Bf16BitsToFloat(u1 & 0xffffu), k11 = __uint_as_float(u1 & 0xffff0000u);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 qv = *reinterpret_cast<const float2*>(qh + j * kDim + 2 * pair);
          s[j][0] = fmaf(qv.y, k01, fmaf(qv.x, k00, s[j][0]));
          s[j][1] = fmaf(qv.y, k11, fmaf(qv.x, k10, s[j][1]));
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        s[j][0] += __shfl_xor_sync(kFullMask, s[j][0], 1);
        s[j][1] += __shfl_xor_sync(kFullMask, s[j][1], 1);
      }
      if (low == 0) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float* row = part_s + (half * kGroupHeads + 4 * quad + j) * kTile + 2 * cp;
          row[0] = s[j][0];
          row[1] = s[j][1];
        }
      }
    }
    __syncthreads();

    // 3. Online softmax: a warp per head, a lane per candidate.
    for (int h = warp; h < kGroupHeads; h += kWarps) {
      const float score = lane < valid
                              ? __fmul_rn(__fadd_rn(part_s[h * kTile + lane], part_s[(kGroupHeads + h) * kTile + lane]), p.scale)
                              : -INFINITY;
      const float m_old = m_s[h];
      const float m_new = fmaxf(m_old, WarpMax(score));
      const float prob = lane < valid ? expf(score - m_new) : 0.0f;
      const float sum = WarpSum(prob);
      p_s[lane * kGroupHeads + h] = prob;
      __syncwarp();
      if (lane == 0) {
        const float correction = expf(m_old - m_new);
        m_s[h] = m_new;
        l_s[h] = fmaf(l_s[h], correction, sum);
        corr_s[h] = correction;
      }
    }
    __syncthreads();

    // 4. Output: a thread owns 4 heads x 4 pair columns (column + 64 i); P is a broadcast per warp.
    {
      const int column = lane + 32 * (warp & 1);
      const float4 correction = *reinterpret_cast<const float4*>(corr_s + 4 * quad);
      const float cj[4] = {correction.x, correction.y, correction.z, correction.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[j][e] = __fmul_rn(acc[j][e], cj[j]);
      }
      for (int c = 0; c < valid; ++c) {
        const float4 pr = *reinterpret_cast<const float4*>(p_s + c * kGroupHeads + 4 * quad);
        const float pj[4] = {pr.x, pr.y, pr.z, pr.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const uint32_t u = kv_s[(column + 64 * i) * kStride + c];
          const float v0 = Bf16BitsToFloat(u & 0xffffu), v1 = __uint_as_float(u & 0xffff0000u);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            acc[j][2 * i] = fmaf(pj[j], v0, acc[j][2 * i]);
            acc[j][2 * i + 1] = fmaf(pj[j], v1, acc[j][2 * i + 1]);
          }
        }
      }
    }
    __syncthreads();
  }

  const int column = lane + 32 * (warp & 1);
  if (p.splits > 1) {
    if (!WritePartialState(p, block, cand, m_s, l_s)) return;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int h = 4 * quad + j;
      if (h >= hn) continue;
      float* out = p.partial_acc + PartialRow(p, t, block.split, h0 + h) * kDim;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        *reinterpret_cast<float2*>(out + 2 * (column + 64 * i)) = make_float2(acc[j][2 * i], acc[j][2 * i + 1]);
      }
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int h = 4 * quad + j;
    if (h >= hn) continue;
    const float l = l_s[h];
    float* out = p.o + (t * p.heads + h0 + h) * kDim;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      *reinterpret_cast<float2*>(out + 2 * (column + 64 * i)) =
          make_float2(__fdiv_rn(acc[j][2 * i], l), __fdiv_rn(acc[j][2 * i + 1], l));
    }
  }
}


bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

absl::Status CheckEntries(const char* name, const KvFormat& format, int64_t count) {
  if (count < 0 || count > 0x7fffffff) return absl::InvalidArgumentError(absl::StrCat(name, ": count ", count, " out of range"));
  if (format.nope_dim < 0 || format.nope_dim % 64 != 0 || format.rope_dim < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": nope_dim ", format.nope_dim, " must be a multiple of 64 and rope_dim ", format.rope_dim, " >= 0"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status StoreKvEntries(const KvFormat& format, const float* x, int64_t count, const KvRef* dst, cudaStream_t stream) {
  TANDEM_RETURN_IF_ERROR(CheckEntries("StoreKvEntries", format, count));
  if (count == 0) return absl::OkStatus();
  StoreKvKernel<<<static_cast<unsigned>(count), 256, 0, stream>>>(x, format.nope_dim, format.rope_dim,
                                                                  format.scale_bytes(), dst);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("StoreKvKernel");
  return absl::OkStatus();
}

absl::Status LoadKvEntries(const KvFormat& format, const KvRef* src, int64_t count, float* x, cudaStream_t stream) {
  TANDEM_RETURN_IF_ERROR(CheckEntries("LoadKvEntries", format, count));
  if (count == 0) return absl::OkStatus();
  LoadKvKernel<<<static_cast<unsigned>(count), 256, 0, stream>>>(src, format.nope_dim, format.rope_dim, x);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("LoadKvKernel");
  return absl::OkStatus();
}

absl::Status CopyKvEntries(const KvFormat& format, const KvRef* src, const KvRef* dst, int64_t count,
                           cudaStream_t stream) {
  TANDEM_RETURN_IF_ERROR(CheckEntries("CopyKvEntries", format, count));
  if (count == 0) return absl::OkStatus();
  CopyKvKernel<<<static_cast<unsigned>(count), 64, 0, stream>>>(src, dst, format.data_bytes(), format.scale_bytes());
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("CopyKvKernel");
  return absl::OkStatus();
}

namespace {

// The shape checks (all that SparseAttentionWorkspaceBytes needs), then the pointers.
absl::Status CheckAttentionShape(const SparseAttentionArgs& a) {
  const KvFormat& f = a.format;
  if (f.dim() != kDim || f.nope_dim % 64 != 0 || f.rope_dim % 4 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("SparseAttention: format ", f.nope_dim, " + ", f.rope_dim,
                                                   " must have dim 512, nope_dim a multiple of 64, rope_dim of 4"));
  }
  if (a.tokens < 0 || a.heads <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("SparseAttention: tokens ", a.tokens, " and heads ", a.heads,
                                                   " must be >= 0 and > 0"));
  }
  const bool selected = a.compressed && a.selected;
  if (selected && (a.topk <= 0 || a.topk > kMaxTopK)) {
    return absl::InvalidArgumentError(absl::StrCat("SparseAttention: topk ", a.topk, " must be in [1, ", kMaxTopK, "]"));
  }
  const int64_t groups = (a.heads + kGroupHeads - 1) / kGroupHeads;
  if (a.tokens * groups > 0x7fffffff) {
    return absl::InvalidArgumentError(absl::StrCat("SparseAttention: ", a.tokens, " tokens x ", groups, " head groups > 2^31-1"));
  }
  return absl::OkStatus();
}

absl::Status CheckSparseAttention(const SparseAttentionArgs& a) {
  TANDEM_RETURN_IF_ERROR(CheckAttentionShape(a));
  if (a.tokens == 0) return absl::OkStatus();
  if (!a.q || !a.o || !a.sink) return absl::InvalidArgumentError("SparseAttention: q, o and sink are required");
  if (!Aligned16(a.q) || !Aligned16(a.o)) return absl::InvalidArgumentError("SparseAttention: q and o must be 16-byte aligned");
  if (a.window && (!a.window_begin || !a.window_count)) {
    return absl::InvalidArgumentError("SparseAttention: window needs window_begin and window_count");
  }
  if (a.compressed && (!a.compressed_begin || (!a.selected && !a.compressed_count))) {
    return absl::InvalidArgumentError(
        "SparseAttention: compressed needs compressed_begin and either selected or compressed_count");
  }
  return absl::OkStatus();
}

std::atomic<int64_t> g_wide_min_tokens{8};
std::atomic<bool> g_wgmma_attention{true};

// The warpgroup-MMA form of the 64-head kernel when this build has its sm_90a code (TANDEM_CUDA_SM90A: a build
// for plain sm_90 compiles it to traps), the device runs that code (compute capability 9.0) and its shared
// memory fits (selections up to ~3.7k slots on an H100/H200); else the mma.sync one.
AttentionLaunch WideLaunch(int64_t selected_slots) {
#if defined(TANDEM_CUDA_SM90A)
  if (g_wgmma_attention.load(std::memory_order_relaxed)) {
    const absl::StatusOr<internal::DeviceLimits> limits = internal::CurrentDeviceLimits();
    const AttentionLaunch wgmma = internal::WgmmaAttentionLaunch(selected_slots);
    constexpr size_t kStaticShared = 1024;  // the kernel's own __shared__ words, with room to spare
    if (limits.ok() && limits->compute_capability == 90 && wgmma.shared + kStaticShared <= limits->shared_optin) {
      return wgmma;
    }
    if (!limits.ok()) (void)cudaGetLastError();  // a failed query must not read as a later launch's failure
  }
#endif
  return internal::WideAttentionLaunch(selected_slots);
}

// The kernel that serves these args: the DSV4 entry on the tensor cores (64 heads a block for bf16 math
// when the heads come in 64s and the batch has enough tokens, else 16), any other format on the scalar f32
// kernel.
AttentionLaunch ChooseAttentionKernel(const SparseAttentionArgs& a) {
  const int64_t selected_slots = a.compressed && a.selected ? a.topk : 0;
  if (a.format.nope_dim == 448 && a.format.rope_dim == 64) {
    if (a.math == AttentionMath::kBf16 && a.heads % 64 == 0 &&
        a.tokens >= g_wide_min_tokens.load(std::memory_order_relaxed)) {
      return WideLaunch(selected_slots);
    }
    return internal::MmaAttentionLaunch(a.math == AttentionMath::kF32, selected_slots);
  }
  return {SparseAttentionKernel, "launch of SparseAttentionKernel", kThreads, kGroupHeads, AttentionSharedBytes(selected_slots)};
}

int64_t HeadGroups(int64_t heads, const AttentionLaunch& launch) {
  return (heads + launch.heads_per_block - 1) / launch.heads_per_block;
}

size_t PartialBytes(int64_t tokens, int64_t heads, int64_t splits) {
  return static_cast<size_t>(tokens * splits * heads) * (kDim + 2) * sizeof(float);
}

// Splits so that tokens x groups x splits blocks about fill the device once: a block's latency is its
// share of the candidates, and one wave of blocks runs them all at once. 1 when the batch fills it.
absl::StatusOr<int64_t> PlannedSplits(const SparseAttentionArgs& a, const AttentionLaunch& launch) {
  const int64_t units = a.tokens * HeadGroups(a.heads, launch);
  if (a.tokens * a.heads > 0x7fffffff || units >= 0x7fffffff / kMaxSplits) return 1;
  TANDEM_RETURN_IF_ERROR(internal::AllowSharedMemory(launch.kernel, launch.shared, "SparseAttention"));
  int device = 0, sms = 0;
  TANDEM_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  TANDEM_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  TANDEM_ASSIGN_OR_RETURN(const int per_sm, internal::BlocksPerSm(reinterpret_cast<const void*>(launch.kernel),
                                                                  launch.threads, launch.shared));
  const int64_t slots = static_cast<int64_t>(sms) * std::max(per_sm, 1);
  return std::clamp<int64_t>(slots / units, 1, kMaxSplits);
}

}  // namespace

void SetWideAttentionMinTokens(int64_t tokens) { g_wide_min_tokens.store(tokens, std::memory_order_relaxed); }
int64_t WideAttentionMinTokens() { return g_wide_min_tokens.load(std::memory_order_relaxed); }
void SetWgmmaAttention(bool on) { g_wgmma_attention.store(on, std::memory_order_relaxed); }
bool WgmmaAttention() { return g_wgmma_attention.load(std::memory_order_relaxed); }

const char* SparseAttentionKernelName(const SparseAttentionArgs& a) { return ChooseAttentionKernel(a).name; }

size_t SparseAttentionWorkspaceBytes(const SparseAttentionArgs& a) {
  if (a.tokens <= 0 || !CheckAttentionShape(a).ok()) return 0;
  const absl::StatusOr<int64_t> splits = PlannedSplits(a, ChooseAttentionKernel(a));
  if (!splits.ok()) {
    (void)cudaGetLastError();  // a failed query must not read as a later launch's failure
    return 0;
  }
  return *splits > 1 ? PartialBytes(a.tokens, a.heads, *splits) : 0;
}

absl::Status SparseAttention(const SparseAttentionArgs& a, cudaStream_t stream) {
  TANDEM_RETURN_IF_ERROR(CheckSparseAttention(a));
  if (a.tokens == 0) return absl::OkStatus();
  const KvFormat& f = a.format;
  const bool selected = a.compressed && a.selected;
  const AttentionLaunch launch = ChooseAttentionKernel(a);
  const int64_t groups = HeadGroups(a.heads, launch);
  AttentionParams p;
  p.heads = a.heads;
  p.groups = static_cast<int>(groups);
  p.nope = static_cast<int>(f.nope_dim);
  p.chunks = static_cast<int>(f.data_bytes() / 8);
  p.q = a.q;
  p.sink = a.sink;
  p.scale = a.scale;
  p.window = a.window;
  p.window_begin = a.window_begin;
  p.window_count = a.window_count;
  p.compressed = a.compressed;
  p.compressed_begin = a.compressed_begin;
  p.compressed_count = a.compressed_count;
  p.selected = selected ? a.selected : nullptr;
  p.topk = selected ? static_cast<int>(a.topk) : 0;
  p.o = a.o;
  TANDEM_RETURN_IF_ERROR(internal::AllowSharedMemory(launch.kernel, launch.shared, "SparseAttention"));
  // As many splits as planned and as the workspace holds (none without one).
  int64_t splits = 1;
  if (a.workspace && Aligned16(a.workspace) && a.workspace_bytes >= PartialBytes(a.tokens, a.heads, 2)) {
    TANDEM_ASSIGN_OR_RETURN(splits, PlannedSplits(a, launch));
    splits = std::min<int64_t>(splits, static_cast<int64_t>(a.workspace_bytes / PartialBytes(a.tokens, a.heads, 1)));
  }
  p.splits = static_cast<int>(splits);
  if (splits > 1) {
    p.partial_acc = static_cast<float*>(a.workspace);
    p.partial_ml = p.partial_acc + a.tokens * splits * a.heads * kDim;
  }
  launch.kernel<<<static_cast<unsigned>(a.tokens * groups * splits), launch.threads, launch.shared, stream>>>(p);
  TANDEM_RETURN_IF_ERROR(CudaStatus(cudaGetLastError(), launch.name, __FILE__, __LINE__));
  if (splits > 1) {
    SparseAttentionCombineKernel<<<static_cast<unsigned>(a.tokens * a.heads), 128, 0, stream>>>(p);
    TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("SparseAttentionCombineKernel");
  }
  return absl::OkStatus();
}

}  // namespace tandem::kernels::cuda
