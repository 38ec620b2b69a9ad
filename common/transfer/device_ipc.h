// PD between two processes of one host with device pools: decode exports its device pool regions (CUDA IPC
// handles), prefill maps them and copies its device pages straight in, instead of staging through host copies.
// This library only negotiates and routes; the engine supplies the device side (DevicePeer, the checksum).
//
// Negotiation (protocol version unchanged: an optional capability plus two frames only sent to a peer that
// advertised it, so an older peer or one without device pools still works, staged):
//   decode  HELLO             capabilities |= kCapabilityDeviceIpc   (it has an export and may use it)
//   prefill HELLO_ACCEPT      capabilities |= kCapabilityDeviceIpc   ("send your device regions")
//   decode  DEVICE_REGIONS    DeviceExport (host id, process token, device, one handle per region)
//   prefill DEVICE_REGIONS_REPLY  StatusMessage: OK = prefill writes this connection's rooms over IPC;
//                                 otherwise why not (another host, the open failed): staged
// With --pd-transfer ipc either side refuses the connection instead of falling back.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/core/status.h"
#include "common/transfer/transport.h"

namespace tandem::transfer {

// --pd-transfer: auto (IPC when both sides can and share a host, else staged), staged, ipc (or refuse).
enum class PdTransfer { kAuto, kStaged, kIpc };
absl::StatusOr<PdTransfer> ParsePdTransfer(std::string_view name);  // "auto", "staged", "ipc"
const char* PdTransferName(PdTransfer mode);

// One exported device region: its size and the opaque handle (a cudaIpcMemHandle_t) that maps it.
struct DeviceRegionExport {
  uint64_t size = 0;
  std::string handle;
};

// Decode's device pools as another process can map them; regions in the order of its transport regions.
struct DeviceExport {
  std::string host_id;         // LocalHostId() of the exporting process
  uint64_t process_token = 0;  // random per process: a mapping of one's own export is refused by CUDA
  std::string location;        // "GPU 0 (NVIDIA H200, 0000:1b:00.0)", for logs
  std::vector<DeviceRegionExport> regions;
};

// This host's identity: the kernel's boot id and the hostname. Two processes may share device memory only
// when both match (one kernel, one UTS namespace); the open itself is the final check.
std::string LocalHostId();
// Random, fixed for the process.
uint64_t LocalProcessToken();

// Why `peer` cannot be mapped from this process (another host, this very process, region count or sizes
// that do not match its HELLO), or OK.
absl::Status CheckMappable(const DeviceExport& peer, std::span<const RemoteRegion> hello_regions);

// Prefill's side of the decision at HELLO: ask for the device regions (true), stage (false), or refuse.
// `local_can`: prefill has device pools and a way to open exports.
absl::StatusOr<bool> WantDeviceRegions(PdTransfer mode, bool local_can, uint64_t decode_capabilities);

// A decode's device regions mapped into prefill. Copy moves src[i] (prefill's live device pools, at the
// offsets of its registered regions) into dst[i] (the peer's regions) and returns once the bytes landed.
// Destroying it unmaps the regions.
class DevicePeer {
 public:
  virtual ~DevicePeer() = default;
  virtual absl::Status Copy(std::span<const Segment> src, std::span<const Segment> dst) = 0;
  // Test hook: inverts the byte at `dst` in the peer's memory (a corrupted transfer).
  virtual absl::Status InvertByte(const Segment& dst) = 0;
};

// What the prefill agent needs for the IPC path.
struct PrefillDeviceIpc {
  PdTransfer mode = PdTransfer::kStaged;
  // Maps a decode's export; null when this engine has no device pools.
  std::function<absl::StatusOr<std::shared_ptr<DevicePeer>>(const DeviceExport&)> open;
};

// What the decode agent needs for the IPC path.
struct DecodeDeviceIpc {
  PdTransfer mode = PdTransfer::kStaged;
  std::optional<DeviceExport> local;  // absent: this engine's pools are not on a device
  // The checksum of destination segments as they lie in the device pools (rooms a peer wrote over IPC),
  // in segment order, as ChecksumSegments computes it.
  std::function<absl::StatusOr<uint64_t>(std::span<const Segment>)> device_checksum;
};

}  // namespace tandem::transfer
