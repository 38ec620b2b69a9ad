#include "tests/unit/transfer/test_util.h"

namespace tandem::transfer::testing {

LayoutDescriptor TestDescriptor() { return LayoutDescriptor{"cfg-1234", 256, "fp8_e4m3", 0, 43}; }

Handshake TestHandshake() { return LocalHandshake(TestDescriptor(), "layout-abcd"); }

AgentOptions FastOptions() {
  AgentOptions options;
  options.control.heartbeat_interval = std::chrono::milliseconds(20);
  options.control.lease = std::chrono::milliseconds(400);
  options.unknown_room_grace = std::chrono::milliseconds(2000);
  options.abort_ack_timeout = std::chrono::milliseconds(1000);
  options.connect_timeout = std::chrono::milliseconds(2000);
  return options;
}

Buffer RegisterBuffer(KvTransport& transport, const std::string& name, size_t size, uint32_t seed) {
  Buffer b;
  b.bytes.resize(size);
  uint64_t x = seed * 0x9e3779b97f4a7c15ULL + 1;
  for (size_t i = 0; i < size; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    b.bytes[i] = seed == 0 ? 0 : static_cast<uint8_t>(x);
  }
  auto region = transport.RegisterRegion({name, b.bytes.data(), b.bytes.size()});
  b.region = region.ok() ? *region : 0;
  return b;
}

RoomDone DoneRecorder::Callback() {
  return [this](RoomId room, const absl::Status& status) {
    std::lock_guard lock(mutex_);
    done_[room].push_back(status);
    changed_.notify_all();
  };
}

std::optional<absl::Status> DoneRecorder::Wait(RoomId room, std::chrono::milliseconds timeout) {
  std::unique_lock lock(mutex_);
  if (!changed_.wait_for(lock, timeout, [&] { return done_.contains(room); })) return std::nullopt;
  return done_[room].front();
}

int DoneRecorder::calls(RoomId room) {
  std::lock_guard lock(mutex_);
  return done_.contains(room) ? static_cast<int>(done_[room].size()) : 0;
}

std::vector<Segment> PageSegments(uint32_t region, size_t pages, uint64_t page_bytes, uint64_t stride_pages, uint64_t first_page) {
  std::vector<Segment> out;
  for (size_t i = 0; i < pages; ++i) out.push_back({region, (first_page + i * stride_pages) * page_bytes, page_bytes});
  return out;
}

}  // namespace tandem::transfer::testing
