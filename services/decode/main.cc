// tandem-decode: the decode service; `--mode mixed` also prefills locally (the monolithic engine).
#include <CLI/CLI.hpp>

#include "common/engine/server/serve.h"

int main(int argc, char** argv) {
  tandem::engine::ServeOptions options;
  options.grpc_port = 30002;
  options.http_port = 31002;
  std::string mode = "decode";
  CLI::App app{"tandem-decode: DeepSeek-V4 decode service (--mode mixed: prefill and decode in one engine)"};
  tandem::engine::AddServeFlags(app, options);
  app.add_option("--mode", mode, "decode (disaggregated) or mixed (monolithic)")->capture_default_str()->check(CLI::IsMember({"decode", "mixed"}));
  CLI11_PARSE(app, argc, argv);
  options.role = mode == "mixed" ? tandem::v1::ROLE_MIXED : tandem::v1::ROLE_DECODE;
  return tandem::engine::RunServer(std::move(options), "tandem-decode");
}
