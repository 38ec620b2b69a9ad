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

void EngineMetrics::Refresh(const EngineLoad& load) {
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
