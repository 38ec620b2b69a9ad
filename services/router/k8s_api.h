// A minimal Kubernetes API client for the router's discovery: HTTPS verified against the cluster CA,
// the service-account bearer token (re-read for every request, since kubelet rotates it), GET and
// streaming GET (watch), and errors a user can act on.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/core/status.h"

namespace httplib {
class ClientImpl;
}

namespace tandem::router {

struct K8sApiOptions {
  // "https://host:port"; empty: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT.
  std::string server;
  std::string token_file = "/var/run/secrets/kubernetes.io/serviceaccount/token";
  std::string ca_file = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
  std::string namespace_file = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
  std::string namespace_name;  // empty: read namespace_file
  double connect_timeout_seconds = 5.0;
  double read_timeout_seconds = 30.0;  // a watch adds its own timeoutSeconds to this
};

// The result of one request that reached the server (any HTTP status); transport and TLS failures
// are a non-OK Status instead.
struct K8sResponse {
  int status = 0;
  std::string body;  // the whole body for a plain GET; for a stream, only a non-200 body
};

class K8sApi {
 public:
  // Resolves the server (flags, else the in-cluster environment) and the namespace; the token and CA
  // files are checked here once so a misconfigured pod says so at start.
  static absl::StatusOr<std::unique_ptr<K8sApi>> Create(K8sApiOptions options);
  ~K8sApi();

  const std::string& namespace_name() const { return namespace_; }
  const std::string& server() const { return server_url_; }

  absl::StatusOr<K8sResponse> Get(const std::string& path);
  // GET whose 200 body arrives in pieces as the server sends them; on_data returning false ends the
  // request (Canceled). extra_read_seconds lengthens the read timeout (a watch's timeoutSeconds).
  absl::StatusOr<K8sResponse> Stream(const std::string& path, double extra_read_seconds,
                                     const std::function<bool(const char* data, size_t size)>& on_data);
  // Breaks a request in progress (from another thread) and makes later ones fail at once.
  void Shutdown();

 private:
  K8sApi() = default;
  absl::StatusOr<std::string> ReadToken();
  absl::StatusOr<std::unique_ptr<httplib::ClientImpl>> NewClient(double extra_read_seconds);
  void Track(httplib::ClientImpl* client, bool add);
  absl::Status TransportError(int error, long verify_result) const;

  K8sApiOptions options_;
  std::string host_;
  int port_ = 443;
  std::string server_url_;
  std::string namespace_;
  std::mutex mutex_;
  std::string last_token_;                       // for the "token changed" log line
  std::vector<httplib::ClientImpl*> in_flight_;  // requests in progress, for Shutdown
  std::atomic<bool> shutdown_{false};
};

// "a=b,c!=d,e" → the labelSelector query value, percent-encoded.
std::string UrlEncode(const std::string& text);

}  // namespace tandem::router
