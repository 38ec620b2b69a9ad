// KV transport: moves byte segments between registered memory regions of two processes with one-sided puts.
// It knows nothing about the model; `UcxTransport` and `LoopbackTransport` implement it.
//
// Contract notes (differences from the first sketch, on purpose):
// * Small control messages do not travel on the transport: they travel on the bootstrap TCP connection that
//   also carries the heartbeats (common/transfer/control_loop.h), so a dead peer fails its messages and its
//   lease together. `Put` returns only once the bytes are visible at the destination (remote completion), so
//   a control message sent after `Put` can never overtake the data it describes.
// * `Put` is synchronous and thread-safe; transports serialise puts internally.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/core/status.h"

namespace tandem::transfer {

// A byte range this process registered once (a cache pool's whole memory, a bench buffer).
struct MemoryRegion {
  std::string name;
  uint8_t* base = nullptr;
  size_t size = 0;
};

// `length` bytes at `offset` inside region number `region` (the index RegisterRegion returned).
struct Segment {
  uint32_t region = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
  bool operator==(const Segment&) const = default;
};

// What a peer needs to address one of our regions: its name, base address, size and the transport's packed key.
struct RemoteRegion {
  std::string name;
  uint64_t base = 0;
  uint64_t size = 0;
  std::string key;  // packed rkey (UCX) or empty (loopback)
};

// One coalesced put: `length` bytes from `source` into `remote_region` at `remote_offset`.
struct PutRun {
  const uint8_t* source = nullptr;
  uint32_t remote_region = 0;
  uint64_t remote_offset = 0;
  uint64_t length = 0;
};

using PeerId = uint64_t;

struct TransportStats {
  uint64_t put_calls = 0;    // Put() calls that succeeded
  uint64_t puts_issued = 0;  // one-sided puts after coalescing
  uint64_t bytes_put = 0;
  uint64_t put_failures = 0;
};

// Checks that src[i] and dst[i] have equal lengths and that every segment lies inside its region; the error
// names the first bad segment. Empty lists are valid.
absl::Status CheckSegmentPair(std::span<const Segment> src, std::span<const Segment> dst);
absl::Status CheckSegmentsInside(std::span<const Segment> segments, std::span<const uint64_t> region_sizes,
                                 std::string_view side);
// Merges neighbours that are contiguous in the same region on both sides. Lengths must already match.
void CoalesceSegments(std::span<const Segment> src, std::span<const Segment> dst, std::vector<Segment>& src_out,
                      std::vector<Segment>& dst_out);

class KvTransport {
 public:
  virtual ~KvTransport() = default;
  KvTransport(const KvTransport&) = delete;
  KvTransport& operator=(const KvTransport&) = delete;

  virtual std::string_view kind() const = 0;  // "ucx" or "loopback": part of the handshake

  // `size` zero-filled bytes owned by the transport until it is destroyed, in memory its peers can reach
  // best: UCX allocates through its memory domains (ucp_mem_map with ALLOCATE), which its shared-memory
  // transports can map into the peer; plain heap memory they cannot, and puts into it fall back to slow
  // paths. Registering (part of) an allocation later reuses its registration.
  absl::StatusOr<uint8_t*> AllocateRegion(size_t size);

  // Registers a region once; returns its index (Segment::region). Regions stay registered for the
  // transport's lifetime.
  absl::StatusOr<uint32_t> RegisterRegion(const MemoryRegion& region);
  std::vector<MemoryRegion> regions() const;

  // This process's endpoint address (UCX worker address) and the descriptors of its regions.
  virtual absl::StatusOr<std::string> LocalAddress() = 0;
  std::vector<RemoteRegion> DescribeRegions() const;

  // Connects to a peer by its address blob and region descriptors; the peer is kept until Disconnect.
  absl::StatusOr<PeerId> Connect(std::string_view address, std::span<const RemoteRegion> remote_regions);
  absl::Status Disconnect(PeerId peer);

  // Writes src[i] (local regions) into dst[i] (the peer's regions) for every i and returns when all bytes
  // are visible at the peer. Runs contiguous on both sides become one put.
  absl::Status Put(PeerId peer, std::span<const Segment> src, std::span<const Segment> dst);

  TransportStats stats() const;

  // Test hook: the next `count` Put calls flip one byte in flight (the first byte of their first run lands
  // inverted). Also set from the environment: TANDEM_TRANSFER_CORRUPT_PUTS=N at construction.
  void CorruptNextPuts(uint64_t count) { corrupt_puts_.store(count); }
  // Takes one of those corruptions for bytes that bypass Put (device IPC copies): true if the caller must
  // corrupt what it moves.
  bool TakeCorruption();

 protected:
  KvTransport();
  // Default: zeroed heap memory kept in `heap_allocations_`.
  virtual absl::StatusOr<uint8_t*> DoAllocate(size_t size);
  virtual absl::StatusOr<std::string> DoRegister(const MemoryRegion& region) = 0;  // returns the packed key
  virtual absl::StatusOr<PeerId> DoConnect(std::string_view address, std::span<const RemoteRegion> remote) = 0;
  virtual absl::Status DoDisconnect(PeerId peer) = 0;
  // Issues every run and waits for remote completion.
  virtual absl::Status DoPut(PeerId peer, std::span<const PutRun> runs) = 0;

 private:
  struct PeerRegions {
    PeerId id = 0;
    std::vector<uint64_t> sizes;
  };
  mutable std::mutex mutex_;
  std::vector<MemoryRegion> regions_;
  std::vector<std::string> keys_;
  std::vector<PeerRegions> peers_;
  std::vector<std::unique_ptr<uint8_t[]>> heap_allocations_;
  std::atomic<uint64_t> corrupt_puts_{0};
  std::atomic<uint64_t> put_calls_{0}, puts_issued_{0}, bytes_put_{0}, put_failures_{0};
};

}  // namespace tandem::transfer
