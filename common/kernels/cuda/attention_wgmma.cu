// Sparse MQA for the DSV4 entry with bf16 math (AttentionMath::kBf16), 64 heads a block on Hopper's
// warpgroup MMA (NUMERICS.md "Attention"; attention.cu picks the kernel and merges splits).
//
// Why a third kernel: the 64-head mma.sync kernel (attention_wide.cu) is latency-bound (ncu: 8 warps a SM,
// IPC 1.2), and its operands cross shared memory once per warp: every warp reads its own K and V
// fragments, and its scores meet the other dims' partial scores in shared memory. Here one wgmma reads
// its B operand once for a whole warpgroup, each warpgroup's scores are complete (all 512 dims), and the
// softmax's row reductions stay inside a quad of lanes.
//
// A block of two warpgroups serves (token, 64 heads, split) in tiles of 64 candidates:
// - the raw entries arrive by cp.async one tile ahead and are dequantized once into a bf16 tile (exact: e4m3
//   times a power of two; the rope dims copied);
// - warpgroup w scores candidates [32 w, 32 w + 32) of the tile against all 64 heads (32 wgmma m64n32k16
//   over the 512 dims, q and K from shared memory);
// - the two warpgroups trade their row maxima and probability sums through shared memory, so both hold the
//   same running max and denominator for their rows; the probabilities (bf16) go to shared memory;
// - warpgroup w accumulates output dims [256 w, 256 w + 256) of all 64 heads: 4 wgmma m64n256k16 over the
//   tile's 64 candidates, P from shared memory, V (the same bf16 tile) read N-major.
// q and the probabilities are rounded to bf16 once; scores, the online softmax and the output stay f32, as
// in the other bf16 kernels. Every warp takes every phase: a producer warpgroup that dequantized into a second
// tile while the other two computed measured no faster (one warp a scheduler could not hide its loads;
// bench/results/cuda-kernels/NOTES.md).
#include <cuda_runtime.h>

#include <cstdint>

#include "common/kernels/cuda/attention_device.cuh"
#include "common/kernels/cuda/sparse_attention.cuh"
#include "common/kernels/cuda/wgmma.cuh"

namespace tandem::kernels::cuda::internal {
namespace {

constexpr int kDim = kAttentionDim;
constexpr int kHeads = 64;                     // heads per block: the wgmma M
constexpr int kNope = 448, kRope = 64;
constexpr int kNopeChunks = kNope / 16;        // 16-byte chunks of e4m3 codes (28; 4 per 64-wide scale tile)
constexpr int kScaleOffset = kEntryDataBytes;  // the scale bytes after the data in a raw row (576)
constexpr int kRawStride = kEntryDataBytes + 16;  // a raw entry in shared memory: data, 8 scale bytes, 8 pad
constexpr int kTile = 64;                      // candidates per tile
constexpr int kStages = 2;                     // raw tiles in the ring: the next tile's copy flies during this one
constexpr int kThreads = 256;
constexpr int kGroupThreads = 128;             // a warpgroup
constexpr int kCopiers = kThreads / kTile;     // threads per candidate for the copy and the dequantization (4)
constexpr int kChunkSteps = kEntryChunks / kCopiers;  // chunks sub + 4 j, j < 9
constexpr int kScoreCandidates = kTile / 2;    // candidates a warpgroup scores (the QK N)
constexpr int kOutDims = kDim / 2;             // output dims a warpgroup accumulates (the PV N)
// Core-matrix tiles (wgmma.cuh): 8 rows x 16 bytes, 128 bytes each. q_s: [dim / 8][head / 8], kv_s:
// [dim / 8][candidate / 8], p_s: [candidate / 8][head / 8].
constexpr uint32_t kCore = 128;
constexpr uint32_t kQColumnBytes = kHeads / 8 * kCore;   // one group of 8 dims of q: 1 KB
constexpr uint32_t kKvColumnBytes = kTile / 8 * kCore;   // one group of 8 dims of the tile: 1 KB
constexpr uint32_t kPColumnBytes = kHeads / 8 * kCore;   // one group of 8 candidates of P: 1 KB
constexpr size_t kQBytes = size_t{kDim / 8} * kQColumnBytes;
constexpr size_t kKvBytes = size_t{kDim / 8} * kKvColumnBytes;
constexpr size_t kPBytes = size_t{kTile / 8} * kPColumnBytes;
constexpr size_t kRawBytes = size_t{kStages} * kTile * kRawStride;
constexpr size_t kTradeBytes = size_t{2} * 2 * kHeads * 4;  // [max | sum][warpgroup][head]
// The epilogue's output rows in shared memory: 8 floats of padding put a half-warp's 8-byte stores (8 rows x 4
// column pairs) on distinct banks.
constexpr int kStageStride = kDim + 8;
static_assert(kNope + kRope == kDim && kNope % 64 == 0, "the DSV4 entry");
static_assert(kCopiers == 4 && kChunkSteps * kCopiers == kEntryChunks, "the copy: 4 threads per candidate, 9 chunks each");
static_assert(kThreads == 2 * kGroupThreads && kTile == 8 * kThreads / 32, "a warp dequantizes 8 candidates");
static_assert(kRawStride % 16 == 0 && kQBytes % 16 == 0 && kRawBytes % 16 == 0, "16-byte aligned shared regions");
static_assert(size_t{kHeads} * kStageStride * 4 <= kKvBytes + kPBytes + kRawBytes, "the output rows fit the tiles' space");

size_t SharedBytes(int64_t selected_slots) {
  return kQBytes + kKvBytes + kPBytes + kRawBytes + kTradeBytes + 2 * kHeads * 4 + static_cast<size_t>(selected_slots) * 4;
}

// Byte offset of element (row, col) of a core-matrix tile whose column groups of 8 are `column_bytes` apart.
__device__ __forceinline__ uint32_t CoreOffset(uint32_t row, uint32_t col, uint32_t column_bytes) {
  return (col / 8) * column_bytes + (row / 8) * kCore + (row % 8) * 16 + (col % 8) * 2;
}

// Four e4m3 codes (one word, low byte first) times a power of two as two bf16 pairs (codes 0, 1 and 2, 3),
// with bit moves and one bf16 multiply a pair instead of four conversions: a code's exponent and mantissa bits
// placed under the bf16 exponent's low four bits read as the code's value times 2^-120 (its subnormals become
// bf16 subnormals, which bf16 arithmetic keeps), and the product by scale_bf16x2 = 2^(e - 7) (bf16 exponent
// field e + 120, for scale bytes e <= 134) puts the scale 2^(e - 127) and the 2^120 back, rounded once as
// DequantFp8Pair's f32 product is: the same bits. NaN codes would read as +-480: DequantChunk sends them to the
// conversions.
__device__ __forceinline__ uint2 DequantFp8Quad(uint32_t codes, uint32_t scale_bf16x2) {
  const uint32_t w = __byte_perm(codes, 0u, 0x3120);  // bytes 0, 2, 1, 3: each pair's codes 16 bits apart
  const uint32_t lo = ((w << 4) & 0x07F007F0u) | ((w << 8) & 0x80008000u);
  const uint32_t hi = ((w >> 4) & 0x07F007F0u) | (w & 0x80008000u);
  return make_uint2(MulBf16x2(lo, scale_bf16x2), MulBf16x2(hi, scale_bf16x2));
}

// 16 codes of one scale tile (scale byte e) as 16 bf16 (two 16-byte rows), the same bits as DequantFp8Pair.
// Scales over 2^7 (never from the quantizer) take a second exact product: first 2^120 (the code's value),
// then 2^(e - 127) (or NaN for e = 255, as Ue8m0ToFloat), overflowing to infinity where f32 does. A chunk with a
// NaN code (the quantizer writes 0x7f / 0xff for a NaN value) takes the conversions, which keep it NaN as the
// CPU and the other kernels do (the bit moves would read it as +-480).
__device__ __forceinline__ void DequantChunk(const uint4& raw, uint32_t e, uint4* first, uint4* second) {
  const auto nan_codes = [](uint32_t w) { return ((w & 0x7F7F7F7Fu) + 0x01010101u) & 0x80808080u; };
  if (nan_codes(raw.x) | nan_codes(raw.y) | nan_codes(raw.z) | nan_codes(raw.w)) {
    DequantFp8Chunk(raw, Ue8m0ToFloat(e), first, second);
    return;
  }
  const auto pair = [](uint32_t field) { return (field << 7) | (field << 23); };
  const uint32_t s = pair(e <= 134u ? e + 120u : 247u);
  const uint2 x = DequantFp8Quad(raw.x, s), y = DequantFp8Quad(raw.y, s);
  const uint2 z = DequantFp8Quad(raw.z, s), w = DequantFp8Quad(raw.w, s);
  *first = make_uint4(x.x, x.y, y.x, y.y);
  *second = make_uint4(z.x, z.y, w.x, w.y);
  if (e > 134u) {
    const uint32_t t = e == 255u ? 0x7FC07FC0u : pair(e);
    *first = make_uint4(MulBf16x2(first->x, t), MulBf16x2(first->y, t), MulBf16x2(first->z, t), MulBf16x2(first->w, t));
    *second = make_uint4(MulBf16x2(second->x, t), MulBf16x2(second->y, t), MulBf16x2(second->z, t), MulBf16x2(second->w, t));
  }
}

__global__ void __launch_bounds__(kThreads, 1) SparseAttentionWgmmaKernel(AttentionParams p) {
  extern __shared__ __align__(128) uint8_t shared[];
  uint8_t* q_s = shared;
  uint8_t* kv_s = q_s + kQBytes;
  uint8_t* p_s = kv_s + kKvBytes;
  uint8_t* raw_s = p_s + kPBytes;
  float* trade_s = reinterpret_cast<float*>(raw_s + kRawBytes);  // [0: max, 1: sum][warpgroup][head]
  float* m_s = trade_s + 2 * 2 * kHeads;
  float* l_s = m_s + kHeads;
  int32_t* sel_s = reinterpret_cast<int32_t*>(l_s + kHeads);
  __shared__ int warp_counts[kThreads / 32];

  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32;
  const int group = tid / kGroupThreads, group_warp = (tid % kGroupThreads) / 32;
  const int g = lane >> 2, tq = lane & 3;
  const int r0 = 16 * group_warp + g, r1 = r0 + 8;  // this thread's two head rows in every fragment
  const BlockCoordinates block = CoordinatesOf(p, kHeads);
  const int64_t t = block.t, h0 = block.h0;
  const int hn = block.hn;

  // q as bf16 core matrices (heads past hn zero): thread tid takes head tid % 64 and dims 8 (tid / 64 + 4 k)
  // .. + 7, k < 16, in two batches of 8 loads (16 in flight a thread) converted after they all land: one at a
  // time, each waited for, they took a quarter of the kernel at batch 64 (ncu). The first batch flies while
  // the block finds its candidates.
  constexpr int kQItems = kHeads * kDim / 8 / kThreads, kQBatch = kQItems / 2, kQStride = kThreads / kHeads;
  const int q_head = tid % kHeads;
  const float* q_row = p.q + (t * p.heads + h0 + q_head) * kDim;
  const auto q_dim = [&](int k) { return 8 * (tid / kHeads + kQStride * k); };
  const auto load_q = [&](int k0, float4 (&v)[kQBatch][2]) {
#pragma unroll
    for (int k = 0; k < kQBatch; ++k) {
      v[k][0] = v[k][1] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (q_head < hn) {
        v[k][0] = __ldg(reinterpret_cast<const float4*>(q_row + q_dim(k0 + k)));
        v[k][1] = __ldg(reinterpret_cast<const float4*>(q_row + q_dim(k0 + k)) + 1);
      }
    }
  };
  const auto store_q = [&](int k0, const float4 (&v)[kQBatch][2]) {
#pragma unroll
    for (int k = 0; k < kQBatch; ++k) {
      const float4 a = v[k][0], b = v[k][1];
      *reinterpret_cast<uint4*>(q_s + CoreOffset(q_head, q_dim(k0 + k), kQColumnBytes)) =
          make_uint4(PackBf16x2(a.x, a.y), PackBf16x2(a.z, a.w), PackBf16x2(b.x, b.y), PackBf16x2(b.z, b.w));
    }
  };
  float4 q_batch[kQBatch][2];
  load_q(0, q_batch);

  const BlockCandidates cand = StartBlock<kThreads>(p, block, kHeads, kTile, m_s, l_s, sel_s, warp_counts);
  const int tile_begin = cand.tile_begin, tile_end = cand.tile_end;

  // Copy roles: candidate tid / 4, chunks sub + 4 j (4 lanes read 64 contiguous bytes of an entry).
  const int copy_c = tid / kCopiers, copy_sub = tid % kCopiers;
  const auto ref_for = [&](int tile0) { return cand.RefInTile(p, sel_s, tile0, kTile, copy_c); };
  const auto issue = [&](int tile0, int stage, const KvRef& ref) {
    if (tile0 < tile_end && copy_c < min(kTile, tile_end - tile0)) {
      IssueEntryCopy<kCopiers>(raw_s + (stage * kTile + copy_c) * kRawStride, ref, copy_sub);
    }
    CopyAsyncCommit();
  };
  issue(tile_begin, 0, ref_for(tile_begin));
  KvRef pending = ref_for(tile_begin + kTile);
  store_q(0, q_batch);
  load_q(kQBatch, q_batch);
  store_q(kQBatch, q_batch);

  if (tile_begin < tile_end) FenceProxyAsync();  // the first tile's barriers publish q to the wgmmas

  // The running max and denominator of rows r0 and r1 (the same in both warpgroups, every tile).
  float m_run[2] = {m_s[r0], m_s[r1]};
  float l_run[2] = {l_s[r0], l_s[r1]};
  float acc[kOutDims / 2];  // rows r0 / r1, dims 256 group + 8 j + 2 tq (+1): registers 4 j + 0, 1 / 2, 3
#pragma unroll
  for (int i = 0; i < kOutDims / 2; ++i) acc[i] = 0.0f;

  const uint32_t q_base = SharedAddress(q_s), kv_base = SharedAddress(kv_s), p_base = SharedAddress(p_s);
  // QK: A = q (rows heads), B = this group's 32 candidates (rows), both K-major over the dims.
  const uint64_t qk_a = WgmmaDescriptor(q_base, kQColumnBytes, kCore);
  const uint64_t qk_b = WgmmaDescriptor(kv_base + group * (kScoreCandidates / 8) * kCore, kKvColumnBytes, kCore);
  // PV: A = P (rows heads, K-major over the candidates), B = the tile N-major: K = candidates, N = this group's dims.
  const uint64_t pv_a = WgmmaDescriptor(p_base, kPColumnBytes, kCore);
  const uint64_t pv_b = WgmmaDescriptor(kv_base + group * (kOutDims / 8) * kKvColumnBytes, kCore, kKvColumnBytes);

  int stage = 0;
  for (int tile0 = tile_begin; tile0 < tile_end; tile0 += kTile) {
    const int valid = min(kTile, tile_end - tile0);
    CopyAsyncWaitAll();  // this tile's raw bytes (the only group in flight)
    __syncthreads();     // ... visible to all; the previous tile's PV is done with kv_s and p_s
    {
      const int ahead = tile0 + kTile;
      issue(ahead, stage ^ 1, pending);
      pending = ref_for(ahead + kTile);
    }

    // 1. Dequantize: warp w's lanes l take candidate 8 w + l % 8 (a store phase of 8 lanes covers 8 distinct
    // core-matrix rows) and chunks l / 8 + 4 j; zeros past `valid`, so that P = 0 never meets stale bytes.
    {
      const int c = 8 * (tid / 32) + lane % 8, sub = lane / 8;
      const uint8_t* src = raw_s + (stage * kTile + c) * kRawStride;
      const bool live = c < valid;
#pragma unroll
      for (int j = 0; j < kChunkSteps; ++j) {
        const int k = sub + kCopiers * j;
        if (k < kNopeChunks) {
          uint4 first = make_uint4(0u, 0u, 0u, 0u), second = first;
          if (live) DequantChunk(*reinterpret_cast<const uint4*>(src + 16 * k), src[kScaleOffset + k / 4], &first, &second);
          *reinterpret_cast<uint4*>(kv_s + CoreOffset(c, 16 * k, kKvColumnBytes)) = first;
          *reinterpret_cast<uint4*>(kv_s + CoreOffset(c, 16 * k + 8, kKvColumnBytes)) = second;
        } else {  // rope bytes 16 (k - 28): bf16 dims 448 + 8 (k - 28) on
          *reinterpret_cast<uint4*>(kv_s + CoreOffset(c, kNope + 8 * (k - kNopeChunks), kKvColumnBytes)) =
              live ? *reinterpret_cast<const uint4*>(src + 16 * k) : make_uint4(0u, 0u, 0u, 0u);
        }
      }
    }
    FenceProxyAsync();
    __syncthreads();  // the tile is visible to both warpgroups' wgmmas

    // 2. Scores of this group's 32 candidates, all 64 heads, over the 512 dims.
    float s[kScoreCandidates / 2];
    WgmmaFence();
    WgmmaM64N32K16<false>(s, qk_a, qk_b);
#pragma unroll
    for (int ks = 1; ks < kDim / 16; ++ks) {
      WgmmaM64N32K16<true>(s, WgmmaAdvance(qk_a, ks * 2 * kQColumnBytes), WgmmaAdvance(qk_b, ks * 2 * kKvColumnBytes));
    }
    WgmmaCommit();
    WgmmaWait<0>();
    WgmmaTouch(s);

    // 3. Online softmax. Candidate of register 4 j + u: 32 group + 8 j + 2 tq + u % 2; row r0 for u < 2.
    float top[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int i = 0; i < kScoreCandidates / 2; ++i) {
      const int c = kScoreCandidates * group + 8 * (i / 4) + 2 * tq + i % 2;
      s[i] = c < valid ? __fmul_rn(s[i], p.scale) : -INFINITY;
      top[(i / 2) % 2] = fmaxf(top[(i / 2) % 2], s[i]);
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      top[u] = fmaxf(top[u], __shfl_xor_sync(kFullMask, top[u], 1));
      top[u] = fmaxf(top[u], __shfl_xor_sync(kFullMask, top[u], 2));
    }
    float* trade_max = trade_s;
    float* trade_sum = trade_s + 2 * kHeads;
    if (tq == 0) {
      trade_max[group * kHeads + r0] = top[0];
      trade_max[group * kHeads + r1] = top[1];
    }
    __syncthreads();  // both groups' maxima are visible
    float m_new[2], sum[2] = {0.0f, 0.0f};
    m_new[0] = fmaxf(m_run[0], fmaxf(trade_max[r0], trade_max[kHeads + r0]));
    m_new[1] = fmaxf(m_run[1], fmaxf(trade_max[r1], trade_max[kHeads + r1]));
#pragma unroll
    for (int j = 0; j < kScoreCandidates / 8; ++j) {
#pragma unroll
      for (int u = 0; u < 2; ++u) {  // row r0 then r1
        const float a = __bfloat162float(__float2bfloat16_rn(expf(s[4 * j + 2 * u] - m_new[u])));
        const float b = __bfloat162float(__float2bfloat16_rn(expf(s[4 * j + 2 * u + 1] - m_new[u])));
        sum[u] += a + b;
        const int c = kScoreCandidates * group + 8 * j + 2 * tq;
        *reinterpret_cast<uint32_t*>(p_s + CoreOffset(u == 0 ? r0 : r1, c, kPColumnBytes)) = PackBf16x2(a, b);
      }
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      sum[u] += __shfl_xor_sync(kFullMask, sum[u], 1);
      sum[u] += __shfl_xor_sync(kFullMask, sum[u], 2);
    }
    if (tq == 0) {
      trade_sum[group * kHeads + r0] = sum[0];
      trade_sum[group * kHeads + r1] = sum[1];
    }
    FenceProxyAsync();
    __syncthreads();  // P and both groups' sums are visible
    float correction[2];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int r = u == 0 ? r0 : r1;
      correction[u] = expf(m_run[u] - m_new[u]);
      l_run[u] = fmaf(l_run[u], correction[u], trade_sum[r] + trade_sum[kHeads + r]);
      m_run[u] = m_new[u];
    }

    // 4. O = O * correction + P . V over the tile's 64 candidates. (Waited for here: a wgmma group left in
    // flight across the loop's back edge makes ptxas serialize every wgmma of the kernel.)
#pragma unroll
    for (int i = 0; i < kOutDims / 2; ++i) acc[i] *= correction[(i / 2) % 2];
    WgmmaTouch(acc);
    WgmmaFence();
#pragma unroll
    for (int ks = 0; ks < kTile / 16; ++ks) {
      WgmmaM64N256K16<true>(acc, WgmmaAdvance(pv_a, ks * 2 * kPColumnBytes), WgmmaAdvance(pv_b, ks * 2 * kCore), 1);
    }
    WgmmaCommit();
    WgmmaWait<0>();
    WgmmaTouch(acc);
    stage ^= 1;
  }
  CopyAsyncWaitAll();  // no copy outlives the block (the empty group past the range included)

  // The output rows (unsplit: divided by the denominator; split: the raw accumulator) go through shared
  // memory (the tiles' space, free now), then out as whole 16-byte vectors: a thread's own fragments would
  // take 64 scattered 8-byte stores, which ncu saw queue up at the end (lg throttle).
  const bool split = p.splits > 1;
  // The running state back where WritePartialState reads it (a block without tiles left it unchanged there:
  // writing it anyway would race its first reads, with no barrier in between; racecheck saw that).
  if (split && tile_begin < tile_end && group == 0 && tq == 0) {
    m_s[r0] = m_run[0];
    m_s[r1] = m_run[1];
    l_s[r0] = l_run[0];
    l_s[r1] = l_run[1];
  }
  __syncthreads();  // both groups' wgmmas are done with kv_s and p_s; m_s, l_s are written
  if (split && !WritePartialState(p, block, cand, m_s, l_s)) return;  // (the same answer for the whole block)
  float* stage_s = reinterpret_cast<float*>(kv_s);
  const int column = group * kOutDims + 2 * tq;
#pragma unroll
  for (int j = 0; j < kOutDims / 8; ++j) {
    float2 v0 = make_float2(acc[4 * j], acc[4 * j + 1]), v1 = make_float2(acc[4 * j + 2], acc[4 * j + 3]);
    if (!split) {
      v0 = make_float2(__fdiv_rn(v0.x, l_run[0]), __fdiv_rn(v0.y, l_run[0]));
      v1 = make_float2(__fdiv_rn(v1.x, l_run[1]), __fdiv_rn(v1.y, l_run[1]));
    }
    *reinterpret_cast<float2*>(stage_s + r0 * kStageStride + column + 8 * j) = v0;
    *reinterpret_cast<float2*>(stage_s + r1 * kStageStride + column + 8 * j) = v1;
  }
  __syncthreads();
  for (int i = tid; i < kHeads * kDim / 4; i += kThreads) {
    const int row = i / (kDim / 4), c4 = i % (kDim / 4);
    if (row >= hn) continue;
    float* dst = split ? p.partial_acc + PartialRow(p, t, block.split, h0 + row) * kDim : p.o + (t * p.heads + h0 + row) * kDim;
    reinterpret_cast<float4*>(dst)[c4] = *reinterpret_cast<const float4*>(stage_s + row * kStageStride + 4 * c4);
  }
}

}  // namespace

AttentionLaunch WgmmaAttentionLaunch(int64_t selected_slots) {
  return {SparseAttentionWgmmaKernel, "launch of SparseAttentionWgmmaKernel", kThreads, kHeads, SharedBytes(selected_slots)};
}

}  // namespace tandem::kernels::cuda::internal
