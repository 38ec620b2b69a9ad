// Cached per-device launch facts (device_info.h).
#include "common/kernels/cuda/device_info.h"

#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <tuple>

#include "common/kernels/cuda/check.h"

namespace tandem::kernels::cuda::internal {
namespace {

std::mutex& Mutex() {
  static std::mutex mutex;
  return mutex;
}

}  // namespace

absl::Status AllowSharedMemoryFor(const void* kernel, size_t bytes, const char* name) {
  // No shortcut below 48 KB of dynamic memory: the kernel's static arrays count against the same default
  // limit (48 KB dynamic + 2 KB static fails to launch without the opt-in).
  int device = 0;
  TANDEM_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  static std::map<std::pair<int, const void*>, size_t> limits;  // guarded by Mutex()
  size_t limit = 0;
  {
    std::lock_guard<std::mutex> lock(Mutex());
    auto found = limits.find({device, kernel});
    if (found != limits.end()) limit = found->second;
  }
  if (limit == 0) {
    TANDEM_ASSIGN_OR_RETURN(const DeviceLimits device_limits, CurrentDeviceLimits());
    cudaFuncAttributes attributes{};
    TANDEM_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attributes, kernel));
    limit = device_limits.shared_optin - attributes.sharedSizeBytes;
    TANDEM_CUDA_RETURN_IF_ERROR(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(limit)));
    std::lock_guard<std::mutex> lock(Mutex());
    limits[{device, kernel}] = limit;
  }
  if (bytes > limit) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": needs ", bytes, " bytes of shared memory, the device allows ",
                                                   limit));
  }
  return absl::OkStatus();
}

absl::StatusOr<int> BlocksPerSm(const void* kernel, int threads, size_t shared) {
  int device = 0;
  TANDEM_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  static std::map<std::tuple<int, const void*, int, size_t>, int> known;  // guarded by Mutex()
  const auto key = std::make_tuple(device, kernel, threads, shared);
  {
    std::lock_guard<std::mutex> lock(Mutex());
    auto found = known.find(key);
    if (found != known.end()) return found->second;
  }
  int per_sm = 0;
  TANDEM_CUDA_RETURN_IF_ERROR(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, shared));
  std::lock_guard<std::mutex> lock(Mutex());
  known[key] = per_sm;
  return per_sm;
}

absl::StatusOr<DeviceLimits> CurrentDeviceLimits() {
  int device = 0;
  TANDEM_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  static std::map<int, DeviceLimits> known;  // guarded by Mutex()
  {
    std::lock_guard<std::mutex> lock(Mutex());
    auto found = known.find(device);
    if (found != known.end()) return found->second;
  }
  int major = 0, minor = 0, optin = 0;
  TANDEM_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  TANDEM_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  TANDEM_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const DeviceLimits limits{10 * major + minor, static_cast<size_t>(optin)};
  std::lock_guard<std::mutex> lock(Mutex());
  known[device] = limits;
  return limits;
}

}  // namespace tandem::kernels::cuda::internal
