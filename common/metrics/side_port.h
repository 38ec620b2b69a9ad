// The HTTP side port of a service: GET /health (200 when serving, 503 while starting or draining),
// GET /metrics (Prometheus text), plus any GET routes the service adds. One thread pool, bounded.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "common/core/status.h"

namespace httplib {
class Server;
}

namespace tandem::metrics {

struct HttpReply {
  int status = 200;
  std::string body;
  std::string content_type = "application/json";
};

class SidePort {
 public:
  using Handler = std::function<HttpReply()>;

  SidePort();
  ~SidePort();
  SidePort(const SidePort&) = delete;
  SidePort& operator=(const SidePort&) = delete;

  // Routes must be added before Start.
  void AddGet(const std::string& path, Handler handler);
  // Binds host:port (0: any free port) and serves on a thread of its own.
  absl::Status Start(const std::string& host, int port);
  void Stop();
  int port() const { return port_; }

 private:
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  int port_ = 0;
};

}  // namespace tandem::metrics
