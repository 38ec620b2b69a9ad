// A fast 64-bit checksum over the bytes of a segment list, in order: catches corrupted or missing KV bytes.
// Not cryptographic. Each 8-byte word goes through an invertible per-lane step, so any change to one word is
// always detected; the final mix folds the four lanes and the length.
#pragma once

#include <cstdint>
#include <span>

#include "common/core/status.h"
#include "common/transfer/transport.h"

namespace tandem::transfer {

class Checksum64 {
 public:
  void Update(const uint8_t* data, size_t length);
  uint64_t Finish() const;  // does not reset; more Update calls continue the same stream

 private:
  void Block(const uint8_t* block);
  uint64_t lanes_[4] = {0x243f6a8885a308d3ULL, 0x13198a2e03707344ULL, 0xa4093822299f31d0ULL, 0x082efa98ec4e6c89ULL};
  uint8_t pending_[32] = {};
  size_t pending_size_ = 0;
  uint64_t total_ = 0;
};

uint64_t ChecksumBytes(const uint8_t* data, size_t length);
// The checksum of the concatenation of the segments' bytes; the segments must lie inside `regions`.
absl::StatusOr<uint64_t> ChecksumSegments(std::span<const MemoryRegion> regions, std::span<const Segment> segments);

}  // namespace tandem::transfer
