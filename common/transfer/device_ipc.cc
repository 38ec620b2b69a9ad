#include "common/transfer/device_ipc.h"

#include <unistd.h>

#include <fstream>
#include <random>

#include "common/transfer/handshake.h"

namespace tandem::transfer {

absl::StatusOr<PdTransfer> ParsePdTransfer(std::string_view name) {
  if (name == "auto") return PdTransfer::kAuto;
  if (name == "staged") return PdTransfer::kStaged;
  if (name == "ipc") return PdTransfer::kIpc;
  return absl::InvalidArgumentError(absl::StrCat("--pd-transfer ", std::string(name), ": expected auto, staged or ipc"));
}

const char* PdTransferName(PdTransfer mode) {
  switch (mode) {
    case PdTransfer::kAuto: return "auto";
    case PdTransfer::kStaged: return "staged";
    case PdTransfer::kIpc: return "ipc";
  }
  return "?";
}

std::string LocalHostId() {
  std::string boot_id;
  std::ifstream in("/proc/sys/kernel/random/boot_id");
  std::getline(in, boot_id);
  char host[256] = {};
  if (gethostname(host, sizeof(host) - 1) != 0) host[0] = '\0';
  return absl::StrCat(boot_id.empty() ? "no-boot-id" : boot_id, "/", host);
}

uint64_t LocalProcessToken() {
  static const uint64_t token = [] {
    std::random_device device;
    uint64_t t = 0;
    while (t == 0) t = (static_cast<uint64_t>(device()) << 32) ^ device() ^ static_cast<uint64_t>(getpid());
    return t;
  }();
  return token;
}

absl::Status CheckMappable(const DeviceExport& peer, std::span<const RemoteRegion> hello_regions) {
  if (peer.host_id != LocalHostId()) {
    return absl::FailedPreconditionError(
        absl::StrCat("decode runs on another host (", peer.host_id, ", this is ", LocalHostId(), ")"));
  }
  if (peer.process_token == LocalProcessToken()) {
    return absl::FailedPreconditionError("decode is this very process (CUDA cannot map a process's own export)");
  }
  if (peer.regions.size() != hello_regions.size()) {
    return absl::InvalidArgumentError(absl::StrCat("decode exports ", peer.regions.size(), " device regions for its ",
                                                   hello_regions.size(), " transport regions"));
  }
  for (size_t i = 0; i < hello_regions.size(); ++i) {
    if (peer.regions[i].size != hello_regions[i].size) {
      return absl::InvalidArgumentError(absl::StrCat("decode's device region ", i, " (", hello_regions[i].name, ") has ",
                                                     peer.regions[i].size, " bytes, its transport region ",
                                                     hello_regions[i].size));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<bool> WantDeviceRegions(PdTransfer mode, bool local_can, uint64_t decode_capabilities) {
  if (mode == PdTransfer::kStaged) return false;
  const bool offered = (decode_capabilities & kCapabilityDeviceIpc) != 0;
  if (mode == PdTransfer::kAuto) return local_can && offered;
  if (!local_can) {
    return absl::FailedPreconditionError("--pd-transfer ipc: this prefill engine has no device pools (it needs --device cuda)");
  }
  if (!offered) {
    return absl::FailedPreconditionError(
        "--pd-transfer ipc: decode offers no device IPC (its pools are not on a GPU, it runs --pd-transfer staged, or "
        "its build predates device IPC)");
  }
  return true;
}

}  // namespace tandem::transfer
