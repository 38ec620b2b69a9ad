// Shared helpers for the transfer tests: a compatible handshake, fast options, registered buffers and a
// recorder for RoomDone callbacks that tests wait on with deadlines.
#pragma once

#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "common/transfer/decode_agent.h"
#include "common/transfer/handshake.h"
#include "common/transfer/prefill_agent.h"
#include "common/transfer/transport.h"

namespace tandem::transfer::testing {

LayoutDescriptor TestDescriptor();
Handshake TestHandshake();
// Short heartbeats and leases so failure tests finish quickly (tests never assert timings).
AgentOptions FastOptions();

// One region of `size` bytes, filled with a pattern derived from `seed` (or zeros for seed 0).
struct Buffer {
  std::vector<uint8_t> bytes;
  uint32_t region = 0;
};
Buffer RegisterBuffer(KvTransport& transport, const std::string& name, size_t size, uint32_t seed);

// Records RoomDone calls.
class DoneRecorder {
 public:
  RoomDone Callback();
  // The status the room ended with, waiting up to `timeout`; nullopt if it did not end.
  std::optional<absl::Status> Wait(RoomId room, std::chrono::milliseconds timeout = std::chrono::seconds(10));
  int calls(RoomId room);

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  std::map<RoomId, std::vector<absl::Status>> done_;
};

// Scattered page-sized segments: `pages` pages of `page_bytes` chosen by stride from a region.
std::vector<Segment> PageSegments(uint32_t region, size_t pages, uint64_t page_bytes, uint64_t stride_pages, uint64_t first_page);

}  // namespace tandem::transfer::testing
