// Small TCP helpers for the bootstrap channel: listen, connect with a deadline, blocking frame I/O.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include "common/core/status.h"
#include "common/transfer/wire.h"

namespace tandem::transfer {

using Clock = std::chrono::steady_clock;

// A listening socket on host:port (port 0 picks a free one); returns the fd and the bound port.
absl::StatusOr<std::pair<int, uint16_t>> ListenTcp(const std::string& host, uint16_t port);
// A connected, non-blocking socket, or UNAVAILABLE naming host:port and why.
absl::StatusOr<int> ConnectTcp(const std::string& host, uint16_t port, Clock::time_point deadline);
void SetNonBlocking(int fd);
// Writes all bytes, waiting for the socket as needed, until the deadline.
absl::Status WriteAll(int fd, std::string_view bytes, Clock::time_point deadline);
// Reads exactly one frame (header checked) before the deadline.
absl::StatusOr<std::pair<FrameHeader, std::string>> ReadFrame(int fd, Clock::time_point deadline, size_t max_frame_bytes);

}  // namespace tandem::transfer
