// The scheduler's PrefillLink/DecodeLink over common/transfer: the pools' memory registered once with a
// KV transport (UCX), the bootstrap server on prefill, the cached bootstrap client on decode.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "common/cache/pools.h"
#include "common/engine/disaggregation.h"
#include "common/engine/engine.h"
#include "common/transfer/room.h"

namespace tandem::engine {

struct TransferLinkOptions {
  std::string model_config_hash;
  std::string dtype;  // what both sides must agree on besides the layout ("kv-fp8/experts-fp4")
  std::string bootstrap_host = "0.0.0.0";
  int bootstrap_port = 8998;  // prefill: where to listen (0: any free port)
  transfer::AgentOptions agent;
};

struct TransferStats {
  transfer::AgentMetrics agent;
  uint64_t last_room_bytes = 0;
  double last_room_seconds = 0;
};

// Called per finished room: bytes moved and the transfer's duration (for the services' metrics).
using TransferObserver = std::function<void(uint64_t bytes, double seconds)>;

// What the Engine's LinkFactory returns for the prefill or decode role: a UCX transport that allocates the
// pools' memory, then the links over it. `on_stats` receives the reader of the agent's counters once the
// links exist; `bound_bootstrap_port` (prefill) the port the bootstrap server listens on.
absl::StatusOr<std::unique_ptr<TransferSetup>> MakeTransferSetup(EngineRole role, const TransferLinkOptions& options,
                                                                 TransferObserver observer,
                                                                 std::function<void(std::function<TransferStats()>)> on_stats,
                                                                 int* bound_bootstrap_port);

}  // namespace tandem::engine
