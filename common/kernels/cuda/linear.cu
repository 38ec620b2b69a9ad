// Linear layers on the GPU: f32 -> bf16 activation casts, block-FP8 weight dequantization to bf16 (exact),
// and bf16 GEMMs through cuBLASLt with f32 accumulation and one cached plan per shape.
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <utility>

#include "common/kernels/cuda/check.h"
#include "common/kernels/cuda/cuda_ops.h"

namespace tandem::kernels::cuda {
namespace {

constexpr int64_t kFp8Block = 128;

__global__ void FloatToBf16Kernel(const float* x, int64_t count, __nv_bfloat16* y) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t vectors = count / 4;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < vectors; i += stride) {
    const float4 v = reinterpret_cast<const float4*>(x)[i];
    __nv_bfloat162* out = reinterpret_cast<__nv_bfloat162*>(y + 4 * i);
    out[0] = __floats2bfloat162_rn(v.x, v.y);
    out[1] = __floats2bfloat162_rn(v.z, v.w);
  }
  for (int64_t i = 4 * vectors + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    y[i] = __float2bfloat16_rn(x[i]);
  }
}

__global__ void FloatToBf16SplitKernel(const float* x, int64_t count, __nv_bfloat16* hi, __nv_bfloat16* lo) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    const float v = x[i];
    const __nv_bfloat16 h = __float2bfloat16_rn(v);
    hi[i] = h;
    lo[i] = __float2bfloat16_rn(v - __bfloat162float(h));  // exact difference: v and h share the exponent range
  }
}

__global__ void AddRowHalvesKernel(const float* halves, int64_t count, float* y) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    y[i] = halves[i] + halves[count + i];
  }
}

__device__ float Fp8ToFloat(uint8_t code) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(code), __NV_E4M3)));
}

// Each thread expands 8 consecutive codes of a row (in % 8 == 0, so they share one scale block).
__global__ void DequantizeFp8Kernel(const uint8_t* codes, const uint8_t* scales, int64_t out, int64_t in,
                                    __nv_bfloat16* dst) {
  const int64_t groups_per_row = in / 8;
  const int64_t block_cols = (in + kFp8Block - 1) / kFp8Block;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < out * groups_per_row; g += stride) {
    const int64_t row = g / groups_per_row, col = (g % groups_per_row) * 8;
    const float scale = ldexpf(1.0f, static_cast<int>(scales[(row / kFp8Block) * block_cols + col / kFp8Block]) - 127);
    const uint2 packed = *reinterpret_cast<const uint2*>(codes + row * in + col);
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&packed);
    __align__(16) __nv_bfloat16 values[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) values[i] = __float2bfloat16_rn(Fp8ToFloat(bytes[i]) * scale);
    *reinterpret_cast<uint4*>(dst + row * in + col) = *reinterpret_cast<const uint4*>(values);
  }
}

__global__ void DequantizeFp8ScalarKernel(const uint8_t* codes, const uint8_t* scales, int64_t out, int64_t in,
                                          __nv_bfloat16* dst) {
  const int64_t block_cols = (in + kFp8Block - 1) / kFp8Block;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < out * in; i += stride) {
    const int64_t row = i / in, col = i % in;
    const float scale = ldexpf(1.0f, static_cast<int>(scales[(row / kFp8Block) * block_cols + col / kFp8Block]) - 127);
    dst[i] = __float2bfloat16_rn(Fp8ToFloat(codes[i]) * scale);
  }
}

unsigned GridFor(int64_t work, int threads) {
  // A grid-stride loop past ~16 waves of 132 SMs gains nothing.
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, 132 * 16)));
}

bool Aligned(const void* p, uintptr_t bytes) { return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0; }

// The largest power of two (up to 256, cuBLASLt's default assumption) dividing every pointer's address.
uint32_t CommonAlignment(const void* x, const void* weight, const void* y) {
  const uintptr_t bits = reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(weight) |
                         reinterpret_cast<uintptr_t>(y) | uintptr_t{256};
  return static_cast<uint32_t>(bits & (~bits + 1));
}

}  // namespace

absl::Status FloatToBf16(const float* x, int64_t count, __nv_bfloat16* y, cudaStream_t stream) {
  if (count < 0) return absl::InvalidArgumentError("FloatToBf16: negative count");
  if (count == 0) return absl::OkStatus();
  if (!Aligned(x, 16) || !Aligned(y, 8)) return absl::InvalidArgumentError("FloatToBf16: x needs 16-byte, y 8-byte alignment");
  FloatToBf16Kernel<<<GridFor(count / 4 + 1, 256), 256, 0, stream>>>(x, count, y);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("FloatToBf16Kernel");
  return absl::OkStatus();
}

absl::Status FloatToBf16Split(const float* x, int64_t count, __nv_bfloat16* hi, __nv_bfloat16* lo, cudaStream_t stream) {
  if (count < 0) return absl::InvalidArgumentError("FloatToBf16Split: negative count");
  if (count == 0) return absl::OkStatus();
  if (!x || !hi || !lo) return absl::InvalidArgumentError("FloatToBf16Split: null pointer");
  FloatToBf16SplitKernel<<<GridFor(count, 256), 256, 0, stream>>>(x, count, hi, lo);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("FloatToBf16SplitKernel");
  return absl::OkStatus();
}

absl::Status AddRowHalves(const float* halves, int64_t rows, int64_t out, float* y, cudaStream_t stream) {
  if (rows < 0 || out <= 0) return absl::InvalidArgumentError("AddRowHalves: bad shape");
  if (rows == 0) return absl::OkStatus();
  if (!halves || !y) return absl::InvalidArgumentError("AddRowHalves: null pointer");
  AddRowHalvesKernel<<<GridFor(rows * out, 256), 256, 0, stream>>>(halves, rows * out, y);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("AddRowHalvesKernel");
  return absl::OkStatus();
}

absl::Status DequantizeFp8Block(const Fp8BlockWeight& weight, __nv_bfloat16* dst, cudaStream_t stream) {
  if (weight.out <= 0 || weight.in <= 0) return absl::InvalidArgumentError("DequantizeFp8Block: empty weight");
  if (weight.in % 8 == 0 && Aligned(weight.codes, 8) && Aligned(dst, 16)) {
    DequantizeFp8Kernel<<<GridFor(weight.out * weight.in / 8, 256), 256, 0, stream>>>(weight.codes, weight.scales,
                                                                                      weight.out, weight.in, dst);
    TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("DequantizeFp8Kernel");
  } else {
    DequantizeFp8ScalarKernel<<<GridFor(weight.out * weight.in, 256), 256, 0, stream>>>(weight.codes, weight.scales,
                                                                                        weight.out, weight.in, dst);
    TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("DequantizeFp8ScalarKernel");
  }
  return absl::OkStatus();
}

// ---- cuBLASLt ----
// Row-major y[rows, out] = x[rows, in] · w[out, in]^T is, in cuBLASLt's column-major terms,
// D[out, rows] = op(A)[out, in] · B[in, rows] with A = w viewed [in, out] (transposed) and B = x viewed [in, rows].
struct Gemm::Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool tuned = false;
  ~Plan() {
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

absl::StatusOr<std::unique_ptr<Gemm>> Gemm::Create(size_t workspace_bytes, bool tune) {
  std::unique_ptr<Gemm> gemm(new Gemm());
  gemm->tune_ = tune;
  TANDEM_CUBLAS_RETURN_IF_ERROR(cublasLtCreate(&gemm->handle_));
  if (workspace_bytes > 0) TANDEM_CUDA_RETURN_IF_ERROR(cudaMalloc(&gemm->workspace_, workspace_bytes));
  gemm->workspace_bytes_ = workspace_bytes;
  return gemm;
}

Gemm::~Gemm() {
  plans_.clear();
  if (workspace_) cudaFree(workspace_);
  if (handle_) cublasLtDestroy(handle_);
}

absl::StatusOr<const Gemm::Plan*> Gemm::PlanFor(bool f32_inputs, const void* x, int64_t rows, int64_t in,
                                                const void* weight, int64_t out, void* y, Output output,
                                                cudaStream_t stream, bool tune) {
  tune = tune && tune_;
  const uint32_t alignment = CommonAlignment(x, weight, y);
  const auto key = std::make_tuple(rows, in, out, static_cast<int>(output), f32_inputs, alignment);
  if (auto it = plans_.find(key); it != plans_.end() && (it->second->tuned || !tune)) return it->second.get();
  auto plan = std::make_unique<Plan>();
  const cudaDataType_t d_type = output == Output::kF32 ? CUDA_R_32F : CUDA_R_16BF;
  const cudaDataType_t in_type = f32_inputs ? CUDA_R_32F : CUDA_R_16BF;
  TANDEM_RETURN_IF_ERROR(Describe(plan.get()));
  TANDEM_CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&plan->a, in_type, in, out, in));
  TANDEM_CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&plan->b, in_type, in, rows, in));
  TANDEM_CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&plan->d, d_type, out, rows, out));
  TANDEM_RETURN_IF_ERROR(Select(plan.get(), alignment, x, weight, y, stream, tune,
                                absl::StrCat(f32_inputs ? "f32" : "bf16", " rows ", rows, ", in ", in, ", out ", out)));
  const Plan* raw = plan.get();
  plans_.insert_or_assign(key, std::move(plan));
  return raw;
}

absl::Status Gemm::Describe(Plan* plan) {
  TANDEM_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t transpose = CUBLAS_OP_T, keep = CUBLAS_OP_N;
  TANDEM_CUBLAS_RETURN_IF_ERROR(
      cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &transpose, sizeof(transpose)));
  TANDEM_CUBLAS_RETURN_IF_ERROR(
      cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &keep, sizeof(keep)));
  return absl::OkStatus();
}

absl::Status Gemm::Select(Plan* plan, uint32_t alignment, const void* x, const void* weight, void* y,
                          cudaStream_t stream, bool tune, const std::string& what) {
  cublasLtMatmulPreference_t preference = nullptr;
  TANDEM_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceCreate(&preference));
  constexpr int kCandidates = 8;
  cublasLtMatmulHeuristicResult_t results[kCandidates] = {};
  int found = 0;
  cublasStatus_t status = cublasLtMatmulPreferenceSetAttribute(
      preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes_, sizeof(workspace_bytes_));
  for (const cublasLtMatmulPreferenceAttributes_t attribute :
       {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES}) {
    if (status == CUBLAS_STATUS_SUCCESS) {
      status = cublasLtMatmulPreferenceSetAttribute(preference, attribute, &alignment, sizeof(alignment));
    }
  }
  if (status == CUBLAS_STATUS_SUCCESS) {
    status = cublasLtMatmulAlgoGetHeuristic(handle_, plan->desc, plan->a, plan->b, plan->d, plan->d, preference,
                                            kCandidates, results, &found);
  }
  cublasLtMatmulPreferenceDestroy(preference);
  TANDEM_RETURN_IF_ERROR(CublasStatus(status, "cublasLtMatmulAlgoGetHeuristic", __FILE__, __LINE__));
  if (found == 0) return absl::UnimplementedError(absl::StrCat("cuBLASLt has no algorithm for ", what));
  // The heuristic's first pick is often slow for skinny decode shapes: time the candidates once on the
  // caller's buffers (y is overwritten by the real call right after), unless the stream is being captured.
  int best = 0;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (tune) TANDEM_CUDA_RETURN_IF_ERROR(cudaStreamIsCapturing(stream, &capture));
  if (tune && found > 1 && capture == cudaStreamCaptureStatusNone) {
    cudaEvent_t start = nullptr, stop = nullptr;
    TANDEM_CUDA_RETURN_IF_ERROR(cudaEventCreate(&start));
    TANDEM_CUDA_RETURN_IF_ERROR(cudaEventCreate(&stop));
    const float alpha = 1.0f, beta = 0.0f;
    float best_ms = 0.0f;
    absl::Status timing = absl::OkStatus();
    for (int c = 0; c < found && timing.ok(); ++c) {
      float total = 0.0f;
      for (int rep = 0; rep < 4 && timing.ok(); ++rep) {
        timing.Update(CudaStatus(cudaEventRecord(start, stream), "cudaEventRecord", __FILE__, __LINE__));
        timing.Update(CublasStatus(cublasLtMatmul(handle_, plan->desc, &alpha, weight, plan->a, x, plan->b, &beta, y,
                                                  plan->d, y, plan->d, &results[c].algo, workspace_, workspace_bytes_,
                                                  stream),
                                   "cublasLtMatmul (tuning)", __FILE__, __LINE__));
        timing.Update(CudaStatus(cudaEventRecord(stop, stream), "cudaEventRecord", __FILE__, __LINE__));
        timing.Update(CudaStatus(cudaEventSynchronize(stop), "cudaEventSynchronize", __FILE__, __LINE__));
        float ms = 0.0f;
        timing.Update(CudaStatus(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime", __FILE__, __LINE__));
        if (rep > 0) total += ms;  // the first run of each candidate warms it up
      }
      if (timing.ok() && (c == 0 || total < best_ms)) {
        best_ms = total;
        best = c;
      }
    }
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    TANDEM_RETURN_IF_ERROR(timing);
  }
  plan->algo = results[best].algo;
  plan->tuned = tune && capture == cudaStreamCaptureStatusNone;  // captured: heuristic only, tune on a later call
  return absl::OkStatus();
}

absl::Status Gemm::LinearBatched(const __nv_bfloat16* x, int64_t rows, int64_t in, int64_t ldx, int64_t x_stride,
                                 const __nv_bfloat16* weight, int64_t out, int64_t w_stride, float* y, int64_t ldy,
                                 int64_t y_stride, int64_t batch, cudaStream_t stream) {
  if (rows < 0 || in <= 0 || out <= 0 || batch <= 0 || ldx < in || ldy < out) {
    return absl::InvalidArgumentError("Gemm::LinearBatched: bad shape");
  }
  if (rows == 0) return absl::OkStatus();
  // Every batch's pointers and row pitches must keep the alignment the algorithm is chosen for.
  uint32_t alignment = CommonAlignment(x, weight, y);
  for (const int64_t bytes : {2 * ldx, 2 * x_stride, 2 * w_stride, 4 * ldy, 4 * y_stride}) {
    const uint64_t b = static_cast<uint64_t>(bytes) | 256u;
    alignment = std::min<uint32_t>(alignment, static_cast<uint32_t>(b & (~b + 1)));
  }
  const auto key = std::make_tuple(rows, in, out, ldx, x_stride, w_stride, ldy, y_stride, batch, alignment);
  auto it = batched_plans_.find(key);
  if (it == batched_plans_.end()) {
    auto plan = std::make_unique<Plan>();
    TANDEM_RETURN_IF_ERROR(Describe(plan.get()));
    TANDEM_CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&plan->a, CUDA_R_16BF, in, out, in));
    TANDEM_CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&plan->b, CUDA_R_16BF, in, rows, ldx));
    TANDEM_CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&plan->d, CUDA_R_32F, out, rows, ldy));
    const int32_t count = static_cast<int32_t>(batch);
    const std::pair<cublasLtMatrixLayout_t, int64_t> strides[] = {{plan->a, w_stride}, {plan->b, x_stride}, {plan->d, y_stride}};
    for (const auto& [layout, stride] : strides) {
      TANDEM_CUBLAS_RETURN_IF_ERROR(
          cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)));
      TANDEM_CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                                                     &stride, sizeof(stride)));
    }
    TANDEM_RETURN_IF_ERROR(Select(plan.get(), alignment, x, weight, y, stream, tune_,
                                  absl::StrCat("batched bf16 ", batch, " x rows ", rows, ", in ", in, ", out ", out)));
    it = batched_plans_.emplace(key, std::move(plan)).first;
  }
  const Plan* plan = it->second.get();
  const float alpha = 1.0f, beta = 0.0f;
  TANDEM_CUBLAS_RETURN_IF_ERROR(cublasLtMatmul(handle_, plan->desc, &alpha, weight, plan->a, x, plan->b, &beta, y,
                                               plan->d, y, plan->d, &plan->algo, workspace_, workspace_bytes_, stream));
  return absl::OkStatus();
}

absl::Status Gemm::Linear(const __nv_bfloat16* x, int64_t rows, int64_t in, const __nv_bfloat16* weight, int64_t out,
                          void* y, Output output, cudaStream_t stream, bool tune, bool accumulate) {
  if (rows < 0 || in <= 0 || out <= 0) return absl::InvalidArgumentError("Gemm::Linear: bad shape");
  if (accumulate && output != Output::kF32) return absl::InvalidArgumentError("Gemm::Linear: accumulate needs f32 output");
  if (rows == 0) return absl::OkStatus();
  TANDEM_ASSIGN_OR_RETURN(const Plan* plan,
                          PlanFor(false, x, rows, in, weight, out, y, output, stream, tune && !accumulate));
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  TANDEM_CUBLAS_RETURN_IF_ERROR(cublasLtMatmul(handle_, plan->desc, &alpha, weight, plan->a, x, plan->b, &beta, y,
                                               plan->d, y, plan->d, &plan->algo, workspace_, workspace_bytes_, stream));
  return absl::OkStatus();
}

absl::Status Gemm::LinearSplit(const float* x, int64_t rows, int64_t in, const __nv_bfloat16* weight, int64_t out,
                               float* y, __nv_bfloat16* xb, float* yb, cudaStream_t stream) {
  if (rows < 0 || in <= 0 || out <= 0) return absl::InvalidArgumentError("Gemm::LinearSplit: bad shape");
  if (rows == 0) return absl::OkStatus();
  const bool stacked = rows <= kSplitStackRows;
  if (!xb || (stacked && !yb)) return absl::InvalidArgumentError("Gemm::LinearSplit: missing scratch");
  // Stacked, lo directly follows hi (one [2 * rows, in] operand); otherwise lo starts 256-byte aligned so
  // its GEMM finds the plan (keyed by alignment) the hi GEMM tuned.
  const int64_t count = rows * in;
  __nv_bfloat16* lo = stacked ? xb + count : xb + (count + 127) / 128 * 128;
  TANDEM_RETURN_IF_ERROR(FloatToBf16Split(x, count, xb, lo, stream));
  if (stacked) {
    TANDEM_RETURN_IF_ERROR(Linear(xb, 2 * rows, in, weight, out, yb, Output::kF32, stream));
    return AddRowHalves(yb, rows, out, y, stream);
  }
  TANDEM_RETURN_IF_ERROR(Linear(xb, rows, in, weight, out, y, Output::kF32, stream));
  return Linear(lo, rows, in, weight, out, y, Output::kF32, stream, /*tune=*/false, /*accumulate=*/true);
}

absl::Status Gemm::LinearF32(const float* x, int64_t rows, int64_t in, const float* weight, int64_t out, float* y,
                             cudaStream_t stream) {
  if (rows < 0 || in <= 0 || out <= 0) return absl::InvalidArgumentError("Gemm::LinearF32: bad shape");
  if (rows == 0) return absl::OkStatus();
  TANDEM_ASSIGN_OR_RETURN(const Plan* plan, PlanFor(true, x, rows, in, weight, out, y, Output::kF32, stream, true));
  const float alpha = 1.0f, beta = 0.0f;
  TANDEM_CUBLAS_RETURN_IF_ERROR(cublasLtMatmul(handle_, plan->desc, &alpha, weight, plan->a, x, plan->b, &beta, y,
                                               plan->d, y, plan->d, &plan->algo, workspace_, workspace_bytes_, stream));
  return absl::OkStatus();
}

}  // namespace tandem::kernels::cuda
