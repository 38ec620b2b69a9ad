// tandem-prefill: the prefill service (runs prompts and ships their KV to decode over UCX).
#include <CLI/CLI.hpp>

#include "common/engine/server/serve.h"

int main(int argc, char** argv) {
  tandem::engine::ServeOptions options;
  options.role = tandem::v1::ROLE_PREFILL;
  options.grpc_port = 30001;
  options.http_port = 31001;
  options.bootstrap_port = 8998;
  CLI::App app{"tandem-prefill: DeepSeek-V4 prefill service"};
  tandem::engine::AddServeFlags(app, options);
  app.add_option("--bootstrap-port", options.bootstrap_port, "port decode workers rendezvous on")
      ->capture_default_str()->check(CLI::Range(1, 65535));
  CLI11_PARSE(app, argc, argv);
  return tandem::engine::RunServer(std::move(options), "tandem-prefill");
}
