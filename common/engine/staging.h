// The PD hand-over through a host copy of the pools, for live pools the transport cannot ship from (device
// pools; Debian's UCX has no CUDA transport): the copier that moves segments between the two, in order.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>

#include "common/cache/pools.h"
#include "common/core/status.h"

namespace tandem::engine {

// Blocks until the copies it stands for have landed; their error if one failed. Callable from any thread,
// more than once.
using StagingFence = std::function<absl::Status()>;

// Copies between the live pools and their host copy, asynchronously and in issue order (a CUDA stream of
// its own with --device cuda: DMA to and from page-locked memory).
class StagingCopier {
 public:
  virtual ~StagingCopier() = default;
  // Queues `bytes` from `src` to `dst` after every copy queued before; may return before it ran, so neither
  // side may be touched until a later fence was waited on.
  virtual absl::Status Enqueue(void* dst, const void* src, size_t bytes) = 0;
  // The copies queued so far.
  virtual absl::StatusOr<StagingFence> Fence() = 0;
};

// Host pools on both sides (--test-staged-pools on the CPU): the copies run, in order, only when a fence is
// waited on, so a wait the links forget shows up as a checksum failure in the CPU tests.
std::unique_ptr<StagingCopier> MakeDeferredHostCopier();

// What MakeLinks gets when the live pools are not the ones the transport ships: those pools and the copier.
struct StagedPools {
  cache::StatePools* live = nullptr;
  StagingCopier* copier = nullptr;
};

}  // namespace tandem::engine
