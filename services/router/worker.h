// The fleet as the router sees it: workers (prefill, decode, mixed) with their gRPC stubs, health
// from grpc.health.v1 checks, a circuit breaker each, and the load the router put on them.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "common/core/status.h"
#include "tandem/v1/engine.grpc.pb.h"

namespace tandem::router {

enum class WorkerRole { kPrefill, kDecode, kMixed };
const char* RoleName(WorkerRole role);

struct WorkerAddress {
  WorkerRole role = WorkerRole::kMixed;
  std::string host;
  int port = 0;
  int bootstrap_port = 0;  // prefill only
  std::string name() const { return absl::StrCat(host, ":", port); }
};

// "host:port" or, for prefill, "host:port,bootstrap_port" (the default bootstrap port is 8998).
absl::StatusOr<WorkerAddress> ParseWorkerAddress(WorkerRole role, const std::string& text);

struct BreakerOptions {
  int failure_threshold = 3;  // consecutive failures that open the breaker
  double open_seconds = 5.0;  // then one probe request is let through (half-open)
  int success_threshold = 1;  // successes in half-open that close it again
};

// Closed → (failures) → open → (timeout) → half-open → (success) closed / (failure) open.
class CircuitBreaker {
 public:
  enum class State { kClosed = 0, kOpen = 1, kHalfOpen = 2 };
  explicit CircuitBreaker(BreakerOptions options) : options_(options) {}

  // May a request go to this worker now? Half-open lets one probe through at a time.
  bool Allow();
  // Without taking the probe slot (for policies looking at candidates).
  bool WouldAllow() const;
  void RecordSuccess();
  void RecordFailure();
  State state() const;
  uint64_t transitions() const { return transitions_.load(); }

 private:
  void Move(State next);

  BreakerOptions options_;
  mutable std::mutex mutex_;
  State state_ = State::kClosed;
  int consecutive_failures_ = 0;
  int half_open_successes_ = 0;
  bool probe_in_flight_ = false;
  std::chrono::steady_clock::time_point open_until_{};
  std::atomic<uint64_t> transitions_{0};
};

struct HealthOptions {
  double interval_seconds = 1.0;
  double timeout_seconds = 1.0;
  int failure_threshold = 2;  // failed checks that mark a healthy worker unhealthy
  int success_threshold = 1;  // passed checks that mark an unhealthy worker healthy
};

class Worker {
 public:
  Worker(WorkerAddress address, BreakerOptions breaker);

  const WorkerAddress& address() const { return address_; }
  const std::string& name() const { return name_; }
  v1::Engine::Stub& stub() { return *stub_; }
  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }
  CircuitBreaker& breaker() { return breaker_; }

  bool healthy() const { return healthy_.load(); }
  // Healthy and the breaker lets traffic through.
  bool Usable() const { return healthy() && breaker_.WouldAllow(); }
  int64_t in_flight() const { return in_flight_.load(); }
  int64_t engine_load() const { return engine_load_.load(); }
  int64_t max_context_tokens() const { return max_context_tokens_.load(); }
  int64_t max_new_tokens_limit() const { return max_new_tokens_limit_.load(); }
  std::string config_hash() const;

  void AddInFlight(int64_t delta) { in_flight_.fetch_add(delta); }

  // One round of the health loop: grpc.health.v1 Check, then GetLoads (and GetModelInfo once).
  void CheckHealth(const HealthOptions& options);

 private:
  WorkerAddress address_;
  std::string name_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Engine::Stub> stub_;
  CircuitBreaker breaker_;
  std::atomic<bool> healthy_{false};
  int passes_ = 0;
  int failures_ = 0;
  bool ever_healthy_ = false;
  std::atomic<int64_t> in_flight_{0};
  std::atomic<int64_t> engine_load_{0};
  std::atomic<int64_t> max_context_tokens_{0};
  std::atomic<int64_t> max_new_tokens_limit_{0};
  mutable std::mutex info_mutex_;
  std::string config_hash_;
};

// A worker file: one worker a line, "prefill host:port[,bootstrap_port]", "decode host:port" or
// "mixed host:port"; blank lines and # comments ignored.
absl::StatusOr<std::vector<WorkerAddress>> ParseWorkerFile(const std::string& text);

// Owns the workers and the thread that checks them. The set can change at run time (Reload);
// a removed worker is retired, not freed, because requests in flight may still point at it.
class WorkerRegistry {
 public:
  WorkerRegistry(std::vector<WorkerAddress> addresses, BreakerOptions breaker, HealthOptions health);
  // Re-read `path` whenever its modification time changes (checked every health interval).
  void WatchWorkerFile(std::string path, std::vector<WorkerAddress> fixed);
  // The new worker set: unchanged workers keep their state, new ones start unhealthy, missing ones retire.
  void Reload(const std::vector<WorkerAddress>& addresses);
  ~WorkerRegistry();

  void StartHealthChecks();
  void Stop();
  // Runs one check of every worker now (tests and startup).
  void CheckAllNow();
  // Wakes the health loop for a round now (new workers join without waiting an interval).
  void CheckSoon();

  std::vector<Worker*> Workers(WorkerRole role) const;
  std::vector<Worker*> all() const;
  // At least one usable prefill + decode pair, or one usable mixed worker.
  bool Ready() const;
  // The smallest context any healthy worker reported (0 if none known yet).
  int64_t MaxContextTokens() const;
  // The smallest max_new_tokens limit any healthy worker reported (0 if none known yet).
  int64_t MaxNewTokensLimit() const;

 private:
  void MaybeReloadFile();

  mutable std::mutex workers_mutex_;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::vector<std::unique_ptr<Worker>> retired_;
  BreakerOptions breaker_;
  HealthOptions health_;
  std::string worker_file_;
  std::vector<WorkerAddress> fixed_;  // from flags, kept across reloads
  std::filesystem::file_time_type worker_file_time_{};
  std::thread thread_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  bool check_soon_ = false;
};

}  // namespace tandem::router
