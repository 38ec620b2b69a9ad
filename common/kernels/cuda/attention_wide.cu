// Sparse MQA on the tensor cores for the DSV4 entry with bf16 math (AttentionMath::kBf16), 64 heads a block
// (NUMERICS.md "Attention"; attention.cu picks the kernel and merges splits).
//
// Why a second kernel: the 16-head kernel (attention_mma.cu) reads and dequantizes every candidate once
// per 16 heads, four times for V4-Flash's 64; here one block of 8 warps serves all 64, so each entry
// crosses L2 -> SM once and is dequantized once. Warp w owns heads [32 (w & 1), + 32) (two m16 tiles) and
// dims [128 (w >> 1), + 128): QK sums that slice of the dims for its 32 heads x the tile's 32 candidates
// (the four slices' partial scores meet in shared memory), PV produces that slice of the output for its
// heads. q (bf16) sits in shared memory for the whole walk (registers hold the 32 x 128 accumulator); the
// raw entries stream through a ring of kStages tiles by cp.async (two tiles in flight while one computes),
// each tile dequantized once into bf16 [candidate][dim] rows (exact: e4m3 times a power of two, and the
// bf16 rope).
// q and the probabilities are rounded to bf16 once (one MMA pass each); scores, the online softmax and
// the output accumulate in f32. The accumulator is rescaled in place when a tile raises a head's max.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/kernels/cuda/attention_device.cuh"
#include "common/kernels/cuda/sparse_attention.cuh"

namespace tandem::kernels::cuda::internal {
namespace {

constexpr int kDim = kAttentionDim;
constexpr int kHeads = 64;                            // heads per block
constexpr int kNope = 448, kRope = 64;
constexpr int kDataChunks = (kNope + 2 * kRope) / 16;  // 16-byte chunks of an entry's data (36)
constexpr int kNopeChunks = kNope / 16;               // of them e4m3 codes (28; 4 per 64-wide scale tile)
constexpr int kScaleOffset = kNope + 2 * kRope;       // the scale bytes after the data in a raw row (576)
constexpr int kRawStride = kScaleOffset + 16;         // a raw entry in shared memory: data, 8 scale bytes, 8 pad
constexpr int kTile = 32;                             // candidates per tile
constexpr int kStages = 3;                            // raw tiles in the ring
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kCopiers = kThreads / kTile;            // threads per candidate for the copy and the dequantization
constexpr int kCopySteps = (kDataChunks + kCopiers - 1) / kCopiers;  // chunks sub + 8 j, j < 5
constexpr int kSlice = 128;                           // dims per warp (QK's k, PV's n)
constexpr int kSlices = kDim / kSlice;                // 4
constexpr int kWarpHeads = 32;                        // heads per warp: two m16 tiles
constexpr int kRowHalves = kDim + 8;                  // bf16 per K/V row: 16 pad bytes put ldmatrix rows on distinct banks
constexpr int kScoreStride = kTile + 8;               // f32 per partial-score row
constexpr int kProbStride = kTile + 8;                // bf16 per probability row (80 bytes: ldmatrix conflict-free)
constexpr size_t kKvBytes = size_t{kTile} * kRowHalves * 2;
constexpr size_t kQBytes = size_t{kHeads} * kRowHalves * 2;
constexpr size_t kRawBytes = size_t{kStages} * kTile * kRawStride;
constexpr size_t kScoreBytes = size_t{kSlices} * kHeads * kScoreStride * 4;
constexpr size_t kProbBytes = size_t{kHeads} * kProbStride * 2;
static_assert(kNope + kRope == kDim && kNope % 64 == 0, "the DSV4 entry");
static_assert(kTile == 32, "the softmax maps one candidate to one lane; PV takes two k16 steps");
static_assert(kCopiers == 8 && kCopySteps == 5, "the copy: 8 threads per candidate, chunks sub + 8 j");
static_assert(kScaleOffset == kEntryDataBytes && kDataChunks == kEntryChunks, "IssueEntryCopy's raw row");
static_assert(kSlices * 2 == kWarps && kWarpHeads * 2 == kHeads, "a warp per (half of the heads, slice of the dims)");
static_assert(kHeads % kWarps == 0, "the softmax gives each warp kHeads / kWarps heads");
static_assert(kStages >= 2, "the ring overlaps the copy of later tiles with this one's math");
static_assert(kKvBytes % 16 == 0 && kQBytes % 16 == 0 && kRawStride % 16 == 0 && kScoreBytes % 16 == 0 && kProbBytes % 16 == 0,
              "16-byte aligned shared regions");

size_t SharedBytes(int64_t selected_slots) {
  return kQBytes + kKvBytes + kRawBytes + kScoreBytes + kProbBytes + 3 * kHeads * 4 + static_cast<size_t>(selected_slots) * 4;
}

__global__ void __launch_bounds__(kThreads, 1) SparseAttentionWideKernel(AttentionParams p) {
  extern __shared__ __align__(16) uint8_t shared[];
  uint16_t* q_s = reinterpret_cast<uint16_t*>(shared);               // [kHeads][kRowHalves] bf16
  uint16_t* kv_s = q_s + kHeads * kRowHalves;                        // [kTile][kRowHalves] bf16
  uint8_t* raw_s = reinterpret_cast<uint8_t*>(kv_s + kTile * kRowHalves);  // [kStages][kTile][kRawStride]
  float* part_s = reinterpret_cast<float*>(raw_s + kRawBytes);       // [slice][head][kScoreStride]
  uint16_t* prob_s = reinterpret_cast<uint16_t*>(part_s + kSlices * kHeads * kScoreStride);  // [head][kProbStride]
  float* m_s = reinterpret_cast<float*>(prob_s + kHeads * kProbStride);
  float* l_s = m_s + kHeads;
  float* corr_s = l_s + kHeads;
  int32_t* sel_s = reinterpret_cast<int32_t*>(corr_s + kHeads);
  __shared__ int warp_counts[kWarps];

  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, tq = lane & 3;  // fragment row group and column pair
  const int half = warp & 1, slice = warp >> 1;
  const BlockCoordinates block = CoordinatesOf(p, kHeads);
  const int64_t t = block.t, h0 = block.h0;
  const int hn = block.hn;

  const BlockCandidates cand = StartBlock<kThreads>(p, block, kHeads, kTile, m_s, l_s, sel_s, warp_counts);
  const int tile_begin = cand.tile_begin, tile_end = cand.tile_end;

  // This thread's candidate in the tile at tile0 (none past the block's range).
  const auto ref_for = [&](int tile0) {
    const int c = tid / kCopiers;
    return cand.RefInTile(p, sel_s, tile0, kTile, c);
  };
  // Starts the copy of the tile at tile0 into ring slot `stage` and commits it as one group (an empty group
  // past the range, so that every iteration waits on the same count): 8 threads per candidate (a plain-store
  // fallback is published by the barriers before its dequantization).
  const auto issue = [&](int tile0, int stage, const KvRef& ref) {
    const int c = tid / kCopiers, sub = tid % kCopiers;
    if (tile0 < tile_end && c < min(kTile, tile_end - tile0)) {
      IssueEntryCopy<kCopiers>(raw_s + (stage * kTile + c) * kRawStride, ref, sub);
    }
    CopyAsyncCommit();
  };
  // Prologue: tiles 0 .. kStages - 2 of the range in flight.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    const int tile0 = tile_begin + s * kTile;
    issue(tile0, s, ref_for(tile0));
  }
  KvRef pending = ref_for(tile_begin + (kStages - 1) * kTile);

  // q of the block's heads as bf16 rows (heads past hn zero), loaded while the first tiles' copies fly; the
  // barrier at the top of the first tile publishes it (a block without tiles skips it: never read).
  for (int i = tile_begin < tile_end ? tid : kHeads * kDim / 4; i < kHeads * kDim / 4; i += kThreads) {
    const int h = i / (kDim / 4), d = 4 * (i % (kDim / 4));
    const float4 v = h < hn ? *reinterpret_cast<const float4*>(p.q + (t * p.heads + h0 + h) * kDim + d)
                            : make_float4(0.f, 0.f, 0.f, 0.f);
    *reinterpret_cast<uint2*>(q_s + h * kRowHalves + d) = make_uint2(PackBf16x2(v.x, v.y), PackBf16x2(v.z, v.w));
  }

  // ldmatrix lane addresses (as attention_mma.cu, at this warp's slice). QK (K as B): candidate
  // 8 (lane / 16) + lane % 8, dims + 8 at lane bit 3. PV (V as B, transposed): candidate lane % 8 + 8
  // (bit 3), dims + 8 at lane / 16. P and q (A): head lane % 8 + 8 (bit 3), columns + 8 at lane / 16.
  const uint32_t kv_base = SharedAddress(kv_s);
  const uint32_t q_address = SharedAddress(q_s) + (((lane & 7) + 8 * ((lane >> 3) & 1) + kWarpHeads * half) *
                                                       kRowHalves + slice * kSlice + 8 * (lane >> 4)) * 2;
  const uint32_t qk_address =
      kv_base + (((lane >> 4) * 8 + (lane & 7)) * kRowHalves + slice * kSlice + 8 * ((lane >> 3) & 1)) * 2;
  const uint32_t pv_address =
      kv_base + (((lane & 7) + 8 * ((lane >> 3) & 1)) * kRowHalves + slice * kSlice + 8 * (lane >> 4)) * 2;
  const uint32_t prob_address = SharedAddress(prob_s) + (((lane & 7) + 8 * ((lane >> 3) & 1) + kWarpHeads * half) *
                                                             kProbStride + 8 * (lane >> 4)) * 2;

  float acc[2][kSlice / 8][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int n = 0; n < kSlice / 8; ++n) acc[mt][n][0] = acc[mt][n][1] = acc[mt][n][2] = acc[mt][n][3] = 0.0f;
  }

  int stage = 0;
  for (int tile0 = tile_begin; tile0 < tile_end; tile0 += kTile) {
    const int valid = min(kTile, tile_end - tile0);
    // kStages - 1 groups were committed ahead of this tile's; all but the newest kStages - 2 are done.
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kStages - 2) : "memory");
    __syncthreads();  // this tile's raw bytes are visible; the previous tile is done with kv_s, prob_s, its ring slot
    {
      const int ahead = tile0 + (kStages - 1) * kTile;
      issue(ahead, (stage + kStages - 1) % kStages, pending);
      pending = ref_for(ahead + kTile);
    }

    // 1. Dequantize: thread sub of candidate c its chunks sub + 8 j: 16 codes of scale tile k / 4 -> 16
    // bf16, or 8 rope bf16 copied; zeros past `valid`, so that P = 0 never meets stale bytes (0 * NaN).
    {
      const int c = tid / kCopiers, sub = tid % kCopiers;
      uint16_t* row = kv_s + c * kRowHalves;
      const uint8_t* src = raw_s + (stage * kTile + c) * kRawStride;
      const bool live = c < valid;
#pragma unroll
      for (int j = 0; j < kCopySteps; ++j) {
        const int k = sub + kCopiers * j;
        if (k < kNopeChunks) {
          uint4 lo = make_uint4(0u, 0u, 0u, 0u), hi = lo;
          if (live) {
            const uint4 raw = *reinterpret_cast<const uint4*>(src + 16 * k);
            DequantFp8Chunk(raw, Ue8m0ToFloat(src[kScaleOffset + k / 4]), &lo, &hi);
          }
          *reinterpret_cast<uint4*>(row + 16 * k) = lo;
          *reinterpret_cast<uint4*>(row + 16 * k + 8) = hi;
        } else if (k < kDataChunks) {  // rope bytes 16 (k - 28): bf16 values 8 (k - 28) on
          *reinterpret_cast<uint4*>(row + kNope + 8 * (k - kNopeChunks)) =
              live ? *reinterpret_cast<const uint4*>(src + 16 * k) : make_uint4(0u, 0u, 0u, 0u);
        }
      }
    }
    __syncthreads();  // kv_s is ready

    // 2. Partial scores of this warp's 32 heads over its 128 dims: 8 k16 steps x 4 n8 tiles x 2 m16 tiles.
    {
      float score[2][kTile / 8][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int j = 0; j < kTile / 8; ++j) score[mt][j][0] = score[mt][j][1] = score[mt][j][2] = score[mt][j][3] = 0.0f;
      }
#pragma unroll
      for (int ks = 0; ks < kSlice / 16; ++ks) {
        uint32_t q_frag[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) LoadMatrixX4(q_frag[mt], q_address + (16 * mt * kRowHalves + ks * 16) * 2);
#pragma unroll
        for (int jp = 0; jp < kTile / 16; ++jp) {
          uint32_t b[4];
          LoadMatrixX4(b, qk_address + (jp * 16 * kRowHalves + ks * 16) * 2);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            MmaBf16(score[mt][2 * jp], q_frag[mt], b[0], b[1]);
            MmaBf16(score[mt][2 * jp + 1], q_frag[mt], b[2], b[3]);
          }
        }
      }
      float* mine = part_s + slice * kHeads * kScoreStride;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int r0 = kWarpHeads * half + 16 * mt + g;
#pragma unroll
        for (int j = 0; j < kTile / 8; ++j) {
          *reinterpret_cast<float2*>(mine + r0 * kScoreStride + 8 * j + 2 * tq) = make_float2(score[mt][j][0], score[mt][j][1]);
          *reinterpret_cast<float2*>(mine + (r0 + 8) * kScoreStride + 8 * j + 2 * tq) =
              make_float2(score[mt][j][2], score[mt][j][3]);
        }
      }
    }
    __syncthreads();

    // 3. Online softmax: a warp per 8 heads, a lane per candidate; the four slices' partials summed in a
    // fixed order; P goes out as bf16.
    {
      constexpr int kMine = kHeads / kWarps;
      float prob[kMine];
      SoftmaxTileStep<kSlices, kMine, true>(part_s, kHeads, kScoreStride, kMine * warp, valid, p.scale, m_s, l_s, corr_s,
                                            prob);
#pragma unroll
      for (int j = 0; j < kMine; ++j) {
        prob_s[(kMine * warp + j) * kProbStride + lane] = __bfloat16_as_ushort(__float2bfloat16_rn(prob[j]));
      }
    }
    __syncthreads();

    // 4. O = O * correction + P . V: this warp's 2 m16 x 16 n8 tiles, 2 k16 steps each.
    {
      uint32_t p_frag[2][kTile / 16][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int ks = 0; ks < kTile / 16; ++ks) LoadMatrixX4(p_frag[mt][ks], prob_address + (16 * mt * kProbStride + ks * 16) * 2);
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int r0 = kWarpHeads * half + 16 * mt + g;
        const float c0 = corr_s[r0], c1 = corr_s[r0 + 8];
#pragma unroll
        for (int n = 0; n < kSlice / 8; ++n) {
          acc[mt][n][0] *= c0;
          acc[mt][n][1] *= c0;
          acc[mt][n][2] *= c1;
          acc[mt][n][3] *= c1;
        }
      }
#pragma unroll
      for (int np = 0; np < kSlice / 16; ++np) {
#pragma unroll
        for (int ks = 0; ks < kTile / 16; ++ks) {
          uint32_t b[4];
          LoadMatrixX4Trans(b, pv_address + (ks * 16 * kRowHalves + np * 16) * 2);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            MmaBf16(acc[mt][2 * np], p_frag[mt][ks], b[0], b[1]);
            MmaBf16(acc[mt][2 * np + 1], p_frag[mt][ks], b[2], b[3]);
          }
        }
      }
    }
    stage = (stage + 1) % kStages;
  }
  CopyAsyncWaitAll();  // no copy outlives the block (the ring's empty groups and any past the range)

  // Rows g and g + 8 of each m16 tile, columns 8 n + 2 tq (+1) of this warp's slice.
  const int column = slice * kSlice + 2 * tq;
  if (p.splits > 1) {
    if (!WritePartialState(p, block, cand, m_s, l_s)) return;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      const int r0 = kWarpHeads * half + 16 * mt + g;
      float* out0 = p.partial_acc + PartialRow(p, t, block.split, h0 + r0) * kDim + column;
      float* out1 = out0 + 8 * kDim;
#pragma unroll
      for (int n = 0; n < kSlice / 8; ++n) {
        if (r0 < hn) *reinterpret_cast<float2*>(out0 + 8 * n) = make_float2(acc[mt][n][0], acc[mt][n][1]);
        if (r0 + 8 < hn) *reinterpret_cast<float2*>(out1 + 8 * n) = make_float2(acc[mt][n][2], acc[mt][n][3]);
      }
    }
    return;
  }
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    const int r0 = kWarpHeads * half + 16 * mt + g;
    const float l0 = l_s[r0], l1 = l_s[r0 + 8];
    float* out0 = p.o + (t * p.heads + h0 + r0) * kDim + column;
    float* out1 = out0 + 8 * kDim;
#pragma unroll
    for (int n = 0; n < kSlice / 8; ++n) {
      if (r0 < hn) {
        *reinterpret_cast<float2*>(out0 + 8 * n) = make_float2(__fdiv_rn(acc[mt][n][0], l0), __fdiv_rn(acc[mt][n][1], l0));
      }
      if (r0 + 8 < hn) {
        *reinterpret_cast<float2*>(out1 + 8 * n) = make_float2(__fdiv_rn(acc[mt][n][2], l1), __fdiv_rn(acc[mt][n][3], l1));
      }
    }
  }
}

}  // namespace

AttentionLaunch WideAttentionLaunch(int64_t selected_slots) {
  return {SparseAttentionWideKernel, "launch of SparseAttentionWideKernel", kThreads, kHeads, SharedBytes(selected_slots)};
}

}  // namespace tandem::kernels::cuda::internal
