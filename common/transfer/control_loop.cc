#include "common/transfer/control_loop.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

namespace tandem::transfer {

absl::StatusOr<std::unique_ptr<ControlLoop>> ControlLoop::Create(const ControlOptions& options, Handlers handlers) {
  if (options.heartbeat_interval.count() <= 0 || options.lease <= options.heartbeat_interval) {
    return absl::InvalidArgumentError(absl::StrCat("lease (", options.lease.count(), " ms) must exceed the heartbeat interval (",
                                                   options.heartbeat_interval.count(), " ms), which must be positive"));
  }
  const int wake = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake < 0) return absl::InternalError(absl::StrCat("eventfd: ", std::strerror(errno)));
  return std::unique_ptr<ControlLoop>(new ControlLoop(options, std::move(handlers), wake));
}

ControlLoop::ControlLoop(const ControlOptions& options, Handlers handlers, int wake_fd)
    : options_(options), handlers_(std::move(handlers)), wake_fd_(wake_fd) {
  thread_ = std::thread([this] { Run(); });
}

ControlLoop::~ControlLoop() {
  Stop();
  ::close(wake_fd_);
}

void ControlLoop::Stop() {
  if (stop_.exchange(true)) return;
  Wake();
  if (thread_.joinable()) thread_.join();
  std::lock_guard lock(mutex_);
  for (auto& [id, conn] : connections_) {
    std::lock_guard write(conn->write_mutex);
    ::close(conn->fd);
    conn->fd = -1;
  }
  connections_.clear();
  if (listen_fd_ >= 0) ::close(listen_fd_);
  listen_fd_ = -1;
}

void ControlLoop::Wake() {
  const uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(wake_fd_, &one, sizeof(one));
}

absl::StatusOr<uint16_t> ControlLoop::Listen(const std::string& host, uint16_t port) {
  TANDEM_ASSIGN_OR_RETURN(auto listening, ListenTcp(host, port));
  {
    std::lock_guard lock(mutex_);
    if (listen_fd_ >= 0) {
      ::close(listening.first);
      return absl::FailedPreconditionError("control loop already listens");
    }
    listen_fd_ = listening.first;
  }
  Wake();
  return listening.second;
}

ConnectionId ControlLoop::Adopt(int fd) {
  SetNonBlocking(fd);
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  auto conn = std::make_shared<Connection>();
  conn->fd = fd;
  conn->last_received = conn->last_sent = Clock::now();
  ConnectionId id;
  {
    std::lock_guard lock(mutex_);
    id = next_id_++;
    connections_[id] = std::move(conn);
  }
  Wake();
  return id;
}

std::shared_ptr<ControlLoop::Connection> ControlLoop::Find(ConnectionId id) {
  std::lock_guard lock(mutex_);
  auto it = connections_.find(id);
  return it == connections_.end() ? nullptr : it->second;
}

absl::Status ControlLoop::Send(ConnectionId id, FrameType type, std::string_view payload) {
  std::shared_ptr<Connection> conn = Find(id);
  if (!conn || conn->closing.load()) {
    return absl::UnavailableError(absl::StrCat("bootstrap connection ", id, " is closed"));
  }
  const std::string frame = EncodeFrame(type, payload);
  absl::Status status;
  {
    std::lock_guard write(conn->write_mutex);
    if (conn->fd < 0) return absl::UnavailableError(absl::StrCat("bootstrap connection ", id, " is closed"));
    status = WriteAll(conn->fd, frame, Clock::now() + options_.lease);
    conn->last_sent = Clock::now();
  }
  if (!status.ok()) Close(id, status);
  return status;
}

void ControlLoop::Close(ConnectionId id, const absl::Status& reason, bool tell_peer) {
  std::shared_ptr<Connection> conn = Find(id);
  if (!conn) return;
  if (tell_peer && !conn->closing.load()) {
    std::lock_guard write(conn->write_mutex);
    if (conn->fd >= 0) {
      (void)WriteAll(conn->fd, EncodeFrame(FrameType::kRefuse, Encode(StatusMessage{reason.code(), std::string(reason.message())})),
                     Clock::now() + std::chrono::milliseconds(200));
    }
  }
  {
    std::lock_guard lock(mutex_);
    if (conn->closing.load()) return;
    conn->close_reason = reason;
    conn->closing.store(true);
  }
  Wake();
}

void ControlLoop::Finish(ConnectionId id) {
  std::shared_ptr<Connection> conn;
  {
    std::lock_guard lock(mutex_);
    auto it = connections_.find(id);
    if (it == connections_.end()) return;
    conn = it->second;
    connections_.erase(it);
  }
  {
    std::lock_guard write(conn->write_mutex);
    ::close(conn->fd);
    conn->fd = -1;
  }
  if (handlers_.on_closed) handlers_.on_closed(id, conn->close_reason);
}

void ControlLoop::ReadFrom(ConnectionId id, const std::shared_ptr<Connection>& conn) {
  char buffer[64 * 1024];
  for (;;) {
    const ssize_t n = ::recv(conn->fd, buffer, sizeof(buffer), 0);
    if (n > 0) {
      conn->read_buffer.append(buffer, static_cast<size_t>(n));
      conn->last_received = Clock::now();
      if (static_cast<size_t>(n) < sizeof(buffer)) break;
      continue;
    }
    if (n == 0) {
      Close(id, absl::UnavailableError("bootstrap peer closed the connection"));
      break;
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) Close(id, absl::UnavailableError(absl::StrCat("bootstrap receive: ", std::strerror(errno))));
    break;
  }
  // Whole frames only; a bad header refuses the peer and drops the connection.
  size_t used = 0;
  while (!conn->closing.load() && conn->read_buffer.size() - used >= kFrameHeaderBytes) {
    std::string_view rest(conn->read_buffer.data() + used, conn->read_buffer.size() - used);
    absl::StatusOr<FrameHeader> header = ParseFrameHeader(rest.substr(0, kFrameHeaderBytes), options_.max_frame_bytes);
    if (!header.ok()) {
      if (handlers_.on_bad_frame) handlers_.on_bad_frame(id, header.status());
      Close(id, header.status(), /*tell_peer=*/true);
      break;
    }
    if (rest.size() < kFrameHeaderBytes + header->length) break;
    const std::string_view payload = rest.substr(kFrameHeaderBytes, header->length);
    used += kFrameHeaderBytes + header->length;
    if (header->type == FrameType::kHeartbeat) continue;
    if (handlers_.on_frame) handlers_.on_frame(id, header->type, payload);
  }
  conn->read_buffer.erase(0, used);
}

void ControlLoop::Run() {
  const auto tick = std::clamp(options_.heartbeat_interval / 4, std::chrono::milliseconds(2), std::chrono::milliseconds(50));
  std::vector<pollfd> fds;
  std::vector<std::pair<ConnectionId, std::shared_ptr<Connection>>> polled;
  while (!stop_.load()) {
    fds.clear();
    polled.clear();
    int listen_fd;
    std::vector<ConnectionId> to_finish;
    {
      std::lock_guard lock(mutex_);
      listen_fd = listen_fd_;
      for (auto& [id, conn] : connections_) {
        if (conn->closing.load()) {
          to_finish.push_back(id);
          continue;
        }
        polled.emplace_back(id, conn);
      }
    }
    for (ConnectionId id : to_finish) Finish(id);
    fds.push_back({wake_fd_, POLLIN, 0});
    if (listen_fd >= 0) fds.push_back({listen_fd, POLLIN, 0});
    for (auto& [id, conn] : polled) fds.push_back({conn->fd, POLLIN, 0});
    const int n = ::poll(fds.data(), fds.size(), static_cast<int>(tick.count()));
    if (stop_.load()) break;
    if (n > 0) {
      if (fds[0].revents & POLLIN) {
        uint64_t value;
        [[maybe_unused]] ssize_t r = ::read(wake_fd_, &value, sizeof(value));
      }
      size_t index = 1;
      if (listen_fd >= 0) {
        if (fds[index].revents & POLLIN) {
          for (;;) {
            const int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
            if (fd < 0) break;
            const ConnectionId id = Adopt(fd);
            if (handlers_.on_accept) handlers_.on_accept(id);
          }
        }
        ++index;
      }
      for (auto& [id, conn] : polled) {
        if (fds[index++].revents & (POLLIN | POLLHUP | POLLERR)) ReadFrom(id, conn);
      }
    }
    const auto now = Clock::now();
    for (auto& [id, conn] : polled) {
      if (conn->closing.load()) continue;
      if (now - conn->last_received > options_.lease) {
        Close(id, absl::UnavailableError(absl::StrCat("bootstrap peer missed its heartbeats: silent for more than ",
                                                      options_.lease.count(), " ms")));
        continue;
      }
      if (options_.send_heartbeats && now - conn->last_sent >= options_.heartbeat_interval) {
        (void)Send(id, FrameType::kHeartbeat, {});
      }
    }
    if (handlers_.on_tick) handlers_.on_tick();
  }
}

}  // namespace tandem::transfer
