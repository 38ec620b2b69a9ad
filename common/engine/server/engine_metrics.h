// The engine's Prometheus metrics: sglang's meanings and bucket sets under tandem_ names
// (reference/ecosystem.md §2.1), labelled model_name and role.
#pragma once

#include <memory>
#include <string>

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "common/engine/engine.h"
#include "common/engine/pd_trace.h"
#include "common/engine/server/transfer_links.h"

namespace tandem::engine {

class EngineMetrics {
 public:
  EngineMetrics(const std::string& model_name, const std::string& role);

  prometheus::Registry& registry() { return *registry_; }

  void RequestStarted() { requests_->Increment(); }
  void RequestFinished(const RequestUpdate& last, double e2e_seconds);
  void FirstToken(double ttft_seconds) { ttft_->Observe(ttft_seconds); }
  void InterToken(double seconds) { itl_->Observe(seconds); }
  void Queued(double seconds) { queue_time_->Observe(seconds); }
  // A finished KV hand-over (either side); `path`: "ipc", "staged" or "host" (TransferObserver).
  void Transferred(uint64_t bytes, double seconds, std::string_view path);
  // A disaggregated request's hand-over stages on this side (pd_trace.h).
  void Stages(std::span<const pd_trace::Stage> stages);
  // The transfer agent's counters, read at each scrape (prefill and decode roles).
  void set_transfer_stats(std::function<TransferStats()> stats) { transfer_stats_ = std::move(stats); }
  // Gauges from the engine's current load; called before each scrape.
  void Refresh(const EngineLoad& load);
  std::string Scrape(const EngineLoad& load);

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Labels labels_;
  prometheus::Counter* requests_;
  prometheus::Counter* aborted_;
  prometheus::Counter* prompt_tokens_;
  prometheus::Counter* generation_tokens_;
  prometheus::Counter* cached_tokens_;
  prometheus::Counter* retractions_;
  prometheus::Histogram* ttft_;
  prometheus::Histogram* itl_;
  prometheus::Histogram* e2e_;
  prometheus::Histogram* queue_time_;
  prometheus::Gauge* running_;
  prometheus::Gauge* queued_;
  prometheus::Gauge* token_usage_;
  prometheus::Gauge* throughput_;
  prometheus::Gauge* cache_hit_rate_;
  prometheus::Family<prometheus::Counter>* transfer_bytes_;  // by path
  prometheus::Histogram* transfer_latency_;
  prometheus::Family<prometheus::Histogram>* stage_latency_;
  prometheus::Gauge* transfer_speed_;
  prometheus::Counter* bootstrap_failures_;
  prometheus::Counter* transfer_failures_;
  prometheus::Gauge* transfer_queue_;
  prometheus::Gauge* inflight_queue_;
  prometheus::Gauge* quarantined_pages_;
  std::function<TransferStats()> transfer_stats_;
  prometheus::Family<prometheus::Gauge>* pool_used_;
  prometheus::Family<prometheus::Gauge>* pool_total_;
};

}  // namespace tandem::engine
