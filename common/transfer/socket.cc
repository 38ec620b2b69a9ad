#include "common/transfer/socket.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace tandem::transfer {
namespace {

int RemainingMs(Clock::time_point deadline) {
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return ms <= 0 ? 0 : static_cast<int>(std::min<int64_t>(ms, 1 << 30));
}

absl::Status WaitFd(int fd, short events, Clock::time_point deadline, const std::string& what) {
  for (;;) {
    pollfd p{fd, events, 0};
    const int n = ::poll(&p, 1, RemainingMs(deadline));
    if (n > 0) return absl::OkStatus();
    if (n == 0) return absl::DeadlineExceededError(absl::StrCat(what, ": timed out"));
    if (errno != EINTR) return absl::UnavailableError(absl::StrCat(what, ": poll: ", std::strerror(errno)));
  }
}

absl::StatusOr<sockaddr_in> Resolve(const std::string& host, uint16_t port) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  const std::string name = host.empty() ? "0.0.0.0" : host;
  if (::inet_pton(AF_INET, name.c_str(), &addr.sin_addr) == 1) return addr;
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* result = nullptr;
  if (::getaddrinfo(name.c_str(), nullptr, &hints, &result) != 0 || result == nullptr) {
    return absl::UnavailableError(absl::StrCat("cannot resolve host '", name, "'"));
  }
  addr.sin_addr = reinterpret_cast<sockaddr_in*>(result->ai_addr)->sin_addr;
  ::freeaddrinfo(result);
  return addr;
}

}  // namespace

void SetNonBlocking(int fd) { ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL, 0) | O_NONBLOCK); }

absl::StatusOr<std::pair<int, uint16_t>> ListenTcp(const std::string& host, uint16_t port) {
  TANDEM_ASSIGN_OR_RETURN(sockaddr_in addr, Resolve(host, port));
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError(absl::StrCat("socket: ", std::strerror(errno)));
  const int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || ::listen(fd, 128) != 0) {
    const int err = errno;
    ::close(fd);
    return absl::UnavailableError(absl::StrCat("bootstrap port ", host, ":", port, ": ", std::strerror(err)));
  }
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  SetNonBlocking(fd);
  return std::make_pair(fd, ntohs(addr.sin_port));
}

absl::StatusOr<int> ConnectTcp(const std::string& host, uint16_t port, Clock::time_point deadline) {
  const std::string where = absl::StrCat("bootstrap ", host, ":", port);
  TANDEM_ASSIGN_OR_RETURN(sockaddr_in addr, Resolve(host, port));
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError(absl::StrCat("socket: ", std::strerror(errno)));
  SetNonBlocking(fd);
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 && errno != EINPROGRESS) {
    const int err = errno;
    ::close(fd);
    return absl::UnavailableError(absl::StrCat(where, ": connect: ", std::strerror(err)));
  }
  absl::Status waited = WaitFd(fd, POLLOUT, deadline, where + ": connect");
  int err = 0;
  socklen_t len = sizeof(err);
  if (waited.ok()) ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
  if (!waited.ok() || err != 0) {
    ::close(fd);
    if (!waited.ok()) return absl::UnavailableError(waited.message());
    return absl::UnavailableError(absl::StrCat(where, ": connect: ", std::strerror(err)));
  }
  return fd;
}

absl::Status WriteAll(int fd, std::string_view bytes, Clock::time_point deadline) {
  while (!bytes.empty()) {
    const ssize_t n = ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (n > 0) {
      bytes.remove_prefix(static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      absl::Status s = WaitFd(fd, POLLOUT, deadline, "bootstrap send");
      if (!s.ok()) return absl::UnavailableError(s.message());
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    return absl::UnavailableError(absl::StrCat("bootstrap send: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

namespace {
absl::Status ReadExact(int fd, char* out, size_t size, Clock::time_point deadline) {
  while (size > 0) {
    const ssize_t n = ::recv(fd, out, size, 0);
    if (n > 0) {
      out += n;
      size -= static_cast<size_t>(n);
      continue;
    }
    if (n == 0) return absl::UnavailableError("bootstrap peer closed the connection");
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      TANDEM_RETURN_IF_ERROR(WaitFd(fd, POLLIN, deadline, "bootstrap receive"));
      continue;
    }
    if (errno == EINTR) continue;
    return absl::UnavailableError(absl::StrCat("bootstrap receive: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}
}  // namespace

absl::StatusOr<std::pair<FrameHeader, std::string>> ReadFrame(int fd, Clock::time_point deadline, size_t max_frame_bytes) {
  char header[kFrameHeaderBytes];
  TANDEM_RETURN_IF_ERROR(ReadExact(fd, header, sizeof(header), deadline));
  TANDEM_ASSIGN_OR_RETURN(FrameHeader h, ParseFrameHeader(std::string_view(header, sizeof(header)), max_frame_bytes));
  std::string payload(h.length, '\0');
  TANDEM_RETURN_IF_ERROR(ReadExact(fd, payload.data(), payload.size(), deadline));
  return std::make_pair(h, std::move(payload));
}

}  // namespace tandem::transfer
