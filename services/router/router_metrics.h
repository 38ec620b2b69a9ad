// The router's Prometheus metrics under tandem_router_* (reference/ecosystem.md §2.1 conventions:
// underscores, model_name label, per-worker gauges as the SGLang gateway's smg_worker_*).
#pragma once

#include <memory>
#include <mutex>
#include <string>

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "services/router/worker.h"

namespace tandem::router {

class RouterMetrics {
 public:
  explicit RouterMetrics(std::string model_name);

  // One finished client request: api http|grpc, endpoint chat|completion|models, code the HTTP status.
  void Request(const std::string& api, const std::string& endpoint, int code);
  void FirstToken(double seconds) { ttft_->Observe(seconds); }
  void InterToken(double seconds) { itl_->Observe(seconds); }
  void EndToEnd(double seconds) { e2e_->Observe(seconds); }
  void Tokens(int64_t prompt, int64_t generated);
  void Retry() { retries_->Increment(); }
  void RetriesExhausted() { retries_exhausted_->Increment(); }
  void Selected(const Worker& worker);
  void WorkerFailure(const Worker& worker);

  // Per-worker gauges refreshed from the registry, then the text exposition.
  std::string Scrape(const WorkerRegistry& registry);

 private:
  prometheus::Labels WorkerLabels(const Worker& worker) const;

  std::string model_name_;
  std::shared_ptr<prometheus::Registry> registry_;
  std::mutex mutex_;
  prometheus::Family<prometheus::Counter>* requests_;
  prometheus::Histogram* ttft_;
  prometheus::Histogram* itl_;
  prometheus::Histogram* e2e_;
  prometheus::Counter* prompt_tokens_;
  prometheus::Counter* generation_tokens_;
  prometheus::Counter* retries_;
  prometheus::Counter* retries_exhausted_;
  prometheus::Family<prometheus::Counter>* selections_;
  prometheus::Family<prometheus::Counter>* failures_;
  prometheus::Family<prometheus::Gauge>* health_;
  prometheus::Family<prometheus::Gauge>* breaker_state_;
  prometheus::Family<prometheus::Counter>* breaker_transitions_;
  prometheus::Family<prometheus::Gauge>* active_;
  prometheus::Gauge* ready_;
};

}  // namespace tandem::router
