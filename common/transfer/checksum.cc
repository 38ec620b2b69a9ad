#include "common/transfer/checksum.h"

#include <cstring>
#include <vector>

namespace tandem::transfer {
namespace {
constexpr uint64_t kLaneMultiplier = 0xd6e8feb86659fd93ULL;  // odd, so the multiply is invertible
constexpr uint64_t kFoldMultiplier = 0x9fb21c651e98df25ULL;

inline uint64_t Load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;  // little-endian hosts only (x86-64, aarch64): both ends of a transfer agree
}
inline uint64_t Step(uint64_t lane, uint64_t word) {
  lane ^= word;
  lane *= kLaneMultiplier;
  return lane ^ (lane >> 29);  // xorshift by < 64 is invertible too
}
inline uint64_t Avalanche(uint64_t h) {
  h ^= h >> 32;
  h *= kFoldMultiplier;
  h ^= h >> 29;
  h *= kLaneMultiplier;
  return h ^ (h >> 32);
}
}  // namespace

void Checksum64::Block(const uint8_t* block) {
  lanes_[0] = Step(lanes_[0], Load64(block));
  lanes_[1] = Step(lanes_[1], Load64(block + 8));
  lanes_[2] = Step(lanes_[2], Load64(block + 16));
  lanes_[3] = Step(lanes_[3], Load64(block + 24));
}

void Checksum64::Update(const uint8_t* data, size_t length) {
  total_ += length;
  if (pending_size_ > 0) {
    const size_t take = std::min(length, sizeof(pending_) - pending_size_);
    std::memcpy(pending_ + pending_size_, data, take);
    pending_size_ += take;
    data += take;
    length -= take;
    if (pending_size_ < sizeof(pending_)) return;
    Block(pending_);
    pending_size_ = 0;
  }
  while (length >= 32) {
    Block(data);
    data += 32;
    length -= 32;
  }
  if (length > 0) {
    std::memcpy(pending_, data, length);
    pending_size_ = length;
  }
}

uint64_t Checksum64::Finish() const {
  uint64_t lanes[4] = {lanes_[0], lanes_[1], lanes_[2], lanes_[3]};
  if (pending_size_ > 0) {
    uint8_t last[32] = {};
    std::memcpy(last, pending_, pending_size_);
    for (int i = 0; i < 4; ++i) lanes[i] = Step(lanes[i], Load64(last + 8 * i));
  }
  uint64_t h = total_ * kFoldMultiplier;
  for (uint64_t lane : lanes) h = (h ^ Avalanche(lane)) * kLaneMultiplier + 0x632be59bd9b4e019ULL;
  return Avalanche(h);
}

uint64_t ChecksumBytes(const uint8_t* data, size_t length) {
  Checksum64 c;
  c.Update(data, length);
  return c.Finish();
}

absl::StatusOr<uint64_t> ChecksumSegments(std::span<const MemoryRegion> regions, std::span<const Segment> segments) {
  std::vector<uint64_t> sizes;
  for (const MemoryRegion& r : regions) sizes.push_back(r.size);
  TANDEM_RETURN_IF_ERROR(CheckSegmentsInside(segments, sizes, "checksum"));
  Checksum64 c;
  for (const Segment& s : segments) c.Update(regions[s.region].base + s.offset, s.length);
  return c.Finish();
}

}  // namespace tandem::transfer
