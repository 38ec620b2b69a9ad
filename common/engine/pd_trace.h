// Timestamps of a disaggregated request's hand-over on this side, per room: what its TTFT is made of besides
// the forward. The steady clock is CLOCK_MONOTONIC, one clock for every process of a host, so the lines of
// the two sides merge into one timeline (bench/pd/ttft.py does).
#pragma once

#include <cstdint>
#include <functional>
#include <span>

#include "common/engine/disaggregation.h"

namespace tandem::engine::pd_trace {

// Opens the room's timeline with the event "generate" (its Generate call arrived); reopening restarts it.
void Begin(uint64_t room, EngineRole role);
// Records `event` (a string literal) now; a later mark of the same event replaces it (the last chunk's
// "shipped" is the one on the TTFT path). Rooms not open are ignored, so marks cost nothing outside PD.
void Mark(uint64_t room, const char* event);
// Closes the timeline: one debug log line "pd-trace <role> room=<id> t0_ns=<steady ns> <event>=<us> ..." and
// the observer gets the role's stages (the time from one event of its chain to the next).
void Finish(uint64_t room);

// The chains, in TTFT order. Prefill: generate, prompt_done (queue + forward), checksummed (the engine's
// checksum), shipped (the last Ship call), puts_done, complete_sent (wire checksum + COMPLETE), acked (decode's
// side + the ACK). Decode: generate, registered (pages reserved, destination sent), completion_arrived,
// polled (the scheduler woke for it), verified (wire checksum), staged (into the live pools), checked (the
// scheduler's own checksum, where the link did not verify), first_token (handed to gRPC). A stage is named
// after the event that ends it.
struct Stage {
  const char* name;
  double seconds;
};
using Observer = std::function<void(EngineRole role, std::span<const Stage> stages)>;
void SetObserver(Observer observer);  // empty: none

}  // namespace tandem::engine::pd_trace
