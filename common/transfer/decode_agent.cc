#include "common/transfer/decode_agent.h"

#include <unistd.h>

#include <algorithm>

#include <spdlog/spdlog.h>

#include "common/transfer/checksum.h"
#include "common/transfer/handshake.h"

namespace tandem::transfer {

absl::StatusOr<std::unique_ptr<DecodeAgent>> DecodeAgent::Create(KvTransport* transport, Handshake local,
                                                                const AgentOptions& options, DecodeDeviceIpc device_ipc) {
  if (transport == nullptr) return absl::InvalidArgumentError("decode agent needs a transport");
  local.transport_kind = std::string(transport->kind());
  TANDEM_ASSIGN_OR_RETURN(local.transport_address, transport->LocalAddress());
  local.regions = transport->DescribeRegions();
  if (device_ipc.mode == PdTransfer::kIpc && !device_ipc.local) {
    return absl::FailedPreconditionError("--pd-transfer ipc: this decode engine cannot export its pools (it needs --device cuda and CUDA IPC; see any warning above)");
  }
  if (device_ipc.local && device_ipc.local->regions.size() != local.regions.size()) {
    return absl::InvalidArgumentError(absl::StrCat("decode exports ", device_ipc.local->regions.size(), " device regions for ",
                                                   local.regions.size(), " transport regions"));
  }
  if (device_ipc.local && !device_ipc.device_checksum) {
    return absl::InvalidArgumentError("decode device IPC needs a device checksum");
  }
  if (device_ipc.local && device_ipc.mode != PdTransfer::kStaged) local.capabilities |= kCapabilityDeviceIpc;
  local.capabilities |= kCapabilityPeerLease;  // ask for prefill's lease; ours stays off the HELLO (handshake.h)
  local.lease_ms = 0;
  std::unique_ptr<DecodeAgent> agent(new DecodeAgent(transport, std::move(local), options, std::move(device_ipc)));
  DecodeAgent* self = agent.get();
  ControlLoop::Handlers handlers;
  handlers.on_frame = [self](ConnectionId id, FrameType type, std::string_view payload) { self->OnFrame(id, type, payload); };
  handlers.on_closed = [self](ConnectionId id, const absl::Status& reason) { self->OnClosed(id, reason); };
  handlers.on_tick = [self] { self->OnTick(); };
  handlers.on_bad_frame = [self](ConnectionId, const absl::Status&) {
    std::lock_guard lock(self->mutex_);
    ++self->counters_.bootstrap_failures;
  };
  TANDEM_ASSIGN_OR_RETURN(agent->loop_, ControlLoop::Create(options.control, std::move(handlers)));
  return agent;
}

DecodeAgent::DecodeAgent(KvTransport* transport, Handshake local, const AgentOptions& options, DecodeDeviceIpc device_ipc)
    : transport_(transport),
      local_(std::move(local)),
      options_(options),
      device_ipc_(std::move(device_ipc)),
      recent_(options.max_rooms) {}

DecodeAgent::~DecodeAgent() {
  if (loop_) loop_->Stop();
  Deferred deferred;
  {
    std::lock_guard lock(mutex_);
    for (auto& [room, r] : rooms_) {
      deferred.push_back([done = r.on_done, id = room] { if (done) done(id, absl::UnavailableError("decode agent shut down")); });
    }
    rooms_.clear();
  }
  Run(deferred);
}

void DecodeAgent::Run(Deferred& deferred) {
  for (auto& f : deferred) f();
  deferred.clear();
}

void DecodeAgent::SendLater(ConnectionId id, FrameType type, std::string payload, Deferred& deferred) {
  deferred.push_back([this, id, type, payload = std::move(payload)] { (void)loop_->Send(id, type, payload); });
}

void DecodeAgent::set_on_progress(std::function<void(RoomId)> callback) {
  std::lock_guard lock(mutex_);
  on_progress_ = std::move(callback);
}

void DecodeAgent::set_on_pages_reusable(std::function<void(RoomId)> callback) {
  std::lock_guard lock(mutex_);
  on_pages_reusable_ = std::move(callback);
}

void DecodeAgent::set_on_room_transferred(RoomTransferred callback) {
  std::lock_guard lock(mutex_);
  on_room_transferred_ = std::move(callback);
}

bool DecodeAgent::device_ipc(const std::string& host, uint16_t port) const {
  std::lock_guard lock(mutex_);
  auto it = by_address_.find(absl::StrCat(host, ":", port));
  return it != by_address_.end() && connections_.at(it->second).device_ipc;
}

absl::StatusOr<bool> DecodeAgent::NegotiateDeviceIpc(int fd, const std::string& address, const Handshake& prefill,
                                                     Clock::time_point deadline) {
  const bool forced = device_ipc_.mode == PdTransfer::kIpc;
  if (!(local_.capabilities & kCapabilityDeviceIpc)) return false;
  if (!(prefill.capabilities & kCapabilityDeviceIpc)) {
    if (forced) {
      return absl::FailedPreconditionError(absl::StrCat(
          "--pd-transfer ipc: prefill ", address, " does not take device IPC (its pools are not on a GPU, it runs "
          "--pd-transfer staged, or its build predates device IPC)"));
    }
    spdlog::info("PD transfer with prefill {}: staged (prefill does not take device IPC)", address);
    return false;
  }
  TANDEM_RETURN_IF_ERROR(WriteAll(fd, EncodeFrame(FrameType::kDeviceRegions, Encode(*device_ipc_.local)), deadline));
  auto reply = ReadFrame(fd, deadline, options_.control.max_frame_bytes);
  if (!reply.ok()) return absl::UnavailableError(absl::StrCat("bootstrap ", address, ": device IPC: ", reply.status().message()));
  if (reply->first.type == FrameType::kRefuse) {
    absl::StatusOr<StatusMessage> refusal = DecodeStatus(reply->second);
    if (!refusal.ok()) return refusal.status();
    return absl::Status(refusal->code, absl::StrCat("prefill ", address, " refused device IPC: ", refusal->message));
  }
  if (reply->first.type != FrameType::kDeviceRegionsReply) {
    return absl::InvalidArgumentError(absl::StrCat("bootstrap ", address, ": expected DEVICE_REGIONS_REPLY, got ",
                                                   FrameTypeName(reply->first.type)));
  }
  TANDEM_ASSIGN_OR_RETURN(const DeviceRegionsReply answer, DecodeDeviceRegionsReply(reply->second));
  if (answer.accepted) {
    spdlog::info("PD transfer with prefill {}: device IPC into {}", address, device_ipc_.local->location);
    return true;
  }
  if (forced) {
    return absl::FailedPreconditionError(
        absl::StrCat("--pd-transfer ipc: prefill ", address, " cannot write over device IPC: ", answer.reason));
  }
  spdlog::warn("PD transfer with prefill {}: staged ({})", address, answer.reason);
  return false;
}

size_t DecodeAgent::connection_count() const {
  std::lock_guard lock(mutex_);
  return connections_.size();
}

AgentMetrics DecodeAgent::metrics() const {
  std::lock_guard lock(mutex_);
  AgentMetrics m = counters_;
  m.live_rooms = rooms_.size();
  for (const auto& [room, r] : rooms_) {
    if (r.state == State::kWaiting) ++m.waiting_rooms;
    if (r.state == State::kArrived || r.state == State::kVerifying || r.state == State::kCompleted) ++m.transferring_rooms;
  }
  m.connections = connections_.size();
  const auto now = Now();
  for (const auto& [room, q] : quarantined_) m.quarantined_rooms += now < q.until ? 1 : 0;
  return m;
}

bool DecodeAgent::PagesReusable(RoomId room) const {
  std::lock_guard lock(mutex_);
  if (rooms_.contains(room)) return false;
  auto it = quarantined_.find(room);
  return it == quarantined_.end() || Now() >= it->second.until;
}

std::chrono::milliseconds DecodeAgent::LateWriteHold(std::chrono::milliseconds grace, uint32_t prefill_lease_ms) {
  if (prefill_lease_ms == 0) return grace;
  return std::max(grace, std::chrono::milliseconds(prefill_lease_ms) + kLateWriteCopyMargin);
}

absl::StatusOr<ConnectionId> DecodeAgent::GetConnection(const std::string& host, uint16_t port) {
  const std::string address = absl::StrCat(host, ":", port);
  std::lock_guard connect_lock(connect_mutex_);
  {
    std::lock_guard lock(mutex_);
    auto it = by_address_.find(address);
    if (it != by_address_.end()) return it->second;
  }
  auto fail = [&](absl::Status status) {
    std::lock_guard lock(mutex_);
    ++counters_.bootstrap_failures;
    return status;
  };
  const auto deadline = Clock::now() + options_.connect_timeout;
  absl::StatusOr<int> fd = ConnectTcp(host, port, deadline);
  if (!fd.ok()) return fail(fd.status());
  auto close_with = [&](absl::Status status) {
    ::close(*fd);
    return fail(status);
  };
  if (absl::Status s = WriteAll(*fd, EncodeFrame(FrameType::kHello, Encode(local_)), deadline); !s.ok()) return close_with(s);
  auto reply = ReadFrame(*fd, deadline, options_.control.max_frame_bytes);
  if (!reply.ok()) {
    return close_with(absl::UnavailableError(absl::StrCat("bootstrap ", address, ": handshake: ", reply.status().message())));
  }
  if (reply->first.type == FrameType::kRefuse) {
    absl::StatusOr<StatusMessage> refusal = DecodeStatus(reply->second);
    if (!refusal.ok()) return close_with(refusal.status());
    return close_with(absl::Status(refusal->code, absl::StrCat("prefill ", address, " refused the handshake: ", refusal->message)));
  }
  if (reply->first.type != FrameType::kHelloAccept) {
    return close_with(absl::InvalidArgumentError(absl::StrCat("bootstrap ", address, ": expected HELLO_ACCEPT, got ",
                                                              FrameTypeName(reply->first.type))));
  }
  absl::StatusOr<Handshake> prefill = DecodeHandshake(reply->second);
  if (!prefill.ok()) return close_with(prefill.status());
  if (absl::Status compatible = CheckCompatible(*prefill, local_); !compatible.ok()) {
    return close_with(absl::FailedPreconditionError(absl::StrCat("prefill ", address, ": ", compatible.message())));
  }
  absl::StatusOr<bool> device_ipc = NegotiateDeviceIpc(*fd, address, *prefill, deadline);
  if (!device_ipc.ok()) return close_with(device_ipc.status());
  const std::chrono::milliseconds hold = LateWriteHold(options_.late_write_grace, prefill->lease_ms);
  auto seconds = [](std::chrono::milliseconds d) { return std::chrono::duration<double>(d).count(); };
  if (prefill->lease_ms == 0) {
    spdlog::info("PD transfer with prefill {}: it does not advertise its peer lease (older build): pages of a "
                 "transfer that ends unclean are held for --pd-late-write-grace, {} s", address, seconds(hold));
  } else if (hold > options_.late_write_grace) {
    spdlog::warn("PD transfer with prefill {}: --pd-late-write-grace {} s is below its peer lease {} s + {} s for a "
                 "copy in flight; holding the pages of a transfer that ends unclean {} s",
                 address, seconds(options_.late_write_grace), seconds(std::chrono::milliseconds(prefill->lease_ms)),
                 seconds(kLateWriteCopyMargin), seconds(hold));
  }
  // Adopt under mutex_ so on_closed for this connection cannot run before it is in the tables.
  std::lock_guard lock(mutex_);
  const ConnectionId id = loop_->Adopt(*fd);
  connections_[id] = Connection{address, std::move(*prefill), *device_ipc, hold};
  by_address_[address] = id;
  return id;
}

absl::Status DecodeAgent::Connect(const std::string& host, uint16_t port) { return GetConnection(host, port).status(); }

absl::Status DecodeAgent::Register(RoomId room, const std::string& host, uint16_t port, std::vector<Segment> destination,
                                   RoomDone on_done) {
  std::vector<uint64_t> sizes;
  for (const MemoryRegion& r : transport_->regions()) sizes.push_back(r.size);
  TANDEM_RETURN_IF_ERROR(CheckSegmentsInside(destination, sizes, "destination"));
  auto admit = [&]() -> absl::Status {
    if (rooms_.contains(room)) {
      ++counters_.rooms_refused;
      return absl::AlreadyExistsError(absl::StrCat("room ", room, " is already live on this decode worker"));
    }
    // An id whose earlier room is still quarantined: a late ack for the old room would lift the new one's
    // quarantine (and the reverse), so the id waits until the old one's grace is over.
    if (const auto q = quarantined_.find(room); q != quarantined_.end() && Now() < q->second.until) {
      ++counters_.rooms_refused;
      return absl::AlreadyExistsError(
          absl::StrCat("room ", room, " ended uncleanly moments ago and its pages are still held; use a new room id"));
    }
    if (rooms_.size() >= options_.max_rooms) {
      ++counters_.rooms_refused;
      return absl::ResourceExhaustedError(absl::StrCat("room table full (", options_.max_rooms, " live rooms)"));
    }
    return absl::OkStatus();
  };
  {
    std::lock_guard lock(mutex_);
    TANDEM_RETURN_IF_ERROR(admit());
  }
  TANDEM_ASSIGN_OR_RETURN(ConnectionId connection, GetConnection(host, port));
  std::string frame = Encode(DestinationMessage{room, destination});
  {
    std::lock_guard lock(mutex_);
    TANDEM_RETURN_IF_ERROR(admit());
    if (!connections_.contains(connection)) {
      return absl::UnavailableError(absl::StrCat("prefill ", host, ":", port, ": connection dropped"));
    }
    Room& r = rooms_[room];
    r.on_done = std::move(on_done);
    r.connection = connection;
    r.device_ipc = connections_.at(connection).device_ipc;
    r.late_write_hold = connections_.at(connection).late_write_hold;
    r.destination = std::move(destination);
    r.registered = Now();
    r.deadline = r.registered + options_.room_lease;
  }
  // From here on every failure reaches RoomDone: a failed send closes the connection, which ends the room.
  (void)loop_->Send(connection, FrameType::kDestination, frame);
  return absl::OkStatus();
}

absl::StatusOr<Completion> DecodeAgent::WaitCompletion(RoomId room, std::chrono::milliseconds timeout) {
  std::unique_lock lock(mutex_);
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    auto it = rooms_.find(room);
    if (it == rooms_.end()) {
      if (const absl::Status* final = recent_.Find(room)) {
        return final->ok() ? absl::FailedPreconditionError(absl::StrCat("room ", room, " already acknowledged")) : *final;
      }
      return absl::NotFoundError(absl::StrCat("room ", room, " is not live"));
    }
    Room& r = it->second;
    if (r.state == State::kCompleted) {
      return Completion{r.complete.first_token, r.complete.checksum, r.complete.payload, r.device_ipc};
    }
    if (r.state == State::kArrived) {
      r.state = State::kVerifying;
      const std::vector<Segment> destination = r.destination;
      const uint64_t expected = r.complete.checksum;
      const bool device = r.device_ipc;
      lock.unlock();
      // Over what prefill wrote: the device pools themselves (IPC) or the transport's memory.
      absl::StatusOr<uint64_t> computed = device ? device_ipc_.device_checksum(destination)
                                                 : ChecksumSegments(transport_->regions(), destination);
      uint64_t bytes = 0;
      for (const Segment& s : destination) bytes += s.length;
      lock.lock();
      it = rooms_.find(room);
      if (it == rooms_.end()) continue;  // ended meanwhile: report its final status
      Room& v = it->second;
      if (computed.ok() && *computed == expected) {
        v.state = State::kCompleted;
        counters_.bytes_moved += bytes;
        changed_.notify_all();
        continue;
      }
      ++counters_.transfer_failures;
      const absl::Status bad = computed.ok() ? absl::DataLossError(absl::StrCat("room ", room, ": checksum mismatch: prefill sent ",
                                                                                absl::Hex(expected, absl::kZeroPad16), ", decode computed ",
                                                                                absl::Hex(*computed, absl::kZeroPad16), " over ", bytes, " bytes"))
                                             : computed.status();
      Deferred deferred;
      SendLater(v.connection, FrameType::kAbort, Encode(RoomStatusMessage{room, bad.code(), std::string(bad.message())}), deferred);
      EndLocked(room, bad, deferred);
      lock.unlock();
      Run(deferred);
      return bad;
    }
    if (changed_.wait_until(lock, deadline) == std::cv_status::timeout && Clock::now() >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("room ", room, ": no completion from prefill within ", timeout.count(), " ms (room still live)"));
    }
  }
}

absl::Status DecodeAgent::Ack(RoomId room) {
  Deferred deferred;
  {
    std::lock_guard lock(mutex_);
    auto it = rooms_.find(room);
    if (it == rooms_.end()) return absl::NotFoundError(absl::StrCat("room ", room, " is not live"));
    Room& r = it->second;
    if (r.state != State::kCompleted) {
      return absl::FailedPreconditionError(absl::StrCat("room ", room, ": Ack before a verified completion"));
    }
    SendLater(r.connection, FrameType::kAck, Encode(RoomMessage{room}), deferred);
    if (on_room_transferred_) {
      uint64_t bytes = 0;
      for (const Segment& s : r.destination) bytes += s.length;
      deferred.push_back([cb = on_room_transferred_, room, bytes, latency = Now() - r.registered, device = r.device_ipc] {
        cb(room, bytes, std::chrono::duration_cast<std::chrono::nanoseconds>(latency), device);
      });
    }
    EndLocked(room, absl::OkStatus(), deferred);
  }
  Run(deferred);
  return absl::OkStatus();
}

absl::Status DecodeAgent::Abort(RoomId room, std::string_view reason) {
  Deferred deferred;
  {
    std::lock_guard lock(mutex_);
    auto it = rooms_.find(room);
    if (it == rooms_.end()) return absl::NotFoundError(absl::StrCat("room ", room, " is not live"));
    Room& r = it->second;
    if (r.state == State::kAborting) return absl::OkStatus();
    const absl::Status status = absl::AbortedError(absl::StrCat("decode aborted room ", room, ": ", std::string(reason)));
    SendLater(r.connection, FrameType::kAbort, Encode(RoomStatusMessage{room, status.code(), std::string(status.message())}), deferred);
    if (r.state == State::kWaiting) {
      // Prefill may be writing: keep the pages until it acknowledges.
      r.state = State::kAborting;
      r.abort_status = status;
      r.abort_deadline = Now() + options_.abort_ack_timeout;
    } else {
      EndLocked(room, status, deferred);  // prefill finished writing already
    }
  }
  Run(deferred);
  return absl::OkStatus();
}

void DecodeAgent::EndLocked(RoomId room, absl::Status status, Deferred& deferred, bool peer_may_write) {
  auto it = rooms_.find(room);
  if (it == rooms_.end()) return;
  RoomDone done = std::move(it->second.on_done);
  // The request fails now (RoomDone below); only its pages wait.
  if (peer_may_write) quarantined_[room] = Quarantine{it->second.connection, Now() + it->second.late_write_hold};
  rooms_.erase(it);
  recent_.Remember(room, status);
  if (status.ok()) {
    ++counters_.rooms_completed;
  } else {
    ++counters_.rooms_failed;
  }
  changed_.notify_all();
  deferred.push_back([done = std::move(done), room, status] { if (done) done(room, status); });
}

void DecodeAgent::LiftLocked(ConnectionId id, RoomId room, Deferred& deferred) {
  auto it = quarantined_.find(room);
  if (it == quarantined_.end() || it->second.connection != id) return;
  quarantined_.erase(it);
  if (on_pages_reusable_) deferred.push_back([cb = on_pages_reusable_, room] { cb(room); });
}

void DecodeAgent::OnFrame(ConnectionId id, FrameType type, std::string_view payload) {
  Deferred deferred;
  auto protocol_error = [&](absl::Status status) {
    {
      std::lock_guard lock(mutex_);
      ++counters_.bootstrap_failures;
    }
    loop_->Close(id, absl::UnavailableError(absl::StrCat("bad frame from prefill: ", status.message())), /*tell_peer=*/true);
  };
  switch (type) {
    case FrameType::kRoomRefused: {
      absl::StatusOr<RoomStatusMessage> m = DecodeRoomStatus(payload, "ROOM_REFUSED");
      if (!m.ok()) return protocol_error(m.status());
      std::lock_guard lock(mutex_);
      auto it = rooms_.find(m->room);
      if (it != rooms_.end() && it->second.connection == id) {
        EndLocked(m->room, absl::Status(m->code, absl::StrCat("prefill refused room ", m->room, ": ", m->message)), deferred);
      }
      break;
    }
    case FrameType::kComplete: {
      absl::StatusOr<CompleteMessage> m = DecodeComplete(payload, options_.max_payload_bytes);
      if (!m.ok()) return protocol_error(m.status());
      std::lock_guard lock(mutex_);
      auto it = rooms_.find(m->room);
      if (it != rooms_.end() && it->second.connection == id && it->second.state == State::kWaiting) {
        it->second.state = State::kArrived;
        it->second.complete = std::move(*m);
        changed_.notify_all();
        if (on_progress_) deferred.push_back([cb = on_progress_, room = m->room] { cb(room); });
      }
      break;
    }
    case FrameType::kAbort: {
      absl::StatusOr<RoomStatusMessage> m = DecodeRoomStatus(payload, "ABORT");
      if (!m.ok()) return protocol_error(m.status());
      std::lock_guard lock(mutex_);
      auto it = rooms_.find(m->room);
      if (it != rooms_.end() && it->second.connection == id) {
        // Prefill sends ABORT only once none of its puts is in flight: the pages are free to go.
        absl::Status status = it->second.state == State::kAborting
                                  ? it->second.abort_status
                                  : absl::AbortedError(absl::StrCat("prefill ended room ", m->room, ": ", m->message));
        EndLocked(m->room, status, deferred);
      } else {
        LiftLocked(id, m->room, deferred);  // a room we gave up on: prefill's writes have drained after all
      }
      SendLater(id, FrameType::kAbortAck, Encode(RoomMessage{m->room}), deferred);
      break;
    }
    case FrameType::kAbortAck: {
      absl::StatusOr<RoomMessage> m = DecodeRoom(payload, "ABORT_ACK");
      if (!m.ok()) return protocol_error(m.status());
      std::lock_guard lock(mutex_);
      auto it = rooms_.find(m->room);
      if (it != rooms_.end() && it->second.connection == id && it->second.state == State::kAborting) {
        EndLocked(m->room, it->second.abort_status, deferred);
      } else if (it == rooms_.end()) {
        LiftLocked(id, m->room, deferred);  // acknowledged after abort_ack_timeout: nothing is in flight now
      }
      break;
    }
    case FrameType::kRefuse: {
      absl::StatusOr<StatusMessage> m = DecodeStatus(payload);
      loop_->Close(id, absl::UnavailableError(absl::StrCat("prefill closed the connection: ", m.ok() ? m->message : m.status().message())));
      break;
    }
    default:
      return protocol_error(absl::InvalidArgumentError(absl::StrCat("unexpected ", FrameTypeName(type), " from prefill")));
  }
  Run(deferred);
}

void DecodeAgent::OnClosed(ConnectionId id, const absl::Status& reason) {
  Deferred deferred;
  {
    std::lock_guard lock(mutex_);
    std::string address = "prefill";
    auto c = connections_.find(id);
    if (c != connections_.end()) {
      address = c->second.address;
      by_address_.erase(c->second.address);
      connections_.erase(c);
    }
    std::vector<std::pair<RoomId, bool>> affected;  // and whether prefill may still be writing it
    for (auto& [room, r] : rooms_) {
      if (r.connection == id && r.state != State::kVerifying) {
        affected.emplace_back(room, r.state == State::kWaiting || r.state == State::kAborting);
      }
    }
    for (auto [room, may_write] : affected) {
      EndLocked(room, absl::UnavailableError(absl::StrCat("room ", room, ": connection to prefill ", address, " lost: ", reason.message())),
                deferred, may_write);
    }
  }
  Run(deferred);
}

void DecodeAgent::OnTick() {
  Deferred deferred;
  {
    std::lock_guard lock(mutex_);
    const auto now = Now();
    std::vector<RoomId> expired, unacknowledged;
    for (auto& [room, r] : rooms_) {
      if (r.state == State::kAborting) {
        if (now >= r.abort_deadline) unacknowledged.push_back(room);
      } else if (r.state != State::kVerifying && now >= r.deadline) {
        expired.push_back(room);
      }
    }
    for (RoomId room : unacknowledged) EndLocked(room, rooms_.at(room).abort_status, deferred, /*peer_may_write=*/true);
    for (RoomId room : expired) {
      Room& r = rooms_.at(room);
      const absl::Status status = absl::DeadlineExceededError(
          absl::StrCat("room ", room, ": not finished within its ", options_.room_lease.count(), " ms lease"));
      SendLater(r.connection, FrameType::kAbort, Encode(RoomStatusMessage{room, status.code(), std::string(status.message())}), deferred);
      if (r.state == State::kWaiting) {
        r.state = State::kAborting;
        r.abort_status = status;
        r.abort_deadline = now + options_.abort_ack_timeout;
      } else {
        EndLocked(room, status, deferred);
      }
    }
    for (auto it = quarantined_.begin(); it != quarantined_.end();) {
      if (now < it->second.until) {
        ++it;
        continue;
      }
      if (on_pages_reusable_) deferred.push_back([cb = on_pages_reusable_, room = it->first] { cb(room); });
      it = quarantined_.erase(it);
    }
  }
  Run(deferred);
}

}  // namespace tandem::transfer
