// What tandem-decode and tandem-prefill share: their flags and the server's life (HTTP side port up
// first, weights, warm-up, gRPC with health and reflection, SIGTERM/SIGINT drain, exit 0).
#pragma once

#include <string>

#include <CLI/CLI.hpp>

#include "common/engine/engine.h"
#include "common/transfer/device_ipc.h"
#include "tandem/v1/engine.pb.h"

namespace tandem::engine {

struct ServeOptions {
  v1::Role role = v1::ROLE_MIXED;
  std::string host = "0.0.0.0";
  int grpc_port = 0;
  int http_port = 0;
  int bootstrap_port = 0;  // prefill only
  std::string served_model_name;
  double drain_timeout_seconds = 30;
  std::string log_level = "info";
  int64_t cache_budget_mb = 0;
  bool disable_prefix_cache = false;
  double heartbeat_interval_seconds = 1.0;
  double lease_seconds = 4.0;
  double room_lease_seconds = 600.0;
  double late_write_grace_seconds = 10.0;  // --pd-late-write-grace (decode); transfer::AgentOptions::late_write_grace says why 10
  transfer::PdTransfer pd_transfer = transfer::PdTransfer::kAuto;  // --pd-transfer  // absolute bound per room (queueing included); dead peers go by --peer-lease
  EngineOptions engine;
};

// The engine flags of DESIGN.md on `app`, defaults in `options`.
void AddServeFlags(CLI::App& app, ServeOptions& options);
// Runs until SIGTERM or SIGINT; returns the process exit code (0 after a clean drain).
int RunServer(ServeOptions options, const char* binary);

}  // namespace tandem::engine
