// The router process as a library: options, the fleet (registry + dispatch), the OpenAI HTTP front,
// the gRPC front, and their life (start, serve until a signal, stop). main.cc only parses flags.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "common/core/status.h"
#include "common/text/tokenizer.h"
#include "services/router/api.h"
#include "services/router/discovery_k8s.h"
#include "services/router/dispatch.h"
#include "services/router/router_metrics.h"
#include "services/router/worker.h"

namespace tandem::router {

struct RouterOptions {
  std::string host = "0.0.0.0";
  int http_port = 8000;
  int grpc_port = 50051;
  std::string model_dir;
  std::string served_model_name;  // default: the model directory's name
  std::vector<std::string> prefill, decode, mixed;
  std::string worker_file;  // more workers, re-read when it changes
  std::string discovery = "static";  // or "k8s": workers from pods (k8s.*), added to the flags' workers
  K8sDiscoveryOptions k8s;
  std::string prefill_policy = "cache_aware";
  std::string decode_policy = "least_load";
  std::string mixed_policy = "cache_aware";
  HealthOptions health;
  BreakerOptions breaker;
  RetryOptions retry;
  CacheAwareOptions cache;
  std::string api_key_file;
  size_t max_request_bytes = 4 << 20;
  int64_t max_prompt_tokens = 0;  // 0: the workers' context
  int http_threads = 128;
  std::string effort_profile = "official";
};

// Everything the two fronts share.
struct RouterState {
  RouterOptions options;
  std::unique_ptr<text::Tokenizer> tokenizer;
  std::unique_ptr<WorkerRegistry> registry;
  std::unique_ptr<K8sDiscovery> discovery;  // --discovery k8s
  std::unique_ptr<RouterMetrics> metrics;
  Generator* generator = nullptr;  // the fleet, or a fake in tests
  std::unique_ptr<Generator> owned_generator;
  absl::flat_hash_set<std::string> api_keys;
  text::EffortProfile effort_profile = text::EffortProfile::kOfficial;
  int64_t created = 0;

  ServingContext Context() const;
  // Empty key set: no authentication. `header` is the Authorization value ("Bearer KEY").
  bool Authorized(const std::string& header) const;
};

// Loads the tokenizer, parses workers and policies, reads the api keys.
absl::StatusOr<std::unique_ptr<RouterState>> MakeRouterState(RouterOptions options);

class HttpFront;
class GrpcFront;

class Router {
 public:
  explicit Router(std::unique_ptr<RouterState> state);
  ~Router();
  // Binds both ports (0: any free port) and starts the health checks (and the pod watch).
  absl::Status Start();
  void Stop();
  int http_port() const;
  int grpc_port() const;
  RouterState& state() { return *state_; }

 private:
  std::unique_ptr<RouterState> state_;
  std::unique_ptr<HttpFront> http_;
  std::unique_ptr<GrpcFront> grpc_;
};

// Runs until SIGINT/SIGTERM; returns the exit code.
int RunRouter(RouterOptions options);

}  // namespace tandem::router
