// Token-level dispatch: a GenerateRequest goes to one mixed worker or to a prefill + decode pair
// (both legs at once, one fresh 64-bit room), and comes back as a pull stream of token chunks.
// Either leg failing cancels the other; failures before the first chunk retry on a fresh pair.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <vector>

#include "common/core/status.h"
#include "services/router/policy.h"
#include "services/router/router_metrics.h"
#include "services/router/worker.h"
#include "tandem/v1/engine.pb.h"

namespace tandem::router {

struct StreamEvent {
  enum class Kind { kChunk, kEnd };
  Kind kind = Kind::kChunk;
  v1::GenerateChunk chunk;        // kChunk
  v1::GenerateComplete complete;  // kEnd
};

// One generation in progress. Next() blocks for the next event; after kEnd or an error, no more.
class TokenStream {
 public:
  virtual ~TokenStream() = default;
  virtual absl::Status Next(StreamEvent& event) = 0;
  // Ends the generation on every worker (client gone, stop string matched). Thread-safe.
  virtual void Cancel() = 0;
};

// What the text layer talks to: the fleet in production, a fake in unit tests.
class Generator {
 public:
  virtual ~Generator() = default;
  virtual std::unique_ptr<TokenStream> Open(const v1::GenerateRequest& request) = 0;
};

struct RetryOptions {
  int max_retries = 3;
  double initial_backoff_seconds = 0.05;
  double max_backoff_seconds = 2.0;
  double multiplier = 1.5;
  double jitter = 0.2;
};

// True for statuses worth another pair: the worker, not the request, was at fault.
bool IsRetryable(const absl::Status& status);
// Whether a leg ending with `status` counts against its worker's breaker.
bool CountsAsWorkerFailure(const absl::Status& status);

class FleetGenerator final : public Generator {
 public:
  FleetGenerator(WorkerRegistry* registry, std::unique_ptr<Policy> prefill_policy, std::unique_ptr<Policy> decode_policy,
                 std::unique_ptr<Policy> mixed_policy, RouterMetrics* metrics, RetryOptions retry);

  std::unique_ptr<TokenStream> Open(const v1::GenerateRequest& request) override;

  // Internals shared with the stream.
  struct Choice {
    Worker* prefill = nullptr;  // null for a mixed worker
    Worker* main = nullptr;     // decode or mixed
  };
  absl::StatusOr<Choice> Choose(const std::vector<int32_t>& prompt, const std::vector<Worker*>& tried);
  uint64_t NewRoom();
  RouterMetrics* metrics() { return metrics_; }
  const RetryOptions& retry() const { return retry_; }
  double Jitter();

 private:
  WorkerRegistry* registry_;
  std::unique_ptr<Policy> prefill_policy_;
  std::unique_ptr<Policy> decode_policy_;
  std::unique_ptr<Policy> mixed_policy_;
  RouterMetrics* metrics_;
  RetryOptions retry_;
  std::mutex random_mutex_;
  std::mt19937_64 random_;
};

}  // namespace tandem::router
