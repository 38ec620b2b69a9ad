// The OpenAI-compatible HTTP front (cpp-httplib): /v1/chat/completions, /v1/completions, /v1/models,
// SSE streaming, /health, /readiness, /metrics; API keys and request-size limits.
#pragma once

#include <memory>
#include <string>
#include <thread>

#include "services/router/router.h"

namespace httplib {
class Server;
}

namespace tandem::router {

class HttpFront {
 public:
  explicit HttpFront(RouterState* state);
  ~HttpFront();
  absl::Status Start(const std::string& host, int port);
  void Stop();
  int port() const { return port_; }

 private:
  void Routes();

  RouterState* state_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  int port_ = 0;
};

}  // namespace tandem::router
