#include "common/transfer/transport.h"

#include <cstdlib>

#include "absl/strings/numbers.h"

namespace tandem::transfer {

absl::Status CheckSegmentPair(std::span<const Segment> src, std::span<const Segment> dst) {
  if (src.size() != dst.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("segment lists differ in count: source ", src.size(), ", destination ", dst.size()));
  }
  for (size_t i = 0; i < src.size(); ++i) {
    if (src[i].length != dst[i].length) {
      return absl::InvalidArgumentError(absl::StrCat("segment ", i, ": source length ", src[i].length,
                                                     " != destination length ", dst[i].length));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckSegmentsInside(std::span<const Segment> segments, std::span<const uint64_t> region_sizes,
                                 std::string_view side) {
  for (size_t i = 0; i < segments.size(); ++i) {
    const Segment& s = segments[i];
    if (s.region >= region_sizes.size()) {
      return absl::InvalidArgumentError(absl::StrCat(std::string(side), " segment ", i, ": region ", s.region, " not registered (",
                                                     region_sizes.size(), " regions)"));
    }
    const uint64_t size = region_sizes[s.region];
    if (s.offset > size || s.length > size - s.offset) {
      return absl::InvalidArgumentError(absl::StrCat(std::string(side), " segment ", i, ": [", s.offset, ", +", s.length,
                                                     ") outside region ", s.region, " of ", size, " bytes"));
    }
  }
  return absl::OkStatus();
}

void CoalesceSegments(std::span<const Segment> src, std::span<const Segment> dst, std::vector<Segment>& src_out,
                      std::vector<Segment>& dst_out) {
  src_out.clear();
  dst_out.clear();
  for (size_t i = 0; i < src.size(); ++i) {
    if (src[i].length == 0) continue;
    if (!src_out.empty()) {
      Segment& s = src_out.back();
      Segment& d = dst_out.back();
      if (s.region == src[i].region && d.region == dst[i].region && s.offset + s.length == src[i].offset &&
          d.offset + d.length == dst[i].offset) {
        s.length += src[i].length;
        d.length += dst[i].length;
        continue;
      }
    }
    src_out.push_back(src[i]);
    dst_out.push_back(dst[i]);
  }
}

KvTransport::KvTransport() {
  if (const char* env = std::getenv("TANDEM_TRANSFER_CORRUPT_PUTS")) {
    uint64_t count = 0;
    if (absl::SimpleAtoi(env, &count)) corrupt_puts_.store(count);
  }
}

absl::StatusOr<uint8_t*> KvTransport::AllocateRegion(size_t size) {
  if (size == 0) return absl::InvalidArgumentError("transport: cannot allocate an empty region");
  return DoAllocate(size);
}

absl::StatusOr<uint8_t*> KvTransport::DoAllocate(size_t size) {
  auto bytes = std::make_unique<uint8_t[]>(size);  // zeroed
  uint8_t* base = bytes.get();
  std::lock_guard lock(mutex_);
  heap_allocations_.push_back(std::move(bytes));
  return base;
}

absl::StatusOr<uint32_t> KvTransport::RegisterRegion(const MemoryRegion& region) {
  if (region.base == nullptr || region.size == 0) {
    return absl::InvalidArgumentError(absl::StrCat("region '", region.name, "': empty or null memory"));
  }
  std::lock_guard lock(mutex_);
  for (const MemoryRegion& r : regions_) {
    if (r.name == region.name) return absl::AlreadyExistsError(absl::StrCat("region '", region.name, "' already registered"));
  }
  TANDEM_ASSIGN_OR_RETURN(std::string key, DoRegister(region));
  regions_.push_back(region);
  keys_.push_back(std::move(key));
  return static_cast<uint32_t>(regions_.size() - 1);
}

std::vector<MemoryRegion> KvTransport::regions() const {
  std::lock_guard lock(mutex_);
  return regions_;
}

std::vector<RemoteRegion> KvTransport::DescribeRegions() const {
  std::lock_guard lock(mutex_);
  std::vector<RemoteRegion> out;
  for (size_t i = 0; i < regions_.size(); ++i) {
    out.push_back({regions_[i].name, reinterpret_cast<uint64_t>(regions_[i].base), regions_[i].size, keys_[i]});
  }
  return out;
}

absl::StatusOr<PeerId> KvTransport::Connect(std::string_view address, std::span<const RemoteRegion> remote_regions) {
  TANDEM_ASSIGN_OR_RETURN(PeerId id, DoConnect(address, remote_regions));
  PeerRegions peer{id, {}};
  for (const RemoteRegion& r : remote_regions) peer.sizes.push_back(r.size);
  std::lock_guard lock(mutex_);
  peers_.push_back(std::move(peer));
  return id;
}

absl::Status KvTransport::Disconnect(PeerId peer) {
  {
    std::lock_guard lock(mutex_);
    std::erase_if(peers_, [&](const PeerRegions& p) { return p.id == peer; });
  }
  return DoDisconnect(peer);
}

absl::Status KvTransport::Put(PeerId peer, std::span<const Segment> src, std::span<const Segment> dst) {
  absl::Status status = CheckSegmentPair(src, dst);
  std::vector<PutRun> runs;
  if (status.ok()) {
    std::vector<uint64_t> local_sizes, remote_sizes;
    std::vector<uint8_t*> local_bases;
    {
      std::lock_guard lock(mutex_);
      for (const MemoryRegion& r : regions_) {
        local_sizes.push_back(r.size);
        local_bases.push_back(r.base);
      }
      for (const PeerRegions& p : peers_) {
        if (p.id == peer) remote_sizes = p.sizes;
      }
      bool known = false;
      for (const PeerRegions& p : peers_) known = known || p.id == peer;
      if (!known) status = absl::NotFoundError(absl::StrCat("transport peer ", peer, " is not connected"));
    }
    if (status.ok()) status = CheckSegmentsInside(src, local_sizes, "source");
    if (status.ok()) status = CheckSegmentsInside(dst, remote_sizes, "destination");
    if (status.ok()) {
      std::vector<Segment> s, d;
      CoalesceSegments(src, dst, s, d);
      runs.reserve(s.size());
      for (size_t i = 0; i < s.size(); ++i) {
        runs.push_back({local_bases[s[i].region] + s[i].offset, d[i].region, d[i].offset, s[i].length});
      }
    }
  }
  if (status.ok() && !runs.empty()) status = DoPut(peer, runs);
  uint64_t corrupt = corrupt_puts_.load();
  if (status.ok() && !runs.empty() && corrupt > 0 && corrupt_puts_.compare_exchange_strong(corrupt, corrupt - 1)) {
    // The byte lands inverted, as if flipped on the wire.
    const uint8_t flipped = static_cast<uint8_t>(~runs[0].source[0]);
    PutRun bad{&flipped, runs[0].remote_region, runs[0].remote_offset, 1};
    status = DoPut(peer, std::span<const PutRun>(&bad, 1));
  }
  if (!status.ok()) {
    put_failures_.fetch_add(1);
    return status;
  }
  put_calls_.fetch_add(1);
  puts_issued_.fetch_add(runs.size());
  for (const PutRun& r : runs) bytes_put_.fetch_add(r.length);
  return absl::OkStatus();
}

bool KvTransport::TakeCorruption() {
  uint64_t corrupt = corrupt_puts_.load();
  while (corrupt > 0) {
    if (corrupt_puts_.compare_exchange_weak(corrupt, corrupt - 1)) return true;
  }
  return false;
}

TransportStats KvTransport::stats() const {
  return {put_calls_.load(), puts_issued_.load(), bytes_put_.load(), put_failures_.load()};
}

}  // namespace tandem::transfer
