// The prefill side of a PD hand-over: the bootstrap server (listens on --bootstrap-port, checks each
// decode's handshake) and the per-room protocol that ships a request's state into decode's pages.
//
// Calls in order, per room:  ExpectRoom (when its Generate leg arrives) -> WaitDestination -> Ship (once or
// per chunk) -> Complete; the RoomDone callback then says when the room's pages may be freed (after decode's
// ack, or on abort / peer death / lease expiry). Abort may come at any point.
// This class is the `BootstrapServer` of the design sketch; `DecodeAgent` holds the client.
#pragma once

#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/transfer/control_loop.h"
#include "common/transfer/room.h"
#include "common/transfer/transport.h"
#include "common/transfer/wire.h"

namespace tandem::transfer {

struct Destination {
  std::vector<Segment> segments;  // in decode's canonical order; Ship slices of it
  std::string peer;               // decode's address, for logs
};

class PrefillAgent {
 public:
  // `local` carries descriptor + layout hash (see LocalHandshake); transport kind and address are filled in.
  // `device_ipc`: how to write a same-host decode's device pools directly (device_ipc.h); --pd-transfer ipc
  // without a way to open them is FAILED_PRECONDITION.
  static absl::StatusOr<std::unique_ptr<PrefillAgent>> Create(KvTransport* transport, Handshake local,
                                                              const AgentOptions& options, const std::string& host,
                                                              uint16_t port, PrefillDeviceIpc device_ipc = {});
  ~PrefillAgent();
  PrefillAgent(const PrefillAgent&) = delete;
  PrefillAgent& operator=(const PrefillAgent&) = delete;

  uint16_t port() const { return port_; }

  // Admits a room that arrived in a Generate call. ALREADY_EXISTS for a live duplicate, RESOURCE_EXHAUSTED
  // when the table is full.
  absl::Status ExpectRoom(RoomId room, RoomDone on_done);
  // Decode's destination, once it arrived. DEADLINE_EXCEEDED if `timeout` passes first (the room stays);
  // the room's final status if it ended meanwhile.
  absl::StatusOr<Destination> WaitDestination(RoomId room, std::chrono::milliseconds timeout);
  // Puts src[i] into destination segment first_segment + i (over device IPC when the room's decode takes it:
  // src then names the live device pools at the offsets of the registered regions; returns once the bytes
  // landed either way). Call as many times as needed, from any thread.
  absl::Status Ship(RoomId room, size_t first_segment, std::span<const Segment> src);
  // Sends the first token, checksum and payload; RoomDone(OK) follows decode's ack.
  absl::Status Complete(RoomId room, const Completion& completion);
  // Ends the room (ABORTED) once in-flight puts drained, telling decode. Unknown rooms are NOT_FOUND.
  absl::Status Abort(RoomId room, std::string_view reason);

  AgentMetrics metrics() const;
  void set_on_room_transferred(RoomTransferred callback);
  // Called (outside the agent's lock) when something a waiting scheduler polls for arrived for a room:
  // its destination (prefill). Lets the engine wake at once instead of on its next poll.
  void set_on_progress(std::function<void(RoomId)> callback);

 private:
  enum class State { kExpected, kReady, kCompleting, kEnding };
  struct Room {
    State state = State::kExpected;
    RoomDone on_done;
    Clock::time_point deadline;
    std::optional<Clock::time_point> first_ship;
    ConnectionId connection = 0;
    bool device_ipc = false;  // shipped over device IPC
    std::vector<Segment> destination;
    int ships_in_flight = 0;
    uint64_t bytes = 0;
    absl::Status final;
    bool ack_peer_abort = false;   // reply ABORT_ACK when drained
    bool tell_peer_abort = false;  // send ABORT when drained
  };
  struct Peer {
    bool ready = false;
    Handshake handshake;
    PeerId transport_peer = 0;
    std::vector<uint64_t> region_sizes;
    int ships_in_flight = 0;
    bool closed = false;
    bool awaiting_device_regions = false;  // asked for them in HELLO_ACCEPT: DEVICE_REGIONS comes next
    std::shared_ptr<DevicePeer> device;    // decode's device pools mapped here: ships go over IPC
  };
  struct Pending {
    ConnectionId connection;
    std::vector<Segment> segments;
    Clock::time_point arrived;
  };
  using Deferred = std::vector<std::function<void()>>;

  PrefillAgent(KvTransport* transport, Handshake local, const AgentOptions& options, PrefillDeviceIpc device_ipc);
  void OnDeviceRegions(ConnectionId id, std::string_view payload);
  absl::Status CopyToDevice(DevicePeer& device, std::span<const Segment> src, std::span<const Segment> dst);
  void OnFrame(ConnectionId id, FrameType type, std::string_view payload);
  void OnClosed(ConnectionId id, const absl::Status& reason);
  void OnTick();
  void OnHello(ConnectionId id, std::string_view payload);
  void OnDestination(ConnectionId id, std::string_view payload, Deferred& deferred);
  // Marks a room as ending; it is finalised as soon as no put is in flight. Caller holds mutex_.
  void EndLocked(RoomId room, Room& r, absl::Status status, Deferred& deferred);
  void FinalizeLocked(RoomId room, Deferred& deferred);
  void RefuseRoom(ConnectionId id, RoomId room, absl::Status status);
  void ReleasePeerLocked(ConnectionId id, Deferred& deferred);
  static void Run(Deferred& deferred);
  absl::Status NotLive(RoomId room) const;  // the final status of a room that just ended, else NOT_FOUND

  KvTransport* const transport_;
  Handshake local_;
  const AgentOptions options_;
  const PrefillDeviceIpc device_ipc_;
  uint16_t port_ = 0;
  std::unique_ptr<ControlLoop> loop_;

  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::map<RoomId, Room> rooms_;
  std::map<ConnectionId, Peer> peers_;
  std::map<RoomId, Pending> pending_;
  RecentOutcomes recent_;  // what the Wait calls report for a room that just ended
  AgentMetrics counters_;
  RoomTransferred on_room_transferred_;
  std::function<void(RoomId)> on_progress_;
};

}  // namespace tandem::transfer
