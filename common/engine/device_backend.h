// The GPU side of an engine (--device cuda): the device forward as a ForwardRunner, and the cache pools'
// memory in device memory (allocated zeroed, written through cudaMemcpy). Built from cuda_backend.cc
// when the build has CUDA; otherwise MakeCudaBackend says so.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "common/cache/pools.h"
#include "common/core/status.h"
#include "common/model/forward.h"

namespace tandem::engine {

struct DeviceBackend {
  std::unique_ptr<model::ForwardRunner> runner;
  cache::RegionAllocator allocator;   // pool regions on the device
  cache::RegionCopy copy;             // how the pools write them
  std::shared_ptr<void> memory;       // owns the regions: keep it alive longer than the pools
  int64_t device_memory_bytes = 0;    // the device's total memory (for --mem-fraction-static)
  int64_t weight_bytes = 0;           // weights resident on the device
  std::string device_name;
};

// Uploads `weights` to CUDA device `device` (dense layers as bf16, or f32 with dense_f32) and prepares
// its pool memory.
absl::StatusOr<DeviceBackend> MakeCudaBackend(std::shared_ptr<const model::ModelWeights> weights, int device,
                                              bool dense_f32);

}  // namespace tandem::engine
