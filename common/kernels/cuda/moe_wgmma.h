// The prefill grouped expert GEMM from MXFP4 weights on Hopper's warpgroup MMA (internal to this folder;
// GroupedExpertGemm::Run in moe_prefill.cu decides when it serves and builds its tile table).
//
// y[r, n] = sum_k x[r, k] * dequant(W_p[e])[n - start_p, k] for the rows r of expert e, with the stacked
// weights' output columns side by side (part 0: n < out0, part 1: the rest). Each weight is dequantized once a
// block into shared memory (exact bf16, as DequantizeMxfp4) and never reaches global memory, where the cuBLASLt
// path writes and re-reads every expert's bf16 copy.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/core/status.h"

namespace tandem::kernels::cuda::internal {

constexpr int kExpertTileRows = 128;     // rows a block multiplies (two warpgroups of 64)
constexpr int kExpertTileColumns = 256;  // output columns a block computes
constexpr int kExpertTileDepth = 64;     // the K step: `in` must be a multiple of twice it (scales come in pairs of steps)
// GroupedMxfp4GemmArgs::wide_tiles: up to this many rows of one expert a block, this many output columns.
constexpr int kExpertWideTileRows = 256;
constexpr int kExpertWideTileColumns = 128;

// Up to kExpertTileRows (wide tiles: kExpertWideTileRows) grouped rows of one expert, with that expert's weights (device pointers, one per part).
struct ExpertTile {
  const uint8_t* codes[2];   // [out_p, in / 2] e2m1 pairs, low nibble first; 16-byte aligned
  const uint8_t* scales[2];  // [out_p, in / 32] ue8m0; 4-byte aligned
  int64_t row0;              // first row in x and y
  int32_t rows;              // 1..kExpertTileRows (kExpertWideTileRows)
  int32_t unused = 0;
};

// x [rows, in] f32 -> bf16 hi (and lo = bf16(x - hi) when lo is not null) in the kernel's K order: within each
// 8 values v0..v7, the pairs (v0, v4), (v1, v5), (v2, v6), (v3, v7) (the order its weight dequantization
// produces). x row r is source row r; with `gather`, source row gather[r] (device [rows]); with
// `swiglu_limit`, SwiGluOne(source[r, c], source[r, in + c], limit) (source [rows, 2 in], the stacked w1/w3
// output). in % 8 == 0; all pointers 16-byte aligned. One pass: x itself is never written in f32.
struct PermutedSource {
  const float* source = nullptr;
  const int32_t* gather = nullptr;
  bool swiglu = false;
  float swiglu_limit = 0.0f;
  bool register_order = false;  // the order of GroupedMxfp4GemmArgs::register_weights (in % 64 == 0)
};
absl::Status ToBf16Permuted(const PermutedSource& x, int64_t rows, int64_t in, __nv_bfloat16* hi, __nv_bfloat16* lo,
                            cudaStream_t stream);

// Timing probes (tests/gpu/cuda_kernel_bench only): the same launch with one stage of every step left out, so
// that differences of times place a step's time. y is not the product except with kNone; split x takes none.
enum class GemmProbe : int {
  kNone = 0,
  kNoDequant = 1,  // codes still loaded but never used (so their wait goes too); the weight tile is not written
  kNoMma = 2,      // no warpgroup multiplies (nor stores)
  kNoXCopy = 3,    // x's copies left out (the scale copies and the copy groups stay)
};

struct GroupedMxfp4GemmArgs {
  const ExpertTile* tiles = nullptr;  // device [tile_count]
  int64_t tile_count = 0;
  const __nv_bfloat16* x = nullptr;     // [R, in] from ToBf16Permuted, 16-byte aligned rows
  const __nv_bfloat16* x_lo = nullptr;  // its lo part (same layout), or null (one bf16 pass)
  float* y = nullptr;                   // [R, total_out], 8-byte aligned, total_out even
  int64_t in = 0;
  int64_t total_out = 0;
  int64_t out0 = 0;  // columns of part 0 (total_out when there is one part)
  GemmProbe probe = GemmProbe::kNone;
  // 0: each block copies its x tile by cp.async. 1, 2 or 4: x by TMA (128-byte swizzled stages), the blocks
  // of a cluster of this many column tiles (same row tile) each fetching 1/cluster of it for all of them
  // (multicast), so L2 sends x once a cluster instead of once a block.
  int x_cluster = 0;
  int64_t x_rows = 0;  // rows of x (and x_lo): the TMA tensor's extent (rows past it read as zeros)
  // Weights dequantized straight into the wgmma A fragments (registers) with x as B by TMA; x in
  // ToBf16Permuted's register order. Takes no probe and no x_cluster above 1.
  bool register_weights = false;
  // Warp-specialized: one warpgroup dequantizes (and fetches x by TMA), two multiply and copy the codes by
  // cp.async, with full / empty mbarriers a stage instead of a block barrier a step. The same wgmmas in the same
  // order as the weight-tile kernel (the same bits). Takes no probe, x_cluster 1, no register weights.
  bool producer_warpgroup = false;
  // Tiles of up to kExpertWideTileRows rows x kExpertWideTileColumns columns with the weights as the wgmma A
  // operand and x (by TMA) as B: each weight dequantized once per 256 rows instead of once per 128. The tile
  // table must hold tiles of up to kExpertWideTileRows rows. Takes no probe, x_cluster 1 and neither of the two
  // forms above.
  bool wide_tiles = false;
};

// Whether this build and the current device run the kernel (sm_90a code, compute capability 9.0, its shared
// memory within the opt-in limit; the warp-specialized form's when producer_warpgroup, the wide tiles' when
// wide_tiles).
bool GroupedMxfp4GemmWgmmaAvailable(bool producer_warpgroup = false, bool wide_tiles = false);

// Whether the driver encodes TMA tensor maps (cuTensorMapEncodeTiled): x_cluster > 1, register_weights,
// producer_warpgroup and wide_tiles need it; x_cluster 1 falls back to cp.async (the same bits) without it.
bool TensorMapsAvailable();

// One launch over all tiles (grid: column tiles x tiles).
absl::Status GroupedMxfp4GemmWgmma(const GroupedMxfp4GemmArgs& args, cudaStream_t stream);

}  // namespace tandem::kernels::cuda::internal
