// Prefill path of the routed experts on tensor cores: on Hopper, MXFP4 experts in one warpgroup-MMA kernel
// that dequantizes in shared memory (moe_wgmma.h); otherwise each expert's MXFP4 / block-FP8 weight is
// dequantized (exactly) to bf16 scratch and its grouped row block runs as one cuBLASLt bf16 GEMM. Both
// accumulate in f32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include "common/core/status.h"
#include "common/kernels/cuda/cuda_moe.h"
#include "common/kernels/cuda/cuda_ops.h"

namespace tandem::kernels::cuda {

// dst [out, in] = e2m1 code * 2^(scale - 127) in bf16 from MXFP4 codes [out, in/2] (low nibble first) and
// ue8m0 scales [out, in/32]; in must be a multiple of 32. Exact: the product has two significant bits.
absl::Status DequantizeMxfp4(const uint8_t* codes, const uint8_t* scales, int64_t out, int64_t in, __nv_bfloat16* dst,
                             cudaStream_t stream = nullptr);

// h [rows, inter] = SwiGlu(gate_up[:, :inter], gate_up[:, inter:], limit) for the stacked w1/w3 output
// [rows, 2 * inter] of GroupedExpertGemm::Run (the same arithmetic as SwiGlu).
absl::Status SwiGluStacked(const float* gate_up, int64_t rows, int64_t inter, float limit, float* h,
                           cudaStream_t stream = nullptr);

// One grouped expert weight as the host sees it: shape and format, and host arrays [experts] of the device
// code / scale pointers (the same pointers GroupedWeights holds in device memory).
struct HostExpertWeights {
  QuantizedWeight::Format format = QuantizedWeight::Format::kMxfp4;
  const uint8_t* const* codes = nullptr;   // host array [experts] of device pointers
  const uint8_t* const* scales = nullptr;  // host array [experts] of device pointers
  int64_t experts = 0;
  int64_t out = 0;
  int64_t in = 0;
  static HostExpertWeights Of(const GroupedWeights& weights, const uint8_t* const* host_codes,
                              const uint8_t* const* host_scales) {
    return {weights.format, host_codes, host_scales, weights.experts, weights.out, weights.in};
  }
};

// Where GroupedExpertGemm::Run's x [R, in] comes from: `x` itself, or derived from it on the way in. The fused
// kernel's bf16 copy of x is then written straight from the source (no f32 x in between); the lanes
// materialize x in f32 first.
struct ExpertInput {
  const float* x = nullptr;           // [R, in]; gathered: the rows gathered from; SwiGLU: [R, 2 in] gate | up
  const int32_t* gather = nullptr;    // device [R]: x row r = x row gather[r] (as GatherRows)
  std::optional<float> swiglu_limit;  // x = SwiGluStacked(x, limit) (the stacked w1/w3 output)
  static ExpertInput Rows(const float* x) {
    ExpertInput input;
    input.x = x;
    return input;
  }
  static ExpertInput Gathered(const float* source, const int32_t* rows) {
    ExpertInput input;
    input.x = source;
    input.gather = rows;
    return input;
  }
  static ExpertInput SwiGlu(const float* gate_up, float limit) {
    ExpertInput input;
    input.x = gate_up;
    input.swiglu_limit = limit;
    return input;
  }
};

// Grouped expert linear for prefill. MXFP4 weights on Hopper take one fused warpgroup-MMA launch for all
// experts (Options::fused_mxfp4). Otherwise experts with rows are dealt to `lanes` streams, each with its own
// cuBLASLt handle and bf16 weight scratch, so one expert's dequantization overlaps other experts' GEMMs
// (within a lane: dequantize, then GEMM, stream-ordered). GEMM plans are heuristic-only (no timing): one per
// distinct row count, cached. Not thread-safe; use one instance per stream.
class GroupedExpertGemm {
 public:
  struct Options {
    // Largest (sum of stacked outs) * in of one Run: the bf16 weight scratch of each lane.
    int64_t max_weight_elements = 0;
    int lanes = 4;
    size_t gemm_workspace_bytes = size_t{32} << 20;  // per lane
    // x as a bf16 hi + lo pair (Gemm::LinearSplit's ~16-bit precision): a second GEMM per expert
    // accumulates lo's product.
    bool split_x = false;
    // MXFP4 weights on an sm_90a build and a compute capability 9.0 device: one warpgroup-MMA kernel for all
    // experts, each weight dequantized in shared memory (moe_wgmma.h) instead of bf16 scratch + cuBLASLt.
    // Also needs in % 128 == 0, an even sum of outs, at most two stacked weights, x 16-byte aligned, y 8-byte
    // aligned and a stream not capturing (its row tiles are uploaded per Run); otherwise, or when false, the
    // lanes serve.
    bool fused_mxfp4 = true;
    // For tests/gpu/cuda_kernel_bench only: the fused kernel with one stage of its pipeline left out
    // (internal::GemmProbe: 1 no dequantization, 2 no MMAs, 3 no x copies), so that differences of times
    // place its step time. y is then not the product. Needs fused_mxfp4 and no split_x.
    int timing_probe = 0;
    // The fused kernel's x: 0 by cp.async a block; 1 by TMA a block (the default: H200, 8192 tokens, w1/w3
    // 4.75 ms vs 5.76 ms by cp.async); 2 or 4 by TMA fetched once for a cluster of that many column tiles and
    // multicast to their shared memories (4.89 / 5.46 ms; split x 6.34 vs 6.46 ms; internal::GroupedMxfp4GemmArgs).
    int x_cluster = 1;
    // The fused kernel's weights dequantized straight into the warpgroup-MMA A fragments (registers), x as B by
    // TMA: no weight tile in shared memory and no block barrier a step. Correct; about as fast (H200, 8192
    // tokens, w1/w3: 4.94 ms vs 4.75 ms; split x 6.32 vs 6.46 ms; bench/results/cuda-kernels/NOTES.md). Takes no
    // timing_probe and x_cluster 1 only.
    bool register_weights = false;
    // The fused kernel warp-specialized: one warpgroup dequantizes, two multiply and copy the codes, stages handed
    // over by mbarriers instead of a block barrier a step (internal::GroupedMxfp4GemmArgs::producer_warpgroup).
    // The same bits as the default; slower for w1/w3 so far (H200, 8192 tokens: 5.62 ms vs 4.74 ms; w2 split x
    // 3.26 vs 3.46 ms). Takes no timing_probe, x_cluster 1 and no register_weights.
    bool producer_warpgroup = false;
    // The fused kernel on tiles of up to 256 rows of one expert x 128 output columns, the weights the warpgroup-MMA
    // A operand and x (by TMA) the B operand: each weight dequantized once per expert and 128 columns instead of
    // once per 128 rows and 256 columns (internal::GroupedMxfp4GemmArgs::wide_tiles). Experts of up to 128 rows
    // (one weight tile) stay on the default kernel, in a second launch. The same bits as the default, faster
    // (H200, 8192 tokens, 6 of 256 experts chosen uniformly: w1/w3 3.52 ms vs 4.73 ms, w2 1.88 vs 2.46 ms, split
    // x 5.60 vs 6.28 and 3.15 vs 3.45 ms); the model's forward sets it. Without a TMA encoder in the driver the
    // default kernel serves. Takes no timing_probe, x_cluster 1 and neither register_weights nor
    // producer_warpgroup.
    bool wide_tiles = false;
  };
  static absl::StatusOr<std::unique_ptr<GroupedExpertGemm>> Create(const Options& options);
  ~GroupedExpertGemm();
  GroupedExpertGemm(const GroupedExpertGemm&) = delete;
  GroupedExpertGemm& operator=(const GroupedExpertGemm&) = delete;

  // Pre-allocates the bf16 copy of x for up to `rows` rows of `in` (Run grows it otherwise, with cudaMalloc /
  // cudaFree: call Reserve before capturing Run into a graph).
  absl::Status Reserve(int64_t rows, int64_t in);

  // For every expert e and grouped row r in [offsets[e], offsets[e+1]):
  //   y[r, :] = bf16(x[r, :]) . [dequant(W_0[e]) ; dequant(W_1[e]) ; ...]^T   (hi + lo of x with split_x)
  // x [R, in] f32 and y [R, sum_p out_p] f32 (R = offsets[E]), rows already grouped by expert; host_offsets
  // [E + 1] on the host, offsets[0] = 0, non-decreasing. The stacked weights share experts and in; output
  // column block p is x . W_p^T (w1 and w3 stacked: y[:, :I] = x.w1^T, y[:, I:] = x.w3^T, see SwiGluStacked).
  // Reads x and writes y in `stream` order (lanes fork from and join back into it).
  absl::Status Run(std::span<const HostExpertWeights> stacked, const ExpertInput& x, std::span<const int64_t> host_offsets,
                   float* y, cudaStream_t stream = nullptr);
  absl::Status Run(std::span<const HostExpertWeights> stacked, const float* x, std::span<const int64_t> host_offsets,
                   float* y, cudaStream_t stream = nullptr) {
    return Run(stacked, ExpertInput::Rows(x), host_offsets, y, stream);
  }
  absl::Status Run(const GroupedWeights& weights, const uint8_t* const* host_codes, const uint8_t* const* host_scales,
                   const float* x, std::span<const int64_t> host_offsets, float* y, cudaStream_t stream = nullptr) {
    const HostExpertWeights one = HostExpertWeights::Of(weights, host_codes, host_scales);
    return Run(std::span<const HostExpertWeights>(&one, 1), x, host_offsets, y, stream);
  }
  // Whether the last Run with rows went through the fused MXFP4 kernel (tests and benchmarks check the path).
  bool last_run_fused() const { return last_run_fused_; }

 private:
  struct Lane {
    cudaStream_t stream = nullptr;
    cudaEvent_t done = nullptr;
    std::unique_ptr<Gemm> gemm;
    __nv_bfloat16* weight = nullptr;  // [max_weight_elements]
    float* staging = nullptr;         // y rows of an expert whose block in y is not 16-byte aligned
    int64_t staging_elements = 0;
  };
  GroupedExpertGemm() = default;
  // The per-expert dequantizations and GEMMs on the lanes (after the fork).
  absl::Status Enqueue(std::span<const HostExpertWeights> stacked, std::span<const int64_t> offsets, int64_t total_out,
                       float* y);
  // Whether the fused MXFP4 kernel serves this Run (Options::fused_mxfp4).
  absl::StatusOr<bool> FusedServes(std::span<const HostExpertWeights> stacked, std::span<const int64_t> offsets,
                                   int64_t total_out, const float* x, const float* y, cudaStream_t stream) const;
  // The row tiles to the device and the one launch, in `stream` (x already in x_bf16_ / x_lo_).
  absl::Status RunFused(std::span<const HostExpertWeights> stacked, std::span<const int64_t> offsets, int64_t total_out,
                        float* y, cudaStream_t stream);

  Options options_;
  std::vector<Lane> lanes_;
  cudaEvent_t fork_ = nullptr;
  __nv_bfloat16* x_bf16_ = nullptr;
  int64_t x_bf16_elements_ = 0;
  __nv_bfloat16* x_lo_ = nullptr;  // split_x: x - bf16(x) in bf16, laid out as x_bf16_
  int64_t x_lo_elements_ = 0;
  float* x_f32_ = nullptr;  // the lanes' x of a gathered or SwiGLU ExpertInput
  int64_t x_f32_elements_ = 0;
  std::vector<int64_t> x_starts_;  // per expert: first element of its row block in x_bf16_
  std::vector<int> lane_of_;       // per expert: its lane (-1: no rows)
  // The fused kernel's row tiles (internal::ExpertTile, 40 bytes each): pinned host staging and its device copy.
  void* tiles_host_ = nullptr;
  void* tiles_device_ = nullptr;
  int64_t tiles_capacity_ = 0;
  cudaEvent_t tiles_copied_ = nullptr;  // the last upload out of tiles_host_ (rewritten only after it)
  bool last_run_fused_ = false;
};

}  // namespace tandem::kernels::cuda
