// In-process transport: puts are memcpy between two LoopbackTransport instances of one process. For tests of
// the room protocol and the engine above it, without UCX.
#pragma once

#include <map>
#include <memory>
#include <mutex>

#include "common/transfer/transport.h"

namespace tandem::transfer {

class LoopbackTransport final : public KvTransport {
 public:
  LoopbackTransport();
  ~LoopbackTransport() override;
  std::string_view kind() const override { return "loopback"; }
  absl::StatusOr<std::string> LocalAddress() override;

 protected:
  absl::StatusOr<std::string> DoRegister(const MemoryRegion& region) override;
  absl::StatusOr<PeerId> DoConnect(std::string_view address, std::span<const RemoteRegion> remote) override;
  absl::Status DoDisconnect(PeerId peer) override;
  absl::Status DoPut(PeerId peer, std::span<const PutRun> runs) override;

 public:
  struct Shared;  // the instance's regions, shared with the peers that hold it

 private:
  std::shared_ptr<Shared> shared_;
  uint64_t id_ = 0;
  std::mutex mutex_;
  std::map<PeerId, std::shared_ptr<Shared>> peers_;
  PeerId next_peer_ = 1;
};

}  // namespace tandem::transfer
