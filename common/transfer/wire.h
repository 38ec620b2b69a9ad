// The bootstrap wire format: length-prefixed binary frames over TCP and the messages they carry. Every
// field is bounds-checked on decode; forged, truncated or oversize input is an error value, never a crash.
//
// Frame: magic "TDMT" (u32 LE 0x544d4454), type u16, flags u16 (0), payload length u32, payload.
// Integers little-endian; strings/bytes are u32 length + bytes; lists are u32 count + elements.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/core/status.h"
#include "common/transfer/device_ipc.h"
#include "common/transfer/transport.h"

namespace tandem::transfer {

inline constexpr uint32_t kFrameMagic = 0x544d4454;  // "TDMT"
inline constexpr size_t kFrameHeaderBytes = 12;
inline constexpr size_t kDefaultMaxFrameBytes = 16u << 20;

enum class FrameType : uint16_t {
  kHello = 1,         // decode -> prefill: Handshake
  kHelloAccept = 2,   // prefill -> decode: Handshake
  kRefuse = 3,        // either: StatusMessage, then the sender closes
  kHeartbeat = 4,     // either: empty
  kDestination = 5,   // decode -> prefill: DestinationMessage
  kRoomRefused = 6,   // prefill -> decode: RoomStatusMessage
  kComplete = 7,      // prefill -> decode: CompleteMessage
  kAck = 8,           // decode -> prefill: RoomMessage
  kAbort = 9,         // either: RoomStatusMessage
  kAbortAck = 10,     // either: RoomMessage
  // Only after both sides advertised kCapabilityDeviceIpc (device_ipc.h): older peers never see them.
  kDeviceRegions = 11,       // decode -> prefill: DeviceExport
  kDeviceRegionsReply = 12,  // prefill -> decode: DeviceRegionsReply
};
const char* FrameTypeName(FrameType type);

struct FrameHeader {
  FrameType type = FrameType::kHeartbeat;
  uint32_t length = 0;
};
// Checks magic, type, flags and the length limit.
absl::StatusOr<FrameHeader> ParseFrameHeader(std::string_view header, size_t max_frame_bytes);
std::string EncodeFrame(FrameType type, std::string_view payload);

// Compatibility descriptor: what decode and prefill must agree on.
struct LayoutDescriptor {
  std::string model_config_hash;
  uint32_t page_size = 0;
  std::string dtype;
  uint32_t layer_begin = 0;
  uint32_t layer_end = 0;
};

struct Handshake {
  uint32_t protocol_version = 0;
  uint64_t capabilities = 0;
  std::string layout_hash;  // the caller's hash of config + cache layout
  LayoutDescriptor descriptor;
  std::string transport_kind;
  std::string transport_address;
  std::vector<RemoteRegion> regions;
  // The sender's peer lease (ControlOptions::lease): how long it keeps writing to a peer it cannot hear.
  // A trailing field, encoded only when non-zero; 0 = unknown (an older peer, or a HELLO: see
  // kCapabilityPeerLease in handshake.h for why decode never sends it).
  uint32_t lease_ms = 0;
};

struct StatusMessage {
  absl::StatusCode code = absl::StatusCode::kUnknown;
  std::string message;
};
struct RoomMessage {
  uint64_t room = 0;
};
struct RoomStatusMessage {
  uint64_t room = 0;
  absl::StatusCode code = absl::StatusCode::kUnknown;
  std::string message;
};
struct DestinationMessage {
  uint64_t room = 0;
  std::vector<Segment> segments;
};
struct CompleteMessage {
  uint64_t room = 0;
  int32_t first_token = 0;
  uint64_t checksum = 0;
  std::string payload;
};

// Prefill's answer to DEVICE_REGIONS: accepted (it writes this connection's rooms over IPC) or why not.
struct DeviceRegionsReply {
  bool accepted = false;
  std::string reason;
};

// Limits applied while decoding (a forged count cannot make us allocate more than the frame holds anyway).
inline constexpr uint32_t kMaxRegions = 1024;
inline constexpr uint32_t kMaxStringBytes = 1u << 20;

std::string Encode(const Handshake& m);
std::string Encode(const StatusMessage& m);
std::string Encode(const RoomMessage& m);
std::string Encode(const RoomStatusMessage& m);
std::string Encode(const DestinationMessage& m);
std::string Encode(const CompleteMessage& m);
std::string Encode(const DeviceExport& m);
std::string Encode(const DeviceRegionsReply& m);

absl::StatusOr<Handshake> DecodeHandshake(std::string_view payload);
absl::StatusOr<StatusMessage> DecodeStatus(std::string_view payload);
absl::StatusOr<RoomMessage> DecodeRoom(std::string_view payload, std::string_view what);
absl::StatusOr<RoomStatusMessage> DecodeRoomStatus(std::string_view payload, std::string_view what);
absl::StatusOr<DestinationMessage> DecodeDestination(std::string_view payload);
absl::StatusOr<CompleteMessage> DecodeComplete(std::string_view payload, size_t max_payload_bytes);
absl::StatusOr<DeviceExport> DecodeDeviceExport(std::string_view payload);
absl::StatusOr<DeviceRegionsReply> DecodeDeviceRegionsReply(std::string_view payload);

// A status code from the wire: unknown numbers become kUnknown.
absl::StatusCode CodeFromWire(uint32_t code);

}  // namespace tandem::transfer
