// The scheduler's PrefillLink/DecodeLink over common/transfer: the pools' memory registered once with a
// KV transport (UCX), the bootstrap server on prefill, the cached bootstrap client on decode.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "common/cache/pools.h"
#include "common/engine/disaggregation.h"
#include "common/engine/engine.h"
#include "common/transfer/device_ipc.h"
#include "common/transfer/room.h"

namespace tandem::engine {

struct TransferLinkOptions {
  std::string model_config_hash;
  std::string dtype;  // what both sides must agree on besides the layout ("kv-fp8/experts-fp4")
  std::string bootstrap_host = "0.0.0.0";
  int bootstrap_port = 8998;  // prefill: where to listen (0: any free port)
  transfer::AgentOptions agent;
  // --pd-transfer: how device pools reach a peer of this host (ipc) or any peer (staged); auto picks per peer.
  transfer::PdTransfer pd_transfer = transfer::PdTransfer::kAuto;
};

struct TransferStats {
  transfer::AgentMetrics agent;
  uint64_t last_room_bytes = 0;
  double last_room_seconds = 0;
};

// Called per finished room: bytes moved, the transfer's duration and its path (for the services' metrics):
// "ipc" (device to device), "staged" (device pools through host copies) or "host" (host pools as they are).
using TransferObserver = std::function<void(uint64_t bytes, double seconds, std::string_view path)>;

// What the Engine's LinkFactory returns for the prefill or decode role: a UCX transport that allocates the
// pools' memory, then the links over it. `on_stats` receives the reader of the agent's counters once the
// links exist; `bound_bootstrap_port` (prefill) the port the bootstrap server listens on.
absl::StatusOr<std::unique_ptr<TransferSetup>> MakeTransferSetup(EngineRole role, const TransferLinkOptions& options,
                                                                 TransferObserver observer,
                                                                 std::function<void(std::function<TransferStats()>)> on_stats,
                                                                 int* bound_bootstrap_port);

}  // namespace tandem::engine
