// MoE on the GPU (NUMERICS.md "MoE"): routing, grouping (token, slot) pairs by expert, the clamped SwiGLU and
// the weighted combine. Routing scores are double like the CPU. The grouped expert GEMMs are in moe_grouped.cu.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <climits>
#include <utility>

#include "common/kernels/cuda/attention_device.cuh"
#include "common/kernels/cuda/check.h"
#include "common/kernels/cuda/cuda_moe.h"

namespace tandem::kernels::cuda {
namespace {

using internal::SwiGluOne;

// ---- Routing: one warp per token ----
constexpr int kRouteWarps = 4;
constexpr int kMaxK = 32;

__device__ double SqrtSoftplus(double v) { return sqrt(v > 20.0 ? v : log1p(exp(v))); }

__global__ void MoeRouteKernel(MoeRouteArgs args) {
  extern __shared__ double route_keys[];  // [kRouteWarps][E]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kRouteWarps + warp;
  if (token >= args.tokens) return;  // no block-wide barrier below
  const int64_t E = args.experts, k = args.k;
  const float* logits = args.logits + token * E;
  int32_t* chosen = args.chosen + token * k;
  float* weights = args.weights + token * k;
  int32_t ids[kMaxK];
  if (args.tid2eid) {
    if (lane != 0) return;
    const int32_t* row = args.tid2eid + static_cast<int64_t>(args.token_ids[token]) * k;
    for (int64_t i = 0; i < k; ++i) ids[i] = row[i];
  } else {
    double* keys = route_keys + warp * E;
    // NaN scores rank below every number but above the experts already taken (-inf).
    for (int64_t e = lane; e < E; e += 32) {
      const double key = SqrtSoftplus(logits[e]) + static_cast<double>(args.bias[e]);
      keys[e] = isnan(key) ? -DBL_MAX : key;
    }
    __syncwarp();
    for (int64_t i = 0; i < k; ++i) {
      // Each lane scans its experts in increasing id (strict > keeps the smaller id), then a butterfly
      // merge with ties to the smaller id: every lane ends with the same winner.
      double best = -INFINITY;
      int best_id = INT_MAX;
      for (int64_t e = lane; e < E; e += 32) {
        const double v = keys[e];
        if (v > best) {
          best = v;
          best_id = static_cast<int>(e);
        }
      }
      for (int offset = 16; offset > 0; offset /= 2) {
        const double other = __shfl_xor_sync(0xffffffffu, best, offset);
        const int other_id = __shfl_xor_sync(0xffffffffu, best_id, offset);
        if (other > best || (other == best && other_id < best_id)) {
          best = other;
          best_id = other_id;
        }
      }
      ids[i] = best_id;
      __syncwarp();
      if (lane == 0) keys[best_id] = -INFINITY;
      __syncwarp();
    }
    if (lane != 0) return;
  }
  // Same operations and order as the CPU: s in double, sum over the slots in order, one rounding at the end.
  double sum = 0.0;
  for (int64_t i = 0; i < k; ++i) sum += SqrtSoftplus(logits[ids[i]]);
  for (int64_t i = 0; i < k; ++i) {
    chosen[i] = ids[i];
    weights[i] = static_cast<float>(SqrtSoftplus(logits[ids[i]]) / sum * static_cast<double>(args.routed_scaling));
  }
}

// ---- Grouping: each warp owns a unit of kGroupUnit consecutive pairs ----
constexpr int kGroupWarps = 4;
constexpr int64_t kGroupUnit = 512;
constexpr int64_t kMaxGroupExperts = 2048;

__host__ __device__ inline int64_t GroupUnits(int64_t pairs) { return (pairs + kGroupUnit - 1) / kGroupUnit; }

// kScatter = false: unit_counts[unit][e] = pairs of the unit routed to e. kScatter = true: unit_counts holds
// the exclusive prefix over units; each pair gets offsets[e] + prefix + its rank among the unit's earlier
// pairs of e (warp steps of 32 in pair order, ranks inside a step by lane): stable.
template <bool kScatter>
__global__ void MoeGroupUnitKernel(const int32_t* chosen, int64_t pairs, int64_t k, int64_t experts,
                                   int32_t* unit_counts, const int64_t* offsets, int32_t* rows, int32_t* position) {
  extern __shared__ int32_t group_running[];  // [kGroupWarps][E]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * kGroupWarps + warp;
  const int64_t units = GroupUnits(pairs);
  if (unit >= units) return;  // no block-wide barrier below
  int32_t* running = group_running + warp * experts;
  for (int64_t e = lane; e < experts; e += 32) {
    running[e] = kScatter ? static_cast<int32_t>(offsets[e]) + unit_counts[unit * experts + e] : 0;
  }
  __syncwarp();
  const int64_t begin = unit * kGroupUnit, end = min(pairs, begin + kGroupUnit);
  for (int64_t base = begin; base < end; base += 32) {
    const int64_t p = base + lane;
    const bool valid = p < end;
    const int e = valid ? chosen[p] : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int leader = __ffs(peers) - 1;
    if (kScatter && valid) {
      const int pos = running[e] + __popc(peers & ((1u << lane) - 1u));
      rows[pos] = static_cast<int32_t>(p / k);
      position[p] = pos;
    }
    __syncwarp();
    if (valid && lane == leader) running[e] += __popc(peers);
    __syncwarp();
  }
  if (!kScatter) {
    for (int64_t e = lane; e < experts; e += 32) unit_counts[unit * experts + e] = running[e];
  }
}

constexpr int kScanThreads = 1024;
constexpr int kScanPerThread = kMaxGroupExperts / kScanThreads;  // 2

// One block: per expert an exclusive scan over units (in place), then offsets = exclusive scan of the totals.
__global__ void __launch_bounds__(kScanThreads) MoeGroupScanKernel(int32_t* unit_counts, int64_t units, int64_t experts,
                                                                   int64_t pairs, int64_t* offsets) {
  __shared__ int64_t warp_sums[kScanThreads / 32];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  int64_t totals[kScanPerThread];
  int64_t mine = 0;
#pragma unroll
  for (int j = 0; j < kScanPerThread; ++j) {
    const int64_t e = static_cast<int64_t>(tid) * kScanPerThread + j;
    totals[j] = 0;
    if (e < experts) {
      int32_t run = 0;
      for (int64_t u = 0; u < units; ++u) {
        const int32_t c = unit_counts[u * experts + e];
        unit_counts[u * experts + e] = run;
        run += c;
      }
      totals[j] = run;
    }
    mine += totals[j];
  }
  int64_t inclusive = mine;
  for (int offset = 1; offset < 32; offset *= 2) {
    const int64_t v = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += v;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  int64_t base = inclusive - mine;
  for (int w = 0; w < warp; ++w) base += warp_sums[w];
#pragma unroll
  for (int j = 0; j < kScanPerThread; ++j) {
    const int64_t e = static_cast<int64_t>(tid) * kScanPerThread + j;
    if (e < experts) offsets[e] = base;
    base += totals[j];
  }
  if (tid == 0) offsets[experts] = pairs;
}

// ---- Elementwise ----

__global__ void SwiGluKernel(const float* a, const float* b, int64_t count, float limit, bool vector, float* h) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vector) {
    const int64_t vectors = count / 4;
    for (int64_t i = first; i < vectors; i += stride) {
      const float4 va = reinterpret_cast<const float4*>(a)[i], vb = reinterpret_cast<const float4*>(b)[i];
      reinterpret_cast<float4*>(h)[i] = make_float4(SwiGluOne(va.x, vb.x, limit), SwiGluOne(va.y, vb.y, limit),
                                                    SwiGluOne(va.z, vb.z, limit), SwiGluOne(va.w, vb.w, limit));
    }
    done = 4 * vectors;
  }
  for (int64_t i = done + first; i < count; i += stride) h[i] = SwiGluOne(a[i], b[i], limit);
}

// One block per token. The slots are added in grouped-row order, which is the CPU's order (experts
// ascending, rows of an expert in pair order), each product and sum rounded separately as on the CPU.
__global__ void MoeCombineKernel(const float* shared, const float* routed, const int32_t* position, const float* weights,
                                 int64_t k, int64_t dim, float* out) {
  __shared__ int32_t slot_position[kMaxK];
  __shared__ float slot_weight[kMaxK];
  const int64_t token = blockIdx.x;
  if (threadIdx.x == 0) {
    for (int64_t i = 0; i < k; ++i) {
      const int32_t p = position[token * k + i];
      const float w = weights[token * k + i];
      int64_t j = i;
      for (; j > 0 && slot_position[j - 1] > p; --j) {
        slot_position[j] = slot_position[j - 1];
        slot_weight[j] = slot_weight[j - 1];
      }
      slot_position[j] = p;
      slot_weight[j] = w;
    }
  }
  __syncthreads();
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    float acc = shared ? shared[token * dim + d] : 0.0f;
    for (int64_t i = 0; i < k; ++i) {
      acc = __fadd_rn(acc, __fmul_rn(slot_weight[i], routed[static_cast<int64_t>(slot_position[i]) * dim + d]));
    }
    out[token * dim + d] = acc;
  }
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

unsigned GridFor(int64_t work, int threads) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, 132 * 16)));
}

}  // namespace

absl::Status MoeRoute(const MoeRouteArgs& args, cudaStream_t stream) {
  if (args.tokens < 0 || args.experts < 1 || args.k < 1 || args.k > std::min<int64_t>(args.experts, kMaxK)) {
    return absl::InvalidArgumentError(absl::StrCat("MoeRoute: need tokens >= 0, experts >= 1, 1 <= k <= min(experts, ",
                                                   kMaxK, "); got tokens ", args.tokens, ", experts ", args.experts,
                                                   ", k ", args.k));
  }
  if ((args.bias == nullptr) == (args.tid2eid == nullptr)) {
    return absl::InvalidArgumentError("MoeRoute: exactly one of bias (learned gate) and tid2eid (hash layer) must be set");
  }
  if (args.tid2eid && !args.token_ids) return absl::InvalidArgumentError("MoeRoute: hash routing needs token_ids");
  if (args.tokens == 0) return absl::OkStatus();
  if (!args.logits || !args.chosen || !args.weights) return absl::InvalidArgumentError("MoeRoute: null logits or outputs");
  const size_t smem = args.bias ? kRouteWarps * static_cast<size_t>(args.experts) * sizeof(double) : 0;
  if (smem > 48 * 1024) {
    return absl::UnimplementedError(absl::StrCat("MoeRoute: ", args.experts, " experts exceed the kernel's 1536"));
  }
  const int64_t blocks = (args.tokens + kRouteWarps - 1) / kRouteWarps;
  if (blocks > 0x7fffffff) return absl::InvalidArgumentError("MoeRoute: too many tokens");
  MoeRouteKernel<<<static_cast<unsigned>(blocks), 32 * kRouteWarps, smem, stream>>>(args);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("MoeRouteKernel");
  return absl::OkStatus();
}

size_t MoeGroupWorkspaceBytes(int64_t tokens, int64_t k, int64_t experts) {
  if (tokens <= 0 || k <= 0 || experts <= 0) return 0;
  return static_cast<size_t>(GroupUnits(tokens * k)) * static_cast<size_t>(experts) * sizeof(int32_t);
}

absl::Status MoeGroup(const int32_t* chosen, int64_t tokens, int64_t k, int64_t experts, int64_t* offsets, int32_t* rows,
                      int32_t* position, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (tokens < 0 || k < 1 || experts < 1 || experts > kMaxGroupExperts) {
    return absl::InvalidArgumentError(absl::StrCat("MoeGroup: need tokens >= 0, k >= 1, 1 <= experts <= ",
                                                   kMaxGroupExperts, "; got ", tokens, ", ", k, ", ", experts));
  }
  const int64_t pairs = tokens * k;
  if (pairs > 0x7fffffff) return absl::InvalidArgumentError("MoeGroup: tokens * k exceeds int32 rows");
  if (!offsets) return absl::InvalidArgumentError("MoeGroup: null offsets");
  if (pairs == 0) {
    TANDEM_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(offsets, 0, (experts + 1) * sizeof(int64_t), stream));
    return absl::OkStatus();
  }
  if (!chosen || !rows || !position) return absl::InvalidArgumentError("MoeGroup: null chosen, rows or position");
  const size_t needed = MoeGroupWorkspaceBytes(tokens, k, experts);
  if (!workspace || workspace_bytes < needed) {
    return absl::InvalidArgumentError(absl::StrCat("MoeGroup: workspace of ", workspace_bytes, " bytes, needs ", needed));
  }
  auto* unit_counts = static_cast<int32_t*>(workspace);
  const int64_t units = GroupUnits(pairs);
  const unsigned blocks = static_cast<unsigned>((units + kGroupWarps - 1) / kGroupWarps);
  const size_t smem = kGroupWarps * static_cast<size_t>(experts) * sizeof(int32_t);
  MoeGroupUnitKernel<false><<<blocks, 32 * kGroupWarps, smem, stream>>>(chosen, pairs, k, experts, unit_counts, offsets,
                                                                        rows, position);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("MoeGroupUnitKernel<count>");
  MoeGroupScanKernel<<<1, kScanThreads, 0, stream>>>(unit_counts, units, experts, pairs, offsets);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("MoeGroupScanKernel");
  MoeGroupUnitKernel<true><<<blocks, 32 * kGroupWarps, smem, stream>>>(chosen, pairs, k, experts, unit_counts, offsets,
                                                                       rows, position);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("MoeGroupUnitKernel<scatter>");
  return absl::OkStatus();
}

absl::Status SwiGlu(const float* a, const float* b, int64_t count, float limit, float* h, cudaStream_t stream) {
  if (count < 0) return absl::InvalidArgumentError("SwiGlu: negative count");
  if (count == 0) return absl::OkStatus();
  if (!a || !b || !h) return absl::InvalidArgumentError("SwiGlu: null pointer");
  const bool vector = Aligned16(a) && Aligned16(b) && Aligned16(h);
  SwiGluKernel<<<GridFor(vector ? count / 4 + 1 : count, 256), 256, 0, stream>>>(a, b, count, limit, vector, h);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("SwiGluKernel");
  return absl::OkStatus();
}

absl::Status MoeCombine(const float* shared, const float* routed, const int32_t* position, const float* weights,
                        int64_t tokens, int64_t k, int64_t dim, float* out, cudaStream_t stream) {
  if (tokens < 0 || k < 1 || k > kMaxK || dim < 1) {
    return absl::InvalidArgumentError(absl::StrCat("MoeCombine: need tokens >= 0, 1 <= k <= ", kMaxK, ", dim >= 1"));
  }
  if (tokens == 0) return absl::OkStatus();
  if (tokens > 0x7fffffff) return absl::InvalidArgumentError("MoeCombine: too many tokens");
  if (!routed || !position || !weights || !out) return absl::InvalidArgumentError("MoeCombine: null pointer");
  MoeCombineKernel<<<static_cast<unsigned>(tokens), 256, 0, stream>>>(shared, routed, position, weights, k, dim, out);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("MoeCombineKernel");
  return absl::OkStatus();
}

}  // namespace tandem::kernels::cuda
