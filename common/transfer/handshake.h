// The versioned handshake: protocol version, capability bits and the layout descriptor both sides must share.
// An incompatible peer is refused with an error naming what differs ("page_size: prefill 256, decode 128").
#pragma once

#include <string>

#include "common/core/status.h"
#include "common/transfer/wire.h"

namespace tandem::transfer {

inline constexpr uint32_t kProtocolVersion = 1;

// Capability bits. Every bit in kRequiredCapabilities must be offered by both sides.
inline constexpr uint64_t kCapabilityChecksum = 1ull << 0;     // COMPLETE carries a checksum decode verifies
inline constexpr uint64_t kCapabilityAbortAck = 1ull << 1;     // ABORT is answered with ABORT_ACK after drain
inline constexpr uint64_t kCapabilityChunkedShip = 1ull << 2;  // many puts per room before COMPLETE
// Optional: decode offers its device pools over CUDA IPC; prefill answers with it to ask for them (device_ipc.h).
inline constexpr uint64_t kCapabilityDeviceIpc = 1ull << 3;
// Optional: decode offers it in HELLO to say it reads Handshake::lease_ms; prefill then answers with the bit and
// its peer lease, which sets how long decode quarantines an unclean room's pages (DecodeAgent::LateWriteHold).
// The HELLO itself carries no lease: an older prefill would refuse the trailing field.
inline constexpr uint64_t kCapabilityPeerLease = 1ull << 4;
inline constexpr uint64_t kRequiredCapabilities = kCapabilityChecksum | kCapabilityAbortAck | kCapabilityChunkedShip;

// A handshake with this build's version and capabilities, for the caller to fill descriptor and layout hash.
Handshake LocalHandshake(const LayoutDescriptor& descriptor, std::string layout_hash);

// FailedPrecondition naming the first difference, prefill's value first. The transport address and region
// tables are not compared (they are each side's own).
absl::Status CheckCompatible(const Handshake& prefill, const Handshake& decode);

std::string DescribeLayout(const LayoutDescriptor& d);  // "model abc, page_size 256, dtype fp8, layers [0, 43)"

}  // namespace tandem::transfer
