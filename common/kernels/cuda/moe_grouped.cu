// MoE on the GPU (NUMERICS.md "MoE"): the grouped expert GEMMs of decode-sized batches (cuda_moe.h), which
// dequantize MXFP4 / block-FP8 weights on the fly. f32 with f32 accumulation (only the summation order
// differs from the CPU), except the MXFP4 experts with at most 8 rows, which run on tensor cores with x as a
// bf16 hi + lo pair (|x - hi - lo| <= 2^-16 |x|). e2m1 / e4m3 codes become f32 by placing their bits at the bottom of an f32
// exponent (a subnormal for the codes' own subnormals) and one exact multiply by 2^126 / 2^120: this needs
// f32 denormals, so this file must not be built with -ftz=true or --use_fast_math.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <utility>

#include "common/kernels/cuda/attention_device.cuh"
#include "common/kernels/cuda/check.h"
#include "common/kernels/cuda/cuda_moe.h"
#include "common/kernels/cuda/moe_grouped_units.cuh"

namespace tandem::kernels::cuda {
namespace {

// Whether MXFP4 experts of up to kMmaMaxRows rows take the tensor-core unit (SetGroupedLinearTensorCores).
std::atomic<bool> g_grouped_mma{true};

template <int M>
__device__ __forceinline__ bool MmaExpert(const LinearArgs<M>& a, int64_t count) {
  return a.mma && count <= kMmaMaxRows;
}
template <int M>
__device__ __forceinline__ bool GemvExpert(const LinearArgs<M>& a, int64_t count) {
  return a.gemv && count <= kGemvMaxRows;
}

// Share weights of the tensor-core units (relative: only these units share their launch). A unit whose x
// does not fit the shared memory in one phase (MmaPhase < in; on the flash shapes, experts of 5-8 rows)
// stages it again for every unit and takes ~1.5x as long (ncu, H200, w1/w3 at 64 tokens: equal weights left
// the SMs active 73.5% of the kernel, the blocks holding those experts finishing last; weighted 5 : 4, 90%).
// Weighted 6 : 4 the kernel ran 15% faster at 64 tokens and no slower at 16 and 256; 7 and 8 lost at 256
// tokens (cuda-kernels/NOTES.md).
constexpr int64_t kMmaUnitWeight = 4;
constexpr int64_t kMmaRestagingUnitWeight = 6;

// Units and weight of one unit for an expert with `count` rows (0 units when it has none). The tensor-core
// experts run in a launch of their own (kMma: only they have units; otherwise they have none), so that
// each kernel gets the registers of its own units.
template <int M, bool kMma>
__device__ __forceinline__ void ExpertUnits(const LinearArgs<M>& a, int64_t count, int64_t* units, int64_t* weight) {
  *weight = 1;
  if (count <= 0 || MmaExpert(a, count) != kMma) {
    *units = 0;
  } else if (kMma) {
    *units = CeilDiv(a.out, kMmaUnitRows / M);
    *weight = MmaPhase(a, static_cast<int>(count)) < a.in ? kMmaRestagingUnitWeight : kMmaUnitWeight;
  } else if (GemvExpert(a, count)) {
    *units = CeilDiv(count, kGroupRows) * CeilDiv(a.out, kUnitRows / M);
    *weight = 1;
  } else {
    *units = CeilDiv(count, kTileRows) * CeilDiv(a.out, kTileOut);
    *weight = kTiledUnitWeight;
  }
}

// Inclusive block-wide prefix sum of v (all threads call it).
__device__ int64_t BlockInclusiveSum(int64_t v, int64_t* warp_sums) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int offset = 1; offset < 32; offset *= 2) {
    const int64_t other = __shfl_up_sync(0xffffffffu, v, offset);
    if (lane >= offset) v += other;
  }
  __syncthreads();  // warp_sums free
  if (lane == 31) warp_sums[warp] = v;
  __syncthreads();
  for (int w = 0; w < warp; ++w) v += warp_sums[w];
  return v;
}

// A persistent grid (one wave): every block reads the expert offsets, cuts the work of the experts that have
// rows into equal contiguous shares (one per block) and walks its share in order, so no block waits on an
// empty expert and the x rows a block stages in shared memory serve all its consecutive units of that group.
template <Format F, int M, bool kMma>
__global__ void __launch_bounds__(kLinearThreads, 2) GroupedLinearKernel(LinearArgs<M> a) {
  extern __shared__ float4 linear_smem[];
  __shared__ int64_t chunk_end[kLinearThreads];  // inclusive prefix of the chunk's expert weights
  __shared__ int64_t warp_sums[kLinearWarps];
  const int tid = threadIdx.x;
  // The total weight, then this block's share [lo, hi): the units whose weight prefix starts inside it.
  int64_t total = 0;
  for (int64_t e0 = 0; e0 < a.experts; e0 += kLinearThreads) {
    int64_t units = 0, weight = 0;
    if (e0 + tid < a.experts) ExpertUnits<M, kMma>(a, a.offsets[e0 + tid + 1] - a.offsets[e0 + tid], &units, &weight);
    const int64_t sum = BlockInclusiveSum(units * weight, warp_sums);
    if (tid == kLinearThreads - 1) chunk_end[0] = sum;
    __syncthreads();
    total += chunk_end[0];
    __syncthreads();
  }
  const int64_t lo = total * blockIdx.x / gridDim.x, hi = total * (blockIdx.x + 1) / gridDim.x;
  if (lo == hi) return;  // the same for the whole block
  int64_t staged_expert = -1, staged_group = -1;
  int64_t base = 0;  // weight of the experts before this chunk
  for (int64_t e0 = 0; e0 < a.experts && base < hi; e0 += kLinearThreads) {
    const int n = static_cast<int>(Min64(kLinearThreads, a.experts - e0));
    int64_t units = 0, weight = 0;
    if (tid < n) ExpertUnits<M, kMma>(a, a.offsets[e0 + tid + 1] - a.offsets[e0 + tid], &units, &weight);
    const int64_t end = BlockInclusiveSum(units * weight, warp_sums);
    chunk_end[tid] = end;
    __syncthreads();
    // First expert of the chunk whose weight ends after lo (the ends are non-decreasing).
    int first = 0, last = n;
    while (first < last) {
      const int mid = (first + last) / 2;
      if (base + chunk_end[mid] <= lo) {
        first = mid + 1;
      } else {
        last = mid;
      }
    }
    for (int i = first; i < n; ++i) {
      const int64_t e = e0 + i;
      const int64_t start = base + (i > 0 ? chunk_end[i - 1] : 0);
      if (start >= hi) break;
      const int64_t begin = a.offsets[e], count = a.offsets[e + 1] - begin;
      int64_t e_units, e_weight;
      ExpertUnits<M, kMma>(a, count, &e_units, &e_weight);
      const int64_t j_begin = lo > start ? CeilDiv(lo - start, e_weight) : 0;
      const int64_t j_end = Min64(e_units, CeilDiv(hi - start, e_weight));
      if constexpr (kMma) {
        for (int64_t j = j_begin; j < j_end; ++j) {
          MmaUnit<M>(a, e, j * (kMmaUnitRows / M), begin, static_cast<int>(count), reinterpret_cast<uint4*>(linear_smem),
                     &staged_expert);
        }
      } else if (GemvExpert(a, count)) {
        const int64_t groups = CeilDiv(count, kGroupRows);
        for (int64_t j = j_begin; j < j_end; ++j) {
          const int64_t group = j % groups, o_unit = (j / groups) * (kUnitRows / M);
          const int64_t row0 = begin + group * kGroupRows;
          const int rows = static_cast<int>(Min64(kGroupRows, count - group * kGroupRows));
          if (staged_expert != e || staged_group != group) {
            __syncthreads();  // the previous unit's readers are done
            StageRows<F, M>(a, row0, rows, linear_smem);
            __syncthreads();
            staged_expert = e;
            staged_group = group;
          }
          if (rows == 1) {
            GemvUnit<F, M, 1>(a, e, o_unit, linear_smem, row0);
          } else if (rows == 2) {
            GemvUnit<F, M, 2>(a, e, o_unit, linear_smem, row0);
          } else if (rows == 3) {
            GemvUnit<F, M, 3>(a, e, o_unit, linear_smem, row0);
          } else {
            GemvUnit<F, M, 4>(a, e, o_unit, linear_smem, row0);
          }
        }
      } else {
        const int64_t row_tiles = CeilDiv(count, kTileRows);
        for (int64_t j = j_begin; j < j_end; ++j) {
          const int64_t r0 = (j % row_tiles) * kTileRows, o0 = (j / row_tiles) * kTileOut;
          const int rows_here = static_cast<int>(Min64(kTileRows, count - r0));
          TiledUnit<F, M>(a, e, begin + r0, rows_here, o0, reinterpret_cast<float*>(linear_smem));
          staged_expert = -1;
        }
      }
    }
    base += chunk_end[n - 1];
    __syncthreads();  // chunk_end is rewritten next
  }
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <Format F, int M, bool kMma>
absl::Status LaunchGroupedLinear(const LinearArgs<M>& args, size_t smem, const char* name, cudaStream_t stream) {
  const auto kernel = GroupedLinearKernel<F, M, kMma>;
  int device = 0, sms = 0, smem_per_sm = 0;
  TANDEM_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  TANDEM_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  TANDEM_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  TANDEM_RETURN_IF_ERROR(internal::AllowSharedMemory(kernel, smem, name));
  // One wave: the blocks that fit at once (2 by the launch bounds, fewer if the shared memory says so; the
  // static arrays and the 1 KB the runtime reserves per block counted generously).
  const size_t per_block = smem + 4096;
  const int per_sm = static_cast<int>(std::max<size_t>(1, std::min<size_t>(2, static_cast<size_t>(smem_per_sm) / per_block)));
  kernel<<<static_cast<unsigned>(std::max(1, sms) * per_sm), kLinearThreads, smem, stream>>>(args);
  return CudaStatus(cudaGetLastError(), name, __FILE__, __LINE__);
}

// max_rows: the caller's bound on the rows of one expert. With the tensor cores on, two launches: the
// tensor-core experts, then the others (a launch whose blocks find no units returns at once).
template <int M>
absl::Status GroupedLinear(const LinearArgs<M>& args, Format format, int64_t max_rows, cudaStream_t stream) {
  const size_t gemv_smem = static_cast<size_t>(kGroupRows) * static_cast<size_t>(args.in) * sizeof(float);
  LinearArgs<M> a = args;
  a.gemv = gemv_smem <= kGemvSmemLimit;
  const size_t smem = std::max(kTiledSmemBytes, a.gemv ? gemv_smem : size_t{0});
  a.smem_bytes = static_cast<int64_t>(smem);
  a.mma = format == Format::kMxfp4 && a.gemv && args.in % kMmaStep == 0 && max_rows >= kMmaMinRowsBound &&
          g_grouped_mma.load(std::memory_order_relaxed);
  if (format == Format::kFp8Block) {
    return LaunchGroupedLinear<Format::kFp8Block, M, false>(a, smem, "GroupedLinearKernel<FP8>", stream);
  }
  if (a.mma) {
    const absl::Status mma = LaunchGroupedLinear<Format::kMxfp4, M, true>(a, smem, "GroupedLinearKernel<MXFP4, mma>", stream);
    if (!mma.ok()) return mma;
  }
  return LaunchGroupedLinear<Format::kMxfp4, M, false>(a, smem, "GroupedLinearKernel<MXFP4>", stream);
}

absl::Status CheckGroupedWeights(const GroupedWeights& weights, const char* what) {
  if (weights.experts < 1 || weights.experts > 65535 || weights.out < 1 || weights.in < kTileK ||
      weights.in % kTileK != 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": need 1 <= experts <= 65535, out >= 1 and in a positive "
                                                   "multiple of ", kTileK, "; got experts ", weights.experts, ", out ",
                                                   weights.out, ", in ", weights.in));
  }
  if (weights.out > (int64_t{1} << 30) || weights.in > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": out and in must be at most 2^30"));
  }
  if (!weights.codes || !weights.scales) return absl::InvalidArgumentError(absl::StrCat(what, ": null weights"));
  return absl::OkStatus();
}

// The call checks both entry points share (the weights are checked by then), then the launch with matrix m
// from w[m] (M = 2: w1 and w3, same shapes).
template <int M>
absl::Status RunGrouped(const char* name, const GroupedWeights* const (&w)[M], const float* x, const int32_t* gather,
                        const int64_t* offsets, int64_t max_rows_per_expert, float limit, float* y, const char* y_name,
                        cudaStream_t stream) {
  if (max_rows_per_expert < 0) return absl::InvalidArgumentError(absl::StrCat(name, ": negative max_rows_per_expert"));
  if (max_rows_per_expert == 0) return absl::OkStatus();
  if (!x || !offsets || !y) return absl::InvalidArgumentError(absl::StrCat(name, ": null x, offsets or ", y_name));
  if (!Aligned16(x)) return absl::InvalidArgumentError(absl::StrCat(name, ": x must be 16-byte aligned"));
  LinearArgs<M> args{};
  for (int m = 0; m < M; ++m) args.m[m] = {w[m]->codes, w[m]->scales};
  args.experts = w[0]->experts;
  args.out = w[0]->out;
  args.in = w[0]->in;
  args.x = x;
  args.gather = gather;
  args.offsets = offsets;
  args.y = y;
  args.limit = limit;
  return GroupedLinear(args, w[0]->format, max_rows_per_expert, stream);
}

}  // namespace

void SetGroupedLinearTensorCores(bool on) { g_grouped_mma.store(on, std::memory_order_relaxed); }
bool GroupedLinearTensorCores() { return g_grouped_mma.load(std::memory_order_relaxed); }

absl::Status GroupedQuantizedLinear(const GroupedWeights& weights, const float* x, const int32_t* gather,
                                    const int64_t* offsets, int64_t max_rows_per_expert, float* y, cudaStream_t stream) {
  TANDEM_RETURN_IF_ERROR(CheckGroupedWeights(weights, "GroupedQuantizedLinear"));
  return RunGrouped<1>("GroupedQuantizedLinear", {&weights}, x, gather, offsets, max_rows_per_expert, 0.0f, y, "y",
                       stream);
}

absl::Status GroupedSwiGluLinear(const GroupedWeights& w1, const GroupedWeights& w3, const float* x,
                                 const int32_t* gather, const int64_t* offsets, int64_t max_rows_per_expert,
                                 float limit, float* h, cudaStream_t stream) {
  TANDEM_RETURN_IF_ERROR(CheckGroupedWeights(w1, "GroupedSwiGluLinear (w1)"));
  TANDEM_RETURN_IF_ERROR(CheckGroupedWeights(w3, "GroupedSwiGluLinear (w3)"));
  if (w1.format != w3.format || w1.experts != w3.experts || w1.out != w3.out || w1.in != w3.in) {
    return absl::InvalidArgumentError(absl::StrCat("GroupedSwiGluLinear: w1 and w3 differ in format or shape (",
                                                   w1.experts, " x ", w1.out, " x ", w1.in, " vs ", w3.experts, " x ",
                                                   w3.out, " x ", w3.in, ")"));
  }
  return RunGrouped<2>("GroupedSwiGluLinear", {&w1, &w3}, x, gather, offsets, max_rows_per_expert, limit, h, "h",
                       stream);
}

}  // namespace tandem::kernels::cuda
