// Sparse MQA on the tensor cores for the DSV4 entry (448 e4m3 + 64 bf16 rope dims), 16 heads a block
// (NUMERICS.md "Attention"; attention.cu picks the kernel and merges splits).
#include <cuda_runtime.h>

#include <cstdint>

#include "common/kernels/cuda/attention_device.cuh"
#include "common/kernels/cuda/sparse_attention.cuh"

namespace tandem::kernels::cuda::internal {
namespace {

constexpr int kDim = kAttentionDim;
constexpr int kGroupHeads = 16;  // heads served per block from one copy of the candidates

// A block of 4 warps serves (token, 16 heads, split) and walks its candidates in tiles of 32: the raw
// entries arrive by cp.async while the previous tile computes, are dequantized once into shared memory as
// bf16 [candidate][dim], and feed mma.sync m16n8k16 twice: scores = q . K^T (the 16 heads are M; warp w
// sums dims [128w, 128w + 128) for all 32 candidates, the four partials meet in shared memory) and
// O += P . V (warp w owns output dims [128w, 128w + 128)). K and V are exact in bf16.
// Exact (kExact, AttentionMath::kF32): q is f32 split into bf16 hi + mid + lo (three MMAs: f32 accuracy;
// hi + lo alone left ~1e-5 absolute score error at |q| ~ 3, enough to fail parity where two large weights
// meet values of opposite sign), P into hi + lo (two MMAs, ~2^-17 relative: P <= 1 and its error scales
// with the weight). bf16 math: q and P one bf16 each (two MMA passes instead of five).
// Each tile's PV lands in a fresh accumulator that one f32 FMA adds to the running one (rescaled), so
// the tensor cores' truncating accumulation never spans more than the tile.
namespace tc {

constexpr int kNope = 448, kRope = 64;
constexpr int kDataChunks = (kNope + 2 * kRope) / 8;  // 8-byte chunks of an entry's data (72)
constexpr int kRawStride = 8 * kDataChunks + 16;      // a raw entry in shared memory: data, 8 scale bytes, 8 pad
constexpr int kWideChunks = kDataChunks / 2;          // 16-byte chunks of an entry's data (36)
constexpr int kChunksPerThread = kWideChunks / 4;     // each of a candidate's 4 threads copies and converts 9
constexpr int kNopeSteps = kNope / 64;                // of them e4m3 (one scale tile each: 7), then 2 of rope
constexpr int kTile = 32;                             // candidates per tile
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kSlice = kDim / kWarps;                 // dims per warp, QK's k and PV's n
constexpr int kRowHalves = kDim + 8;                  // bf16 per K/V row: 16 pad bytes put ldmatrix rows on distinct banks
constexpr int kScoreStride = kTile + 8;               // f32 per partial-score row (conflict-free float2 stores)
constexpr int kProbStride = kTile + 8;                // bf16 per probability row (80 bytes: ldmatrix conflict-free)
constexpr size_t kKvBytes = size_t{kTile} * kRowHalves * 2;
constexpr size_t kRawBytes = size_t{kTile} * kRawStride;
constexpr size_t kScoreBytes = size_t{kWarps} * kGroupHeads * kScoreStride * 4;
constexpr size_t kProbBytes = size_t{2} * kGroupHeads * kProbStride * 2;
constexpr size_t kQLowBytes = size_t{kWarps} * (kSlice / 16) * 4 * 32 * 4;  // q's third bf16 piece, per thread
static_assert(kNope % 64 == 0 && kNope + kRope == kDim, "the DSV4 entry");
static_assert(8 * kDataChunks == kEntryDataBytes, "IssueEntryCopy's raw row");
static_assert(kGroupHeads == 16, "the heads are one m16 tile");
static_assert(kTile == 32, "the softmax maps one candidate to one lane; PV takes two k16 steps");
static_assert(kWarps * kSlice == kDim && kSlice == 128, "QK: 8 k16 steps a warp; PV: 16 n8 tiles a warp");
static_assert(kTile * 4 == kThreads && kWideChunks == 4 * kChunksPerThread, "the copy: 4 threads per candidate");
static_assert(kNopeSteps * 4 * 16 == kNope && kRawStride % 16 == 0,
              "thread sub's j-th chunk (sub + 4 j) of the nope part lies in scale tile j");
static_assert(kKvBytes % 16 == 0 && kRawBytes % 16 == 0 && kScoreBytes % 16 == 0 && kProbBytes % 16 == 0 &&
                  kQLowBytes % 16 == 0,
              "16-byte aligned shared regions");

size_t SharedBytes(int64_t selected_slots) {
  return kKvBytes + kRawBytes + kScoreBytes + kProbBytes + kQLowBytes + 3 * kGroupHeads * 4 +
         static_cast<size_t>(selected_slots) * 4;
}

}  // namespace tc

template <bool kExact>
__global__ void __launch_bounds__(tc::kThreads, 2) SparseAttentionMmaKernel(AttentionParams p) {
  using tc::kChunksPerThread, tc::kDataChunks, tc::kWideChunks, tc::kKvBytes, tc::kNope, tc::kNopeSteps, tc::kProbStride, tc::kQLowBytes, tc::kRawBytes, tc::kRawStride,
      tc::kRowHalves, tc::kScoreStride, tc::kSlice, tc::kThreads, tc::kTile, tc::kWarps;
  extern __shared__ __align__(16) uint8_t shared[];
  uint16_t* kv_s = reinterpret_cast<uint16_t*>(shared);  // [kTile][kRowHalves] bf16
  uint8_t* raw_s = shared + kKvBytes;                    // [kTile][kRawStride] the next tile's entries
  float* part_s = reinterpret_cast<float*>(raw_s + kRawBytes);  // [warp][head][kScoreStride] partial scores
  uint16_t* prob_s = reinterpret_cast<uint16_t*>(part_s + kWarps * kGroupHeads * kScoreStride);  // [hi, lo][head][kProbStride]
  // [warp][ks][fragment register][lane]: each thread reads back only the words it wrote (no barrier)
  uint32_t* qlo_s = reinterpret_cast<uint32_t*>(prob_s + 2 * kGroupHeads * kProbStride);
  float* m_s = reinterpret_cast<float*>(reinterpret_cast<uint8_t*>(qlo_s) + kQLowBytes);
  float* l_s = m_s + kGroupHeads;
  float* corr_s = l_s + kGroupHeads;
  int32_t* sel_s = reinterpret_cast<int32_t*>(corr_s + kGroupHeads);
  __shared__ int warp_counts[kWarps];

  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, tq = lane & 3;  // fragment row group and column pair
  const BlockCoordinates block = CoordinatesOf(p, kGroupHeads);
  const int64_t t = block.t, h0 = block.h0;
  const int hn = block.hn;
  const BlockCandidates cand = StartBlock<kThreads>(p, block, kGroupHeads, kTile, m_s, l_s, sel_s, warp_counts);
  const int tile_begin = cand.tile_begin, tile_end = cand.tile_end;

  // The candidate of this thread in the tile at tile0, fetched a phase before its copy is issued (the
  // KvRef load's latency then hides behind the dequantization instead of stalling the issue).
  const auto ref_for = [&](int tile0) {
    const int c = tid >> 2;
    return cand.RefInTile(p, sel_s, tile0, kTile, c);
  };
  // Starts the copy of candidates [tile0, tile0 + valid) into raw_s: 4 threads per candidate (a plain-store
  // fallback is published by the next barrier).
  const auto issue = [&](int valid, const KvRef& ref) {
    const int c = tid >> 2, sub = tid & 3;
    if (c < valid) IssueEntryCopy<4>(raw_s + c * kRawStride, ref, sub);
    CopyAsyncCommit();
  };
  if (tile_begin < tile_end) issue(min(kTile, tile_end - tile_begin), ref_for(tile_begin));

  // q of this warp's dims as A fragments (rows g, g + 8; columns 2 tq, 2 tq + 1 and + 8), split hi + mid
  // + lo; hi and mid stay in registers, lo (the bits below hi + mid) in shared memory: no registers to spare.
  uint32_t q_hi[kSlice / 16][4], q_lo[kSlice / 16][4];
  uint32_t* my_qlo = qlo_s + warp * (kSlice / 16) * 4 * 32 + lane;
  {
    const float* q0 = p.q + (t * p.heads + h0 + g) * kDim + warp * kSlice + 2 * tq;
    const float* q1 = q0 + 8 * kDim;
    const bool row0 = g < hn, row1 = g + 8 < hn;
#pragma unroll
    for (int ks = 0; ks < kSlice / 16; ++ks) {
      const float2 zero = make_float2(0.f, 0.f);
      const float2 v0 = row0 ? *reinterpret_cast<const float2*>(q0 + 16 * ks) : zero;
      const float2 v1 = row1 ? *reinterpret_cast<const float2*>(q1 + 16 * ks) : zero;
      const float2 v2 = row0 ? *reinterpret_cast<const float2*>(q0 + 16 * ks + 8) : zero;
      const float2 v3 = row1 ? *reinterpret_cast<const float2*>(q1 + 16 * ks + 8) : zero;
      if constexpr (kExact) {
        uint32_t third[4];
        SplitBf16x2x3(v0.x, v0.y, q_hi[ks][0], q_lo[ks][0], third[0]);
        SplitBf16x2x3(v1.x, v1.y, q_hi[ks][1], q_lo[ks][1], third[1]);
        SplitBf16x2x3(v2.x, v2.y, q_hi[ks][2], q_lo[ks][2], third[2]);
        SplitBf16x2x3(v3.x, v3.y, q_hi[ks][3], q_lo[ks][3], third[3]);
#pragma unroll
        for (int r = 0; r < 4; ++r) my_qlo[(ks * 4 + r) * 32] = third[r];
      } else {
        q_hi[ks][0] = PackBf16x2(v0.x, v0.y);
        q_hi[ks][1] = PackBf16x2(v1.x, v1.y);
        q_hi[ks][2] = PackBf16x2(v2.x, v2.y);
        q_hi[ks][3] = PackBf16x2(v3.x, v3.y);
      }
    }
  }

  // ldmatrix lane addresses. QK (K as B, no transpose): candidate 8 (lane / 16) + lane % 8, dims + 8 at
  // lane bit 3. PV (V as B, transposed): candidate lane % 8 + 8 (bit 3), dims + 8 at lane / 16. P (A):
  // head lane % 8 + 8 (bit 3), candidates + 8 at lane / 16.
  const uint32_t kv_base = SharedAddress(kv_s);
  const uint32_t qk_address =
      kv_base + (((lane >> 4) * 8 + (lane & 7)) * kRowHalves + warp * kSlice + 8 * ((lane >> 3) & 1)) * 2;
  const uint32_t pv_address =
      kv_base + (((lane & 7) + 8 * ((lane >> 3) & 1)) * kRowHalves + warp * kSlice + 8 * (lane >> 4)) * 2;
  const uint32_t prob_address =
      SharedAddress(prob_s) + (((lane & 7) + 8 * ((lane >> 3) & 1)) * kProbStride + 8 * (lane >> 4)) * 2;

  float acc[kSlice / 8][4];
#pragma unroll
  for (int n = 0; n < kSlice / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;

  for (int tile0 = tile_begin; tile0 < tile_end; tile0 += kTile) {
    const int valid = min(kTile, tile_end - tile0);
    const KvRef next_ref = ref_for(tile0 + kTile);
    CopyAsyncWaitAll();
    __syncthreads();  // the tile's bytes are in raw_s; the previous tile's PV is done with kv_s and prob_s

    // 1. Dequantize, thread sub of candidate c its chunks sub + 4 j: 16 codes of scale tile j -> 16 bf16
    // (j < 7), then two chunks of 8 rope bf16 copied; zeros past `valid`, so that P = 0 never meets stale
    // bytes (0 * NaN). Unrolled: no division, no branch but the candidate's.
    {
      const int c = tid >> 2, sub = tid & 3;
      uint16_t* row = kv_s + c * kRowHalves;
      const uint8_t* src = raw_s + c * kRawStride;
      if (c < valid) {
#pragma unroll
        for (int j = 0; j < kNopeSteps; ++j) {
          const int w = sub + 4 * j;
          const uint4 raw = *reinterpret_cast<const uint4*>(src + 16 * w);
          const float scale = Ue8m0ToFloat(src[8 * kDataChunks + j]);
          DequantFp8Chunk(raw, scale, reinterpret_cast<uint4*>(row + 16 * w), reinterpret_cast<uint4*>(row + 16 * w + 8));
        }
#pragma unroll
        for (int j = kNopeSteps; j < kChunksPerThread; ++j) {
          const int w = sub + 4 * j;  // rope bytes 16 (w - 28): bf16 values 8 (w - 28) on
          *reinterpret_cast<uint4*>(row + kNope + 8 * (w - 4 * kNopeSteps)) = *reinterpret_cast<const uint4*>(src + 16 * w);
        }
      } else {
        const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
        for (int j = 0; j < kNopeSteps; ++j) {
          *reinterpret_cast<uint4*>(row + 16 * (sub + 4 * j)) = zero;
          *reinterpret_cast<uint4*>(row + 16 * (sub + 4 * j) + 8) = zero;
        }
#pragma unroll
        for (int j = kNopeSteps; j < kChunksPerThread; ++j) *reinterpret_cast<uint4*>(row + kNope + 8 * (sub + 4 * j - 4 * kNopeSteps)) = zero;
      }
    }
    __syncthreads();  // kv_s is ready and raw_s free: the next tile's copy overlaps this one's math
    if (tile0 + kTile < tile_end) issue(min(kTile, tile_end - tile0 - kTile), next_ref);

    // 2. Partial scores over this warp's 128 dims: 8 k16 steps x 4 n8 tiles x (q's lo, mid, hi); q's hi
    // products and its two small pieces accumulate apart (two dependent chains of 8 and 16 MMAs instead of
    // one of 24), summed once per tile.
    {
      float score[kTile / 8][4], small[kTile / 8][4];
#pragma unroll
      for (int j = 0; j < kTile / 8; ++j) {
        score[j][0] = score[j][1] = score[j][2] = score[j][3] = 0.0f;
        small[j][0] = small[j][1] = small[j][2] = small[j][3] = 0.0f;
      }
#pragma unroll
      for (int ks = 0; ks < kSlice / 16; ++ks) {
#pragma unroll
        for (int jp = 0; jp < kTile / 16; ++jp) {
          uint32_t b[4];
          LoadMatrixX4(b, qk_address + (jp * 16 * kRowHalves + ks * 16) * 2);
          if constexpr (kExact) {
            const uint32_t q_third[4] = {my_qlo[(ks * 4) * 32], my_qlo[(ks * 4 + 1) * 32], my_qlo[(ks * 4 + 2) * 32],
                                         my_qlo[(ks * 4 + 3) * 32]};
            MmaBf16(small[2 * jp], q_third, b[0], b[1]);
            MmaBf16(small[2 * jp + 1], q_third, b[2], b[3]);
            MmaBf16(small[2 * jp], q_lo[ks], b[0], b[1]);
            MmaBf16(small[2 * jp + 1], q_lo[ks], b[2], b[3]);
          }
          MmaBf16(score[2 * jp], q_hi[ks], b[0], b[1]);
          MmaBf16(score[2 * jp + 1], q_hi[ks], b[2], b[3]);
        }
      }
      if constexpr (kExact) {
#pragma unroll
        for (int j = 0; j < kTile / 8; ++j) {
#pragma unroll
          for (int r = 0; r < 4; ++r) score[j][r] += small[j][r];
        }
      }
      float* mine = part_s + warp * kGroupHeads * kScoreStride;
#pragma unroll
      for (int j = 0; j < kTile / 8; ++j) {
        *reinterpret_cast<float2*>(mine + g * kScoreStride + 8 * j + 2 * tq) = make_float2(score[j][0], score[j][1]);
        *reinterpret_cast<float2*>(mine + (g + 8) * kScoreStride + 8 * j + 2 * tq) = make_float2(score[j][2], score[j][3]);
      }
    }
    __syncthreads();

    // 3. Online softmax: a warp per 4 heads, a lane per candidate; P goes out as bf16 hi and lo.
    {
      constexpr int kMine = kGroupHeads / kWarps;
      float prob[kMine];
      SoftmaxTileStep<kWarps, kMine, !kExact>(part_s, kGroupHeads, kScoreStride, kMine * warp, valid, p.scale, m_s, l_s,
                                              corr_s, prob);
#pragma unroll
      for (int j = 0; j < kMine; ++j) {
        const int h = kMine * warp + j;
        const __nv_bfloat16 hi = __float2bfloat16_rn(prob[j]);
        prob_s[h * kProbStride + lane] = __bfloat16_as_ushort(hi);
        if constexpr (kExact) {
          const __nv_bfloat16 lo = __float2bfloat16_rn(prob[j] - __bfloat162float(hi));
          prob_s[(kGroupHeads + h) * kProbStride + lane] = __bfloat16_as_ushort(lo);
        }
      }
    }
    __syncthreads();

    // 4. O = O * correction + P . V over this warp's 16 n8 tiles: 2 k16 steps x (lo, hi) per tile.
    {
      uint32_t p_hi[kTile / 16][4], p_lo[kTile / 16][4];
#pragma unroll
      for (int ks = 0; ks < kTile / 16; ++ks) {
        LoadMatrixX4(p_hi[ks], prob_address + ks * 16 * 2);
        if constexpr (kExact) LoadMatrixX4(p_lo[ks], prob_address + (kGroupHeads * kProbStride + ks * 16) * 2);
      }
      const float c0 = corr_s[g], c1 = corr_s[g + 8];
#pragma unroll
      for (int np = 0; np < kSlice / 16; ++np) {
        float part[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int ks = 0; ks < kTile / 16; ++ks) {
          uint32_t b[4];
          LoadMatrixX4Trans(b, pv_address + (ks * 16 * kRowHalves + np * 16) * 2);
          if constexpr (kExact) {
            MmaBf16(part[0], p_lo[ks], b[0], b[1]);
            MmaBf16(part[1], p_lo[ks], b[2], b[3]);
          }
          MmaBf16(part[0], p_hi[ks], b[0], b[1]);
          MmaBf16(part[1], p_hi[ks], b[2], b[3]);
        }
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float* a = acc[2 * np + e];
          a[0] = fmaf(a[0], c0, part[e][0]);
          a[1] = fmaf(a[1], c0, part[e][1]);
          a[2] = fmaf(a[2], c1, part[e][2]);
          a[3] = fmaf(a[3], c1, part[e][3]);
        }
      }
    }
  }

  // Rows g and g + 8 of the accumulator, columns 8 n + 2 tq (+1) of this warp's slice.
  const int column = warp * kSlice + 2 * tq;
  if (p.splits > 1) {
    if (!WritePartialState(p, block, cand, m_s, l_s)) return;
    float* out0 = p.partial_acc + PartialRow(p, t, block.split, h0 + g) * kDim + column;
    float* out1 = out0 + 8 * kDim;
#pragma unroll
    for (int n = 0; n < kSlice / 8; ++n) {
      if (g < hn) *reinterpret_cast<float2*>(out0 + 8 * n) = make_float2(acc[n][0], acc[n][1]);
      if (g + 8 < hn) *reinterpret_cast<float2*>(out1 + 8 * n) = make_float2(acc[n][2], acc[n][3]);
    }
    return;
  }
  const float l0 = l_s[g], l1 = l_s[g + 8];
  float* out0 = p.o + (t * p.heads + h0 + g) * kDim + column;
  float* out1 = out0 + 8 * kDim;
#pragma unroll
  for (int n = 0; n < kSlice / 8; ++n) {
    if (g < hn) *reinterpret_cast<float2*>(out0 + 8 * n) = make_float2(__fdiv_rn(acc[n][0], l0), __fdiv_rn(acc[n][1], l0));
    if (g + 8 < hn) *reinterpret_cast<float2*>(out1 + 8 * n) = make_float2(__fdiv_rn(acc[n][2], l1), __fdiv_rn(acc[n][3], l1));
  }
}

}  // namespace

AttentionLaunch MmaAttentionLaunch(bool exact, int64_t selected_slots) {
  if (exact) {
    return {SparseAttentionMmaKernel<true>, "launch of SparseAttentionMmaKernel<exact>", tc::kThreads, kGroupHeads,
            tc::SharedBytes(selected_slots)};
  }
  return {SparseAttentionMmaKernel<false>, "launch of SparseAttentionMmaKernel<bf16>", tc::kThreads, kGroupHeads,
          tc::SharedBytes(selected_slots)};
}

}  // namespace tandem::kernels::cuda::internal
