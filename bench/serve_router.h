// The router's client APIs as `tandem-bench serve` targets: OpenAI /v1/completions over HTTP with SSE
// streaming, and tandem.v1.Router/Completion over gRPC, sending the same token-id prompts as the engine path.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "bench/serve_load.h"
#include "tandem/v1/router.grpc.pb.h"

namespace tandem::bench {

// "http://host:port" (the path, if any, is ignored: requests go to /v1/completions).
struct HttpTarget {
  std::string host;
  int port = 0;
};
absl::StatusOr<HttpTarget> ParseHttpUrl(const std::string& url);

// One streaming completion over HTTP. Each thread keeps one keep-alive connection per target, as a
// pooled OpenAI client would. Token counts per event come from stream_options.continuous_usage_stats.
RequestRecord SendOneHttp(const HttpTarget& target, const LoadSpec& spec, int level, int64_t index);

// One streaming Completion over the router's gRPC API. Its chunks carry no per-chunk token count, so
// each chunk with text counts as one ITL gap (at most tokens - 1 of them); the total comes from the
// last chunk's usage.
RequestRecord SendOneRouterGrpc(v1::Router::Stub& stub, const LoadSpec& spec, int level, int64_t index);

}  // namespace tandem::bench
