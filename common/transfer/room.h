// Types shared by both sides of the per-room protocol: room ids, completion, options, metrics.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <functional>
#include <string>

#include "common/core/status.h"
#include "common/transfer/control_loop.h"

namespace tandem::transfer {

using RoomId = uint64_t;

// Called exactly once per room whose ExpectRoom/Register returned OK, when the room is over: OK after the ack,
// ABORTED (with the reason, either side's), UNAVAILABLE (peer died or the connection dropped), DEADLINE_EXCEEDED
// (the room's lease ran out), DATA_LOSS (checksum mismatch, decode). Prefill may free its pages then; decode
// may reuse its pages once DecodeAgent::PagesReusable says so (at once after a clean end, a grace later when
// the peer may still be writing). Runs on an agent thread or inside the call that ended the room, never under
// an agent lock.
using RoomDone = std::function<void(RoomId, const absl::Status&)>;

// What prefill hands decode at the end of a room.
struct Completion {
  int32_t first_token = 0;
  uint64_t checksum = 0;  // ChecksumSegments over the source segments, in order
  std::string payload;    // small extras (logprobs, MTP hidden state), at most max_payload_bytes
  bool device_ipc = false;  // decode: the state landed in the device pools over IPC (not in the transport's memory)
};

// What decode adds to a prefill's advertised peer lease for the copy prefill may have started just before the
// lease ran out: one chunk is milliseconds at device bandwidth; a second leaves room for a loaded host.
inline constexpr std::chrono::milliseconds kLateWriteCopyMargin{1000};

struct AgentOptions {
  ControlOptions control;                       // heartbeat interval and connection lease
  size_t max_rooms = 4096;                      // live rooms; more are refused with RESOURCE_EXHAUSTED
  size_t max_pending_destinations = 256;        // prefill: destinations waiting for their Generate leg
  std::chrono::milliseconds unknown_room_grace{2000};  // prefill: how long such a destination may wait
  std::chrono::milliseconds room_lease{60000};  // a room not over by then is aborted (DEADLINE_EXCEEDED)
  std::chrono::milliseconds abort_ack_timeout{2000};   // decode: wait this long for ABORT_ACK before ending the room
  // decode: how long the pages of a room that ended without a clean finish (connection lost, abort not
  // acknowledged in time) stay out of the pool, because a copy prefill started before it learned of the end
  // may still land in them (device IPC copies and RDMA puts write decode's memory directly). Safe when it
  // exceeds the time prefill takes to learn the room is over (at once on the close of the connection; at most
  // its peer lease, 4 s by default, when it cannot hear decode) plus one chunk's copy (milliseconds at device
  // bandwidth): 10 s covers the default lease with room for a loaded host. A prefill that advertises its lease
  // in the handshake is held at least that lease + kLateWriteCopyMargin (DecodeAgent::LateWriteHold).
  std::chrono::milliseconds late_write_grace{10000};
  // decode: the clock of room leases, abort deadlines and the late-write grace (empty: Clock::now). Tests
  // pass a fake one; the connections' heartbeats and leases always run on the real clock.
  std::function<Clock::time_point()> clock;
  std::chrono::milliseconds connect_timeout{5000};     // decode: TCP connect + handshake
  size_t max_payload_bytes = 64 * 1024;
};

// Plain counters and gauges; services export them (prometheus) without this library depending on it.
struct AgentMetrics {
  uint64_t bytes_moved = 0;          // prefill: bytes put; decode: bytes of verified completions
  uint64_t rooms_completed = 0;
  uint64_t rooms_failed = 0;
  uint64_t bootstrap_failures = 0;   // refused or failed handshakes, bad frames
  uint64_t transfer_failures = 0;    // failed puts, checksum mismatches
  uint64_t rooms_refused = 0;        // unknown, duplicate, table full, bad destination
  uint64_t live_rooms = 0;
  uint64_t waiting_rooms = 0;        // prefill: no destination yet; decode: waiting for COMPLETE
  uint64_t transferring_rooms = 0;   // prefill: destination known, not complete; decode: completed, not acked
  uint64_t pending_destinations = 0; // prefill
  uint64_t connections = 0;
  uint64_t quarantined_rooms = 0;    // decode: rooms that ended unclean, their pages held back (DecodeAgent::LateWriteHold)
};

// Called when a room ends well: bytes moved, the time from its first byte on the wire (prefill: first
// Ship; decode: Register) to the end of the transfer (COMPLETE sent / verified), and whether the bytes went
// device to device over IPC (device_ipc.h) rather than through the transport.
using RoomTransferred = std::function<void(RoomId, uint64_t bytes, std::chrono::nanoseconds latency, bool device_ipc)>;

// The final statuses of the last `capacity` rooms that ended, so a waiter that wakes late still learns why.
class RecentOutcomes {
 public:
  explicit RecentOutcomes(size_t capacity = 4096) : capacity_(capacity) {}
  void Remember(RoomId room, const absl::Status& status) {
    if (outcomes_.insert_or_assign(room, status).second) order_.push_back(room);
    while (order_.size() > capacity_) {
      outcomes_.erase(order_.front());
      order_.pop_front();
    }
  }
  const absl::Status* Find(RoomId room) const {
    auto it = outcomes_.find(room);
    return it == outcomes_.end() ? nullptr : &it->second;
  }

 private:
  size_t capacity_;
  std::map<RoomId, absl::Status> outcomes_;
  std::deque<RoomId> order_;
};

}  // namespace tandem::transfer
