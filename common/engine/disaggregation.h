// The scheduler's view of the other engine in a prefill -> decode hand-over. The links are polled from
// the scheduler thread and never block it; common/transfer implements them over the bootstrap port and
// UCX, tests over an in-process copy.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>

#include "common/core/status.h"
#include "common/engine/state_manifest.h"

namespace tandem::engine {

enum class EngineRole { kMixed, kPrefill, kDecode };
const char* EngineRoleName(EngineRole role);

// Where a disaggregated request meets its other leg.
struct RoomInfo {
  uint64_t room = 0;
  std::string bootstrap_host;  // the prefill worker (decode leg only)
  int bootstrap_port = 0;
};

// What prefill hands over besides the state bytes.
struct Handoff {
  int32_t first_token = 0;
  uint64_t checksum = 0;  // StateManifest::Checksum of the prompt's state (0 when the link checksums it itself)
  // Decode: the link already checked the received bytes against prefill's checksum (its wire checksum, over
  // what became the live state), so the scheduler does not read them a second time.
  bool verified = false;
};

// Decode side: where the state must land, then wait for it.
class DecodeLink {
 public:
  virtual ~DecodeLink() = default;
  // Sends the destination (this engine's segments, in manifest order) to the prefill worker.
  virtual absl::Status Register(const RoomInfo& room, const StateManifest& destination) = 0;
  // Non-blocking: nullopt while the state is in flight; then the hand-over or why it failed.
  virtual std::optional<absl::StatusOr<Handoff>> Poll(uint64_t room) = 0;
  // The state arrived and checked out (or failed its checksum: `status` says so); prefill may free it.
  virtual void Acknowledge(uint64_t room, const absl::Status& status) = 0;
  virtual void Abort(uint64_t room, const absl::Status& reason) = 0;
  // Whether the pages registered for `room` may go to another request: false while the peer may still write
  // into them (the room is live, or it ended without a clean finish less than a grace ago: a copy started
  // before the end can land after it). The scheduler keeps a failed request's pages until then. A link whose
  // writes cannot outlive the room (an in-process copy) keeps the default.
  virtual bool PagesReusable(uint64_t room) {
    (void)room;
    return true;
  }
};

// Prefill side: admit rooms that arrived in a Generate call, ship the state as it becomes final.
class PrefillLink {
 public:
  virtual ~PrefillLink() = default;
  // ALREADY_EXISTS for a live room, RESOURCE_EXHAUSTED when the room table is full.
  virtual absl::Status Expect(uint64_t room) = 0;
  // Non-blocking: nullopt until the decode side registered its destination; then OK or the failure
  // (decode aborted, the peer died, the lease ran out).
  virtual std::optional<absl::Status> DestinationReady(uint64_t room) = 0;
  // Writes the given segments (indices into `source`, the same indices in the destination).
  virtual absl::Status Ship(uint64_t room, const StateManifest& source, std::span<const size_t> segments) = 0;
  // True when Complete works out the state's checksum itself, from the bytes it shipped: the scheduler then
  // spends no pass over the pools on it and leaves Handoff::checksum 0.
  virtual bool checksums_shipped_state() const { return false; }
  // Everything shipped: tells decode, which checks and acknowledges.
  virtual absl::Status Complete(uint64_t room, const Handoff& handoff) = 0;
  // Non-blocking: nullopt until decode acknowledged; then OK or the failure.
  virtual std::optional<absl::Status> Acknowledged(uint64_t room) = 0;
  virtual void Abort(uint64_t room, const absl::Status& reason) = 0;
};

}  // namespace tandem::engine
