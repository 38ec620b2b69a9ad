// tandem-router: the client-facing front (OpenAI HTTP + gRPC) of a prefill/decode fleet.
#include <CLI/CLI.hpp>

#include "services/router/router.h"

int main(int argc, char** argv) {
  tandem::router::RouterOptions o;
  CLI::App app{"tandem-router: OpenAI-compatible HTTP and gRPC front of a DeepSeek-V4 prefill/decode fleet"};
  app.add_option("--host", o.host, "address to bind")->capture_default_str();
  app.add_option("--http-port", o.http_port, "OpenAI HTTP API, /health, /readiness, /metrics")->capture_default_str()->check(CLI::Range(0, 65535));
  app.add_option("--grpc-port", o.grpc_port, "gRPC tandem.v1.Router, health, reflection")->capture_default_str()->check(CLI::Range(0, 65535));
  app.add_option("--model", o.model_dir, "model directory (its tokenizer.json is used)")->required();
  app.add_option("--served-model-name", o.served_model_name, "model id clients send (default: the directory name)");
  app.add_option("--prefill", o.prefill, "prefill worker host:grpc_port[,bootstrap_port] (repeatable)");
  app.add_option("--decode", o.decode, "decode worker host:grpc_port (repeatable)");
  app.add_option("--mixed", o.mixed, "mixed (monolithic) worker host:grpc_port (repeatable)");
  app.add_option("--worker-file", o.worker_file, "more workers, one \"prefill|decode|mixed ADDRESS\" a line; re-read when it changes");
  app.add_option("--discovery", o.discovery, "static (the worker flags) or k8s (also the pods the selectors match, watched through the Kubernetes API)")
      ->capture_default_str()->check(CLI::IsMember({"static", "k8s"}));
  app.add_option("--prefill-selector", o.k8s.prefill_selector, "k8s: label selector of prefill pods (e.g. app=tandem,role=prefill)");
  app.add_option("--decode-selector", o.k8s.decode_selector, "k8s: label selector of decode pods");
  app.add_option("--mixed-selector", o.k8s.mixed_selector, "k8s: label selector of mixed (monolithic) pods");
  app.add_option("--k8s-namespace", o.k8s.api.namespace_name, "k8s: namespace to watch (default: the pod's own, from --k8s-namespace-file)");
  app.add_option("--k8s-api-server", o.k8s.api.server, "k8s: https://HOST:PORT (default: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT)");
  app.add_option("--k8s-token-file", o.k8s.api.token_file, "k8s: service-account bearer token, re-read for every request")->capture_default_str();
  app.add_option("--k8s-ca-file", o.k8s.api.ca_file, "k8s: CA bundle the API server's certificate must verify against")->capture_default_str();
  app.add_option("--k8s-namespace-file", o.k8s.api.namespace_file, "k8s: file holding the pod's namespace")->capture_default_str();
  app.add_option("--k8s-watch-timeout", o.k8s.watch_timeout_seconds, "k8s: seconds the API server keeps one watch open (then it is renewed)")
      ->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--k8s-max-backoff", o.k8s.max_backoff_seconds, "k8s: longest wait between retries of a failed list or watch (starts at 0.5 s, doubles)")
      ->capture_default_str()->check(CLI::PositiveNumber);
  const auto policies = CLI::IsMember({"round_robin", "least_load", "cache_aware"});
  app.add_option("--prefill-policy", o.prefill_policy, "prefill selection")->capture_default_str()->check(policies);
  app.add_option("--decode-policy", o.decode_policy, "decode selection")->capture_default_str()->check(policies);
  app.add_option("--mixed-policy", o.mixed_policy, "mixed-worker selection")->capture_default_str()->check(policies);
  app.add_option("--cache-balance-threshold", o.cache.balance_threshold, "cache_aware: prefix affinity only while loads differ by at most this")->capture_default_str();
  app.add_option("--health-interval", o.health.interval_seconds, "seconds between grpc.health.v1 checks")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--health-timeout", o.health.timeout_seconds, "seconds a check may take")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--health-failure-threshold", o.health.failure_threshold, "failed checks before a worker is unhealthy")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--health-success-threshold", o.health.success_threshold, "passed checks before it is healthy again")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--breaker-failure-threshold", o.breaker.failure_threshold, "consecutive failed legs that open a worker's breaker")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--breaker-open-seconds", o.breaker.open_seconds, "seconds a breaker stays open before a probe")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--breaker-success-threshold", o.breaker.success_threshold, "probe successes that close it")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--max-retries", o.retry.max_retries, "retries on a fresh pair before the first byte")->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--retry-backoff", o.retry.initial_backoff_seconds, "first retry backoff in seconds (x1.5 each, 20% jitter)")->capture_default_str();
  app.add_option("--api-key-file", o.api_key_file, "file of accepted API keys, one per line (Bearer on HTTP, authorization metadata on gRPC)");
  app.add_option("--max-request-bytes", o.max_request_bytes, "largest request body accepted")->capture_default_str();
  app.add_option("--max-prompt-tokens", o.max_prompt_tokens, "context limit for prompt + output (0: what the workers report)")->capture_default_str();
  app.add_option("--http-threads", o.http_threads, "HTTP worker threads (each open stream holds one)")->capture_default_str()->check(CLI::Range(4, 4096));
  app.add_option("--effort-profile", o.effort_profile, "reasoning-effort prompts: official or preview")->capture_default_str()->check(CLI::IsMember({"official", "preview"}));
  CLI11_PARSE(app, argc, argv);
  return tandem::router::RunRouter(std::move(o));
}
