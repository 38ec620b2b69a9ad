// Prefill grouped expert linears: MXFP4 -> bf16 dequantization (exact), the stacked-w1/w3 SwiGLU, and
// GroupedExpertGemm (the fused MXFP4 kernel of moe_wgmma.cu on Hopper; else per expert: dequantize to bf16
// scratch, then one cuBLASLt GEMM of its row block).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "common/kernels/cuda/attention_device.cuh"
#include "common/kernels/cuda/check.h"
#include "common/kernels/cuda/cuda_moe_prefill.h"
#include "common/kernels/cuda/cuda_model_ops.h"
#include "common/kernels/cuda/moe_wgmma.h"

namespace tandem::kernels::cuda {
namespace {

using internal::SwiGluOne;
using internal::Ue8m0ToFloat;

constexpr int kMxfp4Group = 32;  // values per ue8m0 scale

unsigned GridFor(int64_t work, int threads) {
  // A grid-stride loop past ~16 waves of 132 SMs gains nothing.
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, 132 * 16)));
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// e2m1 code (low 4 bits): 0, .5, 1, 1.5, 2, 3, 4, 6 and their negatives, as the CPU's E2m1ToFloat.
__device__ __forceinline__ float E2m1(uint32_t code) {
  const uint32_t exponent = (code >> 1) & 3u, mantissa = code & 1u;
  const float magnitude =
      exponent == 0 ? (mantissa ? 0.5f : 0.0f) : __uint_as_float(((exponent + 126u) << 23) | (mantissa << 22));
  return (code & 8u) ? -magnitude : magnitude;
}

// One thread per 32-value group: a 16-byte code load, one scale, four 16-byte stores.
__global__ void DequantizeMxfp4Kernel(const uint8_t* codes, const uint8_t* scales, int64_t out, int64_t in,
                                      __nv_bfloat16* dst) {
  const int64_t groups_per_row = in / kMxfp4Group;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < out * groups_per_row; g += stride) {
    const float scale = Ue8m0ToFloat(scales[g]);  // scales [out, in/32] is indexed by the group number itself
    const uint4 packed = *reinterpret_cast<const uint4*>(codes + g * (kMxfp4Group / 2));
    const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
    __align__(16) __nv_bfloat16 values[kMxfp4Group];
#pragma unroll
    for (int w = 0; w < 4; ++w) {
#pragma unroll
      for (int n = 0; n < 8; ++n) values[8 * w + n] = __float2bfloat16_rn(E2m1(words[w] >> (4 * n)) * scale);
    }
    uint4* target = reinterpret_cast<uint4*>(dst + g * kMxfp4Group);
#pragma unroll
    for (int i = 0; i < 4; ++i) target[i] = reinterpret_cast<const uint4*>(values)[i];
  }
}

// Any alignment: one thread per code byte (two values).
__global__ void DequantizeMxfp4ScalarKernel(const uint8_t* codes, const uint8_t* scales, int64_t out, int64_t in,
                                            __nv_bfloat16* dst) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < out * in / 2; i += stride) {
    const float scale = Ue8m0ToFloat(scales[(2 * i) / kMxfp4Group]);
    const uint32_t byte = codes[i];
    dst[2 * i] = __float2bfloat16_rn(E2m1(byte) * scale);
    dst[2 * i + 1] = __float2bfloat16_rn(E2m1(byte >> 4) * scale);
  }
}

__global__ void SwiGluStackedKernel(const float* gate_up, int64_t rows, int64_t inter, float limit, bool vector,
                                    float* h) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (vector) {
    const int64_t per_row = inter / 4;
    for (int64_t i = first; i < rows * per_row; i += stride) {
      const int64_t r = i / per_row, c = (i % per_row) * 4;
      const float4 a = *reinterpret_cast<const float4*>(gate_up + r * 2 * inter + c);
      const float4 b = *reinterpret_cast<const float4*>(gate_up + r * 2 * inter + inter + c);
      *reinterpret_cast<float4*>(h + r * inter + c) =
          make_float4(SwiGluOne(a.x, b.x, limit), SwiGluOne(a.y, b.y, limit), SwiGluOne(a.z, b.z, limit),
                      SwiGluOne(a.w, b.w, limit));
    }
    return;
  }
  for (int64_t i = first; i < rows * inter; i += stride) {
    const int64_t r = i / inter, c = i % inter;
    h[i] = SwiGluOne(gate_up[r * 2 * inter + c], gate_up[r * 2 * inter + inter + c], limit);
  }
}

// x f32 -> bf16 at any alignment (the fast FloatToBf16 wants 16-byte aligned x).
__global__ void CastToBf16Kernel(const float* x, int64_t count, __nv_bfloat16* y) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    y[i] = __float2bfloat16_rn(x[i]);
  }
}

absl::Status CastToBf16(const float* x, int64_t count, __nv_bfloat16* y, cudaStream_t stream) {
  if (count == 0) return absl::OkStatus();
  if (Aligned16(x) && (reinterpret_cast<uintptr_t>(y) & 7) == 0) return FloatToBf16(x, count, y, stream);
  CastToBf16Kernel<<<GridFor(count, 256), 256, 0, stream>>>(x, count, y);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("CastToBf16Kernel");
  return absl::OkStatus();
}

template <typename T>
absl::Status Grow(T** buffer, int64_t* capacity, int64_t needed) {
  if (needed <= *capacity) return absl::OkStatus();
  // cudaFree would synchronize anyway; make the wait on in-flight users of the old buffer explicit.
  TANDEM_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  if (*buffer) TANDEM_CUDA_RETURN_IF_ERROR(cudaFree(*buffer));
  *buffer = nullptr;
  *capacity = 0;
  TANDEM_CUDA_RETURN_IF_ERROR(cudaMalloc(reinterpret_cast<void**>(buffer), static_cast<size_t>(needed) * sizeof(T)));
  *capacity = needed;
  return absl::OkStatus();
}

}  // namespace

absl::Status DequantizeMxfp4(const uint8_t* codes, const uint8_t* scales, int64_t out, int64_t in, __nv_bfloat16* dst,
                             cudaStream_t stream) {
  if (out <= 0 || in <= 0) return absl::InvalidArgumentError("DequantizeMxfp4: empty weight");
  if (in % kMxfp4Group != 0) {
    return absl::InvalidArgumentError(absl::StrCat("DequantizeMxfp4: in ", in, " is not a multiple of 32"));
  }
  if (!codes || !scales || !dst) return absl::InvalidArgumentError("DequantizeMxfp4: null pointer");
  if (Aligned16(codes) && Aligned16(dst)) {
    DequantizeMxfp4Kernel<<<GridFor(out * in / kMxfp4Group, 256), 256, 0, stream>>>(codes, scales, out, in, dst);
    TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("DequantizeMxfp4Kernel");
  } else {
    DequantizeMxfp4ScalarKernel<<<GridFor(out * in / 2, 256), 256, 0, stream>>>(codes, scales, out, in, dst);
    TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("DequantizeMxfp4ScalarKernel");
  }
  return absl::OkStatus();
}

absl::Status SwiGluStacked(const float* gate_up, int64_t rows, int64_t inter, float limit, float* h,
                           cudaStream_t stream) {
  if (rows < 0 || inter <= 0) return absl::InvalidArgumentError("SwiGluStacked: bad shape");
  if (rows == 0) return absl::OkStatus();
  if (!gate_up || !h) return absl::InvalidArgumentError("SwiGluStacked: null pointer");
  const bool vector = inter % 4 == 0 && Aligned16(gate_up) && Aligned16(h);
  SwiGluStackedKernel<<<GridFor(vector ? rows * inter / 4 : rows * inter, 256), 256, 0, stream>>>(gate_up, rows, inter,
                                                                                                  limit, vector, h);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("SwiGluStackedKernel");
  return absl::OkStatus();
}

// ---- GroupedExpertGemm ----

absl::StatusOr<std::unique_ptr<GroupedExpertGemm>> GroupedExpertGemm::Create(const Options& options) {
  if (options.max_weight_elements <= 0) return absl::InvalidArgumentError("GroupedExpertGemm: max_weight_elements <= 0");
  if (options.lanes < 1 || options.lanes > 16) return absl::InvalidArgumentError("GroupedExpertGemm: lanes must be 1..16");
  if (options.timing_probe < 0 || options.timing_probe > static_cast<int>(internal::GemmProbe::kNoXCopy) ||
      (options.timing_probe != 0 && (options.split_x || !options.fused_mxfp4))) {
    return absl::InvalidArgumentError(absl::StrCat("GroupedExpertGemm: timing_probe ", options.timing_probe,
                                                   " (0..3; a probe needs fused_mxfp4 and no split_x)"));
  }
  if (options.x_cluster != 0 && options.x_cluster != 1 && options.x_cluster != 2 && options.x_cluster != 4) {
    return absl::InvalidArgumentError(absl::StrCat("GroupedExpertGemm: x_cluster ", options.x_cluster, " (0, 1, 2 or 4)"));
  }
  if (options.register_weights && (options.timing_probe != 0 || options.x_cluster != 1)) {
    return absl::InvalidArgumentError("GroupedExpertGemm: register_weights takes no timing_probe and x_cluster 1 (x by TMA)");
  }
  if (options.producer_warpgroup && (options.timing_probe != 0 || options.x_cluster != 1 || options.register_weights)) {
    return absl::InvalidArgumentError(
        "GroupedExpertGemm: producer_warpgroup takes no timing_probe, x_cluster 1 (x by TMA) and no register_weights");
  }
  if (options.wide_tiles && (options.timing_probe != 0 || options.x_cluster != 1 || options.register_weights ||
                             options.producer_warpgroup)) {
    return absl::InvalidArgumentError(
        "GroupedExpertGemm: wide_tiles takes no timing_probe, x_cluster 1 (x by TMA) and neither register_weights nor "
        "producer_warpgroup");
  }
  std::unique_ptr<GroupedExpertGemm> grouped(new GroupedExpertGemm());
  grouped->options_ = options;
  TANDEM_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&grouped->fork_, cudaEventDisableTiming));
  TANDEM_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&grouped->tiles_copied_, cudaEventDisableTiming));
  grouped->lanes_.resize(static_cast<size_t>(options.lanes));
  for (Lane& lane : grouped->lanes_) {
    TANDEM_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&lane.stream, cudaStreamNonBlocking));
    TANDEM_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&lane.done, cudaEventDisableTiming));
    TANDEM_ASSIGN_OR_RETURN(lane.gemm, Gemm::Create(options.gemm_workspace_bytes));
    TANDEM_CUDA_RETURN_IF_ERROR(cudaMalloc(reinterpret_cast<void**>(&lane.weight),
                                           static_cast<size_t>(options.max_weight_elements) * sizeof(__nv_bfloat16)));
  }
  return grouped;
}

GroupedExpertGemm::~GroupedExpertGemm() {
  for (Lane& lane : lanes_) {
    if (lane.stream) cudaStreamSynchronize(lane.stream);
    lane.gemm.reset();
    if (lane.staging) cudaFree(lane.staging);
    if (lane.weight) cudaFree(lane.weight);
    if (lane.done) cudaEventDestroy(lane.done);
    if (lane.stream) cudaStreamDestroy(lane.stream);
  }
  if (tiles_copied_) {
    cudaEventSynchronize(tiles_copied_);
    cudaEventDestroy(tiles_copied_);
  }
  if (tiles_host_) cudaFreeHost(tiles_host_);
  if (tiles_device_) cudaFree(tiles_device_);
  if (x_bf16_) cudaFree(x_bf16_);
  if (x_lo_) cudaFree(x_lo_);
  if (x_f32_) cudaFree(x_f32_);
  if (fork_) cudaEventDestroy(fork_);
}

absl::Status GroupedExpertGemm::Reserve(int64_t rows, int64_t in) {
  if (rows < 0 || in <= 0) return absl::InvalidArgumentError("GroupedExpertGemm::Reserve: bad shape");
  TANDEM_RETURN_IF_ERROR(Grow(&x_bf16_, &x_bf16_elements_, rows * in + 8 * rows));
  if (options_.split_x) TANDEM_RETURN_IF_ERROR(Grow(&x_lo_, &x_lo_elements_, rows * in + 8 * rows));
  return absl::OkStatus();
}

absl::Status GroupedExpertGemm::Run(std::span<const HostExpertWeights> stacked, const ExpertInput& input,
                                    std::span<const int64_t> offsets, float* y, cudaStream_t stream) {
  if (stacked.empty()) return absl::InvalidArgumentError("GroupedExpertGemm::Run: no weights");
  const int64_t experts = stacked[0].experts, in = stacked[0].in;
  int64_t total_out = 0;
  for (const HostExpertWeights& w : stacked) {
    if (w.experts != experts || w.in != in || w.out <= 0 || in <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("GroupedExpertGemm::Run: stacked weights need one expert count and in "
                                                     "(got experts ", w.experts, " vs ", experts, ", in ", w.in, " vs ", in,
                                                     ", out ", w.out, ")"));
    }
    if (w.format == QuantizedWeight::Format::kMxfp4 && in % kMxfp4Group != 0) {
      return absl::InvalidArgumentError(absl::StrCat("GroupedExpertGemm::Run: MXFP4 in ", in, " not a multiple of 32"));
    }
    if (!w.codes || !w.scales) return absl::InvalidArgumentError("GroupedExpertGemm::Run: null host pointer array");
    total_out += w.out;
  }
  if (total_out * in > options_.max_weight_elements) {
    return absl::InvalidArgumentError(absl::StrCat("GroupedExpertGemm::Run: stacked weight ", total_out, " x ", in,
                                                   " exceeds max_weight_elements ", options_.max_weight_elements));
  }
  if (static_cast<int64_t>(offsets.size()) != experts + 1 || offsets[0] != 0) {
    return absl::InvalidArgumentError(absl::StrCat("GroupedExpertGemm::Run: need experts + 1 = ", experts + 1,
                                                   " host offsets starting at 0, got ", offsets.size()));
  }
  for (int64_t e = 0; e < experts; ++e) {
    if (offsets[e + 1] < offsets[e]) return absl::InvalidArgumentError("GroupedExpertGemm::Run: offsets decrease");
    if (offsets[e + 1] == offsets[e]) continue;
    for (const HostExpertWeights& w : stacked) {
      if (!w.codes[e] || !w.scales[e]) {
        return absl::InvalidArgumentError(absl::StrCat("GroupedExpertGemm::Run: expert ", e, " has rows but no weight"));
      }
    }
  }
  const int64_t rows_total = offsets[experts];
  if (rows_total == 0) return absl::OkStatus();
  if (!input.x || !y) return absl::InvalidArgumentError("GroupedExpertGemm::Run: null x or y");
  if (input.gather && input.swiglu_limit) {
    return absl::InvalidArgumentError("GroupedExpertGemm::Run: an input is gathered or a SwiGLU, not both");
  }

  TANDEM_ASSIGN_OR_RETURN(const bool fused, FusedServes(stacked, offsets, total_out, input.x, y, stream));
  last_run_fused_ = fused;
  if (fused) {  // x in the kernel's K order, contiguous (in % 128 == 0); not under capture (FusedServes)
    TANDEM_RETURN_IF_ERROR(Grow(&x_bf16_, &x_bf16_elements_, rows_total * in));
    if (options_.split_x) TANDEM_RETURN_IF_ERROR(Grow(&x_lo_, &x_lo_elements_, rows_total * in));
    const internal::PermutedSource source{.source = input.x,
                                          .gather = input.gather,
                                          .swiglu = input.swiglu_limit.has_value(),
                                          .swiglu_limit = input.swiglu_limit.value_or(0.0f),
                                          .register_order = options_.register_weights};
    TANDEM_RETURN_IF_ERROR(
        internal::ToBf16Permuted(source, rows_total, in, x_bf16_, options_.split_x ? x_lo_ : nullptr, stream));
    return RunFused(stacked, offsets, total_out, y, stream);
  }
  const bool derived = input.gather || input.swiglu_limit;  // the lanes read it in f32, from x_f32_

  // Row block starts in the bf16 copy of x: contiguous when rows are 16-byte multiples, else each expert's
  // block starts on a 16-byte boundary (cuBLASLt's fast kernels and TMA want aligned bases).
  const bool contiguous = in % 8 == 0;
  x_starts_.assign(static_cast<size_t>(experts), 0);
  int64_t cursor = 0;
  for (int64_t e = 0; e < experts; ++e) {
    x_starts_[e] = contiguous ? offsets[e] * in : cursor;
    if (!contiguous && offsets[e + 1] > offsets[e]) cursor = (cursor + (offsets[e + 1] - offsets[e]) * in + 7) / 8 * 8;
  }
  const int64_t x_needed = contiguous ? rows_total * in : cursor;

  // Experts to lanes, greedily to the least loaded (a dequantization costs about as much as ~128 rows of GEMM).
  lane_of_.assign(static_cast<size_t>(experts), -1);
  std::vector<int64_t> load(lanes_.size(), 0), staging_needed(lanes_.size(), 0);
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t rows = offsets[e + 1] - offsets[e];
    if (rows == 0) continue;
    const size_t lane = static_cast<size_t>(std::min_element(load.begin(), load.end()) - load.begin());
    lane_of_[e] = static_cast<int>(lane);
    load[lane] += rows + 128;
    if (!Aligned16(y + offsets[e] * total_out)) staging_needed[lane] = std::max(staging_needed[lane], rows * total_out);
  }
  bool grow = x_needed > x_bf16_elements_ || (options_.split_x && x_needed > x_lo_elements_) ||
              (derived && rows_total * in > x_f32_elements_);
  for (size_t l = 0; l < lanes_.size(); ++l) grow = grow || staging_needed[l] > lanes_[l].staging_elements;
  if (grow) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    TANDEM_CUDA_RETURN_IF_ERROR(cudaStreamIsCapturing(stream, &capture));
    if (capture != cudaStreamCaptureStatusNone) {
      return absl::FailedPreconditionError("GroupedExpertGemm::Run: scratch must grow during graph capture; Reserve first");
    }
    TANDEM_RETURN_IF_ERROR(Grow(&x_bf16_, &x_bf16_elements_, x_needed));
    if (options_.split_x) TANDEM_RETURN_IF_ERROR(Grow(&x_lo_, &x_lo_elements_, x_needed));
    if (derived) TANDEM_RETURN_IF_ERROR(Grow(&x_f32_, &x_f32_elements_, rows_total * in));
    for (size_t l = 0; l < lanes_.size(); ++l) {
      TANDEM_RETURN_IF_ERROR(Grow(&lanes_[l].staging, &lanes_[l].staging_elements, staging_needed[l]));
    }
  }
  // A derived input materialized in f32 for the lanes.
  const float* x = input.x;
  if (input.gather) {
    TANDEM_RETURN_IF_ERROR(GatherRows(input.x, input.gather, rows_total, in, x_f32_, stream));
    x = x_f32_;
  } else if (input.swiglu_limit) {
    TANDEM_RETURN_IF_ERROR(SwiGluStacked(input.x, rows_total, in, *input.swiglu_limit, x_f32_, stream));
    x = x_f32_;
  }

  if (options_.split_x) {
    if (contiguous) {
      TANDEM_RETURN_IF_ERROR(FloatToBf16Split(x, rows_total * in, x_bf16_, x_lo_, stream));
    } else {
      for (int64_t e = 0; e < experts; ++e) {
        TANDEM_RETURN_IF_ERROR(FloatToBf16Split(x + offsets[e] * in, (offsets[e + 1] - offsets[e]) * in,
                                                x_bf16_ + x_starts_[e], x_lo_ + x_starts_[e], stream));
      }
    }
  } else if (contiguous) {
    TANDEM_RETURN_IF_ERROR(CastToBf16(x, rows_total * in, x_bf16_, stream));
  } else {
    for (int64_t e = 0; e < experts; ++e) {
      TANDEM_RETURN_IF_ERROR(
          CastToBf16(x + offsets[e] * in, (offsets[e + 1] - offsets[e]) * in, x_bf16_ + x_starts_[e], stream));
    }
  }
  // Fork the lanes from `stream`, and join them back whatever happens in between.
  TANDEM_CUDA_RETURN_IF_ERROR(cudaEventRecord(fork_, stream));
  for (Lane& lane : lanes_) TANDEM_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(lane.stream, fork_, 0));
  absl::Status status = Enqueue(stacked, offsets, total_out, y);
  for (Lane& lane : lanes_) {
    status.Update(CudaStatus(cudaEventRecord(lane.done, lane.stream), "cudaEventRecord", __FILE__, __LINE__));
    status.Update(CudaStatus(cudaStreamWaitEvent(stream, lane.done, 0), "cudaStreamWaitEvent", __FILE__, __LINE__));
  }
  return status;
}

absl::StatusOr<bool> GroupedExpertGemm::FusedServes(std::span<const HostExpertWeights> stacked,
                                                    std::span<const int64_t> offsets, int64_t total_out, const float* x,
                                                    const float* y, cudaStream_t stream) const {
  if (!options_.fused_mxfp4 || stacked.size() > 2 || stacked[0].in % (2 * internal::kExpertTileDepth) != 0 ||
      total_out % 2 != 0 || !Aligned16(x) || (reinterpret_cast<uintptr_t>(y) & 7) != 0) {
    return false;
  }
  for (const HostExpertWeights& w : stacked) {
    if (w.format != QuantizedWeight::Format::kMxfp4) return false;
  }
  for (int64_t e = 0; e < stacked[0].experts; ++e) {
    if (offsets[e + 1] == offsets[e]) continue;
    for (const HostExpertWeights& w : stacked) {
      if (!Aligned16(w.codes[e]) || (reinterpret_cast<uintptr_t>(w.scales[e]) & 3) != 0) return false;
    }
  }
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  TANDEM_CUDA_RETURN_IF_ERROR(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return false;
  if ((options_.register_weights || options_.producer_warpgroup || options_.x_cluster > 1) &&
      !internal::TensorMapsAvailable()) {
    return false;
  }
  return internal::GroupedMxfp4GemmWgmmaAvailable(options_.producer_warpgroup, options_.wide_tiles);
}

absl::Status GroupedExpertGemm::RunFused(std::span<const HostExpertWeights> stacked, std::span<const int64_t> offsets,
                                         int64_t total_out, float* y, cudaStream_t stream) {
  using internal::ExpertTile;
  const int64_t experts = stacked[0].experts;
  // Wide tiles need TMA; without a tensor-map encoder the weight-tile kernel serves (the same bits: the bench
  // compares them every run).
  const bool wide = options_.wide_tiles && internal::TensorMapsAvailable();
  // With wide tiles, experts that fit one weight tile (up to kExpertTileRows rows) still go to the weight-tile
  // kernel, in a second launch: it serves them faster (H200, the flash-layer bench's prefill of 8192 tokens, whose
  // random gate sends a third of the tiles under 65 rows: routed experts 9.47-9.52 vs 10.04 ms split, 6.62-6.68
  // vs 6.89-6.92 ms bf16; experts up to 64 rows only: 9.68 / 6.72 ms).
  // An expert's tiles: rows of up to kExpertWideTileRows on the wide kernel, kExpertTileRows on the weight-tile
  // kernel.
  auto on_wide = [&](int64_t rows) { return wide && rows > internal::kExpertTileRows; };
  auto tile_rows = [&](int64_t rows) {
    return on_wide(rows) ? internal::kExpertWideTileRows : internal::kExpertTileRows;
  };
  int64_t count = 0, wide_count = 0;
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t rows = offsets[e + 1] - offsets[e], n = (rows + tile_rows(rows) - 1) / tile_rows(rows);
    count += n;
    if (on_wide(rows)) wide_count += n;
  }
  // The previous upload must be out of the staging before it is rewritten (or freed).
  TANDEM_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(tiles_copied_));
  if (count > tiles_capacity_) {
    if (tiles_host_) TANDEM_CUDA_RETURN_IF_ERROR(cudaFreeHost(tiles_host_));
    tiles_host_ = nullptr;
    ExpertTile* device = static_cast<ExpertTile*>(tiles_device_);
    const absl::Status grown = Grow(&device, &tiles_capacity_, count);
    tiles_device_ = device;  // null after a failed Grow, which also left the capacity at 0
    TANDEM_RETURN_IF_ERROR(grown);
    const cudaError_t pinned = cudaMallocHost(&tiles_host_, static_cast<size_t>(count) * sizeof(ExpertTile));
    if (pinned != cudaSuccess) {
      tiles_host_ = nullptr;
      tiles_capacity_ = 0;
      TANDEM_CUDA_RETURN_IF_ERROR(pinned);
    }
  }
  // The wide kernel's tiles first, then the weight-tile kernel's.
  ExpertTile* tiles = static_cast<ExpertTile*>(tiles_host_);
  int64_t next_wide = 0, next_small = wide_count;
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t rows = offsets[e + 1] - offsets[e], step = tile_rows(rows);
    for (int64_t r = offsets[e]; r < offsets[e + 1]; r += step) {
      ExpertTile& tile = tiles[on_wide(rows) ? next_wide++ : next_small++];
      for (size_t p = 0; p < 2; ++p) {
        const HostExpertWeights& w = stacked[std::min(p, stacked.size() - 1)];
        tile.codes[p] = w.codes[e];
        tile.scales[p] = w.scales[e];
      }
      tile.row0 = r;
      tile.rows = static_cast<int32_t>(std::min<int64_t>(step, offsets[e + 1] - r));
    }
  }
  // Wide tiles: the largest tiles first, so that the last blocks to start are the shortest (each output is one
  // block's: the order changes no bits). H200, 8192 tokens: w2 1.90 vs 1.95-2.00 ms, w1/w3 3.53-3.55 vs 3.56-3.57.
  std::stable_sort(tiles, tiles + wide_count, [](const ExpertTile& l, const ExpertTile& r) { return l.rows > r.rows; });
  TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(tiles_device_, tiles_host_, static_cast<size_t>(count) * sizeof(ExpertTile),
                                              cudaMemcpyHostToDevice, stream));
  TANDEM_CUDA_RETURN_IF_ERROR(cudaEventRecord(tiles_copied_, stream));
  internal::GroupedMxfp4GemmArgs args;
  args.tiles = static_cast<const ExpertTile*>(tiles_device_);
  args.tile_count = count;
  args.x = x_bf16_;
  args.x_lo = options_.split_x ? x_lo_ : nullptr;
  args.y = y;
  args.in = stacked[0].in;
  args.total_out = total_out;
  args.out0 = stacked[0].out;
  args.probe = static_cast<internal::GemmProbe>(options_.timing_probe);
  args.x_cluster = options_.x_cluster;
  args.register_weights = options_.register_weights;
  args.producer_warpgroup = options_.producer_warpgroup;
  args.x_rows = offsets[experts];
  if (wide_count > 0) {
    args.wide_tiles = true;
    args.tile_count = wide_count;
    TANDEM_RETURN_IF_ERROR(internal::GroupedMxfp4GemmWgmma(args, stream));
  }
  if (count == wide_count) return absl::OkStatus();
  args.wide_tiles = false;
  args.tiles = static_cast<const ExpertTile*>(tiles_device_) + wide_count;
  args.tile_count = count - wide_count;
  return internal::GroupedMxfp4GemmWgmma(args, stream);
}

absl::Status GroupedExpertGemm::Enqueue(std::span<const HostExpertWeights> stacked, std::span<const int64_t> offsets,
                                        int64_t total_out, float* y) {
  const int64_t in = stacked[0].in;
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    const int64_t rows = offsets[e + 1] - offsets[e];
    if (rows == 0) continue;
    Lane& lane = lanes_[static_cast<size_t>(lane_of_[e])];
    int64_t row0 = 0;
    for (const HostExpertWeights& w : stacked) {
      __nv_bfloat16* dst = lane.weight + row0 * in;
      if (w.format == QuantizedWeight::Format::kMxfp4) {
        TANDEM_RETURN_IF_ERROR(DequantizeMxfp4(w.codes[e], w.scales[e], w.out, in, dst, lane.stream));
      } else {
        TANDEM_RETURN_IF_ERROR(DequantizeFp8Block({w.codes[e], w.scales[e], w.out, in}, dst, lane.stream));
      }
      row0 += w.out;
    }
    float* target = y + offsets[e] * total_out;
    const bool staged = !Aligned16(target);
    float* result = staged ? lane.staging : target;
    TANDEM_RETURN_IF_ERROR(lane.gemm->Linear(x_bf16_ + x_starts_[e], rows, in, lane.weight, total_out, result,
                                             Gemm::Output::kF32, lane.stream, /*tune=*/false));
    if (options_.split_x) {
      TANDEM_RETURN_IF_ERROR(lane.gemm->Linear(x_lo_ + x_starts_[e], rows, in, lane.weight, total_out, result,
                                               Gemm::Output::kF32, lane.stream, /*tune=*/false, /*accumulate=*/true));
    }
    if (staged) {
      TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(target, lane.staging, static_cast<size_t>(rows * total_out) * sizeof(float),
                                                  cudaMemcpyDeviceToDevice, lane.stream));
    }
  }
  return absl::OkStatus();
}

}  // namespace tandem::kernels::cuda
