// Prometheus helpers shared by the services: sglang's bucket sets (reference/ecosystem.md §2.1) and
// the text exposition of a registry.
#pragma once

#include <string>
#include <vector>

#include <prometheus/registry.h>

namespace tandem::metrics {

// Seconds; the meanings and bucket sets of sglang's time_to_first_token_seconds,
// inter_token_latency_seconds, e2e_request_latency_seconds and queue_time_seconds.
const std::vector<double>& TtftBuckets();
const std::vector<double>& InterTokenBuckets();
const std::vector<double>& E2eBuckets();
const std::vector<double>& QueueTimeBuckets();

// The registry in the Prometheus text format (version 0.0.4).
std::string Exposition(const prometheus::Registry& registry);
inline constexpr const char* kExpositionContentType = "text/plain; version=0.0.4; charset=utf-8";

}  // namespace tandem::metrics
