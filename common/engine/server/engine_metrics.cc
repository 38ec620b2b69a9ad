#include "common/engine/server/engine_metrics.h"

#include "common/metrics/metrics.h"

namespace tandem::engine {
namespace {

template <typename Builder>
auto& Make(Builder builder, const char* name, const char* help, prometheus::Registry& registry) {
  return builder.Name(name).Help(help).Register(registry);
}

}  // namespace

EngineMetrics::EngineMetrics(const std::string& model_name, const std::string& role)
    : registry_(std::make_shared<prometheus::Registry>()), labels_{{"model_name", model_name}, {"role", role}} {
  auto& r = *registry_;
  requests_ = &Make(prometheus::BuildCounter(), "tandem_num_requests_total", "Generate requests accepted", r).Add(labels_);
  aborted_ = &Make(prometheus::BuildCounter(), "tandem_num_aborted_requests_total",
                   "requests that ended aborted, cancelled or with an error", r).Add(labels_);
  prompt_tokens_ = &Make(prometheus::BuildCounter(), "tandem_prompt_tokens_total", "prompt tokens of finished requests", r).Add(labels_);
  generation_tokens_ =
      &Make(prometheus::BuildCounter(), "tandem_generation_tokens_total", "tokens generated", r).Add(labels_);
  cached_tokens_ =
      &Make(prometheus::BuildCounter(), "tandem_cached_tokens_total", "prompt tokens taken from the prefix cache", r).Add(labels_);
  retractions_ = &Make(prometheus::BuildCounter(), "tandem_num_retractions_total",
                       "requests retracted under memory pressure and recomputed later", r).Add(labels_);
  ttft_ = &Make(prometheus::BuildHistogram(), "tandem_time_to_first_token_seconds", "time from Generate to the first token", r)
               .Add(labels_, metrics::TtftBuckets());
  itl_ = &Make(prometheus::BuildHistogram(), "tandem_inter_token_latency_seconds", "time between streamed tokens", r)
              .Add(labels_, metrics::InterTokenBuckets());
  e2e_ = &Make(prometheus::BuildHistogram(), "tandem_e2e_request_latency_seconds", "time from Generate to its end", r)
              .Add(labels_, metrics::E2eBuckets());
  queue_time_ = &Make(prometheus::BuildHistogram(), "tandem_queue_time_seconds", "time waiting before first admission", r)
                     .Add(labels_, metrics::QueueTimeBuckets());
  running_ = &Make(prometheus::BuildGauge(), "tandem_num_running_reqs", "requests running", r).Add(labels_);
  queued_ = &Make(prometheus::BuildGauge(), "tandem_num_queue_reqs", "requests waiting", r).Add(labels_);
  token_usage_ = &Make(prometheus::BuildGauge(), "tandem_token_usage", "fraction of token pages in use", r).Add(labels_);
  throughput_ = &Make(prometheus::BuildGauge(), "tandem_gen_throughput", "generated tokens per second (last 5 s)", r).Add(labels_);
  cache_hit_rate_ = &Make(prometheus::BuildGauge(), "tandem_cache_hit_rate",
                          "fraction of prompt tokens taken from the prefix cache", r).Add(labels_);
  transfer_bytes_ = &Make(prometheus::BuildCounter(), "tandem_kv_transfer_bytes_total",
                          "KV/state bytes handed over, by path: ipc (device to device), staged (device pools through host "
                          "copies), host (host pools as they are)", r);
  transfer_latency_ = &Make(prometheus::BuildHistogram(), "tandem_kv_transfer_latency_seconds",
                            "one request's hand-over, first byte to verified completion", r)
                           .Add(labels_, prometheus::Histogram::BucketBoundaries{0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1,
                                                                                 0.2, 0.5, 1, 2, 5, 10});
  // sglang's per_stage_req_latency_seconds{stage} (1 ms x 1.62^k), but from 50 us: the hand-over's stages are
  // sub-millisecond.
  stage_latency_ = &Make(prometheus::BuildHistogram(), "tandem_per_stage_req_latency_seconds",
                         "PD: time of each hand-over stage of a request on this side (stage: the event ending it)", r);
  // sglang's kv_transfer_speed_gb_s, in bytes per second: promtool refuses abbreviated units in names.
  transfer_speed_ = &Make(prometheus::BuildGauge(), "tandem_kv_transfer_speed_bytes_per_second",
                          "speed of the last hand-over", r).Add(labels_);
  bootstrap_failures_ = &Make(prometheus::BuildCounter(), "tandem_num_bootstrap_failed_reqs_total",
                              "refused or failed bootstrap handshakes and bad frames", r).Add(labels_);
  transfer_failures_ = &Make(prometheus::BuildCounter(), "tandem_num_transfer_failed_reqs_total",
                             "failed puts and checksum mismatches", r).Add(labels_);
  transfer_queue_ = &Make(prometheus::BuildGauge(), "tandem_num_decode_transfer_queue_reqs",
                          "decode: requests with pages reserved, state in flight", r).Add(labels_);
  inflight_queue_ = &Make(prometheus::BuildGauge(), "tandem_num_prefill_inflight_queue_reqs",
                          "prefill: prompts done, shipping or awaiting decode's ack", r).Add(labels_);
  quarantined_pages_ = &Make(prometheus::BuildGauge(), "tandem_kv_quarantined_pages",
                             "decode: token pages of failed transfers held out of the pool until no late write from "
                             "prefill can land in them (--pd-late-write-grace)", r).Add(labels_);
  pool_used_ = &Make(prometheus::BuildGauge(), "tandem_cache_pool_used_pages", "pages or slots in use, per state pool", r);
  pool_total_ = &Make(prometheus::BuildGauge(), "tandem_cache_pool_total_pages", "pages or slots, per state pool", r);
}

void EngineMetrics::RequestFinished(const RequestUpdate& last, double e2e_seconds) {
  e2e_->Observe(e2e_seconds);
  if (!last.status.ok()) aborted_->Increment();
  prompt_tokens_->Increment(static_cast<double>(last.prompt_tokens));
  generation_tokens_->Increment(static_cast<double>(last.completion_tokens));
  cached_tokens_->Increment(static_cast<double>(last.cached_tokens));
  retractions_->Increment(static_cast<double>(last.retractions));
}

void EngineMetrics::Transferred(uint64_t bytes, double seconds, std::string_view path) {
  prometheus::Labels labels = labels_;
  labels["path"] = std::string(path);
  transfer_bytes_->Add(labels).Increment(static_cast<double>(bytes));
  transfer_latency_->Observe(seconds);
  if (seconds > 0) transfer_speed_->Set(static_cast<double>(bytes) / seconds);
}

void EngineMetrics::Stages(std::span<const pd_trace::Stage> stages) {
  static const prometheus::Histogram::BucketBoundaries buckets = [] {
    prometheus::Histogram::BucketBoundaries b;
    for (double edge = 5e-5; b.size() < 30; edge *= 1.62) b.push_back(edge);
    return b;
  }();
  for (const auto& stage : stages) {
    prometheus::Labels labels = labels_;
    labels["stage"] = stage.name;
    stage_latency_->Add(labels, buckets).Observe(stage.seconds);
  }
}

void EngineMetrics::Refresh(const EngineLoad& load) {
  transfer_queue_->Set(static_cast<double>(load.scheduler.awaiting_state));
  inflight_queue_->Set(static_cast<double>(load.scheduler.handing_over));
  quarantined_pages_->Set(static_cast<double>(load.scheduler.quarantined_pages));
  if (transfer_stats_) {
    // Mirror the agent's own counters (they only grow).
    const TransferStats stats = transfer_stats_();
    const double bootstrap = static_cast<double>(stats.agent.bootstrap_failures);
    const double transfer = static_cast<double>(stats.agent.transfer_failures);
    if (bootstrap > bootstrap_failures_->Value()) bootstrap_failures_->Increment(bootstrap - bootstrap_failures_->Value());
    if (transfer > transfer_failures_->Value()) transfer_failures_->Increment(transfer - transfer_failures_->Value());
  }
  running_->Set(static_cast<double>(load.scheduler.running));
  queued_->Set(static_cast<double>(load.scheduler.waiting));
  token_usage_->Set(load.scheduler.token_usage);
  throughput_->Set(load.generation_throughput);
  const double prompt = prompt_tokens_->Value();
  cache_hit_rate_->Set(prompt > 0 ? cached_tokens_->Value() / prompt : 0.0);
  for (const auto& pool : load.scheduler.pools) {
    prometheus::Labels labels = labels_;
    labels["pool"] = pool.name;
    pool_used_->Add(labels).Set(static_cast<double>(pool.used));
    pool_total_->Add(labels).Set(static_cast<double>(pool.total));
  }
}

std::string EngineMetrics::Scrape(const EngineLoad& load) {
  Refresh(load);
  return metrics::Exposition(*registry_);
}

}  // namespace tandem::engine
