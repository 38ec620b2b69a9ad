// CUDA and cuBLASLt return codes turned into absl::Status at the API boundary (host-only, internal to
// this folder and its tests): every call and every launch goes through one of these.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include "common/core/status.h"

namespace tandem::kernels::cuda {

inline absl::Status CudaStatus(cudaError_t err, const char* what, const char* file, int line) {
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("CUDA error ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ") in ",
                                          what, " at ", file, ":", line));
}

inline absl::Status CublasStatus(cublasStatus_t status, const char* what, const char* file, int line) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat("cuBLASLt error ", cublasLtGetStatusName(status), " in ", what, " at ", file, ":", line));
}

}  // namespace tandem::kernels::cuda

#define TANDEM_CUDA_RETURN_IF_ERROR(expr) \
  TANDEM_RETURN_IF_ERROR(::tandem::kernels::cuda::CudaStatus((expr), #expr, __FILE__, __LINE__))

// After a <<<...>>> launch: catches bad configurations at once (execution errors surface at the next sync).
#define TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED(name) \
  TANDEM_RETURN_IF_ERROR(::tandem::kernels::cuda::CudaStatus(cudaGetLastError(), "launch of " name, __FILE__, __LINE__))

#define TANDEM_CUBLAS_RETURN_IF_ERROR(expr) \
  TANDEM_RETURN_IF_ERROR(::tandem::kernels::cuda::CublasStatus((expr), #expr, __FILE__, __LINE__))
