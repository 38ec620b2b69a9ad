// UCX (UCP) transport: one context and worker per instance, regions allocated by UCX (so shared-memory
// transports can map them into the peer) or registered once with ucp_mem_map, their rkeys packed for the handshake, one endpoint per peer kept until Disconnect, ucp_put_nbx for data and
// an endpoint flush for remote completion. UCX_TLS (or UcxOptions::tls) picks tcp, shared memory or rc/ud.
// Host memory only: Debian's UCX 1.13 has no CUDA support.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "common/transfer/transport.h"

// Kept out of the header: UCX types stay inside ucx_transport.cc.
struct ucp_context;
struct ucp_worker;

namespace tandem::transfer {

struct UcxOptions {
  std::string tls;  // e.g. "tcp", "self,sm"; empty: UCX_TLS from the environment (or UCX's default)
  std::chrono::milliseconds put_timeout{30000};  // a put not remotely complete by then fails the peer
};

class UcxTransport final : public KvTransport {
 public:
  static absl::StatusOr<std::unique_ptr<UcxTransport>> Create(const UcxOptions& options = {});
  ~UcxTransport() override;
  std::string_view kind() const override { return "ucx"; }
  absl::StatusOr<std::string> LocalAddress() override;

 protected:
  absl::StatusOr<uint8_t*> DoAllocate(size_t size) override;
  absl::StatusOr<std::string> DoRegister(const MemoryRegion& region) override;
  absl::StatusOr<PeerId> DoConnect(std::string_view address, std::span<const RemoteRegion> remote) override;
  absl::Status DoDisconnect(PeerId peer) override;
  absl::Status DoPut(PeerId peer, std::span<const PutRun> runs) override;

 public:
  struct Peer;  // endpoint, unpacked rkeys, remote bases; defined in the .cc

 private:
  explicit UcxTransport(const UcxOptions& options);
  absl::Status Init();
  void Progress();  // the thread that drives incoming wireup and (for tcp) incoming puts
  void ClosePeerLocked(Peer& peer, bool force);

  const UcxOptions options_;
  ucp_context* context_ = nullptr;
  ucp_worker* worker_ = nullptr;
  int event_fd_ = -1;  // the worker's
  int stop_fd_ = -1;
  std::mutex worker_mutex_;  // the worker is SERIALIZED: one thread at a time
  struct Allocation {
    uint8_t* base = nullptr;
    size_t size = 0;
    void* handle = nullptr;  // ucp_mem_h; unmapping it frees the memory
  };
  std::vector<Allocation> allocations_;
  std::vector<void*> memory_handles_;  // registrations of memory UCX did not allocate
  std::map<PeerId, std::unique_ptr<Peer>> peers_;
  PeerId next_peer_ = 1;
  bool peer_errors_supported_ = true;
  std::atomic<bool> stop_{false};
  std::thread progress_thread_;
};

}  // namespace tandem::transfer
