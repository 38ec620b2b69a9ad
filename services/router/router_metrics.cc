#include "services/router/router_metrics.h"

#include "common/metrics/metrics.h"

namespace tandem::router {

RouterMetrics::RouterMetrics(std::string model_name)
    : model_name_(std::move(model_name)), registry_(std::make_shared<prometheus::Registry>()) {
  auto& r = *registry_;
  const prometheus::Labels model{{"model_name", model_name_}};
  requests_ = &prometheus::BuildCounter().Name("tandem_router_requests_total")
                   .Help("client requests by api, endpoint and HTTP status code").Register(r);
  ttft_ = &prometheus::BuildHistogram().Name("tandem_router_time_to_first_token_seconds")
               .Help("request arrival to the first generated text sent to the client").Register(r)
               .Add(model, metrics::TtftBuckets());
  itl_ = &prometheus::BuildHistogram().Name("tandem_router_inter_token_latency_seconds")
              .Help("time between successive chunks sent to the client").Register(r)
              .Add(model, metrics::InterTokenBuckets());
  e2e_ = &prometheus::BuildHistogram().Name("tandem_router_e2e_request_latency_seconds")
              .Help("request arrival to its last byte").Register(r).Add(model, metrics::E2eBuckets());
  prompt_tokens_ = &prometheus::BuildCounter().Name("tandem_router_prompt_tokens_total")
                        .Help("prompt tokens of served requests").Register(r).Add(model);
  generation_tokens_ = &prometheus::BuildCounter().Name("tandem_router_generation_tokens_total")
                            .Help("tokens generated for clients").Register(r).Add(model);
  retries_ = &prometheus::BuildCounter().Name("tandem_router_retries_total")
                  .Help("dispatches retried on a fresh worker pair before the first byte").Register(r).Add(model);
  retries_exhausted_ = &prometheus::BuildCounter().Name("tandem_router_retries_exhausted_total")
                            .Help("requests that failed after every retry").Register(r).Add(model);
  selections_ = &prometheus::BuildCounter().Name("tandem_router_worker_selections_total")
                     .Help("times a policy picked the worker").Register(r);
  failures_ = &prometheus::BuildCounter().Name("tandem_router_worker_failures_total")
                   .Help("legs that failed on the worker (counted by its circuit breaker)").Register(r);
  health_ = &prometheus::BuildGauge().Name("tandem_router_worker_health")
                 .Help("1 when the worker passes its grpc.health.v1 checks").Register(r);
  breaker_state_ = &prometheus::BuildGauge().Name("tandem_router_worker_cb_state")
                        .Help("circuit breaker state: 0 closed, 1 open, 2 half-open").Register(r);
  breaker_transitions_ = &prometheus::BuildCounter().Name("tandem_router_worker_cb_transitions_total")
                              .Help("circuit breaker state changes").Register(r);
  active_ = &prometheus::BuildGauge().Name("tandem_router_worker_requests_active")
                 .Help("legs the router has in flight on the worker").Register(r);
  ready_ = &prometheus::BuildGauge().Name("tandem_router_ready")
                .Help("1 when a healthy prefill+decode pair or mixed worker exists").Register(r).Add(model);
}

prometheus::Labels RouterMetrics::WorkerLabels(const Worker& worker) const {
  return {{"model_name", model_name_}, {"worker", worker.name()}, {"role", RoleName(worker.address().role)}};
}

void RouterMetrics::Request(const std::string& api, const std::string& endpoint, int code) {
  std::lock_guard lock(mutex_);
  requests_->Add({{"model_name", model_name_}, {"api", api}, {"endpoint", endpoint}, {"code", std::to_string(code)}})
      .Increment();
}

void RouterMetrics::Tokens(int64_t prompt, int64_t generated) {
  prompt_tokens_->Increment(static_cast<double>(prompt));
  generation_tokens_->Increment(static_cast<double>(generated));
}

void RouterMetrics::Selected(const Worker& worker) {
  std::lock_guard lock(mutex_);
  selections_->Add(WorkerLabels(worker)).Increment();
}

void RouterMetrics::WorkerFailure(const Worker& worker) {
  std::lock_guard lock(mutex_);
  failures_->Add(WorkerLabels(worker)).Increment();
}

std::string RouterMetrics::Scrape(const WorkerRegistry& registry) {
  {
    std::lock_guard lock(mutex_);
    for (const auto& worker : registry.all()) {
      const auto labels = WorkerLabels(*worker);
      health_->Add(labels).Set(worker->healthy() ? 1 : 0);
      breaker_state_->Add(labels).Set(static_cast<double>(worker->breaker().state()));
      auto& transitions = breaker_transitions_->Add(labels);
      const double seen = static_cast<double>(worker->breaker().transitions());
      if (seen > transitions.Value()) transitions.Increment(seen - transitions.Value());
      active_->Add(labels).Set(static_cast<double>(worker->in_flight()));
      selections_->Add(labels);
      failures_->Add(labels);
    }
    ready_->Set(registry.Ready() ? 1 : 0);
  }
  return metrics::Exposition(*registry_);
}

}  // namespace tandem::router
