#include "common/transfer/ucx_transport.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <ucp/api/ucp.h>

#include <cstring>
#include <vector>

#include "common/transfer/socket.h"

namespace tandem::transfer {
namespace {

absl::Status UcxError(std::string_view what, ucs_status_t status) {
  return absl::UnavailableError(absl::StrCat("ucx: ", std::string(what), ": ", ucs_status_string(status)));
}

}  // namespace

struct UcxTransport::Peer {
  ucp_ep_h endpoint = nullptr;
  std::vector<ucp_rkey_h> rkeys;
  std::vector<uint64_t> bases;
  std::atomic<bool> failed{false};
  ucs_status_t failure = UCS_OK;
};

absl::StatusOr<std::unique_ptr<UcxTransport>> UcxTransport::Create(const UcxOptions& options) {
  std::unique_ptr<UcxTransport> transport(new UcxTransport(options));
  TANDEM_RETURN_IF_ERROR(transport->Init());
  return transport;
}

UcxTransport::UcxTransport(const UcxOptions& options) : options_(options) {}

absl::Status UcxTransport::Init() {
  ucp_config_t* config = nullptr;
  ucs_status_t status = ucp_config_read(nullptr, nullptr, &config);
  if (status != UCS_OK) return UcxError("config_read", status);
  if (!options_.tls.empty()) {
    status = ucp_config_modify(config, "TLS", options_.tls.c_str());
    if (status != UCS_OK) {
      ucp_config_release(config);
      return absl::InvalidArgumentError(absl::StrCat("ucx: TLS '", options_.tls, "': ", ucs_status_string(status)));
    }
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_RMA | UCP_FEATURE_WAKEUP;
  status = ucp_init(&params, config, &context_);
  ucp_config_release(config);
  if (status != UCS_OK) return UcxError("init", status);
  ucp_worker_params_t worker_params{};
  worker_params.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  worker_params.thread_mode = UCS_THREAD_MODE_SERIALIZED;
  status = ucp_worker_create(context_, &worker_params, &worker_);
  if (status != UCS_OK) return UcxError("worker_create", status);
  if (ucp_worker_get_efd(worker_, &event_fd_) != UCS_OK) event_fd_ = -1;
  stop_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  progress_thread_ = std::thread([this] { Progress(); });
  return absl::OkStatus();
}

UcxTransport::~UcxTransport() {
  stop_.store(true);
  if (stop_fd_ >= 0) {
    const uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(stop_fd_, &one, sizeof(one));
  }
  if (progress_thread_.joinable()) progress_thread_.join();
  if (worker_ != nullptr) {
    std::lock_guard lock(worker_mutex_);
    for (auto& [id, peer] : peers_) ClosePeerLocked(*peer, /*force=*/true);
    peers_.clear();
    for (void* handle : memory_handles_) ucp_mem_unmap(context_, static_cast<ucp_mem_h>(handle));
    for (const Allocation& allocation : allocations_) ucp_mem_unmap(context_, static_cast<ucp_mem_h>(allocation.handle));
    ucp_worker_destroy(worker_);
  }
  if (context_ != nullptr) ucp_cleanup(context_);
  if (stop_fd_ >= 0) ::close(stop_fd_);
}

void UcxTransport::Progress() {
  while (!stop_.load()) {
    ucs_status_t armed = UCS_ERR_UNSUPPORTED;
    {
      std::lock_guard lock(worker_mutex_);
      while (ucp_worker_progress(worker_) != 0) {
      }
      if (event_fd_ >= 0) armed = ucp_worker_arm(worker_);
    }
    if (armed == UCS_ERR_BUSY) continue;
    if (armed == UCS_OK) {
      pollfd fds[2] = {{event_fd_, POLLIN, 0}, {stop_fd_, POLLIN, 0}};
      ::poll(fds, 2, 100);
    } else {
      pollfd fd{stop_fd_, POLLIN, 0};
      ::poll(&fd, 1, 1);  // no wakeup support on these transports: poll the worker every millisecond
    }
  }
}

absl::StatusOr<std::string> UcxTransport::LocalAddress() {
  std::lock_guard lock(worker_mutex_);
  ucp_address_t* address = nullptr;
  size_t length = 0;
  const ucs_status_t status = ucp_worker_get_address(worker_, &address, &length);
  if (status != UCS_OK) return UcxError("worker_get_address", status);
  std::string blob(reinterpret_cast<const char*>(address), length);
  ucp_worker_release_address(worker_, address);
  return blob;
}

absl::StatusOr<uint8_t*> UcxTransport::DoAllocate(size_t size) {
  std::lock_guard lock(worker_mutex_);
  // UCX picks the method by UCX_ALLOC_PRIO (by default sysv, then posix shared memory, then huge pages, mmap,
  // heap) and registers the result on every memory domain, so the rkey also covers the mm transports.
  ucp_mem_map_params_t params{};
  params.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH | UCP_MEM_MAP_PARAM_FIELD_FLAGS;
  params.address = nullptr;
  params.length = size;
  params.flags = UCP_MEM_MAP_ALLOCATE;
  ucp_mem_h handle = nullptr;
  const ucs_status_t status = ucp_mem_map(context_, &params, &handle);
  if (status != UCS_OK) return UcxError(absl::StrCat("mem_map(ALLOCATE) of ", size, " bytes"), status);
  ucp_mem_attr_t attr{};
  attr.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS | UCP_MEM_ATTR_FIELD_LENGTH;
  if (ucp_mem_query(handle, &attr) != UCS_OK || attr.address == nullptr || attr.length < size) {
    ucp_mem_unmap(context_, handle);
    return absl::InternalError(absl::StrCat("ucx: mem_map(ALLOCATE) of ", size, " bytes gave no usable memory"));
  }
  auto* base = static_cast<uint8_t*>(attr.address);
  std::memset(base, 0, size);  // shared memory and mmap come zeroed, the heap fallback does not
  allocations_.push_back({base, size, handle});
  return base;
}

absl::StatusOr<std::string> UcxTransport::DoRegister(const MemoryRegion& region) {
  std::lock_guard lock(worker_mutex_);
  ucp_mem_h handle = nullptr;
  for (const Allocation& allocation : allocations_) {
    if (region.base >= allocation.base && region.size <= allocation.size &&
        static_cast<size_t>(region.base - allocation.base) <= allocation.size - region.size) {
      handle = static_cast<ucp_mem_h>(allocation.handle);
    }
  }
  const bool owned = handle != nullptr;
  if (!owned) {
    ucp_mem_map_params_t params{};
    params.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
    params.address = region.base;
    params.length = region.size;
    const ucs_status_t status = ucp_mem_map(context_, &params, &handle);
    if (status != UCS_OK) return UcxError(absl::StrCat("mem_map of region '", region.name, "'"), status);
  }
  void* packed = nullptr;
  size_t packed_size = 0;
  const ucs_status_t status = ucp_rkey_pack(context_, handle, &packed, &packed_size);
  if (status != UCS_OK) {
    if (!owned) ucp_mem_unmap(context_, handle);
    return UcxError(absl::StrCat("rkey_pack of region '", region.name, "'"), status);
  }
  std::string key(static_cast<const char*>(packed), packed_size);
  ucp_rkey_buffer_release(packed);
  if (!owned) memory_handles_.push_back(handle);
  return key;
}

absl::StatusOr<PeerId> UcxTransport::DoConnect(std::string_view address, std::span<const RemoteRegion> remote) {
  if (address.empty()) return absl::InvalidArgumentError("ucx: empty peer worker address");
  const std::string blob(address);  // UCX reads the address in place; keep an aligned private copy
  auto peer = std::make_unique<Peer>();
  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
  params.address = reinterpret_cast<const ucp_address_t*>(blob.data());
  params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  params.err_handler.cb = [](void* arg, ucp_ep_h, ucs_status_t status) {
    auto* p = static_cast<Peer*>(arg);
    p->failure = status;
    p->failed.store(true);
  };
  params.err_handler.arg = peer.get();
  std::lock_guard lock(worker_mutex_);
  if (!peer_errors_supported_) params.err_mode = UCP_ERR_HANDLING_MODE_NONE;
  ucs_status_t status = ucp_ep_create(worker_, &params, &peer->endpoint);
  if (status == UCS_ERR_UNREACHABLE && peer_errors_supported_) {
    peer_errors_supported_ = false;  // UCX logs the refusal once; later peers go straight to NONE
    // UCX 1.13's shared-memory transports cannot report peer failure; without it a dead peer is only
    // noticed by the control connection (its lease), not by the endpoint.
    params.err_mode = UCP_ERR_HANDLING_MODE_NONE;
    status = ucp_ep_create(worker_, &params, &peer->endpoint);
  }
  if (status != UCS_OK) return UcxError("ep_create", status);
  for (const RemoteRegion& region : remote) {
    ucp_rkey_h rkey = nullptr;
    status = ucp_ep_rkey_unpack(peer->endpoint, region.key.data(), &rkey);
    if (status != UCS_OK) {
      ClosePeerLocked(*peer, /*force=*/true);
      return UcxError(absl::StrCat("rkey_unpack of peer region '", region.name, "'"), status);
    }
    peer->rkeys.push_back(rkey);
    peer->bases.push_back(region.base);
  }
  // Finish wireup now (a flush needs the peer's reply), so no wireup message is in flight when the endpoint
  // or either worker goes away later: UCX 1.13 asserts on a late wireup reply.
  ucp_request_param_t flush_params{};
  void* flush = ucp_ep_flush_nbx(peer->endpoint, &flush_params);
  if (flush != nullptr && !UCS_PTR_IS_ERR(flush)) {
    const auto deadline = Clock::now() + options_.put_timeout;
    while (ucp_request_check_status(flush) == UCS_INPROGRESS && Clock::now() < deadline) ucp_worker_progress(worker_);
    status = ucp_request_check_status(flush);
    ucp_request_free(flush);
  } else {
    status = UCS_PTR_IS_ERR(flush) ? UCS_PTR_STATUS(flush) : UCS_OK;
  }
  if (status != UCS_OK) {
    ClosePeerLocked(*peer, /*force=*/true);
    return UcxError("endpoint wireup", status);
  }
  const PeerId id = next_peer_++;
  peers_[id] = std::move(peer);
  return id;
}

void UcxTransport::ClosePeerLocked(Peer& peer, bool force) {
  for (ucp_rkey_h rkey : peer.rkeys) ucp_rkey_destroy(rkey);
  peer.rkeys.clear();
  if (peer.endpoint == nullptr) return;
  ucp_request_param_t params{};
  params.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  params.flags = force || peer.failed.load() ? UCP_EP_CLOSE_FLAG_FORCE : 0;
  void* request = ucp_ep_close_nbx(peer.endpoint, &params);
  if (request != nullptr && !UCS_PTR_IS_ERR(request)) {
    const auto deadline = Clock::now() + std::chrono::seconds(2);
    while (ucp_request_check_status(request) == UCS_INPROGRESS && Clock::now() < deadline) ucp_worker_progress(worker_);
    ucp_request_free(request);
  }
  peer.endpoint = nullptr;
}

absl::Status UcxTransport::DoDisconnect(PeerId id) {
  std::lock_guard lock(worker_mutex_);
  auto it = peers_.find(id);
  if (it == peers_.end()) return absl::NotFoundError(absl::StrCat("ucx peer ", id, " is not connected"));
  ClosePeerLocked(*it->second, /*force=*/false);
  peers_.erase(it);
  return absl::OkStatus();
}

absl::Status UcxTransport::DoPut(PeerId id, std::span<const PutRun> runs) {
  std::lock_guard lock(worker_mutex_);
  auto it = peers_.find(id);
  if (it == peers_.end()) return absl::NotFoundError(absl::StrCat("ucx peer ", id, " is not connected"));
  Peer& peer = *it->second;
  if (peer.failed.load()) return UcxError("peer endpoint failed earlier", peer.failure);
  std::vector<void*> requests;
  requests.reserve(runs.size() + 1);
  absl::Status status;
  ucp_request_param_t params{};
  for (const PutRun& run : runs) {
    void* request = ucp_put_nbx(peer.endpoint, run.source, run.length, peer.bases[run.remote_region] + run.remote_offset,
                                peer.rkeys[run.remote_region], &params);
    if (UCS_PTR_IS_ERR(request)) {
      status = UcxError("put", UCS_PTR_STATUS(request));
      break;
    }
    if (request != nullptr) requests.push_back(request);
  }
  // The flush completes when every put before it is visible at the peer.
  void* flush = ucp_ep_flush_nbx(peer.endpoint, &params);
  if (UCS_PTR_IS_ERR(flush)) {
    if (status.ok()) status = UcxError("flush", UCS_PTR_STATUS(flush));
  } else if (flush != nullptr) {
    requests.push_back(flush);
  }
  const auto deadline = Clock::now() + options_.put_timeout;
  size_t done = 0;
  bool timed_out = false;
  while (done < requests.size()) {
    ucp_worker_progress(worker_);
    while (done < requests.size() && ucp_request_check_status(requests[done]) != UCS_INPROGRESS) ++done;
    if (done < requests.size() && Clock::now() > deadline && !timed_out) {
      // Force-closing the endpoint completes every outstanding request with an error.
      timed_out = true;
      peer.failed.store(true);
      peer.failure = UCS_ERR_TIMED_OUT;
      ClosePeerLocked(peer, /*force=*/true);
    }
  }
  for (void* request : requests) {
    const ucs_status_t s = ucp_request_check_status(request);
    if (s != UCS_OK && status.ok()) status = UcxError("put completion", s);
    ucp_request_free(request);
  }
  if (timed_out) return absl::UnavailableError(absl::StrCat("ucx: puts not complete within ", options_.put_timeout.count(), " ms"));
  if (peer.failed.load() && status.ok()) status = UcxError("peer endpoint failed", peer.failure);
  return status;
}

}  // namespace tandem::transfer
