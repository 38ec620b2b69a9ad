// One thread polling framed TCP connections: accepts, reads frames, sends heartbeats, expires leases.
// Both agents run on it; a connection whose peer closed or went silent past its lease is closed with
// UNAVAILABLE and reported once through on_closed.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "common/core/status.h"
#include "common/transfer/socket.h"
#include "common/transfer/wire.h"

namespace tandem::transfer {

using ConnectionId = uint64_t;

struct ControlOptions {
  std::chrono::milliseconds heartbeat_interval{1000};
  std::chrono::milliseconds lease{4000};  // a peer silent this long is dead
  size_t max_frame_bytes = kDefaultMaxFrameBytes;
  bool send_heartbeats = true;  // tests turn it off to play a peer that went silent
};

class ControlLoop {
 public:
  struct Handlers {
    std::function<void(ConnectionId)> on_accept;
    std::function<void(ConnectionId, FrameType, std::string_view)> on_frame;  // never heartbeats
    std::function<void(ConnectionId, const absl::Status&)> on_closed;
    std::function<void()> on_tick;
    std::function<void(ConnectionId, const absl::Status&)> on_bad_frame;  // a header was refused
  };
  // Handlers run on the loop thread, without any loop lock held: they may call Send and Close.
  static absl::StatusOr<std::unique_ptr<ControlLoop>> Create(const ControlOptions& options, Handlers handlers);
  ~ControlLoop();
  ControlLoop(const ControlLoop&) = delete;
  ControlLoop& operator=(const ControlLoop&) = delete;

  absl::StatusOr<uint16_t> Listen(const std::string& host, uint16_t port);
  ConnectionId Adopt(int fd);  // a connected socket; the loop owns it from now on
  // Thread-safe. A failed send closes the connection.
  absl::Status Send(ConnectionId id, FrameType type, std::string_view payload);
  // Thread-safe; on_closed follows on the loop thread. With `tell_peer`, a REFUSE carrying the reason goes first.
  void Close(ConnectionId id, const absl::Status& reason, bool tell_peer = false);
  void Stop();
  const ControlOptions& options() const { return options_; }

 private:
  struct Connection {
    int fd = -1;
    std::mutex write_mutex;
    std::string read_buffer;
    Clock::time_point last_received;
    Clock::time_point last_sent;
    std::atomic<bool> closing{false};
    absl::Status close_reason;  // set once, under the loop mutex
  };
  ControlLoop(const ControlOptions& options, Handlers handlers, int wake_fd);
  void Run();
  void Wake();
  void ReadFrom(ConnectionId id, const std::shared_ptr<Connection>& conn);
  void Finish(ConnectionId id);
  std::shared_ptr<Connection> Find(ConnectionId id);

  const ControlOptions options_;
  const Handlers handlers_;
  int wake_fd_ = -1;
  int listen_fd_ = -1;
  std::mutex mutex_;
  std::map<ConnectionId, std::shared_ptr<Connection>> connections_;
  ConnectionId next_id_ = 1;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace tandem::transfer
