#include "common/transfer/loopback_transport.h"

#include <cstring>

#include "absl/strings/numbers.h"

namespace tandem::transfer {

struct LoopbackTransport::Shared {
  std::mutex mutex;
  bool alive = true;
  std::vector<MemoryRegion> regions;
};

namespace {
std::mutex registry_mutex;
std::map<uint64_t, std::weak_ptr<LoopbackTransport::Shared>>& Registry() {
  static auto* registry = new std::map<uint64_t, std::weak_ptr<LoopbackTransport::Shared>>();
  return *registry;
}
uint64_t next_instance = 1;
constexpr std::string_view kPrefix = "loopback:";
}  // namespace

LoopbackTransport::LoopbackTransport() : shared_(std::make_shared<Shared>()) {
  std::lock_guard lock(registry_mutex);
  id_ = next_instance++;
  Registry()[id_] = shared_;
}

LoopbackTransport::~LoopbackTransport() {
  {
    std::lock_guard lock(registry_mutex);
    Registry().erase(id_);
  }
  std::lock_guard lock(shared_->mutex);
  shared_->alive = false;
}

absl::StatusOr<std::string> LoopbackTransport::LocalAddress() { return absl::StrCat(std::string(kPrefix), id_); }

absl::StatusOr<std::string> LoopbackTransport::DoRegister(const MemoryRegion& region) {
  std::lock_guard lock(shared_->mutex);
  shared_->regions.push_back(region);
  return std::string();
}

absl::StatusOr<PeerId> LoopbackTransport::DoConnect(std::string_view address, std::span<const RemoteRegion> remote) {
  uint64_t instance = 0;
  const std::string text(address);
  if (!text.starts_with(kPrefix) || !absl::SimpleAtoi(text.substr(kPrefix.size()), &instance)) {
    return absl::InvalidArgumentError(absl::StrCat("loopback address '", std::string(address), "' is not loopback:<id>"));
  }
  std::shared_ptr<Shared> target;
  {
    std::lock_guard lock(registry_mutex);
    auto it = Registry().find(instance);
    if (it != Registry().end()) target = it->second.lock();
  }
  if (!target) return absl::UnavailableError(absl::StrCat("loopback peer ", instance, " does not exist in this process"));
  {
    std::lock_guard lock(target->mutex);
    if (remote.size() != target->regions.size()) {
      return absl::InvalidArgumentError(absl::StrCat("loopback peer ", instance, " has ", target->regions.size(),
                                                     " regions, descriptors name ", remote.size()));
    }
  }
  std::lock_guard lock(mutex_);
  const PeerId id = next_peer_++;
  peers_[id] = std::move(target);
  return id;
}

absl::Status LoopbackTransport::DoDisconnect(PeerId peer) {
  std::lock_guard lock(mutex_);
  peers_.erase(peer);
  return absl::OkStatus();
}

absl::Status LoopbackTransport::DoPut(PeerId peer, std::span<const PutRun> runs) {
  std::shared_ptr<Shared> target;
  {
    std::lock_guard lock(mutex_);
    auto it = peers_.find(peer);
    if (it == peers_.end()) return absl::NotFoundError(absl::StrCat("loopback peer ", peer, " is not connected"));
    target = it->second;
  }
  std::lock_guard lock(target->mutex);
  if (!target->alive) return absl::UnavailableError("loopback peer is gone");
  for (const PutRun& run : runs) {
    const MemoryRegion& region = target->regions[run.remote_region];
    std::memcpy(region.base + run.remote_offset, run.source, run.length);
  }
  return absl::OkStatus();
}

}  // namespace tandem::transfer
