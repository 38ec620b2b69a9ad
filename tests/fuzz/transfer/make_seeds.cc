// Writes wire_fuzz's seeds with the real encoders: one file per message (and frame header, and a stream of
// frames), each a selector byte (mode + 14 * limit index, see wire_fuzz.cc) then the bytes.
//   make_seeds OUT_DIR     (run.sh builds and runs it; the DEVICE_REGIONS seeds carry this host's id)
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "common/transfer/device_ipc.h"
#include "common/transfer/handshake.h"
#include "common/transfer/wire.h"

namespace {

using namespace tandem::transfer;

constexpr int kStreamMode = 13;
constexpr int kDefaultLimit = 0;  // kLimits[0]: kDefaultMaxFrameBytes
constexpr int kAgentPayloadLimit = 1;  // kLimits[1]: AgentOptions::max_payload_bytes
constexpr int kSmallLimit = 5;  // kLimits[5]: 64 bytes

struct Seed {
  std::string name;
  int mode;
  int limit;
  std::string bytes;
};

Handshake FullHandshake() {
  Handshake h = LocalHandshake(LayoutDescriptor{"cfg-1234", 256, "fp8_e4m3", 0, 43}, "layout-abcd");
  h.transport_kind = "loopback";
  h.transport_address = "loopback:1";
  h.regions = {{"c4_kv", 0x1000, 1 << 20, "key-bytes"}, {"window_kv", 0x2000, 4096, ""}};
  return h;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_seeds OUT_DIR\n");
    return 2;
  }
  const std::string out = argv[1];
  const auto mode = [](FrameType type) { return static_cast<int>(type); };

  const Handshake hello = FullHandshake();
  Handshake accept = FullHandshake();
  accept.capabilities |= kCapabilityDeviceIpc | kCapabilityPeerLease;
  accept.lease_ms = 4000;
  Handshake old_peer = FullHandshake();
  old_peer.protocol_version = 0;
  old_peer.capabilities = kCapabilityChecksum;
  old_peer.regions.clear();

  const StatusMessage refuse{absl::StatusCode::kFailedPrecondition, "incompatible peer: page_size: prefill 256, decode 128"};
  const RoomMessage room{42};
  const RoomStatusMessage abort{42, absl::StatusCode::kCancelled, "request cancelled"};
  const DestinationMessage destination{42, {{0, 0, 4096}, {1, 8192, 4096}, {0, 1 << 20, 256}}};
  const CompleteMessage complete{42, 19923, 0x0123456789abcdefull, std::string(16, 'p')};
  const CompleteMessage big_complete{43, -1, 7, std::string(100, 'q')};
  const DeviceExport same_host{LocalHostId(), LocalProcessToken() + 1, "GPU 0 (fuzz)",
                               {{1 << 20, std::string(64, 'h')}, {4096, std::string(64, 'i')}}};
  const DeviceExport other_host{"another-boot-id/another-host", 7, "GPU 1 (fuzz)", {{1 << 20, std::string(64, 'h')}}};
  const DeviceRegionsReply accepted{true, ""};
  const DeviceRegionsReply staged{false, "decode runs on another host"};

  std::vector<Seed> seeds = {
      {"hello", mode(FrameType::kHello), kDefaultLimit, Encode(hello)},
      {"hello-accept-lease-ipc", mode(FrameType::kHelloAccept), kDefaultLimit, Encode(accept)},
      {"hello-old-peer", mode(FrameType::kHello), kDefaultLimit, Encode(old_peer)},
      {"refuse", mode(FrameType::kRefuse), kDefaultLimit, Encode(refuse)},
      {"ack", mode(FrameType::kAck), kDefaultLimit, Encode(room)},
      {"abort-ack", mode(FrameType::kAbortAck), kDefaultLimit, Encode(room)},
      {"room-refused", mode(FrameType::kRoomRefused), kDefaultLimit, Encode(abort)},
      {"abort", mode(FrameType::kAbort), kDefaultLimit, Encode(abort)},
      {"destination", mode(FrameType::kDestination), kDefaultLimit, Encode(destination)},
      {"destination-empty", mode(FrameType::kDestination), kDefaultLimit, Encode(DestinationMessage{1, {}})},
      {"complete", mode(FrameType::kComplete), kAgentPayloadLimit, Encode(complete)},
      {"complete-over-limit", mode(FrameType::kComplete), kSmallLimit, Encode(big_complete)},
      {"device-regions-this-host", mode(FrameType::kDeviceRegions), kDefaultLimit, Encode(same_host)},
      {"device-regions-other-host", mode(FrameType::kDeviceRegions), kDefaultLimit, Encode(other_host)},
      {"device-regions-reply-accepted", mode(FrameType::kDeviceRegionsReply), kDefaultLimit, Encode(accepted)},
      {"device-regions-reply-staged", mode(FrameType::kDeviceRegionsReply), kDefaultLimit, Encode(staged)},
  };
  for (int type = static_cast<int>(FrameType::kHello); type <= static_cast<int>(FrameType::kDeviceRegionsReply); ++type) {
    seeds.push_back({"header-" + std::to_string(type), 0, kDefaultLimit, EncodeFrame(static_cast<FrameType>(type), "abcd")});
  }
  seeds.push_back({"header-over-limit", 0, kSmallLimit, EncodeFrame(FrameType::kComplete, std::string(100, 'x'))});
  // A decode connection's life as prefill reads it, and prefill's replies as decode reads them.
  seeds.push_back({"stream-decode-to-prefill", kStreamMode, kAgentPayloadLimit,
                   EncodeFrame(FrameType::kHello, Encode(hello)) + EncodeFrame(FrameType::kDeviceRegions, Encode(same_host)) +
                       EncodeFrame(FrameType::kDestination, Encode(destination)) + EncodeFrame(FrameType::kHeartbeat, "") +
                       EncodeFrame(FrameType::kAck, Encode(room)) + EncodeFrame(FrameType::kAbort, Encode(abort)) +
                       EncodeFrame(FrameType::kAbortAck, Encode(room))});
  seeds.push_back({"stream-prefill-to-decode", kStreamMode, kAgentPayloadLimit,
                   EncodeFrame(FrameType::kHelloAccept, Encode(accept)) +
                       EncodeFrame(FrameType::kDeviceRegionsReply, Encode(staged)) +
                       EncodeFrame(FrameType::kRoomRefused, Encode(abort)) + EncodeFrame(FrameType::kComplete, Encode(complete)) +
                       EncodeFrame(FrameType::kHeartbeat, "") + EncodeFrame(FrameType::kRefuse, Encode(refuse))});

  for (const Seed& seed : seeds) {
    std::ofstream file(out + "/" + seed.name, std::ios::binary | std::ios::trunc);
    file.put(static_cast<char>(seed.mode + 14 * seed.limit));
    file.write(seed.bytes.data(), static_cast<std::streamsize>(seed.bytes.size()));
    if (!file) {
      std::fprintf(stderr, "make_seeds: cannot write %s/%s\n", out.c_str(), seed.name.c_str());
      return 1;
    }
  }
  std::printf("%zu seeds in %s\n", seeds.size(), out.c_str());
  return 0;
}
