#include "common/transfer/prefill_agent.h"

#include <algorithm>

#include "common/transfer/handshake.h"

#include <spdlog/spdlog.h>

namespace tandem::transfer {

absl::StatusOr<std::unique_ptr<PrefillAgent>> PrefillAgent::Create(KvTransport* transport, Handshake local,
                                                                  const AgentOptions& options, const std::string& host,
                                                                  uint16_t port, PrefillDeviceIpc device_ipc) {
  if (transport == nullptr) return absl::InvalidArgumentError("prefill agent needs a transport");
  if (device_ipc.mode == PdTransfer::kIpc && !device_ipc.open) {
    return absl::FailedPreconditionError("--pd-transfer ipc: this prefill engine cannot map device pools (it needs --device cuda and CUDA IPC; see any warning above)");
  }
  local.transport_kind = std::string(transport->kind());
  std::unique_ptr<PrefillAgent> agent(new PrefillAgent(transport, std::move(local), options, std::move(device_ipc)));
  PrefillAgent* self = agent.get();
  ControlLoop::Handlers handlers;
  handlers.on_accept = [self](ConnectionId id) {
    std::lock_guard lock(self->mutex_);
    self->peers_[id] = Peer{};
  };
  handlers.on_frame = [self](ConnectionId id, FrameType type, std::string_view payload) { self->OnFrame(id, type, payload); };
  handlers.on_closed = [self](ConnectionId id, const absl::Status& reason) { self->OnClosed(id, reason); };
  handlers.on_tick = [self] { self->OnTick(); };
  handlers.on_bad_frame = [self](ConnectionId, const absl::Status&) {
    std::lock_guard lock(self->mutex_);
    ++self->counters_.bootstrap_failures;
  };
  TANDEM_ASSIGN_OR_RETURN(agent->loop_, ControlLoop::Create(options.control, std::move(handlers)));
  TANDEM_ASSIGN_OR_RETURN(agent->port_, agent->loop_->Listen(host, port));
  return agent;
}

PrefillAgent::PrefillAgent(KvTransport* transport, Handshake local, const AgentOptions& options, PrefillDeviceIpc device_ipc)
    : transport_(transport),
      local_(std::move(local)),
      options_(options),
      device_ipc_(std::move(device_ipc)),
      recent_(options.max_rooms) {}

PrefillAgent::~PrefillAgent() {
  if (loop_) loop_->Stop();
  Deferred deferred;
  {
    std::lock_guard lock(mutex_);
    for (auto& [room, r] : rooms_) {
      RoomDone done = r.on_done;
      const RoomId id = room;
      deferred.push_back([done, id] { if (done) done(id, absl::UnavailableError("prefill agent shut down")); });
    }
    rooms_.clear();
    for (auto& [id, peer] : peers_) {
      if (peer.ready) deferred.push_back([t = transport_, p = peer.transport_peer] { (void)t->Disconnect(p); });
      if (peer.device) deferred.push_back([d = std::move(peer.device)]() mutable { d.reset(); });  // unmapped outside the lock
    }
    peers_.clear();
  }
  Run(deferred);
}

void PrefillAgent::Run(Deferred& deferred) {
  for (auto& f : deferred) f();
  deferred.clear();
}

void PrefillAgent::set_on_progress(std::function<void(RoomId)> callback) {
  std::lock_guard lock(mutex_);
  on_progress_ = std::move(callback);
}

void PrefillAgent::set_on_room_transferred(RoomTransferred callback) {
  std::lock_guard lock(mutex_);
  on_room_transferred_ = std::move(callback);
}

AgentMetrics PrefillAgent::metrics() const {
  std::lock_guard lock(mutex_);
  AgentMetrics m = counters_;
  m.live_rooms = rooms_.size();
  for (const auto& [room, r] : rooms_) {
    if (r.state == State::kExpected) ++m.waiting_rooms;
    if (r.state == State::kReady || r.state == State::kCompleting) ++m.transferring_rooms;
  }
  m.pending_destinations = pending_.size();
  for (const auto& [id, peer] : peers_) m.connections += peer.ready && !peer.closed;
  return m;
}

absl::Status PrefillAgent::ExpectRoom(RoomId room, RoomDone on_done) {
  std::lock_guard lock(mutex_);
  if (rooms_.contains(room)) {
    ++counters_.rooms_refused;
    return absl::AlreadyExistsError(absl::StrCat("room ", room, " is already live on this prefill worker"));
  }
  if (rooms_.size() >= options_.max_rooms) {
    ++counters_.rooms_refused;
    return absl::ResourceExhaustedError(absl::StrCat("room table full (", options_.max_rooms, " live rooms)"));
  }
  Room& r = rooms_[room];
  r.on_done = std::move(on_done);
  r.deadline = Clock::now() + options_.room_lease;
  auto pending = pending_.find(room);
  if (pending != pending_.end()) {
    r.connection = pending->second.connection;
    r.destination = std::move(pending->second.segments);
    r.state = State::kReady;
    pending_.erase(pending);
    changed_.notify_all();
  }
  return absl::OkStatus();
}

absl::StatusOr<Destination> PrefillAgent::WaitDestination(RoomId room, std::chrono::milliseconds timeout) {
  std::unique_lock lock(mutex_);
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    auto it = rooms_.find(room);
    if (it == rooms_.end()) {
      if (const absl::Status* final = recent_.Find(room)) return final->ok() ? absl::FailedPreconditionError(absl::StrCat("room ", room, " already ended")) : *final;
      return absl::NotFoundError(absl::StrCat("room ", room, " is not live"));
    }
    Room& r = it->second;
    if (r.state == State::kEnding) return r.final;
    if (r.state != State::kExpected) {
      std::string peer = "decode";
      auto p = peers_.find(r.connection);
      if (p != peers_.end()) peer = p->second.handshake.transport_address.substr(0, 64);
      return Destination{r.destination, peer};
    }
    if (changed_.wait_until(lock, deadline) == std::cv_status::timeout && Clock::now() >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("room ", room, ": no destination from decode within ", timeout.count(), " ms"));
    }
  }
}

absl::Status PrefillAgent::NotLive(RoomId room) const {
  if (const absl::Status* final = recent_.Find(room); final != nullptr && !final->ok()) return *final;
  return absl::NotFoundError(absl::StrCat("room ", room, " is not live"));
}

absl::Status PrefillAgent::Ship(RoomId room, size_t first_segment, std::span<const Segment> src) {
  std::vector<Segment> dst;
  PeerId transport_peer = 0;
  ConnectionId connection = 0;
  std::shared_ptr<DevicePeer> device;
  {
    std::lock_guard lock(mutex_);
    auto it = rooms_.find(room);
    if (it == rooms_.end()) return NotLive(room);
    Room& r = it->second;
    if (r.state == State::kEnding) return r.final;
    if (r.state == State::kExpected) return absl::FailedPreconditionError(absl::StrCat("room ", room, ": no destination yet"));
    if (r.state == State::kCompleting) return absl::FailedPreconditionError(absl::StrCat("room ", room, " is already complete"));
    if (first_segment > r.destination.size() || src.size() > r.destination.size() - first_segment) {
      return absl::InvalidArgumentError(absl::StrCat("room ", room, ": segments [", first_segment, ", ",
                                                     first_segment + src.size(), ") run past the destination's ",
                                                     r.destination.size(), " segments"));
    }
    auto peer = peers_.find(r.connection);
    if (peer == peers_.end()) return absl::UnavailableError(absl::StrCat("room ", room, ": decode connection is gone"));
    dst.assign(r.destination.begin() + static_cast<ptrdiff_t>(first_segment),
               r.destination.begin() + static_cast<ptrdiff_t>(first_segment + src.size()));
    ++r.ships_in_flight;
    ++peer->second.ships_in_flight;
    if (!r.first_ship) r.first_ship = Clock::now();
    transport_peer = peer->second.transport_peer;
    device = peer->second.device;
    if (device) r.device_ipc = true;
    connection = r.connection;
  }
  absl::Status status = device ? CopyToDevice(*device, src, dst) : transport_->Put(transport_peer, src, dst);
  if (!status.ok()) {
    status = absl::Status(status.code(), absl::StrCat("room ", room, ", segments from ", first_segment, ": ", status.message()));
  }
  uint64_t bytes = 0;
  for (const Segment& s : src) bytes += s.length;
  Deferred deferred;
  {
    std::lock_guard lock(mutex_);
    Room& r = rooms_.at(room);  // a room with a put in flight is never erased
    --r.ships_in_flight;
    auto peer = peers_.find(connection);
    if (peer != peers_.end()) {
      --peer->second.ships_in_flight;
      if (peer->second.closed && peer->second.ships_in_flight == 0) ReleasePeerLocked(connection, deferred);
    }
    if (status.ok()) {
      r.bytes += bytes;
      counters_.bytes_moved += bytes;
    } else {
      ++counters_.transfer_failures;
      if (r.state != State::kEnding) {
        r.tell_peer_abort = true;
        EndLocked(room, r, status, deferred);
      }
    }
    if (r.state == State::kEnding) {
      if (status.ok()) status = r.final;
      if (r.ships_in_flight == 0) FinalizeLocked(room, deferred);
    }
  }
  Run(deferred);
  return status;
}

absl::Status PrefillAgent::CopyToDevice(DevicePeer& device, std::span<const Segment> src, std::span<const Segment> dst) {
  TANDEM_RETURN_IF_ERROR(CheckSegmentPair(src, dst));
  std::vector<uint64_t> local_sizes;
  for (const MemoryRegion& r : transport_->regions()) local_sizes.push_back(r.size);
  TANDEM_RETURN_IF_ERROR(CheckSegmentsInside(src, local_sizes, "source"));  // dst was checked on arrival
  std::vector<Segment> s, d;
  CoalesceSegments(src, dst, s, d);
  if (s.empty()) return absl::OkStatus();
  TANDEM_RETURN_IF_ERROR(device.Copy(s, d));
  if (transport_->TakeCorruption()) TANDEM_RETURN_IF_ERROR(device.InvertByte(Segment{d[0].region, d[0].offset, 1}));
  return absl::OkStatus();
}

absl::Status PrefillAgent::Complete(RoomId room, const Completion& completion) {
  ConnectionId connection = 0;
  {
    std::lock_guard lock(mutex_);
    auto it = rooms_.find(room);
    if (it == rooms_.end()) return NotLive(room);
    Room& r = it->second;
    if (r.state == State::kEnding) return r.final;
    if (r.state != State::kReady) {
      return absl::FailedPreconditionError(absl::StrCat("room ", room, r.state == State::kExpected ? ": no destination yet" : " is already complete"));
    }
    if (r.ships_in_flight > 0) return absl::FailedPreconditionError(absl::StrCat("room ", room, ": puts still in flight"));
    if (completion.payload.size() > options_.max_payload_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("room ", room, ": payload of ", completion.payload.size(),
                                                     " bytes exceeds ", options_.max_payload_bytes));
    }
    r.state = State::kCompleting;
    if (!r.first_ship) r.first_ship = Clock::now();
    connection = r.connection;
  }
  const CompleteMessage message{room, completion.first_token, completion.checksum, completion.payload};
  absl::Status sent = loop_->Send(connection, FrameType::kComplete, Encode(message));
  if (!sent.ok()) {
    Deferred deferred;
    {
      std::lock_guard lock(mutex_);
      auto it = rooms_.find(room);
      if (it != rooms_.end()) EndLocked(room, it->second, absl::UnavailableError(absl::StrCat("room ", room, ": ", sent.message())), deferred);
    }
    Run(deferred);
    return sent;
  }
  return absl::OkStatus();
}

absl::Status PrefillAgent::Abort(RoomId room, std::string_view reason) {
  Deferred deferred;
  {
    std::lock_guard lock(mutex_);
    auto it = rooms_.find(room);
    if (it == rooms_.end()) return absl::NotFoundError(absl::StrCat("room ", room, " is not live"));
    Room& r = it->second;
    if (r.state == State::kEnding) return absl::OkStatus();
    r.tell_peer_abort = r.connection != 0;
    EndLocked(room, r, absl::AbortedError(absl::StrCat("prefill aborted room ", room, ": ", std::string(reason))), deferred);
  }
  Run(deferred);
  return absl::OkStatus();
}

void PrefillAgent::EndLocked(RoomId room, Room& r, absl::Status status, Deferred& deferred) {
  if (r.state == State::kEnding) return;
  r.state = State::kEnding;
  r.final = std::move(status);
  changed_.notify_all();
  if (r.ships_in_flight == 0) FinalizeLocked(room, deferred);
}

void PrefillAgent::FinalizeLocked(RoomId room, Deferred& deferred) {
  auto it = rooms_.find(room);
  if (it == rooms_.end()) return;
  Room r = std::move(it->second);
  rooms_.erase(it);
  recent_.Remember(room, r.final);
  changed_.notify_all();
  // ABORT goes out only now: no put of ours is in flight, so decode may free its pages on receipt.
  if (r.tell_peer_abort && !r.final.ok()) {
    const std::string frame = Encode(RoomStatusMessage{room, r.final.code(), std::string(r.final.message())});
    deferred.push_back([this, c = r.connection, frame] { (void)loop_->Send(c, FrameType::kAbort, frame); });
  }
  if (r.ack_peer_abort) {
    deferred.push_back([this, c = r.connection, room] { (void)loop_->Send(c, FrameType::kAbortAck, Encode(RoomMessage{room})); });
  }
  if (r.final.ok()) {
    ++counters_.rooms_completed;
    if (on_room_transferred_ && r.first_ship) {
      deferred.push_back([cb = on_room_transferred_, room, bytes = r.bytes, latency = Clock::now() - *r.first_ship,
                          device = r.device_ipc] {
        cb(room, bytes, std::chrono::duration_cast<std::chrono::nanoseconds>(latency), device);
      });
    }
  } else {
    ++counters_.rooms_failed;
  }
  deferred.push_back([done = std::move(r.on_done), room, status = r.final] { if (done) done(room, status); });
}

void PrefillAgent::RefuseRoom(ConnectionId id, RoomId room, absl::Status status) {
  {
    std::lock_guard lock(mutex_);
    ++counters_.rooms_refused;
  }
  (void)loop_->Send(id, FrameType::kRoomRefused, Encode(RoomStatusMessage{room, status.code(), std::string(status.message())}));
}

void PrefillAgent::ReleasePeerLocked(ConnectionId id, Deferred& deferred) {
  auto it = peers_.find(id);
  if (it == peers_.end()) return;
  if (it->second.ready) deferred.push_back([t = transport_, p = it->second.transport_peer] { (void)t->Disconnect(p); });
  // The mapping of decode's device pools goes with the peer, closed outside the lock.
  if (it->second.device) deferred.push_back([d = std::move(it->second.device)]() mutable { d.reset(); });
  peers_.erase(it);
}

void PrefillAgent::OnFrame(ConnectionId id, FrameType type, std::string_view payload) {
  bool ready = false, awaiting_device_regions = false;
  {
    std::lock_guard lock(mutex_);
    auto it = peers_.find(id);
    ready = it != peers_.end() && it->second.ready;
    awaiting_device_regions = ready && it->second.awaiting_device_regions;
  }
  auto protocol_error = [&](absl::Status status) {
    {
      std::lock_guard lock(mutex_);
      ++counters_.bootstrap_failures;
    }
    loop_->Close(id, status, /*tell_peer=*/true);
  };
  if (!ready) {
    if (type != FrameType::kHello) {
      protocol_error(absl::InvalidArgumentError(absl::StrCat("expected HELLO first, got ", FrameTypeName(type))));
    } else {
      OnHello(id, payload);
    }
    return;
  }
  if (awaiting_device_regions) {
    if (type != FrameType::kDeviceRegions) {
      return protocol_error(absl::InvalidArgumentError(absl::StrCat("expected DEVICE_REGIONS, got ", FrameTypeName(type))));
    }
    return OnDeviceRegions(id, payload);
  }
  Deferred deferred;
  switch (type) {
    case FrameType::kDestination:
      OnDestination(id, payload, deferred);
      break;
    case FrameType::kAck: {
      absl::StatusOr<RoomMessage> m = DecodeRoom(payload, "ACK");
      if (!m.ok()) return protocol_error(m.status());
      std::lock_guard lock(mutex_);
      auto it = rooms_.find(m->room);
      if (it != rooms_.end() && it->second.connection == id && it->second.state == State::kCompleting) {
        EndLocked(m->room, it->second, absl::OkStatus(), deferred);
      }
      break;
    }
    case FrameType::kAbort: {
      absl::StatusOr<RoomStatusMessage> m = DecodeRoomStatus(payload, "ABORT");
      if (!m.ok()) return protocol_error(m.status());
      bool ack_now = true;
      {
        std::lock_guard lock(mutex_);
        auto pending = pending_.find(m->room);
        if (pending != pending_.end() && pending->second.connection == id) pending_.erase(pending);
        auto it = rooms_.find(m->room);
        if (it != rooms_.end() && it->second.connection == id) {
          Room& r = it->second;
          if (r.state == State::kEnding) {
            r.ack_peer_abort = true;  // already ending: ack when it is finalised
          } else {
            r.ack_peer_abort = true;
            r.tell_peer_abort = false;
            EndLocked(m->room, r, absl::AbortedError(absl::StrCat("decode aborted room ", m->room, ": ", m->message)), deferred);
          }
          ack_now = false;
        }
      }
      if (ack_now) (void)loop_->Send(id, FrameType::kAbortAck, Encode(RoomMessage{m->room}));
      break;
    }
    case FrameType::kAbortAck: {
      absl::StatusOr<RoomMessage> m = DecodeRoom(payload, "ABORT_ACK");
      if (!m.ok()) return protocol_error(m.status());
      break;
    }
    case FrameType::kRefuse: {
      absl::StatusOr<StatusMessage> m = DecodeStatus(payload);
      loop_->Close(id, m.ok() ? absl::UnavailableError(absl::StrCat("decode closed the connection: ", m->message)) : m.status());
      break;
    }
    default:
      return protocol_error(absl::InvalidArgumentError(absl::StrCat("unexpected ", FrameTypeName(type), " from decode")));
  }
  Run(deferred);
}

void PrefillAgent::OnHello(ConnectionId id, std::string_view payload) {
  auto refuse = [&](absl::Status status) {
    {
      std::lock_guard lock(mutex_);
      ++counters_.bootstrap_failures;
    }
    loop_->Close(id, status, /*tell_peer=*/true);
  };
  absl::StatusOr<Handshake> remote = DecodeHandshake(payload);
  if (!remote.ok()) return refuse(remote.status());
  if (absl::Status compatible = CheckCompatible(local_, *remote); !compatible.ok()) return refuse(compatible);
  // Device IPC: decide before connecting; --pd-transfer ipc refuses a decode that cannot take it.
  absl::StatusOr<bool> want_device = WantDeviceRegions(device_ipc_.mode, device_ipc_.open != nullptr, remote->capabilities);
  if (!want_device.ok()) return refuse(want_device.status());
  const bool wants_lease = (remote->capabilities & kCapabilityPeerLease) != 0;
  absl::StatusOr<PeerId> transport_peer = transport_->Connect(remote->transport_address, remote->regions);
  if (!transport_peer.ok()) {
    return refuse(absl::UnavailableError(absl::StrCat("cannot reach decode's transport: ", transport_peer.status().message())));
  }
  {
    std::lock_guard lock(mutex_);
    auto it = peers_.find(id);
    if (it == peers_.end()) {  // closed meanwhile
      (void)transport_->Disconnect(*transport_peer);
      return;
    }
    Peer& peer = it->second;
    peer.ready = true;
    peer.awaiting_device_regions = *want_device;
    peer.transport_peer = *transport_peer;
    for (const RemoteRegion& r : remote->regions) peer.region_sizes.push_back(r.size);
    peer.handshake = std::move(*remote);
  }
  Handshake reply = local_;
  if (*want_device) reply.capabilities |= kCapabilityDeviceIpc;
  // Only a decode that asked can read the trailing field; it holds unclean rooms' pages at least this long.
  if (wants_lease) {
    reply.capabilities |= kCapabilityPeerLease;
    reply.lease_ms = static_cast<uint32_t>(std::clamp<int64_t>(options_.control.lease.count(), 1, UINT32_MAX));
  }
  (void)loop_->Send(id, FrameType::kHelloAccept, Encode(reply));
}

void PrefillAgent::OnDeviceRegions(ConnectionId id, std::string_view payload) {
  const bool forced = device_ipc_.mode == PdTransfer::kIpc;
  auto refuse = [&](absl::Status status) {
    {
      std::lock_guard lock(mutex_);
      ++counters_.bootstrap_failures;
    }
    loop_->Close(id, status, /*tell_peer=*/true);
  };
  absl::StatusOr<DeviceExport> exported = DecodeDeviceExport(payload);
  if (!exported.ok()) return refuse(exported.status());
  std::vector<RemoteRegion> hello_regions;
  {
    std::lock_guard lock(mutex_);
    auto it = peers_.find(id);
    if (it == peers_.end()) return;
    hello_regions = it->second.handshake.regions;
  }
  // Opened once per connection, on this thread; closed when the peer goes (ReleasePeerLocked).
  absl::StatusOr<std::shared_ptr<DevicePeer>> device = absl::FailedPreconditionError("not mapped");
  if (absl::Status mappable = CheckMappable(*exported, hello_regions); !mappable.ok()) {
    device = mappable;
  } else {
    device = device_ipc_.open(*exported);
    if (device.ok() && *device == nullptr) device = absl::InternalError("the device IPC opener returned nothing");
  }
  if (!device.ok()) {
    const std::string why = absl::StrCat("cannot map decode's device pools (", exported->location, "): ", device.status().message());
    if (forced) return refuse(absl::FailedPreconditionError(absl::StrCat("--pd-transfer ipc: ", why)));
    spdlog::warn("PD transfer to decode {}: {}; staging this peer's rooms through host memory instead", exported->location,
                 std::string(device.status().message()));
    {
      std::lock_guard lock(mutex_);
      auto it = peers_.find(id);
      if (it != peers_.end()) it->second.awaiting_device_regions = false;
    }
    (void)loop_->Send(id, FrameType::kDeviceRegionsReply, Encode(DeviceRegionsReply{false, why}));
    return;
  }
  {
    std::lock_guard lock(mutex_);
    auto it = peers_.find(id);
    if (it == peers_.end()) return;  // closed meanwhile: the mapping goes with `device`
    it->second.awaiting_device_regions = false;
    it->second.device = std::move(*device);
  }
  spdlog::info("PD transfer to decode {}: device IPC ({} regions mapped)", exported->location, exported->regions.size());
  (void)loop_->Send(id, FrameType::kDeviceRegionsReply, Encode(DeviceRegionsReply{true, ""}));
}

void PrefillAgent::OnDestination(ConnectionId id, std::string_view payload, Deferred& deferred) {
  absl::StatusOr<DestinationMessage> m = DecodeDestination(payload);
  if (!m.ok()) {
    {
      std::lock_guard lock(mutex_);
      ++counters_.bootstrap_failures;
    }
    loop_->Close(id, m.status(), /*tell_peer=*/true);
    return;
  }
  const RoomId room = m->room;
  absl::Status refusal;
  {
    std::lock_guard lock(mutex_);
    const Peer& peer = peers_.at(id);
    refusal = CheckSegmentsInside(m->segments, peer.region_sizes, "destination");
    if (refusal.ok()) {
      auto it = rooms_.find(room);
      if (it != rooms_.end()) {
        Room& r = it->second;
        if (r.state == State::kExpected) {
          r.connection = id;
          r.destination = std::move(m->segments);
          r.state = State::kReady;
          changed_.notify_all();
          if (on_progress_) deferred.push_back([cb = on_progress_, room] { cb(room); });
        } else {
          refusal = absl::AlreadyExistsError(absl::StrCat("room ", room, " already has a destination"));
        }
      } else if (pending_.contains(room)) {
        refusal = absl::AlreadyExistsError(absl::StrCat("room ", room, " already has a destination"));
      } else if (options_.unknown_room_grace.count() <= 0) {
        refusal = absl::NotFoundError(absl::StrCat("prefill does not expect room ", room));
      } else if (pending_.size() >= options_.max_pending_destinations) {
        refusal = absl::ResourceExhaustedError(absl::StrCat("prefill does not expect room ", room, " and already holds ",
                                                            pending_.size(), " destinations for unknown rooms"));
      } else {
        pending_[room] = Pending{id, std::move(m->segments), Clock::now()};
      }
    }
  }
  if (!refusal.ok()) RefuseRoom(id, room, refusal);
  (void)deferred;
}

void PrefillAgent::OnClosed(ConnectionId id, const absl::Status& reason) {
  Deferred deferred;
  {
    std::lock_guard lock(mutex_);
    auto peer = peers_.find(id);
    if (peer == peers_.end()) return;
    peer->second.closed = true;
    for (auto it = pending_.begin(); it != pending_.end();) {
      it = it->second.connection == id ? pending_.erase(it) : std::next(it);
    }
    std::vector<RoomId> affected;
    for (auto& [room, r] : rooms_) {
      if (r.connection == id && r.state != State::kEnding) affected.push_back(room);
    }
    for (RoomId room : affected) {
      Room& r = rooms_.at(room);
      r.tell_peer_abort = false;
      r.ack_peer_abort = false;
      EndLocked(room, r, absl::UnavailableError(absl::StrCat("room ", room, ": decode connection lost: ", reason.message())), deferred);
    }
    if (peers_.contains(id) && peers_.at(id).ships_in_flight == 0) ReleasePeerLocked(id, deferred);
  }
  Run(deferred);
}

void PrefillAgent::OnTick() {
  Deferred deferred;
  std::vector<std::pair<ConnectionId, RoomId>> refused;
  {
    std::lock_guard lock(mutex_);
    const auto now = Clock::now();
    std::vector<RoomId> expired;
    for (auto& [room, r] : rooms_) {
      if (r.state != State::kEnding && now >= r.deadline) expired.push_back(room);
    }
    for (RoomId room : expired) {
      Room& r = rooms_.at(room);
      r.tell_peer_abort = r.connection != 0;
      const char* what = r.state == State::kExpected ? "no destination from decode" : "not finished";
      EndLocked(room, r, absl::DeadlineExceededError(absl::StrCat("room ", room, ": ", what, " within its ",
                                                                  options_.room_lease.count(), " ms lease")), deferred);
    }
    for (auto it = pending_.begin(); it != pending_.end();) {
      if (now - it->second.arrived >= options_.unknown_room_grace) {
        refused.emplace_back(it->second.connection, it->first);
        it = pending_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto [connection, room] : refused) {
    RefuseRoom(connection, room, absl::NotFoundError(absl::StrCat("prefill does not expect room ", room, " (no Generate for it within ",
                                                                  options_.unknown_room_grace.count(), " ms)")));
  }
  Run(deferred);
}

}  // namespace tandem::transfer
