// The PD hand-over through a host copy of the pools, for live pools the transport cannot ship from (device
// pools; Debian's UCX has no CUDA transport): the copier that moves segments between the two, in order.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <span>
#include <string>

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

// A peer process's device regions mapped into this one (CUDA IPC); destroying it unmaps them.
class DeviceMapping {
 public:
  virtual ~DeviceMapping() = default;
  virtual uint8_t* base(size_t region) const = 0;  // region i of the handles Open was given
};

// Device pools shared with another process of this host (--device cuda): decode exports its regions, prefill
// maps a decode's and copies device to device on a stream of its own (the links decide per peer;
// common/transfer/device_ipc.h). The CUDA calls live in cuda_backend.cc.
class DeviceIpc {
 public:
  virtual ~DeviceIpc() = default;
  virtual std::string location() const = 0;  // "GPU 0 (NVIDIA H200, 0000:1b:00.0)", for logs
  // The handle another process maps the allocation starting at `base` with (cudaIpcGetMemHandle).
  virtual absl::StatusOr<std::string> Export(void* base) = 0;
  // Maps each handle (cudaIpcOpenMemHandle); an error names the CUDA call and its error.
  virtual absl::StatusOr<std::unique_ptr<DeviceMapping>> Open(std::span<const std::string> handles) = 0;
  // Device-to-device copies in issue order (either side may be mapped memory); a fence says when they landed.
  virtual StagingCopier& copier() = 0;
  // Test hook: inverts the byte at device address `at` (a corrupted transfer).
  virtual absl::Status InvertByte(uint8_t* at) = 0;
};

// What MakeLinks gets when the live pools are not the ones the transport ships: those pools and the copier,
// and the device IPC of an engine whose pools are on the GPU (null otherwise, or when CUDA refused it).
struct StagedPools {
  cache::StatePools* live = nullptr;
  StagingCopier* copier = nullptr;
  DeviceIpc* ipc = nullptr;
};

}  // namespace tandem::engine
