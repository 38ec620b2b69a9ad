// CUDA kernels of the DSV4 MoE and output head (NUMERICS.md "MoE", "Output and MTP"): routing (hash and
// learned gate), grouping rows by expert, grouped expert GEMMs straight from MXFP4 / block-FP8 weights,
// the clamped SwiGLU, the weighted combine, hc_head, and the device side of sampling. Every call
// launches asynchronously on `stream`; pointers are device pointers unless said otherwise.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "common/core/status.h"
#include "common/kernels/kernels.h"

namespace tandem::kernels::cuda {

// ---- Routing ----
struct MoeRouteArgs {
  int64_t tokens = 0;
  int64_t experts = 0;  // E
  int64_t k = 0;        // experts per token
  const float* logits = nullptr;     // [tokens, E], the gate GEMM output
  const float* bias = nullptr;       // [E]: learned-gate layers (top-k of s + bias, ties to the smaller id)
  const int32_t* tid2eid = nullptr;  // [vocab, k]: hash layers (exactly one of bias / tid2eid non-null)
  const int32_t* token_ids = nullptr;  // [tokens], read by hash layers
  float routed_scaling = 1.0f;
  int32_t* chosen = nullptr;  // [tokens, k] out: expert ids in the CPU's order
  float* weights = nullptr;   // [tokens, k] out: s / sum(s) * routed_scaling, s = sqrt(softplus(logit))
};
absl::Status MoeRoute(const MoeRouteArgs& args, cudaStream_t stream = nullptr);

// Groups the tokens * k (token, slot) pairs by expert, stable in pair order: offsets [E + 1] (offsets[E] =
// tokens * k), rows [tokens * k] the token of each grouped row, and position [tokens * k] the grouped row
// of pair (t, i) (for the combine). Deterministic.
size_t MoeGroupWorkspaceBytes(int64_t tokens, int64_t k, int64_t experts);
absl::Status MoeGroup(const int32_t* chosen, int64_t tokens, int64_t k, int64_t experts, int64_t* offsets, int32_t* rows,
                      int32_t* position, void* workspace, size_t workspace_bytes, cudaStream_t stream = nullptr);

// ---- Grouped expert linear straight from the checkpoint formats ----
// Device arrays (one entry per expert) of the kernels::QuantizedWeight layout: MXFP4 codes [out, in/2]
// (low nibble first) with ue8m0 scales [out, in/32]; FP8 e4m3 codes [out, in] with ue8m0 scales
// [ceil(out/128), ceil(in/128)].
struct GroupedWeights {
  QuantizedWeight::Format format = QuantizedWeight::Format::kMxfp4;
  const uint8_t* const* codes = nullptr;   // [experts]
  const uint8_t* const* scales = nullptr;  // [experts]
  int64_t experts = 0;
  int64_t out = 0;
  int64_t in = 0;
};
// For every expert e and grouped row r in [offsets[e], offsets[e+1]):
//   y[r, :] = x[gather ? gather[r] : r, :] . dequant(W_e)^T   (x [*, in] f32, y [offsets[E], out] f32).
// max_rows_per_expert: a host-known bound on offsets[e+1] - offsets[e]; 0 means no rows (nothing runs), any
// positive value is fine (the grid is one wave that reads the offsets on the device).
absl::Status GroupedQuantizedLinear(const GroupedWeights& weights, const float* x, const int32_t* gather,
                                    const int64_t* offsets, int64_t max_rows_per_expert, float* y,
                                    cudaStream_t stream = nullptr);
// When max_rows_per_expert >= 24 (a batch of several tokens), MXFP4 experts with at most 8 rows run on tensor
// cores (bf16 mma with f32 accumulation, x split into a bf16 hi + lo pair: |x - hi - lo| <= 2^-16 |x|, so
// within ~1e-5 of the f32 sums); the rest, every FP8 expert and small batches through the f32 kernels. Off: everything through the f32 kernels (process-wide; for A/B comparisons in
// tests and benchmarks).
void SetGroupedLinearTensorCores(bool on);
bool GroupedLinearTensorCores();  // the switch above (part of a decode step's CUDA graph signature)
// The expert FFN's first half in one pass over x: h[r, :] = SwiGlu(x_r . dequant(W1_e)^T, x_r . dequant(W3_e)^T,
// limit) (SwiGlu below), bit-identical to GroupedQuantizedLinear into a and b followed by SwiGlu. w1 and w3:
// same format and shape; h [offsets[E], out] f32.
absl::Status GroupedSwiGluLinear(const GroupedWeights& w1, const GroupedWeights& w3, const float* x,
                                 const int32_t* gather, const int64_t* offsets, int64_t max_rows_per_expert,
                                 float limit, float* h, cudaStream_t stream = nullptr);

// h = silu(min(a, L)) * clamp(b, -L, L) elementwise over count values (in place into a is allowed).
absl::Status SwiGlu(const float* a, const float* b, int64_t count, float limit, float* h, cudaStream_t stream = nullptr);

// out[t, :] = shared[t, :] + sum_i weights[t, i] * routed[position[t * k + i], :]   ([tokens, dim]).
absl::Status MoeCombine(const float* shared, const float* routed, const int32_t* position, const float* weights,
                        int64_t tokens, int64_t k, int64_t dim, float* out, cudaStream_t stream = nullptr);

// ---- Output head ----
// hc_head: x [tokens, M*D] -> y [tokens, D] = sum_j (sigmoid(mix_j * r * scale[0] + base[j]) + hc_eps) * x_j with
// mix = fn . x (fn [M, M*D]) and r = 1/sqrt(mean(x^2) + rms_eps) over the token's M*D values.
absl::Status HcHead(const float* fn, const float* base, const float* scale, int64_t streams, int64_t hidden,
                    double hc_eps, double rms_eps, const float* x, int64_t tokens, float* y,
                    cudaStream_t stream = nullptr);

// ids[r] = argmax of logits[r, :vocab] (ties to the smaller id; NaN never wins).
absl::Status ArgmaxRows(const float* logits, int64_t rows, int64_t vocab, int32_t* ids, cudaStream_t stream = nullptr);

// Temperature / top-k / top-p / min-p sampling of one row per request with a caller-given uniform
// u in [0, 1): exactly the rule of engine::RequestSampler::Sample after its penalties and biases (the CPU
// applies those): order ids by logit (ties to the smaller id), cut to top_k (<= 0: all); p_i =
// exp(l_i/T - l_max/T) / (sum over the whole vocabulary); keep id i while the mass before it is <= top_p and
// p_i >= min_p * p_0 (the first is always kept); pick the first kept id where u * kept_mass - cumulative < 0.
// temperature, top_p and min_p are doubles as the sampler's (a float 0.7 or 0.9 would move its cuts).
struct SampleRow {
  double temperature = 1.0;
  int32_t top_k = -1;
  double top_p = 1.0;
  double min_p = 0.0;
  double u = 0.0;
};
size_t SampleWorkspaceBytes(int64_t rows, int64_t vocab);
absl::Status SampleRows(const float* logits, int64_t rows, int64_t vocab, const SampleRow* params, int32_t* ids,
                        void* workspace, size_t workspace_bytes, cudaStream_t stream = nullptr);

// What engine::RequestSampler does to one token's logit before its rule, in its order and arithmetic:
// kEditPenalize: l = l - subtract, then unless repetition is 1, l = float(l < 0 ? double(l) * repetition :
// double(l) / repetition); kEditBias: l = l + bias; kEditMask: l = -inf. logits [rows, vocab] in place; edits
// run in parallel, so each (row, token) appears at most once; edits outside the rows or vocabulary are skipped.
enum : uint32_t { kEditPenalize = 1, kEditBias = 2, kEditMask = 4 };
struct LogitEdit {
  int32_t row = 0;
  int32_t token = 0;
  float subtract = 0.0f;
  float bias = 0.0f;
  double repetition = 1.0;
  uint32_t flags = 0;
};
absl::Status ApplyLogitEdits(float* logits, int64_t rows, int64_t vocab, const LogitEdit* edits, int64_t count,
                             cudaStream_t stream = nullptr);

}  // namespace tandem::kernels::cuda
