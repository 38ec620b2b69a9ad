#include "common/metrics/side_port.h"

#include <httplib.h>

namespace tandem::metrics {

SidePort::SidePort() : server_(std::make_unique<httplib::Server>()) {
  server_->new_task_queue = [] { return new httplib::ThreadPool(4); };
}

SidePort::~SidePort() { Stop(); }

void SidePort::AddGet(const std::string& path, Handler handler) {
  server_->Get(path, [handler = std::move(handler)](const httplib::Request&, httplib::Response& response) {
    HttpReply reply = handler();
    response.status = reply.status;
    response.set_content(reply.body, reply.content_type.c_str());
  });
}

absl::Status SidePort::Start(const std::string& host, int port) {
  if (port == 0) {
    port_ = server_->bind_to_any_port(host.c_str());
    if (port_ <= 0) return absl::UnavailableError(absl::StrCat("http side port: cannot bind ", host));
  } else {
    if (!server_->bind_to_port(host.c_str(), port)) {
      return absl::UnavailableError(absl::StrCat("http side port: cannot bind ", host, ":", port, " (in use?)"));
    }
    port_ = port;
  }
  thread_ = std::thread([this] { server_->listen_after_bind(); });
  return absl::OkStatus();
}

void SidePort::Stop() {
  if (thread_.joinable()) {
    server_->stop();
    thread_.join();
  }
}

}  // namespace tandem::metrics
