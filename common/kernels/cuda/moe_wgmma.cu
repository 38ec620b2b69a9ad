// Prefill grouped expert GEMM from MXFP4 weights on warpgroup MMA (moe_wgmma.h).
//
// A block of two warpgroups computes a 128-row x 256-column tile of y for one expert, in K steps of 64:
// - x (bf16 from ToBf16Permuted, and its lo part when split) arrives two steps ahead into a 3-stage ring: by
//   TMA (x_cluster >= 1, the default; one thread a block, 128-byte swizzled, an mbarrier a stage) or by
//   cp.async from every thread (x_cluster 0, or when the driver has no tensor-map encoder);
// - each thread owns one weight row of the tile: it loads that row's 32 code bytes two steps ahead into
//   registers (its scales come by cp.async with the x copies) and dequantizes them into a bf16 tile (2 stages);
// - warpgroup w multiplies rows [64 w, 64 w + 64) by all 256 columns: 4 wgmma m64n256k16 a step (8 when
//   split), both operands K-major in shared memory, f32 accumulators in registers (128 a thread). Step k's
//   wgmmas run while step k + 1 is dequantized.
// Rows past the tile's count are computed from a repeated row (cp.async) or whatever rows follow (TMA; zeros
// past x's end) and never stored; a warpgroup whose 64 rows are all past the count skips its MMAs.
// RegisterTile (register_weights, below) is the variant with the weights as the A operand from registers,
// ProducerTile (producer_warpgroup) the warp-specialized one, and WideTile (wide_tiles, the forward's) the one
// with up to 256 rows x 128 columns a block and the weights as the A operand from shared memory.
//
// Dequantization, exactly as DequantizeMxfp4: an e2m1 code's 3 magnitude bits go under the bf16 exponent
// (bits 6-8) and its sign to bit 15, which reads as the code's value times 2^-126 (subnormals included);
// one bf16 multiply by 2^(s - 1) (or, for s > 128, by 2^126 and then 2^(s - 127)) gives the exact product
// (two significant bits: no rounding). s = 255 makes every value of the group NaN, as on the CPU.
// Measured (H200, bench/results/cuda-kernels/NOTES.md "Prefill experts on warpgroup MMA" and the sections after
// it): no single stage sets the pace; without any MMA a step still takes ~2x the MMAs' time.
#include "common/kernels/cuda/moe_wgmma.h"

#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <algorithm>

#include "common/kernels/cuda/attention_device.cuh"
#include "common/kernels/cuda/wgmma.cuh"

namespace tandem::kernels::cuda::internal {
namespace {

constexpr int kThreads = 256;
constexpr int kRows = kExpertTileRows, kColumns = kExpertTileColumns, kDepth = kExpertTileDepth;
constexpr int kXStages = 3;       // x tiles in the ring: the copy of step k + 2 flies during step k
constexpr int kWeightStages = 2;  // bf16 weight tiles: step k + 1 is written while step k is multiplied
constexpr int kScaleSlots = 2;    // the weight rows' scales of two steps a slot (one 4-byte cp.async a row)
constexpr uint32_t kCore = 128;   // a core matrix: 8 rows x 16 bytes
constexpr uint32_t kRowGroupBytes = kDepth / 8 * kCore;  // 8 rows x 64 values: 1 KB
constexpr uint32_t kXTileBytes = kRows * kDepth * 2;     // 16 KB
constexpr uint32_t kWeightTileBytes = kColumns * kDepth * 2;  // 32 KB
static_assert(kThreads == kColumns, "one weight row a thread");

constexpr uint32_t kScaleSlotBytes = kColumns * 4;
constexpr uint32_t kBarrierBytes = 2 * kXStages * 8;  // the TMA path's full and empty mbarriers of each x stage
size_t SharedBytes(bool split) {
  return size_t{kXStages} * (split ? 2 : 1) * kXTileBytes + size_t{kWeightStages} * kWeightTileBytes +
         size_t{kScaleSlots} * kScaleSlotBytes + kBarrierBytes + 1024;  // + alignment slack
}

// ---- TMA and mbarriers (the x_cluster path; sm_90a) ----
// x by TMA lands 128-byte swizzled: row r of a stage at 128 r, its 16-byte chunk c at chunk c ^ (r % 8) (the
// tensor map's CU_TENSOR_MAP_SWIZZLE_128B; stages 1024-byte aligned). The wgmma descriptor of that layout
// (K-major): leading byte offset unused (1), stride 1024 bytes (8 rows), layout type 1 (128-byte swizzle);
// 16 more values of K are 32 bytes on.
__device__ __forceinline__ uint64_t Swizzled128Descriptor(uint32_t shared_address) {
  return static_cast<uint64_t>((shared_address & 0x3FFFFu) >> 4) | uint64_t{1} << 16 | uint64_t{1024 >> 4} << 32 |
         uint64_t{1} << 62;
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void MbarrierInit(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// The inits visible to the cluster (the peers' TMAs and arrivals), before the cluster barrier that follows.
__device__ __forceinline__ void FenceMbarrierInit() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void ClusterSync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
__device__ __forceinline__ uint32_t ClusterRank() {
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
  return rank;
}
// This thread's arrival, expecting `bytes` more of asynchronous transactions in the current phase.
__device__ __forceinline__ void MbarrierExpectBytes(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// An arrival on the barrier at the same offset in cluster block `rank`. The default semantics (release at CTA
// scope) as CUTLASS's cluster barriers use them: with .release.cluster ptxas put a MEMBAR.ALL.GPU before each
// arrival, which waited for the thread's loads in flight.
__device__ __forceinline__ void MbarrierArriveRemote(uint32_t bar, uint32_t rank) {
  asm volatile(
      "{\n.reg .b32 remote;\nmapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n" ::"r"(bar),
      "r"(rank)
      : "memory");
}
// Until the phase of parity `parity` has completed (acquire at CTA scope, the default: the TMA's bytes and the
// arrivals this waits for all land in this block's shared memory; .acquire.cluster made ptxas invalidate L1,
// CCTL.IVALL, after every wait).
__device__ __forceinline__ void MbarrierWait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
// The box at (c0 innermost, c1) of `map` into `dst` of every block in `mask` (same offset), each block's
// barrier at `bar` counting its bytes.
__device__ __forceinline__ void TmaLoadMulticast(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar,
                                                 uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster "
      "[%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar), "h"(mask)
      : "memory");
}
// This thread's arrival on a barrier of its own block.
__device__ __forceinline__ void MbarrierArrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void TmaLoad(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}
#else
__device__ __forceinline__ void MbarrierInit(uint32_t, uint32_t) { __trap(); }
__device__ __forceinline__ void FenceMbarrierInit() { __trap(); }
__device__ __forceinline__ void ClusterSync() { __trap(); }
__device__ __forceinline__ uint32_t ClusterRank() { __trap(); return 0; }
__device__ __forceinline__ void MbarrierExpectBytes(uint32_t, uint32_t) { __trap(); }
__device__ __forceinline__ void MbarrierArriveRemote(uint32_t, uint32_t) { __trap(); }
__device__ __forceinline__ void MbarrierWait(uint32_t, uint32_t) { __trap(); }
__device__ __forceinline__ void TmaLoadMulticast(uint32_t, const CUtensorMap*, int, int, uint32_t, uint16_t) { __trap(); }
__device__ __forceinline__ void TmaLoad(uint32_t, const CUtensorMap*, int, int, uint32_t) { __trap(); }
__device__ __forceinline__ void MbarrierArrive(uint32_t) { __trap(); }
#endif

// 16 bytes global -> shared through L1 (both 16-byte aligned): two lanes asking for the halves of one 32-byte
// sector make one request.
__device__ __forceinline__ void CopyAsync16Cached(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
// Until at most N of this thread's cp.async groups are pending.
template <int N>
__device__ __forceinline__ void CopyAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// The full and empty mbarriers of a ring of kStages x stages (8 bytes each, from `base`). full[s] completes
// when the stage's x of its step has landed; empty[s] when its consumers are done with the stage's step. A
// stage serves steps s, s + kStages, ...: step k's use of it is phase k / kStages.
template <int kStages>
struct StageBarriers {
  uint32_t base = 0;
  __device__ __forceinline__ uint32_t Full(int step) const { return base + 8u * static_cast<uint32_t>(step % kStages); }
  __device__ __forceinline__ uint32_t Empty(int step) const {
    return base + 8u * static_cast<uint32_t>(kStages + step % kStages);
  }
  __device__ __forceinline__ static uint32_t Parity(int step) { return static_cast<uint32_t>(step / kStages) & 1u; }
  // One thread, before the barrier that publishes them.
  __device__ __forceinline__ void Init(uint32_t empty_arrivals, uint32_t full_arrivals = 1) const {
    for (int s = 0; s < kStages; ++s) {
      MbarrierInit(Full(s), full_arrivals);
      MbarrierInit(Empty(s), empty_arrivals);
    }
    FenceMbarrierInit();
  }
  __device__ __forceinline__ void WaitFull(int step) const { MbarrierWait(Full(step), Parity(step)); }
  // Until the stage's previous step (step - kStages) is released; at once for the ring's first round.
  __device__ __forceinline__ void WaitEmpty(int step) const {
    if (step >= kStages) MbarrierWait(Empty(step), Parity(step) ^ 1u);
  }
};

// The x tensors' maps (hi, and lo when split), kernel parameters.
struct XMaps {
  CUtensorMap hi, lo;
};

// Byte offset of (row, 8-value chunk c) in a [rows][64] tile of core matrices: row group r / 8 holds the 8
// chunks of its rows one core matrix after another (K-major: leading 128 bytes, stride 1 KB).
__device__ __forceinline__ uint32_t TileOffset(int row, int chunk) {
  return static_cast<uint32_t>(row >> 3) * kRowGroupBytes + static_cast<uint32_t>(chunk) * kCore +
         static_cast<uint32_t>(row & 7) * 16;
}

// One 8-value chunk times 2^(s - 127). kFast (s <= 128): 2^(s - 1) is a bf16 and one multiply does it; else
// 2^126 first and then the scale (s = 255 gives NaN, as Ue8m0ToFloat).
template <bool kFast>
__device__ __forceinline__ uint4 DequantMxfp4Word(uint32_t codes, uint32_t s) {
  uint32_t v[4];
  ShiftMxfp4Word(codes, v);
  if constexpr (kFast) {
    const uint32_t factor = Mxfp4PairFactor(s);
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = MulBf16x2(v[j], factor);
  } else {
    const uint32_t scale = Ue8m0Bf16x2(s);
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = MulBf16x2(MulBf16x2(v[j], kBf16x2TwoTo126), scale);
  }
  return make_uint4(v[0], v[1], v[2], v[3]);
}

// One weight row's codes for one K step: 64 values.
struct RowCodes {
  uint4 low, high;
};

__device__ __forceinline__ void LoadRowCodes(const uint8_t* codes, bool valid, int step, RowCodes& r) {
  if (!valid) {
    r = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
    return;
  }
  // The two halves of the row's 32-byte sector are two loads: the first brings the sector into L1 and the
  // second hits it. (With L1::no_allocate, L2 sent every sector twice: ncu, H200, w1/w3 at 8192 tokens: L2
  // throughput 74%, the kernel's top limit, and 5% slower.)
  const uint8_t* c = codes + step * (kDepth / 2);
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r.low.x), "=r"(r.low.y), "=r"(r.low.z), "=r"(r.low.w)
               : "l"(c));
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r.high.x), "=r"(r.high.y), "=r"(r.high.z), "=r"(r.high.w)
               : "l"(c + 16));
}

template <bool kFast>
__device__ __forceinline__ void DequantRowAs(const RowCodes& r, uint32_t scales, uint8_t* tile, int row) {
  const uint32_t words[8] = {r.low.x, r.low.y, r.low.z, r.low.w, r.high.x, r.high.y, r.high.z, r.high.w};
  const uint32_t scale[2] = {scales & 0xffu, scales >> 8};
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    *reinterpret_cast<uint4*>(tile + TileOffset(row, c)) = DequantMxfp4Word<kFast>(words[c], scale[c / 4]);
  }
}

// `scales`: the step's two ue8m0 bytes. One branch a step (warp-uniform in practice: a checkpoint's scales
// are all <= 128).
__device__ __forceinline__ void DequantRow(const RowCodes& r, uint32_t scales, uint8_t* tile, int row) {
  if ((scales & 0xffu) <= 128 && (scales >> 8) <= 128) {
    DequantRowAs<true>(r, scales, tile, row);
  } else {
    DequantRowAs<false>(r, scales, tile, row);
  }
}

// A warpgroup's 64 x 256 accumulators (rows [64 group, + 64) of the tile) into y, rows past the tile's count
// and columns past total_out left out. Fragments: warp q of the warpgroup holds rows 16 q + lane / 4 and + 8,
// columns 8 j + 2 (lane % 4) and + 1.
__device__ __forceinline__ void StoreTile(const GroupedMxfp4GemmArgs& a, const ExpertTile& tile, int64_t n0, int group,
                                          int tid, const float (&acc)[128]) {
  const int lane = tid % 32, warp = (tid % 128) / 32;
  const int r0 = group * 64 + warp * 16 + lane / 4, r1 = r0 + 8;
#pragma unroll
  for (int j = 0; j < kColumns / 8; ++j) {
    const int64_t column = n0 + 8 * j + 2 * (lane % 4);
    if (column >= a.total_out) continue;
    if (r0 < tile.rows) {
      *reinterpret_cast<float2*>(a.y + (tile.row0 + r0) * a.total_out + column) = make_float2(acc[4 * j], acc[4 * j + 1]);
    }
    if (r1 < tile.rows) {
      *reinterpret_cast<float2*>(a.y + (tile.row0 + r1) * a.total_out + column) = make_float2(acc[4 * j + 2], acc[4 * j + 3]);
    }
  }
}

// One block's tile. kSplit: x_lo is not null (the lo part's MMAs follow hi's). Run<kMma> is the whole pipeline;
// a warpgroup without rows runs it without MMAs (it still copies and dequantizes its share): a branch around
// the wgmmas inside one loop would make ptxas wait for each wgmma before the next. kProbe leaves a stage out
// (GemmProbe: timing only). kTma: x by TMA, shared across a cluster of a.x_cluster column tiles (x_cluster).
template <bool kSplit, GemmProbe kProbe, bool kTma>
struct BlockTile {
  const GroupedMxfp4GemmArgs& a;
  const XMaps& maps;
  ExpertTile tile;
  int tid, group, rows, steps;
  int64_t n0;
  uint32_t x_stage_bytes, x_base, weight_base, scale_base;
  StageBarriers<kXStages> barriers;  // kTma: full (one arrival, this block's, plus the tile's bytes from every
                                     // block of the cluster) and empty (one arrival a block of the cluster)
  uint32_t rank = 0;                 // in the cluster (kTma)
  uint8_t* weight_s;
  const uint32_t* scale_s;  // [kScaleSlots][kColumns]: steps 2m, 2m + 1 of each row in slot m % kScaleSlots
  const uint8_t* scale_source;  // this thread's scale row (a valid row when its own is past the outs)
  bool valid;  // this thread's weight row exists
  const uint8_t* code_row;
  // This thread's x chunks (kCopies at most; `copies` of them in this tile): step 0's source and their place
  // in a stage. Chunk c = tid + 256 i names row (c % 8) + 8 (c / 64) and 8-value chunk (c / 8) % 8, so each 8
  // lanes fill one chunk column of 8 rows (distinct banks) and a warp reads 64 contiguous bytes a row.
  static constexpr int kCopies = kRows * 8 / kThreads;
  int copies;
  const __nv_bfloat16* x_source[kCopies];
  uint32_t x_offset[kCopies];

  __device__ BlockTile(const GroupedMxfp4GemmArgs& args, const XMaps& x_maps, uint8_t* shared)
      : a(args), maps(x_maps), tile(args.tiles[blockIdx.y]) {
    tid = static_cast<int>(threadIdx.x);
    group = tid / 128;
    rows = tile.rows;
    steps = static_cast<int>(a.in / kDepth);
    n0 = static_cast<int64_t>(blockIdx.x) * kColumns;
    x_stage_bytes = (kSplit ? 2u : 1u) * kXTileBytes;
    weight_s = shared + kXStages * x_stage_bytes;
    scale_s = reinterpret_cast<const uint32_t*>(weight_s + kWeightStages * kWeightTileBytes);
    x_base = SharedAddress(shared);
    weight_base = SharedAddress(weight_s);
    scale_base = SharedAddress(scale_s);
    barriers.base = scale_base + kScaleSlots * kScaleSlotBytes;
    if constexpr (kTma) rank = ClusterRank();
    const int64_t n = n0 + tid;
    valid = n < a.total_out;
    const int part = n >= a.out0 ? 1 : 0;
    const int64_t local = n - (part ? a.out0 : 0);
    code_row = valid ? (part ? tile.codes[1] : tile.codes[0]) + local * (a.in / 2) : nullptr;
    scale_source = valid ? (part ? tile.scales[1] : tile.scales[0]) + local * (a.in / 32) : tile.scales[0];
    const int rows_loaded = rows > 64 ? kRows : 64;  // a warpgroup without rows copies none
    copies = rows_loaded * 8 / kThreads;
    if constexpr (!kTma) {
#pragma unroll
      for (int i = 0; i < kCopies; ++i) {
        const int c = tid + kThreads * i, row = (c & 7) + 8 * (c >> 6), chunk = (c >> 3) & 7;
        x_source[i] = a.x + (tile.row0 + (row < rows ? row : rows - 1)) * a.in + chunk * 8;
        x_offset[i] = TileOffset(row, chunk);
      }
    }
  }

  // x for step `step` into its ring stage (lo at the same offsets from x_lo), in one copy group with the
  // scales of steps step + 1 and step + 2 after an odd step (of steps 0 and 1 with step 0): a step's scales
  // land one group before its x, as its weights are dequantized one step before its MMAs.
  __device__ __forceinline__ void CopyX(int step) const {
    if (step == 0 || step % 2 == 1) {
      const int pair = (step + 1) / 2;
      if (2 * pair < steps) {
        CopyAsync4(scale_base + static_cast<uint32_t>(pair % kScaleSlots) * kScaleSlotBytes + 4 * tid,
                   scale_source + 4 * pair);
      }
    }
    const uint32_t stage = x_base + static_cast<uint32_t>(step % kXStages) * x_stage_bytes;
    if constexpr (kTma) {
      if (tid == 0 && kProbe != GemmProbe::kNoXCopy) LoadXTile(step, stage);
    } else {
      const int64_t column = static_cast<int64_t>(step) * kDepth;
#pragma unroll
      for (int i = 0; i < kCopies; ++i) {
        if (i < copies && kProbe != GemmProbe::kNoXCopy) {
          CopyAsync16(stage + x_offset[i], x_source[i] + column);
          if constexpr (kSplit) CopyAsync16(stage + kXTileBytes + x_offset[i], a.x_lo + (x_source[i] - a.x) + column);
        }
      }
    }
    CopyAsyncCommit();
  }

  // One thread: this block's share of step `step`'s x tile, into the stage of every block of the cluster.
  // Block r of a cluster of c fetches rows [64 h + r 64 / c, + 64 / c) of each 64-row half h.
  __device__ __forceinline__ void LoadXTile(int step, uint32_t stage) const {
    const int cluster = a.x_cluster, slice = 64 / cluster, halves = rows > 64 ? 2 : 1;
    barriers.WaitEmpty(step);
    const uint32_t full = barriers.Full(step);
    MbarrierExpectBytes(full, static_cast<uint32_t>(halves) * 64u * 128u * (kSplit ? 2u : 1u));
    const int column = step * kDepth;
    for (int h = 0; h < halves; ++h) {
      const int row = 64 * h + static_cast<int>(rank) * slice;
      const uint32_t dst = stage + static_cast<uint32_t>(row) * 128u;
      const int x_row = static_cast<int>(tile.row0) + row;
      if (cluster > 1) {
        const uint16_t mask = static_cast<uint16_t>((1u << cluster) - 1u);
        TmaLoadMulticast(dst, &maps.hi, column, x_row, full, mask);
        if constexpr (kSplit) TmaLoadMulticast(dst + kXTileBytes, &maps.lo, column, x_row, full, mask);
      } else {
        TmaLoad(dst, &maps.hi, column, x_row, full);
        if constexpr (kSplit) TmaLoad(dst + kXTileBytes, &maps.lo, column, x_row, full);
      }
    }
  }
  // Every thread: until step `step`'s x has landed (kTma), before the barrier that publishes the step.
  __device__ __forceinline__ void WaitX(int step) const {
    if constexpr (kTma && kProbe != GemmProbe::kNoXCopy) barriers.WaitFull(step);
  }
  // One thread, after the barrier that ends step `step` (every warpgroup's MMAs on its stage are done): the
  // stage is free in this block, for every block that will multicast into it.
  __device__ __forceinline__ void ReleaseX(int step) const {
    if constexpr (kTma) {
      if (tid == 0 && step + kXStages < steps) {
        for (int r = 0; r < a.x_cluster; ++r) MbarrierArriveRemote(barriers.Empty(step), static_cast<uint32_t>(r));
      }
    }
  }

  // Step `step`'s two scale bytes of this thread's row.
  __device__ __forceinline__ uint32_t Scales(int step) const {
    const uint32_t pair = scale_s[((step / 2) % kScaleSlots) * kColumns + tid];
    return step % 2 ? pair >> 16 : pair & 0xffffu;
  }

  template <bool kMma>
  __device__ __forceinline__ void Run() const {
    if constexpr (kTma) {
      if (tid == 0) barriers.Init(static_cast<uint32_t>(a.x_cluster));
      // Every block's barriers exist before any TMA or arrival reaches them. (A block of its own takes the
      // block barrier: the cluster barrier's release / acquire at cluster scope is MEMBAR.ALL.GPU + CCTL.IVALL.)
      if (a.x_cluster > 1) {
        ClusterSync();
      } else {
        __syncthreads();
      }
    }
    CopyX(0);
    CopyX(1);  // steps >= 2: in is a multiple of 128
    // Two register sets of codes, loaded two steps before their dequantization (one step is ~1 us, about
    // a load's latency under this traffic).
    RowCodes even, odd;
    LoadRowCodes(code_row, valid, 0, even);
    CopyAsyncWait<1>();  // step 0's x and scales
    WaitX(0);
    __syncthreads();
    if constexpr (kProbe != GemmProbe::kNoDequant) DequantRow(even, Scales(0), weight_s, tid);
    LoadRowCodes(code_row, valid, 1, odd);
    if (steps > 2) LoadRowCodes(code_row, valid, 2, even);
    FenceProxyAsync();
    __syncthreads();

    float acc[kMma ? 128 : 1];
#pragma unroll
    for (float& v : acc) v = 0.0f;
    WgmmaTouch(acc);
    const uint32_t group_rows = static_cast<uint32_t>(group) * 8 * kRowGroupBytes;  // 64 rows
    // Step k dequantizes step k + 1 from the set loaded at step k - 1 and refills it with step k + 3.
    auto step = [&](int k, RowCodes& codes) {
      if constexpr (kMma) {
        const uint32_t x_stage = x_base + static_cast<uint32_t>(k % kXStages) * x_stage_bytes + group_rows;
        const uint32_t weights = weight_base + static_cast<uint32_t>(k % kWeightStages) * kWeightTileBytes;
        // 16 values of K: 2 core matrices on (32 bytes along a swizzled row with TMA).
        constexpr uint32_t kXAdvance = kTma ? 32 : 2 * kCore;
        const uint64_t hi = kTma ? Swizzled128Descriptor(x_stage) : WgmmaDescriptor(x_stage, kCore, kRowGroupBytes);
        const uint64_t lo = kTma ? Swizzled128Descriptor(x_stage + kXTileBytes)
                                 : WgmmaDescriptor(x_stage + kXTileBytes, kCore, kRowGroupBytes);
        const uint64_t w = WgmmaDescriptor(weights, kCore, kRowGroupBytes);
        WgmmaFence();
#pragma unroll
        for (int kk = 0; kk < kDepth / 16; ++kk) {
          WgmmaM64N256K16<false>(acc, WgmmaAdvance(hi, kk * kXAdvance), WgmmaAdvance(w, kk * 2 * kCore), 1);
          if constexpr (kSplit) {
            WgmmaM64N256K16<false>(acc, WgmmaAdvance(lo, kk * kXAdvance), WgmmaAdvance(w, kk * 2 * kCore), 1);
          }
        }
        WgmmaCommit();
      }
      // While step k multiplies: step k + 2's x copy, step k + 1's weights, step k + 3's codes.
      if (k + 2 < steps) CopyX(k + 2); else CopyAsyncCommit();
      if (k + 1 < steps) {
        if constexpr (kProbe != GemmProbe::kNoDequant) {
          DequantRow(codes, Scales(k + 1),
                     weight_s + static_cast<uint32_t>((k + 1) % kWeightStages) * kWeightTileBytes, tid);
        }
        if (k + 3 < steps) LoadRowCodes(code_row, valid, k + 3, codes);
      }
      CopyAsyncWait<1>();  // step k + 1's x (scales only with TMA)
      if (k + 1 < steps) WaitX(k + 1);
      FenceProxyAsync();
      if constexpr (kMma) {
        WgmmaWait<0>();
        WgmmaTouch(acc);
      }
      __syncthreads();  // step k + 1's operands are visible; step k's stages are free
      ReleaseX(k);
    };
    for (int k = 0; k < steps; k += 2) {
      step(k, odd);
      if (k + 1 < steps) step(k + 1, even);
    }
    CopyAsyncWaitAll();
    if (kTma && a.x_cluster > 1) ClusterSync();  // no block leaves while a peer may still arrive on its barriers
    if constexpr (kMma) Store(acc);
  }

  __device__ __forceinline__ void Store(const float (&acc)[128]) const { StoreTile(a, tile, n0, group, tid, acc); }
};

template <bool kSplit, GemmProbe kProbe, bool kTma>
__global__ void __launch_bounds__(kThreads, 1)
    GroupedMxfp4GemmKernel(GroupedMxfp4GemmArgs a, const __grid_constant__ XMaps maps) {
  extern __shared__ __align__(1024) uint8_t shared_raw[];
  // The swizzled x stages need 1024-byte alignment (SharedBytes has the slack).
  uint8_t* shared = shared_raw + ((1024u - (SharedAddress(shared_raw) & 1023u)) & 1023u);
  const BlockTile<kSplit, kProbe, kTma> block(a, maps, shared);
  if (kProbe != GemmProbe::kNoMma && block.group * 64 < block.rows) {  // warpgroup-uniform
    block.template Run<true>();
  } else {
    block.template Run<false>();
  }
}

// ---- Warp-specialized (GroupedMxfp4GemmArgs::producer_warpgroup) ----
// The weight-tile kernel's tile (128 rows x 256 columns, K steps of 64, the same wgmmas in the same order: the
// same bits) with its work split over three warpgroups and no block barrier between steps:
// - warpgroup 0 dequantizes: thread t weight rows t and t + 128, from a code stage into a weight stage; its
//   thread 0 also fetches x by TMA one step (split: none) ahead of its own dequantization;
// - warpgroups 1 and 2 multiply rows [0, 64) and [64, 128) (4 wgmma m64n256k16 a step, 8 split), and while a
//   step's wgmmas run they copy the codes of step k + kCodeStages - 1 (two threads a 32-byte sector: one
//   request each) and the rows' scale pairs by cp.async into a code stage, completion counted on the stage's
//   mbarrier (cp.async.mbarrier.arrive).
// Each ring (x, weights, codes) has full and empty mbarriers a stage; the consumers copy the codes with the
// issue slots their wgmmas leave idle, off the dequantization's path (bench/results/cuda-kernels/NOTES.md has
// the versions measured).
// 384 threads: the launch bound caps every thread at 168 registers (the consumers' 128 accumulators fit). No
// setmaxnreg: lowering the dequantizing warpgroup to 56 kept ptxas from interleaving its two rows' words (H200,
// 8192 tokens, w1/w3: 5.62 ms with it, 5.54 ms without).
constexpr int kProducerThreads = 384;
constexpr uint32_t kCodeStageBytes = kColumns * kDepth / 2;  // 8 KB: 32 code bytes a row
constexpr uint32_t kScaleStageBytes = kColumns * 4;          // a row's scale pair (steps 2m, 2m + 1)

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// An arrival on `bar` once all of this thread's earlier cp.async copies have landed (counted in the barrier's
// expected arrivals).
__device__ __forceinline__ void CopyAsyncArrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
#else
__device__ __forceinline__ void CopyAsyncArrive(uint32_t) { __trap(); }
#endif

template <bool kSplit>
struct ProducerTile {
  // The rings' depths decouple the roles. Dequantizing step k needs the consumers' release of step k - 3 (so it
  // can run two steps ahead of them; with two weight stages it waited for the release of step k - 2, given only
  // once the consumers had seen step k - 1's weights, so every step paid both hand-overs: H200, 8192 tokens,
  // w1/w3 7.33 ms). Thread 0 fetches x of step k + kXStages - 3 at its step k: the stage's release then comes
  // from a consumer step no later than k - 2 as well. The consumers copy the codes of step k + kCodeStages - 1
  // at their step k, kCodeStages - 3 steps before the dequantization can need them (split x: none ahead,
  // within the shared memory).
  static constexpr int kWeightStages = 3;
  static constexpr int kCodeStages = kSplit ? 3 : 5;
  static constexpr int kXStages = kSplit ? 3 : 4;
  static constexpr int kXAhead = kXStages - 3;  // x fetched this many steps ahead of the dequantization
  static constexpr size_t SharedBytes() {
    return size_t{kXStages} * (kSplit ? 2 : 1) * kXTileBytes + size_t{kWeightStages} * kWeightTileBytes +
           size_t{kCodeStages} * (kCodeStageBytes + kScaleStageBytes) +
           2 * 8 * (kXStages + kWeightStages + kCodeStages) + 1024;
  }
  const GroupedMxfp4GemmArgs& a;
  const XMaps& maps;
  ExpertTile tile;
  int tid, steps;
  int64_t n0;
  uint32_t x_stage_bytes, x_base, weight_base, code_base, scale_base;
  uint8_t* weight_s;
  StageBarriers<kXStages> x_barriers;    // full: thread 0's arrival + the TMA bytes; empty: 8 consumer warps
  StageBarriers<kWeightStages> weight_barriers;  // full: 128 dequantizing threads; empty: 8 consumer warps
  StageBarriers<kCodeStages> code_barriers;      // full: 256 consumer threads' copies; empty: 128 dequantizing threads

  __device__ ProducerTile(const GroupedMxfp4GemmArgs& args, const XMaps& x_maps, uint8_t* shared)
      : a(args), maps(x_maps), tile(args.tiles[blockIdx.y]) {
    tid = static_cast<int>(threadIdx.x);
    steps = static_cast<int>(a.in / kDepth);
    n0 = static_cast<int64_t>(blockIdx.x) * kColumns;
    x_stage_bytes = (kSplit ? 2u : 1u) * kXTileBytes;
    x_base = SharedAddress(shared);
    weight_s = shared + kXStages * x_stage_bytes;
    weight_base = SharedAddress(weight_s);
    code_base = weight_base + kWeightStages * kWeightTileBytes;
    scale_base = code_base + kCodeStages * kCodeStageBytes;
    x_barriers.base = scale_base + kCodeStages * kScaleStageBytes;
    weight_barriers.base = x_barriers.base + 2 * 8 * kXStages;
    code_barriers.base = weight_barriers.base + 2 * 8 * kWeightStages;
  }

  __device__ __forceinline__ void InitBarriers() const {
    x_barriers.Init(8);
    weight_barriers.Init(8, 128);
    code_barriers.Init(128, 256);
  }

  // Weight row `row` of the tile: its codes and scales (row 0 of part 0 for a row past the outs, whose columns
  // are never stored).
  __device__ __forceinline__ void WeightRow(int row, const uint8_t** codes, const uint8_t** scales) const {
    const int64_t n = n0 + row;
    if (n >= a.total_out) {
      *codes = tile.codes[0];
      *scales = tile.scales[0];
      return;
    }
    const bool second = n >= a.out0;  // (selects: an index into tile's arrays would put them on the stack)
    const int64_t local = n - (second ? a.out0 : 0);
    *codes = (second ? tile.codes[1] : tile.codes[0]) + local * (a.in / 2);
    *scales = (second ? tile.scales[1] : tile.scales[0]) + local * (a.in / 32);
  }
  // Half h of row `row`'s 32 code bytes in a code stage: the halves swapped on every other 4 rows, so that 8
  // lanes reading 8 consecutive rows' half h hit distinct banks.
  __device__ __forceinline__ static uint32_t CodeOffset(int row, int half) {
    return static_cast<uint32_t>(row) * 32u + static_cast<uint32_t>(half ^ ((row >> 2) & 1)) * 16u;
  }

  // Thread 0: step `step`'s x (the tile's 64-row halves) into its stage once the consumers are
  // done with the stage's previous step.
  __device__ __forceinline__ void LoadX(int step) const {
    x_barriers.WaitEmpty(step);
    const uint32_t full = x_barriers.Full(step);
    const int halves = tile.rows > 64 ? 2 : 1;
    MbarrierExpectBytes(full, static_cast<uint32_t>(halves) * 64u * 128u * (kSplit ? 2u : 1u));
    const uint32_t stage = x_base + static_cast<uint32_t>(step % kXStages) * x_stage_bytes;
    for (int h = 0; h < halves; ++h) {
      const int x_row = static_cast<int>(tile.row0) + 64 * h;
      TmaLoad(stage + 64u * 128u * h, &maps.hi, step * kDepth, x_row, full);
      if constexpr (kSplit) TmaLoad(stage + kXTileBytes + 64u * 128u * h, &maps.lo, step * kDepth, x_row, full);
    }
  }

  // Consumer thread c (0..255): its share of step `step`'s codes and scales into the step's code stage, once
  // the dequantization is done with the stage's previous step: halves c % 2 of rows c / 2 and 128 + c / 2, and
  // row c's scale pair.
  struct CopySources {
    const uint8_t* codes[2];
    const uint8_t* scales;
    uint32_t code_offset[2];
  };
  __device__ __forceinline__ CopySources CopySourcesOf(int c) const {
    CopySources from;
    const uint8_t* unused = nullptr;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = c / 2 + 128 * i;
      WeightRow(row, &from.codes[i], &unused);
      from.codes[i] += 16 * (c % 2);
      from.code_offset[i] = CodeOffset(row, c % 2);
    }
    WeightRow(c, &unused, &from.scales);
    return from;
  }
  __device__ __forceinline__ void CopyCodes(int step, int c, const CopySources& from) const {
    code_barriers.WaitEmpty(step);
    const uint32_t stage = static_cast<uint32_t>(step % kCodeStages);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      CopyAsync16Cached(code_base + stage * kCodeStageBytes + from.code_offset[i], from.codes[i] + step * (kDepth / 2));
    }
    CopyAsync4(scale_base + stage * kScaleStageBytes + 4u * static_cast<uint32_t>(c), from.scales + 4 * (step / 2));
    CopyAsyncArrive(code_barriers.Full(step));
  }

  // Warpgroup 0: thread t dequantizes weight rows t and t + 128 of every step; thread 0 fetches x.
  __device__ __forceinline__ void Dequantize() const {
    const int t = tid;
    if (t == 0) {
      for (int s = 0; s < kXAhead && s < steps; ++s) LoadX(s);
    }
    const uint8_t* code_s = weight_s + kWeightStages * kWeightTileBytes;
    const uint32_t* scale_s = reinterpret_cast<const uint32_t*>(code_s + kCodeStages * kCodeStageBytes);
    for (int k = 0; k < steps; ++k) {
      if (t == 0 && k + kXAhead < steps) LoadX(k + kXAhead);
      code_barriers.WaitFull(k);
      const uint32_t code_stage = static_cast<uint32_t>(k % kCodeStages);
      const uint8_t* codes = code_s + code_stage * kCodeStageBytes;
      RowCodes r[2];
      uint32_t pair[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int row = t + 128 * i;
        r[i].low = *reinterpret_cast<const uint4*>(codes + CodeOffset(row, 0));
        r[i].high = *reinterpret_cast<const uint4*>(codes + CodeOffset(row, 1));
        pair[i] = scale_s[code_stage * kColumns + row];
      }
      MbarrierArrive(code_barriers.Empty(k));  // (release: after the reads above)
      weight_barriers.WaitEmpty(k);
      uint8_t* weights = weight_s + static_cast<uint32_t>(k % kWeightStages) * kWeightTileBytes;
#pragma unroll
      for (int i = 0; i < 2; ++i) DequantRow(r[i], k % 2 ? pair[i] >> 16 : pair[i] & 0xffffu, weights, t + 128 * i);
      FenceProxyAsync();
      MbarrierArrive(weight_barriers.Full(k));
    }
  }

  // Consumer warpgroup `group` (rows [64 group, + 64)); without rows it only keeps the barriers' count.
  template <bool kMma>
  __device__ __forceinline__ void Consume(int group) const {
    float acc[kMma ? 128 : 1];
#pragma unroll
    for (float& v : acc) v = 0.0f;
    WgmmaTouch(acc);
    const uint32_t group_rows = static_cast<uint32_t>(group) * 8 * kRowGroupBytes;  // 64 swizzled rows
    const bool arrives = tid % 32 == 0;
    const int c = tid - 128;
    const CopySources from = CopySourcesOf(c);
    for (int s = 0; s < kCodeStages - 1 && s < steps; ++s) CopyCodes(s, c, from);
    for (int k = 0; k < steps; ++k) {
      x_barriers.WaitFull(k);
      weight_barriers.WaitFull(k);
      if constexpr (kMma) {
        const uint32_t x_stage = x_base + static_cast<uint32_t>(k % kXStages) * x_stage_bytes + group_rows;
        const uint32_t weights = weight_base + static_cast<uint32_t>(k % kWeightStages) * kWeightTileBytes;
        const uint64_t hi = Swizzled128Descriptor(x_stage), lo = Swizzled128Descriptor(x_stage + kXTileBytes);
        const uint64_t w = WgmmaDescriptor(weights, kCore, kRowGroupBytes);
        WgmmaFence();
#pragma unroll
        for (int kk = 0; kk < kDepth / 16; ++kk) {
          WgmmaM64N256K16<false>(acc, WgmmaAdvance(hi, kk * 32), WgmmaAdvance(w, kk * 2 * kCore), 1);
          if constexpr (kSplit) WgmmaM64N256K16<false>(acc, WgmmaAdvance(lo, kk * 32), WgmmaAdvance(w, kk * 2 * kCore), 1);
        }
        WgmmaCommit();
      }
      if (k + kCodeStages - 1 < steps) CopyCodes(k + kCodeStages - 1, c, from);
      if constexpr (kMma) {
        WgmmaWait<1>();  // step k - 1's wgmmas are done with its stages
        WgmmaTouch(acc);
      }
      if (k > 0 && arrives) {
        MbarrierArrive(x_barriers.Empty(k - 1));
        MbarrierArrive(weight_barriers.Empty(k - 1));
      }
    }
    if constexpr (kMma) {
      WgmmaWait<0>();
      WgmmaTouch(acc);
      StoreTile(a, tile, n0, group, tid, acc);
    }
  }
};

template <bool kSplit>
__global__ void __launch_bounds__(kProducerThreads, 1)
    GroupedMxfp4GemmProducerKernel(GroupedMxfp4GemmArgs a, const __grid_constant__ XMaps maps) {
  extern __shared__ __align__(1024) uint8_t shared_raw[];
  uint8_t* shared = shared_raw + ((1024u - (SharedAddress(shared_raw) & 1023u)) & 1023u);
  const ProducerTile<kSplit> block(a, maps, shared);
  if (block.tid == 0) block.InitBarriers();
  __syncthreads();  // the barriers exist before any wait, arrival or copy
  const int role = block.tid / 128;  // warpgroup-uniform
  if (role == 0) {
    block.Dequantize();
  } else if (64 * (role - 1) < block.tile.rows) {
    block.template Consume<true>(role - 1);
  } else {
    block.template Consume<false>(role - 1);
  }
}

// ---- Wide tiles (GroupedMxfp4GemmArgs::wide_tiles) ----
// The roles of the operands swapped: a block computes up to 256 rows of one expert x 128 output columns, the
// weights the wgmma A operand (warpgroup w: weight rows [64 w, + 64) of the tile) and x the B operand (N = the
// tile's rows rounded up to 64, or to 32 past 128: wgmma m64nNk16, N 64..256; x by TMA in 64-row boxes). An
// expert of up to 256 rows is one tile, so each weight is dequantized once per expert and 128 columns, where the
// weight-tile kernel dequantizes it once per 128 rows and 256 columns (twice for the ~192-row experts of an
// 8192-token prefill). Each thread dequantizes half a weight row a step (row 8 (t / 16) + t % 8, values
// [32 h, + 32) of the step with h = (t / 8) % 2: 16 code bytes and one scale byte, loaded four steps ahead, two
// when split), so a warpgroup writes exactly the weight rows its own wgmmas read: the weight stages pass between
// the threads of one warpgroup.
// - One bf16 pass (RunPipelined): no block barrier. A warpgroup issues step k's wgmmas, waits for step k - 1's
//   (so two steps are in flight at a time on the same accumulators), dequantizes step k + 2 into the weight
//   stage step k - 1 used, and publishes it with a warpgroup barrier; x comes by TMA two steps ahead into a
//   4-stage ring with full and empty mbarriers (an empty stage: all 8 warps past its wgmmas).
// - Split x (RunSynchronous, two x tiles a stage: the shared memory holds 3 x stages and 2 weight stages): the
//   weight-tile kernel's pipeline, step k + 1 dequantized while step k's wgmmas run and one block barrier a step
//   (which also frees the x stage the next TMA overwrites).
constexpr int kWideRows = kExpertWideTileRows;  // 256
constexpr int kWideColumns = kExpertWideTileColumns;  // 128
constexpr uint32_t kWideXTileBytes = kWideRows * kDepth * 2;           // 32 KB
constexpr uint32_t kWideWeightTileBytes = kWideColumns * kDepth * 2;   // 16 KB
static_assert(kThreads == 2 * kWideColumns, "half a weight row a thread");
constexpr int WideXStages(bool split) { return split ? 3 : 4; }
constexpr int WideWeightStages(bool split) { return split ? 2 : 3; }
size_t WideSharedBytes(bool split) {
  return size_t(WideXStages(split)) * (split ? 2 : 1) * kWideXTileBytes +
         size_t(WideWeightStages(split)) * kWideWeightTileBytes + 2 * 8 * size_t(WideXStages(split)) +
         1024;  // + alignment slack
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// The 128 threads of warpgroup `group` (named barrier 1 + group; 0 is __syncthreads').
__device__ __forceinline__ void WarpgroupBarrier(int group) {
  asm volatile("bar.sync %0, 128;\n" ::"r"(1 + group) : "memory");
}
#else
__device__ __forceinline__ void WarpgroupBarrier(int) { __trap(); }
#endif

// Half a weight row's codes and scale for one K step.
struct HalfRowCodes {
  uint4 codes;
  uint32_t scale;
};

template <bool kSplit>
struct WideTile {
  static constexpr int kXStages = WideXStages(kSplit);
  static constexpr int kWeightStages = WideWeightStages(kSplit);
  const GroupedMxfp4GemmArgs& a;
  const XMaps& maps;
  ExpertTile tile;
  int tid, group, steps, boxes;  // boxes: the 64-row TMA boxes of x a step (the tile's rows rounded up)
  int row, half;                 // this thread's weight row in the tile and half of each step's 64 values
  int64_t n0;
  uint32_t x_stage_bytes, x_base, weight_base;
  // full: thread 0's arrival plus the TMA bytes; empty (RunPipelined): one arrival a warp
  StageBarriers<kXStages> barriers;
  uint8_t* weight_s;
  bool valid;  // this thread's weight row exists
  const uint8_t* code_row;   // its 16 code bytes of step 0
  const uint8_t* scale_row;  // its scale byte of step 0

  __device__ WideTile(const GroupedMxfp4GemmArgs& args, const XMaps& x_maps, uint8_t* shared)
      : a(args), maps(x_maps), tile(args.tiles[blockIdx.y]) {
    tid = static_cast<int>(threadIdx.x);
    group = tid / 128;
    // Threads 8 h .. 8 h + 7 of each 16 share a half and cover 8 consecutive rows: a quarter warp's 16-byte
    // stores fill one 128-byte core-matrix row (with row tid / 2 and half tid % 2 a quarter warp's two halves of
    // a row fell on the same banks; H200, 8192 tokens: w1/w3 3.51-3.52 vs 3.55-3.56 ms, split 5.59-5.60 vs
    // 5.66-5.69 ms). A warp still holds 16 whole rows and reads whole 32-byte sectors of codes.
    row = (tid / 16) * 8 + tid % 8;
    half = (tid / 8) % 2;
    steps = static_cast<int>(a.in / kDepth);
    boxes = (tile.rows + 63) / 64;
    n0 = static_cast<int64_t>(blockIdx.x) * kWideColumns;
    x_stage_bytes = (kSplit ? 2u : 1u) * kWideXTileBytes;
    x_base = SharedAddress(shared);
    weight_s = shared + kXStages * x_stage_bytes;
    weight_base = SharedAddress(weight_s);
    barriers.base = weight_base + kWeightStages * kWideWeightTileBytes;
    const int64_t n = n0 + row;
    valid = n < a.total_out;
    const bool second = n >= a.out0;  // (selects: an index into tile's arrays would put them on the stack)
    const int64_t local = n - (second ? a.out0 : 0);
    code_row = valid ? (second ? tile.codes[1] : tile.codes[0]) + local * (a.in / 2) + 16 * half : nullptr;
    scale_row = valid ? (second ? tile.scales[1] : tile.scales[0]) + local * (a.in / 32) + half : nullptr;
  }

  __device__ __forceinline__ void LoadCodes(int step, HalfRowCodes& c) const {
    if (!valid) {
      c = {make_uint4(0, 0, 0, 0), 127u};
      return;
    }
    asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(c.codes.x), "=r"(c.codes.y), "=r"(c.codes.z), "=r"(c.codes.w)
                 : "l"(code_row + step * (kDepth / 2)));
    asm volatile("ld.global.nc.u8 %0, [%1];\n" : "=r"(c.scale) : "l"(scale_row + 2 * step));
  }

  // This thread's 32 values of a step into weight stage `stage` (8-value chunks 4 half .. + 3 of its row).
  __device__ __forceinline__ void Dequant(const HalfRowCodes& c, int stage) const {
    uint8_t* tile_s = weight_s + static_cast<uint32_t>(stage) * kWideWeightTileBytes;
    const uint32_t words[4] = {c.codes.x, c.codes.y, c.codes.z, c.codes.w};
    if (c.scale <= 128) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        *reinterpret_cast<uint4*>(tile_s + TileOffset(row, 4 * half + i)) = DequantMxfp4Word<true>(words[i], c.scale);
      }
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        *reinterpret_cast<uint4*>(tile_s + TileOffset(row, 4 * half + i)) = DequantMxfp4Word<false>(words[i], c.scale);
      }
    }
  }

  // Thread 0: step `step`'s x (the tile's boxes; rows past the tile's count are other experts' rows or zeros
  // past x's end, never stored) once its stage is free: `wait_empty` for RunPipelined's ring (RunSynchronous's
  // block barrier that ended step step - kXStages freed it).
  __device__ __forceinline__ void LoadX(int step, bool wait_empty) const {
    if (tid != 0) return;
    if (wait_empty) barriers.WaitEmpty(step);
    const uint32_t full = barriers.Full(step);
    MbarrierExpectBytes(full, static_cast<uint32_t>(boxes) * 64u * 128u * (kSplit ? 2u : 1u));
    const uint32_t stage = x_base + static_cast<uint32_t>(step % kXStages) * x_stage_bytes;
    for (int b = 0; b < boxes; ++b) {
      const int x_row = static_cast<int>(tile.row0) + 64 * b;
      TmaLoad(stage + 64u * 128u * b, &maps.hi, step * kDepth, x_row, full);
      if constexpr (kSplit) TmaLoad(stage + kWideXTileBytes + 64u * 128u * b, &maps.lo, step * kDepth, x_row, full);
    }
  }

  // Step k's wgmmas of this warpgroup (x hi, and lo when split), one commit group.
  template <int kN>
  __device__ __forceinline__ void Multiply(int k, float (&acc)[kN / 2]) const {
    const uint32_t x_stage = x_base + static_cast<uint32_t>(k % kXStages) * x_stage_bytes;
    const uint32_t weights = weight_base + static_cast<uint32_t>(k % kWeightStages) * kWideWeightTileBytes +
                             static_cast<uint32_t>(group) * 8 * kRowGroupBytes;  // the warpgroup's 64 rows
    const uint64_t w = WgmmaDescriptor(weights, kCore, kRowGroupBytes);
    const uint64_t hi = Swizzled128Descriptor(x_stage), lo = Swizzled128Descriptor(x_stage + kWideXTileBytes);
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < kDepth / 16; ++kk) {
      // 16 values of K: 2 core matrices on in the weight tile, 32 bytes along a swizzled x row.
      WgmmaM64NK16<kN>(acc, WgmmaAdvance(w, kk * 2 * kCore), WgmmaAdvance(hi, kk * 32));
      if constexpr (kSplit) WgmmaM64NK16<kN>(acc, WgmmaAdvance(w, kk * 2 * kCore), WgmmaAdvance(lo, kk * 32));
    }
    WgmmaCommit();
  }

  template <int kN>
  __device__ __forceinline__ void Run() const {
    if (tid == 0) barriers.Init(8);
    __syncthreads();
    float acc[kN / 2];
#pragma unroll
    for (float& v : acc) v = 0.0f;
    WgmmaTouch(acc);
    if constexpr (kSplit) {
      RunSynchronous<kN>(acc);
    } else {
      RunPipelined<kN>(acc);
    }
    WgmmaWait<0>();
    WgmmaTouch(acc);
    Store<kN>(acc);
  }

  template <int kN>
  __device__ __forceinline__ void RunPipelined(float (&acc)[kN / 2]) const {
    LoadX(0, false);
    LoadX(1, false);  // steps >= 2: in is a multiple of 128
    // Four code sets: step s's in set s % 4, loaded four steps before its dequantization (the codes come from
    // DRAM: each expert's weights are read once per column tile).
    HalfRowCodes set[4];
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      if (s < steps) LoadCodes(s, set[s]);
    }
    Dequant(set[0], 0);
    Dequant(set[1], 1);
    if (steps > 4) LoadCodes(4, set[0]);
    if (steps > 5) LoadCodes(5, set[1]);
    FenceProxyAsync();
    WarpgroupBarrier(group);
    // Step k dequantizes step k + 2 from its set and refills it with step k + 6. No accumulator is touched
    // between the wgmmas (that would make ptxas wait for each one).
    auto step = [&](int k, HalfRowCodes& codes) {
      barriers.WaitFull(k);
      Multiply<kN>(k, acc);
      WgmmaWait<1>();  // this warpgroup's step k - 1 is done with its x and weight stages
      if (k > 0 && tid % 32 == 0) MbarrierArrive(barriers.Empty(k - 1));
      if (k + 2 < steps) {
        LoadX(k + 2, true);  // into the stage of step k - 2
        Dequant(codes, (k + 2) % kWeightStages);
        if (k + 6 < steps) LoadCodes(k + 6, codes);
        FenceProxyAsync();
      }
      WarpgroupBarrier(group);  // step k + 2's weights are visible to the warpgroup's wgmmas
    };
    for (int k = 0; k < steps; k += 4) {  // steps is even
      step(k, set[2]);
      step(k + 1, set[3]);
      if (k + 2 < steps) {
        step(k + 2, set[0]);
        step(k + 3, set[1]);
      }
    }
  }

  template <int kN>
  __device__ __forceinline__ void RunSynchronous(float (&acc)[kN / 2]) const {
    LoadX(0, false);
    LoadX(1, false);
    HalfRowCodes even, odd;
    LoadCodes(0, even);
    if (steps > 1) LoadCodes(1, odd);
    Dequant(even, 0);
    if (steps > 2) LoadCodes(2, even);
    FenceProxyAsync();
    barriers.WaitFull(0);
    __syncthreads();
    // Step k dequantizes step k + 1 from the set loaded at step k - 1 and refills it with step k + 3.
    auto step = [&](int k, HalfRowCodes& codes) {
      Multiply<kN>(k, acc);
      if (k + 2 < steps) LoadX(k + 2, false);
      if (k + 1 < steps) {
        Dequant(codes, (k + 1) % kWeightStages);
        if (k + 3 < steps) LoadCodes(k + 3, codes);
        FenceProxyAsync();
        barriers.WaitFull(k + 1);
      }
      WgmmaWait<0>();
      WgmmaTouch(acc);
      __syncthreads();  // step k + 1's weights are visible; step k's x and weight stages are free
    };
    for (int k = 0; k < steps; k += 2) {
      step(k, odd);
      if (k + 1 < steps) step(k + 1, even);
    }
  }

  // acc[4 j + e]: weight row m = 64 group + 16 warp + lane / 4 (+ 8 for e >= 2) of the tile, x row
  // n = 8 j + 2 (lane % 4) (+ 1 for odd e). Each store instruction of a warp writes 4 rows' 8 consecutive
  // columns: whole 32-byte sectors.
  template <int kN>
  __device__ __forceinline__ void Store(const float (&acc)[kN / 2]) const {
    const int lane = tid % 32, warp = (tid % 128) / 32;
    const int64_t m0 = n0 + 64 * group + 16 * warp + lane / 4, m1 = m0 + 8;
    const bool store0 = m0 < a.total_out, store1 = m1 < a.total_out;
#pragma unroll
    for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int n = 8 * j + 2 * (lane % 4) + e;
        if (n >= tile.rows) continue;
        float* y_row = a.y + (tile.row0 + n) * a.total_out;
        if (store0) y_row[m0] = acc[4 * j + e];
        if (store1) y_row[m1] = acc[4 * j + 2 + e];
      }
    }
  }
};

template <bool kSplit>
__global__ void __launch_bounds__(kThreads, 1)
    GroupedMxfp4GemmWideKernel(GroupedMxfp4GemmArgs a, const __grid_constant__ XMaps maps) {
  extern __shared__ __align__(1024) uint8_t shared_raw[];
  uint8_t* shared = shared_raw + ((1024u - (SharedAddress(shared_raw) & 1023u)) & 1023u);
  const WideTile<kSplit> block(a, maps, shared);
  // N: the tile's rows rounded up to 64 below 128 and to 32 above (fewer wasted MMA columns for the ~192-row
  // experts of a prefill; the TMA still fetches whole 64-row boxes). Block-uniform.
  const int rows = block.tile.rows;
  if (rows <= 64) {
    block.template Run<64>();
  } else if (rows <= 128) {
    block.template Run<128>();
  } else if (rows <= 160) {
    block.template Run<160>();
  } else if (rows <= 192) {
    block.template Run<192>();
  } else if (rows <= 224) {
    block.template Run<224>();
  } else {
    block.template Run<256>();
  }
}

// ---- Weights as the A operand from registers (GroupedMxfp4GemmArgs::register_weights) ----
// The same 256-column x 128-row tile with the roles swapped: D = W . x^T, the weight rows (y's columns) as M,
// x's rows as N. Warpgroup w owns weight rows [128 w, 128 w + 128) of the tile as two 64-row slabs; each thread
// dequantizes its 4 rows (slab s, rows 16 warp + lane / 4 and + 8) straight into the A fragments (no weight
// tile in shared memory, no block barrier a step), and x comes by TMA (kRegStages stages, 128-byte swizzled)
// as B, N = 128 (or 64 for tiles of <= 64 rows). Per K step of 64, a thread reads 8 code bytes of each of its
// rows: lane % 4 = q reads values [16 q, 16 q + 16) of the step, one 32-group's scale byte. Its A pairs of
// step slice kk are that word's ShiftMxfp4Word pairs 2 (kk % 2) and + 1 of word kk / 2, so x must come in the
// order ToBf16Permuted's register order gives: logical k = 16 kk + 8 hh + 2 q + e holds value 16 q + (j % 4)
// + 8 (j / 4) + 4 e of the step, j = 2 kk + hh.
// Pipeline: the wgmmas of a K slice pair (kk 0-1, 2-3) are one group; one group stays in flight while the next
// pair is dequantized (wait_group 1 before a pair's A registers are rewritten: the group that read them is done).
constexpr int kRegStages = 4;  // x stages: step k + 3 is fetched while step k is multiplied
size_t RegisterSharedBytes(bool split) {
  return size_t{kRegStages} * (split ? 2 : 1) * kXTileBytes + 2 * kRegStages * 8 + 1024;  // + barriers, alignment
}

template <bool kSplit, int kN>
struct RegisterTile {
  static constexpr int kAcc = kN / 2;  // f32 accumulators a thread, per slab
  const GroupedMxfp4GemmArgs& a;
  const XMaps& maps;
  ExpertTile tile;
  int tid, group, steps, q;
  int64_t n0;
  uint32_t x_base, x_stage_bytes;
  StageBarriers<kRegStages> barriers;  // empty: one arrival a warpgroup
  const uint8_t* code_row[4];   // [2 slab + half]: this thread's 4 weight rows (a valid row's when past the outs)
  const uint8_t* scale_row[4];
  uint32_t valid_mask = 0;      // bit r: row r exists

  __device__ RegisterTile(const GroupedMxfp4GemmArgs& args, const XMaps& x_maps, uint8_t* shared)
      : a(args), maps(x_maps), tile(args.tiles[blockIdx.y]) {
    tid = static_cast<int>(threadIdx.x);
    group = tid / 128;
    const int warp = (tid % 128) / 32, lane = tid % 32;
    q = lane % 4;
    steps = static_cast<int>(a.in / kDepth);
    n0 = static_cast<int64_t>(blockIdx.x) * kColumns;
    x_stage_bytes = (kSplit ? 2u : 1u) * kXTileBytes;
    x_base = SharedAddress(shared);
    barriers.base = x_base + kRegStages * x_stage_bytes;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int64_t n = n0 + 128 * group + 64 * (r / 2) + 16 * warp + lane / 4 + 8 * (r % 2);
      const bool valid = n < a.total_out;
      const bool second = valid && n >= a.out0;  // (selects: an index into tile's arrays puts them on the stack)
      const int64_t local = valid ? n - (second ? a.out0 : 0) : 0;
      code_row[r] = (second ? tile.codes[1] : tile.codes[0]) + local * (a.in / 2) + 8 * q;
      scale_row[r] = (second ? tile.scales[1] : tile.scales[0]) + local * (a.in / 32) + q / 2;
      valid_mask |= valid ? 1u << r : 0u;
    }
  }

  // One thread: step `step`'s x tile (kN rows) into its stage, once both warpgroups are done with the stage's
  // previous step.
  __device__ __forceinline__ void LoadX(int step) const {
    barriers.WaitEmpty(step);
    constexpr int kHalves = kN / 64;
    const uint32_t full = barriers.Full(step);
    MbarrierExpectBytes(full, kHalves * 64u * 128u * (kSplit ? 2u : 1u));
    const uint32_t stage = x_base + static_cast<uint32_t>(step % kRegStages) * x_stage_bytes;
#pragma unroll
    for (int h = 0; h < kHalves; ++h) {
      const int row = static_cast<int>(tile.row0) + 64 * h;
      TmaLoad(stage + 64u * 128u * h, &maps.hi, step * kDepth, row, full);
      if constexpr (kSplit) TmaLoad(stage + kXTileBytes + 64u * 128u * h, &maps.lo, step * kDepth, row, full);
    }
  }

  struct Codes {
    uint2 w[4];
    uint32_t s[4];
  };
  __device__ __forceinline__ void LoadCodes(int step, Codes& c) const {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      if (valid_mask & (1u << r)) {
        asm volatile("ld.global.nc.v2.u32 {%0, %1}, [%2];\n" : "=r"(c.w[r].x), "=r"(c.w[r].y) : "l"(code_row[r] + 32 * step));
        c.s[r] = __ldg(scale_row[r] + 2 * step);
      } else {
        c.w[r] = make_uint2(0, 0);
        c.s[r] = 127;
      }
    }
  }

  // The A pairs of slices 2 p and 2 p + 1 (word p of each row): pairs[r] = ShiftMxfp4Word pairs of row r, scaled.
  __device__ __forceinline__ static void Dequant(const Codes& c, int p, uint4 (&pairs)[4]) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const uint32_t word = p == 0 ? c.w[r].x : c.w[r].y;
      pairs[r] = c.s[r] <= 128 ? DequantMxfp4Word<true>(word, c.s[r]) : DequantMxfp4Word<false>(word, c.s[r]);
    }
  }

  // Slice kk (of a pair whose A pairs are `pairs`) for both slabs: 2 wgmmas (4 split).
  __device__ __forceinline__ void Multiply(float (&acc)[2][kAcc], const uint4 (&pairs)[4], int kk, uint32_t stage) const {
    const uint32_t second = kk % 2;
#pragma unroll
    for (int slab = 0; slab < 2; ++slab) {
      const uint4& top = pairs[2 * slab];
      const uint4& bottom = pairs[2 * slab + 1];
      const uint32_t fragment[4] = {second ? top.z : top.x, second ? bottom.z : bottom.x, second ? top.w : top.y,
                                    second ? bottom.w : bottom.y};
      const auto mma = [&](uint32_t x_stage) {
        const uint64_t b = Swizzled128Descriptor(x_stage + 32u * kk);
        if constexpr (kN == 128) {
          WgmmaM64N128K16Rs(acc[slab], fragment, b, 1);
        } else {
          WgmmaM64N64K16Rs(acc[slab], fragment, b, 1);
        }
      };
      mma(stage);
      if constexpr (kSplit) mma(stage + kXTileBytes);
    }
  }

  __device__ __forceinline__ void Run() const {
    if (tid == 0) barriers.Init(2);  // one arrival a warpgroup
    __syncthreads();
    if (tid == 0) {
      for (int s = 0; s < kRegStages - 1 && s < steps; ++s) LoadX(s);
    }
    Codes even, odd;
    LoadCodes(0, even);
    LoadCodes(1, odd);
    float acc[2][kAcc];
#pragma unroll
    for (auto& slab : acc) {
#pragma unroll
      for (float& v : slab) v = 0.0f;
    }
    uint4 pairs[2][4];  // [slice pair]
    // Step k: slices 0-1 from word 0, 2-3 from word 1 of `codes` (then refilled with step k + 2); the x stage
    // of step k - 1 is released once its last group is done (after the wait at slice 2).
    auto step = [&](int k, Codes& codes) {
      const uint32_t stage = x_base + static_cast<uint32_t>(k % kRegStages) * x_stage_bytes;
      barriers.WaitFull(k);
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        WgmmaWait<1>();  // this pair's registers: the group that read them (step k - 1) is done
        WgmmaTouch(acc[0]);
        WgmmaTouch(acc[1]);
        Dequant(codes, p, pairs[p]);
        if (p == 1 && k > 0) {
          // Every group of step k - 1 is done: its x stage is free (one arrival a warpgroup), and the thread
          // that fetches refills it with step k + 3.
          if (tid % 128 == 0) MbarrierArriveRemote(barriers.Empty(k - 1), 0);
        }
        WgmmaFence();
        Multiply(acc, pairs[p], 2 * p, stage);
        Multiply(acc, pairs[p], 2 * p + 1, stage);
        WgmmaCommit();
      }
      if (tid == 0 && k + kRegStages - 1 < steps) LoadX(k + kRegStages - 1);
      if (k + 2 < steps) LoadCodes(k + 2, codes);
    };
    for (int k = 0; k < steps; k += 2) {
      step(k, even);
      if (k + 1 < steps) step(k + 1, odd);
    }
    WgmmaWait<0>();
    WgmmaTouch(acc[0]);
    WgmmaTouch(acc[1]);
    Store(acc);
  }

  // acc[slab][4 j + 2 h + e]: weight row 16 warp + lane / 4 + 8 h of the slab, x row 8 j + 2 (lane % 4) + e.
  __device__ __forceinline__ void Store(const float (&acc)[2][kAcc]) const {
    const int warp = (tid % 128) / 32, lane = tid % 32;
#pragma unroll
    for (int slab = 0; slab < 2; ++slab) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t column = n0 + 128 * group + 64 * slab + 16 * warp + lane / 4 + 8 * h;
        if (column >= a.total_out) continue;
#pragma unroll
        for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int row = 8 * j + 2 * q + e;
            if (row < tile.rows) a.y[(tile.row0 + row) * a.total_out + column] = acc[slab][4 * j + 2 * h + e];
          }
        }
      }
    }
  }
};

template <bool kSplit>
__global__ void __launch_bounds__(kThreads, 1)
    GroupedMxfp4GemmRegisterKernel(GroupedMxfp4GemmArgs a, const __grid_constant__ XMaps maps) {
  extern __shared__ __align__(1024) uint8_t shared_raw[];
  uint8_t* shared = shared_raw + ((1024u - (SharedAddress(shared_raw) & 1023u)) & 1023u);
  if (a.tiles[blockIdx.y].rows > 64) {  // block-uniform
    const RegisterTile<kSplit, 128> block(a, maps, shared);
    block.Run();
  } else {
    const RegisterTile<kSplit, 64> block(a, maps, shared);
    block.Run();
  }
}

// Each 8 values of x as bf16 pairs (v0, v4), (v1, v5), (v2, v6), (v3, v7), the order ShiftMxfp4Word gives the
// weights; lo = bf16(x - hi) in the same order (exact difference, as FloatToBf16Split). kSource: 0 x's own
// rows, 1 gathered rows, 2 the SwiGLU of stacked gate | up rows (PermutedSource).
template <int kSource>
__device__ __forceinline__ float SourceValue(const PermutedSource& x, int64_t r, int64_t in, int64_t c) {
  if constexpr (kSource == 2) return SwiGluOne(x.source[r * 2 * in + c], x.source[r * 2 * in + in + c], x.swiglu_limit);
  const int64_t row = kSource == 1 ? static_cast<int64_t>(x.gather[r]) : r;
  return x.source[row * in + c];
}

// kRegister: RegisterTile's order instead. Output chunk c of each 64 values (logical k 8 c .. 8 c + 7) holds
// values b + {0, 4, 16, 20, 32, 36, 48, 52} of the 64, b = c % 4 + 8 (c / 4), as consecutive bf16.
template <int kSource, bool kRegister>
__global__ void ToBf16PermutedKernel(PermutedSource x, int64_t rows, int64_t in, __nv_bfloat16* hi, __nv_bfloat16* lo) {
  const int64_t per_row = in / 8, chunks = rows * per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < chunks; i += stride) {
    const int64_t r = i / per_row, c = (i % per_row) * 8;
    float v[8];
    if constexpr (kRegister) {
      const int64_t block = c & ~int64_t{63}, chunk = (c & 63) / 8;
      const int64_t base = block + (chunk & 3) + 8 * (chunk >> 2);
      constexpr int kOffsets[8] = {0, 4, 16, 20, 32, 36, 48, 52};
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = SourceValue<kSource>(x, r, in, base + kOffsets[j]);
    } else if constexpr (kSource == 2) {
      const float* gate = x.source + r * 2 * in + c;
      const float4 g0 = reinterpret_cast<const float4*>(gate)[0], g1 = reinterpret_cast<const float4*>(gate)[1];
      const float4 u0 = reinterpret_cast<const float4*>(gate + in)[0], u1 = reinterpret_cast<const float4*>(gate + in)[1];
      const float g[8] = {g0.x, g0.y, g0.z, g0.w, g1.x, g1.y, g1.z, g1.w};
      const float u[8] = {u0.x, u0.y, u0.z, u0.w, u1.x, u1.y, u1.z, u1.w};
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = SwiGluOne(g[j], u[j], x.swiglu_limit);
    } else {
      const int64_t row = kSource == 1 ? static_cast<int64_t>(x.gather[r]) : r;
      const float* src = x.source + row * in + c;
      const float4 a = reinterpret_cast<const float4*>(src)[0], b = reinterpret_cast<const float4*>(src)[1];
      v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    }
    uint32_t h[4], l[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      // (v_j, v_j+4) for the weight tile's order, consecutive values for the register order.
      const float first = kRegister ? v[2 * j] : v[j], second = kRegister ? v[2 * j + 1] : v[j + 4];
      const __nv_bfloat162 pair = __floats2bfloat162_rn(first, second);
      h[j] = *reinterpret_cast<const uint32_t*>(&pair);
      const __nv_bfloat162 rest = __floats2bfloat162_rn(first - __low2float(pair), second - __high2float(pair));
      l[j] = *reinterpret_cast<const uint32_t*>(&rest);
    }
    reinterpret_cast<uint4*>(hi)[i] = make_uint4(h[0], h[1], h[2], h[3]);
    if (lo) reinterpret_cast<uint4*>(lo)[i] = make_uint4(l[0], l[1], l[2], l[3]);
  }
}

template <bool kRegister>
auto PermutedKernelFor(const PermutedSource& x) {
  return x.swiglu ? ToBf16PermutedKernel<2, kRegister>
                  : x.gather ? ToBf16PermutedKernel<1, kRegister> : ToBf16PermutedKernel<0, kRegister>;
}

}  // namespace

absl::Status ToBf16Permuted(const PermutedSource& x, int64_t rows, int64_t in, __nv_bfloat16* hi, __nv_bfloat16* lo,
                            cudaStream_t stream) {
  if (rows == 0) return absl::OkStatus();
  const auto misaligned = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) != 0; };
  if (rows < 0 || in <= 0 || in % (x.register_order ? 64 : 8) != 0 || !x.source || !hi || misaligned(x.source) || misaligned(hi) ||
      (lo && misaligned(lo)) || (x.gather && x.swiglu)) {
    return absl::InvalidArgumentError(absl::StrCat("ToBf16Permuted: rows ", rows, ", in ", in, " (a multiple of ",
                                                   x.register_order ? 64 : 8,
                                                   "), pointers 16-byte aligned, gather or SwiGLU"));
  }
  const int64_t chunks = rows * (in / 8);
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>((chunks + 255) / 256, 132 * 16));
  const auto kernel = x.register_order ? PermutedKernelFor<true>(x) : PermutedKernelFor<false>(x);
  kernel<<<grid, 256, 0, stream>>>(x, rows, in, hi, lo);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("ToBf16PermutedKernel");
  return absl::OkStatus();
}

bool GroupedMxfp4GemmWgmmaAvailable(bool producer_warpgroup, bool wide_tiles) {
#if defined(TANDEM_CUDA_SM90A)
  const absl::StatusOr<DeviceLimits> limits = CurrentDeviceLimits();
  if (!limits.ok()) {
    (void)cudaGetLastError();  // a failed query must not read as a later launch's failure
    return false;
  }
  // The largest shared memory of the kernel's forms that would serve (split x: the most).
  const size_t shared = producer_warpgroup ? ProducerTile<true>::SharedBytes()
                        : wide_tiles       ? WideSharedBytes(true)
                                           : SharedBytes(true);
  return limits->compute_capability == 90 && shared <= limits->shared_optin;
#else
  return false;
#endif
}

namespace {

using Kernel = void (*)(GroupedMxfp4GemmArgs, const XMaps);

template <bool kTma>
absl::StatusOr<Kernel> PickKernel(bool split, GemmProbe probe) {
  if (split) {
    if (probe != GemmProbe::kNone) return absl::InvalidArgumentError("GroupedMxfp4GemmWgmma: timing probes run without split x");
    return GroupedMxfp4GemmKernel<true, GemmProbe::kNone, kTma>;
  }
  switch (probe) {
    case GemmProbe::kNone:
      return GroupedMxfp4GemmKernel<false, GemmProbe::kNone, kTma>;
    case GemmProbe::kNoDequant:
      return GroupedMxfp4GemmKernel<false, GemmProbe::kNoDequant, kTma>;
    case GemmProbe::kNoMma:
      return GroupedMxfp4GemmKernel<false, GemmProbe::kNoMma, kTma>;
    case GemmProbe::kNoXCopy:
      return GroupedMxfp4GemmKernel<false, GemmProbe::kNoXCopy, kTma>;
  }
  return absl::InvalidArgumentError(absl::StrCat("GroupedMxfp4GemmWgmma: unknown probe ", static_cast<int>(probe)));
}

// cuTensorMapEncodeTiled from the driver (through the runtime: no libcuda link), looked up once.
absl::StatusOr<PFN_cuTensorMapEncodeTiled_v12000> TensorMapEncoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = []() -> PFN_cuTensorMapEncodeTiled_v12000 {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (!encode) return absl::UnavailableError("GroupedMxfp4GemmWgmma: the driver has no cuTensorMapEncodeTiled");
  return encode;
}

// x [rows, in] bf16 as boxes of 64 values x `box_rows` rows, 128-byte swizzled in shared memory.
absl::Status EncodeXMap(const __nv_bfloat16* x, int64_t rows, int64_t in, int box_rows, CUtensorMap* map) {
  TANDEM_ASSIGN_OR_RETURN(const PFN_cuTensorMapEncodeTiled_v12000 encode, TensorMapEncoder());
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(in), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(in) * sizeof(__nv_bfloat16)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(kDepth), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<__nv_bfloat16*>(x), dims, strides, box,
                            element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    return absl::InternalError(absl::StrCat("GroupedMxfp4GemmWgmma: cuTensorMapEncodeTiled failed (CUresult ",
                                            static_cast<int>(r), ") for x [", rows, ", ", in, "]"));
  }
  return absl::OkStatus();
}

// One launch of a kernel whose blocks each fetch their own x by TMA (64-row boxes): grid column tiles x tiles.
absl::Status LaunchWithXMaps(const GroupedMxfp4GemmArgs& a, Kernel kernel, int threads, size_t shared, const char* name,
                             cudaStream_t stream, int columns = kColumns) {
  TANDEM_RETURN_IF_ERROR(AllowSharedMemory(kernel, shared, name));
  XMaps maps{};
  TANDEM_RETURN_IF_ERROR(EncodeXMap(a.x, a.x_rows, a.in, 64, &maps.hi));
  if (a.x_lo) TANDEM_RETURN_IF_ERROR(EncodeXMap(a.x_lo, a.x_rows, a.in, 64, &maps.lo));
  const dim3 grid(static_cast<unsigned>((a.total_out + columns - 1) / columns), static_cast<unsigned>(a.tile_count));
  kernel<<<grid, threads, shared, stream>>>(a, maps);
  return CudaStatus(cudaGetLastError(), absl::StrCat("launch of ", name).c_str(), __FILE__, __LINE__);
}

}  // namespace

bool TensorMapsAvailable() { return TensorMapEncoder().ok(); }

absl::Status GroupedMxfp4GemmWgmma(const GroupedMxfp4GemmArgs& args, cudaStream_t stream) {
  GroupedMxfp4GemmArgs a = args;
  // One block's TMA has a cp.async twin with the same bits; a driver without the encoder gets that.
  if (a.x_cluster == 1 && !a.register_weights && !a.producer_warpgroup && !a.wide_tiles && !TensorMapsAvailable()) {
    a.x_cluster = 0;
  }
  if (a.tile_count == 0) return absl::OkStatus();
  if (!a.tiles || !a.x || !a.y) return absl::InvalidArgumentError("GroupedMxfp4GemmWgmma: null pointer");
  if (a.in <= 0 || a.in % (2 * kDepth) != 0 || a.total_out <= 0 || a.total_out % 2 != 0 || a.out0 <= 0 ||
      a.out0 > a.total_out) {
    return absl::InvalidArgumentError(absl::StrCat("GroupedMxfp4GemmWgmma: in ", a.in, " (a multiple of ", 2 * kDepth,
                                                   "), total_out ", a.total_out, " (even), out0 ", a.out0));
  }
  if (a.tile_count > 65535) return absl::InvalidArgumentError("GroupedMxfp4GemmWgmma: over 65535 row tiles");
  const int cluster = a.x_cluster;
  if (cluster != 0 && cluster != 1 && cluster != 2 && cluster != 4) {
    return absl::InvalidArgumentError(absl::StrCat("GroupedMxfp4GemmWgmma: x_cluster ", cluster, " (0, 1, 2 or 4)"));
  }
  if ((cluster > 0 || a.register_weights || a.producer_warpgroup || a.wide_tiles) &&
      (a.x_rows <= 0 || a.x_rows > INT32_MAX - kExpertWideTileRows)) {
    return absl::InvalidArgumentError(
        absl::StrCat("GroupedMxfp4GemmWgmma: x_rows ", a.x_rows, " (TMA row coordinates are 32-bit, 1..2^31 - 257)"));
  }
  const bool split = a.x_lo != nullptr;
  if (a.wide_tiles) {
    if (a.probe != GemmProbe::kNone || cluster != 1 || a.register_weights || a.producer_warpgroup) {
      return absl::InvalidArgumentError(
          "GroupedMxfp4GemmWgmma: wide tiles take no probe, x_cluster 1 and neither register weights nor the producer "
          "warpgroup");
    }
    return LaunchWithXMaps(a, split ? GroupedMxfp4GemmWideKernel<true> : GroupedMxfp4GemmWideKernel<false>, kThreads,
                           WideSharedBytes(split), "GroupedMxfp4GemmWideKernel", stream, kWideColumns);
  }
  if (a.producer_warpgroup) {
    if (a.probe != GemmProbe::kNone || cluster != 1 || a.register_weights) {
      return absl::InvalidArgumentError(
          "GroupedMxfp4GemmWgmma: the producer warpgroup takes no probe, x_cluster 1 and no register weights");
    }
    return LaunchWithXMaps(a, split ? GroupedMxfp4GemmProducerKernel<true> : GroupedMxfp4GemmProducerKernel<false>,
                           kProducerThreads, split ? ProducerTile<true>::SharedBytes() : ProducerTile<false>::SharedBytes(),
                           "GroupedMxfp4GemmProducerKernel", stream);
  }
  if (a.register_weights) {
    if (a.probe != GemmProbe::kNone || cluster > 1) {
      return absl::InvalidArgumentError("GroupedMxfp4GemmWgmma: register weights take no probe and no cluster");
    }
    return LaunchWithXMaps(a, split ? GroupedMxfp4GemmRegisterKernel<true> : GroupedMxfp4GemmRegisterKernel<false>,
                           kThreads, RegisterSharedBytes(split), "GroupedMxfp4GemmRegisterKernel", stream);
  }
  TANDEM_ASSIGN_OR_RETURN(const Kernel kernel, cluster > 0 ? PickKernel<true>(split, a.probe) : PickKernel<false>(split, a.probe));
  const size_t shared = SharedBytes(split);
  TANDEM_RETURN_IF_ERROR(AllowSharedMemory(kernel, shared, "GroupedMxfp4GemmKernel"));
  XMaps maps{};
  if (cluster > 0) {
    TANDEM_RETURN_IF_ERROR(EncodeXMap(a.x, a.x_rows, a.in, 64 / cluster, &maps.hi));
    if (split) TANDEM_RETURN_IF_ERROR(EncodeXMap(a.x_lo, a.x_rows, a.in, 64 / cluster, &maps.lo));
  }
  // Column tiles rounded up to whole clusters (a tile past total_out computes nothing and stores nothing,
  // but fetches its share of x for its cluster).
  const int64_t column_tiles = (a.total_out + kColumns - 1) / kColumns;
  const int64_t per_cluster = std::max(cluster, 1);
  const dim3 grid(static_cast<unsigned>((column_tiles + per_cluster - 1) / per_cluster * per_cluster),
                  static_cast<unsigned>(a.tile_count));
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = static_cast<unsigned>(per_cluster);
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = cluster > 1 ? 1 : 0;  // one block is its own cluster without the attribute
  TANDEM_CUDA_RETURN_IF_ERROR(cudaLaunchKernelEx(&config, kernel, a, maps));
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("GroupedMxfp4GemmKernel");
  return absl::OkStatus();
}

}  // namespace tandem::kernels::cuda::internal
