// The decode side of a PD hand-over: the bootstrap client (one cached, heartbeated connection per prefill
// worker) and the per-room protocol that receives a request's state into pages decode reserved.
//
// Calls in order, per room:  Register (connects on first use, sends the destination segments) ->
// WaitCompletion (first token, payload; the checksum is verified here) -> Ack. RoomDone says when the room
// ended: after Ack, or once an abort is acknowledged, the peer died, or the lease ran out. PagesReusable says
// when its pages may go to another request: at once after a clean end, LateWriteHold after an unclean one.
#pragma once

#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "common/transfer/control_loop.h"
#include "common/transfer/room.h"
#include "common/transfer/transport.h"
#include "common/transfer/wire.h"

namespace tandem::transfer {

class DecodeAgent {
 public:
  // `local` carries descriptor + layout hash; transport kind, address and region keys are filled in here, so
  // register every region with the transport before creating the agent. `device_ipc`: how this engine's
  // device pools may be written by a prefill process of this host (device_ipc.h); --pd-transfer ipc without
  // an export is FAILED_PRECONDITION.
  static absl::StatusOr<std::unique_ptr<DecodeAgent>> Create(KvTransport* transport, Handshake local,
                                                             const AgentOptions& options, DecodeDeviceIpc device_ipc = {});
  ~DecodeAgent();
  DecodeAgent(const DecodeAgent&) = delete;
  DecodeAgent& operator=(const DecodeAgent&) = delete;

  // Connects and handshakes with a prefill worker's bootstrap port unless already connected. An
  // incompatible peer is FAILED_PRECONDITION naming what differs (also: --pd-transfer ipc and the peer cannot
  // write over device IPC); an unreachable one UNAVAILABLE.
  absl::Status Connect(const std::string& host, uint16_t port);
  // Hands prefill the destination of `room` (segments of our registered regions, canonical order).
  absl::Status Register(RoomId room, const std::string& host, uint16_t port, std::vector<Segment> destination,
                        RoomDone on_done);
  // Waits for prefill's COMPLETE and verifies the checksum over the destination. Errors: the room's final
  // status (ABORTED with the peer's reason, UNAVAILABLE, DEADLINE_EXCEEDED for the lease, DATA_LOSS for a
  // checksum mismatch, NOT_FOUND for a prefill refusal of an unknown room); DEADLINE_EXCEEDED when `timeout`
  // passes first, in which case the room stays live.
  absl::StatusOr<Completion> WaitCompletion(RoomId room, std::chrono::milliseconds timeout);
  // Tells prefill the state arrived; RoomDone(OK) runs before this returns.
  absl::Status Ack(RoomId room);
  // Tells prefill to stop; RoomDone(ABORTED) runs once prefill acknowledged (no put of its is in flight),
  // or the connection died, or abort_ack_timeout passed.
  absl::Status Abort(RoomId room, std::string_view reason);
  // Whether no write of prefill's can land in the pages of `room` any more, so they may go to another request:
  // false while the room is live, and after an end without a clean finish (the connection dropped, or the
  // abort went unacknowledged) until LateWriteHold has passed or prefill acknowledged after all. True for
  // a room that ended cleanly (ack, acknowledged abort, prefill's own abort or refusal, a completion that
  // arrived) and for rooms this agent does not know.
  bool PagesReusable(RoomId room) const;
  // How long an unclean room's pages stay out of the pool, for a prefill that advertised `prefill_lease_ms`
  // (0: unknown, an older prefill): `grace`, or the prefill's lease + kLateWriteCopyMargin when that is longer,
  // since prefill keeps writing until its lease on decode runs out.
  static std::chrono::milliseconds LateWriteHold(std::chrono::milliseconds grace, uint32_t prefill_lease_ms);

  AgentMetrics metrics() const;
  void set_on_room_transferred(RoomTransferred callback);
  // Called (outside the agent's lock) when something a waiting scheduler polls for arrived for a room:
  // the completion (decode). Lets the engine wake at once instead of on its next poll.
  void set_on_progress(std::function<void(RoomId)> callback);
  // Called (outside the agent's lock, on the agent's tick or on prefill's late acknowledgement) when the pages
  // of a room that ended unclean became reusable, so a scheduler holding them can give them back at once.
  void set_on_pages_reusable(std::function<void(RoomId)> callback);
  size_t connection_count() const;
  // Whether the connection to this prefill worker writes its rooms over device IPC (false if not connected).
  bool device_ipc(const std::string& host, uint16_t port) const;

 private:
  enum class State { kWaiting, kArrived, kVerifying, kCompleted, kAborting };
  struct Room {
    State state = State::kWaiting;
    RoomDone on_done;
    ConnectionId connection = 0;
    bool device_ipc = false;  // its connection writes over device IPC: verify over the device pools
    std::chrono::milliseconds late_write_hold{0};  // its connection's LateWriteHold
    std::vector<Segment> destination;
    Clock::time_point registered;
    Clock::time_point deadline;
    CompleteMessage complete;
    absl::Status final;           // the status RoomDone gets
    absl::Status abort_status;    // while kAborting
    Clock::time_point abort_deadline;
  };
  struct Connection {
    std::string address;  // host:port
    Handshake prefill;
    bool device_ipc = false;
    std::chrono::milliseconds late_write_hold{0};
  };
  // A room that ended while prefill may still have been writing its pages.
  struct Quarantine {
    ConnectionId connection = 0;
    Clock::time_point until;  // when no write started before the end can still land (end + late_write_hold)
  };
  using Deferred = std::vector<std::function<void()>>;

  DecodeAgent(KvTransport* transport, Handshake local, const AgentOptions& options, DecodeDeviceIpc device_ipc);
  // After HELLO_ACCEPT: offers the device regions if both sides advertised it. True when prefill takes them.
  absl::StatusOr<bool> NegotiateDeviceIpc(int fd, const std::string& address, const Handshake& prefill, Clock::time_point deadline);
  absl::StatusOr<ConnectionId> GetConnection(const std::string& host, uint16_t port);
  void OnFrame(ConnectionId id, FrameType type, std::string_view payload);
  void OnClosed(ConnectionId id, const absl::Status& reason);
  void OnTick();
  // `peer_may_write`: the room ends without prefill having said it stopped writing (quarantines its pages).
  void EndLocked(RoomId room, absl::Status status, Deferred& deferred, bool peer_may_write = false);
  // Prefill acknowledged a quarantined room after all (ABORT / ABORT_ACK come only once its writes drained).
  void LiftLocked(ConnectionId id, RoomId room, Deferred& deferred);
  Clock::time_point Now() const { return options_.clock ? options_.clock() : Clock::now(); }
  void SendLater(ConnectionId id, FrameType type, std::string payload, Deferred& deferred);
  static void Run(Deferred& deferred);

  KvTransport* const transport_;
  Handshake local_;
  const AgentOptions options_;
  const DecodeDeviceIpc device_ipc_;
  std::unique_ptr<ControlLoop> loop_;

  std::mutex connect_mutex_;  // one handshake at a time, so concurrent Registers share one connection
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::map<RoomId, Room> rooms_;
  std::map<std::string, ConnectionId> by_address_;
  std::map<ConnectionId, Connection> connections_;
  std::map<RoomId, Quarantine> quarantined_;  // until their grace passed (the tick drops them)
  RecentOutcomes recent_;  // what the Wait calls report for a room that just ended
  AgentMetrics counters_;
  RoomTransferred on_room_transferred_;
  std::function<void(RoomId)> on_progress_;
  std::function<void(RoomId)> on_pages_reusable_;
};

}  // namespace tandem::transfer
