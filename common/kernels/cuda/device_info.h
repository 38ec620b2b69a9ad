// Per-device facts the launchers ask for on every call, queried once and kept (internal to this folder):
// a kernel's shared-memory opt-in and limit, and its resident blocks per SM for a block shape. The runtime
// computes these afresh on each query (microseconds of host time per launch); the answers never change
// for a (device, kernel, shape) within a process. Thread-safe. Not valid across cudaDeviceReset (it drops the
// shared-memory opt-in while the cache still says set): nothing in this project resets a device.
#pragma once

#include <cstddef>

#include "common/core/status.h"

namespace tandem::kernels::cuda::internal {

// Lets `kernel` use up to the current device's opt-in maximum of dynamic shared memory (set once per device
// and kernel, always to the same value, so concurrent callers never race each other into a smaller limit) and
// checks that `bytes` fits: InvalidArgument naming `name` otherwise.
absl::Status AllowSharedMemoryFor(const void* kernel, size_t bytes, const char* name);

// cudaOccupancyMaxActiveBlocksPerMultiprocessor on the current device, remembered per (device, kernel,
// threads, shared).
absl::StatusOr<int> BlocksPerSm(const void* kernel, int threads, size_t shared);

// The current device's compute capability (major * 10 + minor) and opt-in shared memory per block, remembered
// per device.
struct DeviceLimits {
  int compute_capability = 0;
  size_t shared_optin = 0;
};
absl::StatusOr<DeviceLimits> CurrentDeviceLimits();

}  // namespace tandem::kernels::cuda::internal
