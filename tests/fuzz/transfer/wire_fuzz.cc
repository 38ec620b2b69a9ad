// Any bytes from a bootstrap peer: the PD transfer wire decoders (common/transfer/wire.cc) and what runs on
// their results (CheckCompatible, WantDeviceRegions, CheckMappable) refuse malformed input with an
// InvalidArgument naming the message, never crash; an accepted message re-encodes to a payload that decodes
// to the same message, and to the input itself unless the input spelled a value non-canonically.
// DESTINATION segments then go through CheckSegmentsInside and CoalesceSegments as prefill runs them.
//
// data[0] % 14 picks the mode: 0 a frame header, 1..12 the payload of that FrameType, 13 a byte stream
// split into frames as ControlLoop::ReadFrom does, each payload decoded as the agents do. (data[0] / 14) % 7
// picks the limit (max_frame_bytes for headers, max_payload_bytes for COMPLETE) from kLimits. make_seeds.cc
// writes seeds in this format from the real encoders.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <string>
#include <string_view>
#include <vector>

#include "common/transfer/device_ipc.h"
#include "common/transfer/handshake.h"
#include "common/transfer/transport.h"
#include "common/transfer/wire.h"

namespace {

using namespace tandem::transfer;

constexpr size_t kLimits[] = {kDefaultMaxFrameBytes, 64 * 1024, 0, 1, kFrameHeaderBytes, 64, 4096};
constexpr int kStreamMode = 13;

[[noreturn]] void Fail(std::string_view what, std::string_view why) {
  std::fprintf(stderr, "invariant broken: %.*s: %.*s\n", static_cast<int>(what.size()), what.data(),
               static_cast<int>(why.size()), why.data());
  std::abort();
}

uint32_t U32At(std::string_view bytes, size_t at) {
  uint32_t v = 0;
  std::memcpy(&v, bytes.data() + at, 4);
  return v;
}

// A refusal from a message decoder: InvalidArgument whose message starts with the message's name.
void CheckRefusal(const absl::Status& status, std::string_view what) {
  if (status.code() != absl::StatusCode::kInvalidArgument) Fail(what, "a refusal that is not InvalidArgument");
  const std::string prefix = absl::StrCat(std::string(what), ": ");
  if (status.message().substr(0, prefix.size()) != prefix || status.message().size() == prefix.size()) {
    Fail(what, "a refusal whose message does not name the message and say why");
  }
}

// Decodes, and on success: Encode(decoded) decodes again to a message that encodes to the same bytes, and
// those bytes are the input unless `noncanonical(decoded, input, reencoded)` explains the difference.
// Returns whether the input was accepted; `out` gets the message.
template <typename T, typename Decode, typename Explains>
bool RoundTrip(std::string_view what, std::string_view payload, Decode decode, Explains noncanonical, T* out) {
  absl::StatusOr<T> first = decode(payload);
  if (!first.ok()) {
    CheckRefusal(first.status(), what);
    return false;
  }
  const std::string bytes = Encode(*first);
  absl::StatusOr<T> second = decode(bytes);
  if (!second.ok()) Fail(what, absl::StrCat("its re-encoding is refused: ", second.status().message()));
  if (Encode(*second) != bytes) Fail(what, "decode(encode(m)) encodes differently from m");
  if (bytes != payload && !noncanonical(*first, payload, bytes)) Fail(what, "re-encoding differs from the input");
  *out = std::move(first).value();
  return true;
}

constexpr auto kCanonical = [](const auto&, std::string_view, std::string_view) { return false; };

// A status code the wire may spell as any number: unknown ones (0, > 16) decode to kUnknown and re-encode as 2.
bool OnlyCodeDiffers(std::string_view payload, std::string_view bytes, size_t code_at, absl::StatusCode decoded) {
  if (payload.size() != bytes.size() || decoded != absl::StatusCode::kUnknown) return false;
  const uint32_t wire = U32At(payload, code_at);
  if (CodeFromWire(wire) != absl::StatusCode::kUnknown) return false;
  return payload.substr(0, code_at) == bytes.substr(0, code_at) && payload.substr(code_at + 4) == bytes.substr(code_at + 4);
}

Handshake Local() {
  Handshake h = LocalHandshake(LayoutDescriptor{"cfg-1234", 256, "fp8_e4m3", 0, 43}, "layout-abcd");
  h.transport_kind = "loopback";
  return h;
}

void CheckCompatibility(const Handshake& peer) {
  static const Handshake local = Local();
  const auto check = [](const Handshake& prefill, const Handshake& decode) {
    const absl::Status status = CheckCompatible(prefill, decode);
    if (!status.ok() && (status.code() != absl::StatusCode::kFailedPrecondition || status.message().empty())) {
      Fail("CheckCompatible", "a refusal that is not FailedPrecondition with a message");
    }
    return status.ok();
  };
  if (check(local, peer) != check(peer, local)) Fail("CheckCompatible", "not symmetric");
  const bool complete = (peer.capabilities & kRequiredCapabilities) == kRequiredCapabilities;
  if (check(peer, peer) != complete) Fail("CheckCompatible", "a handshake against itself");
  // A local side built from the peer's own layout passes exactly when version and capabilities do.
  Handshake mirror = LocalHandshake(peer.descriptor, peer.layout_hash);
  mirror.transport_kind = peer.transport_kind;
  if (check(mirror, peer) != (complete && peer.protocol_version == kProtocolVersion)) {
    Fail("CheckCompatible", "a peer with this build's layout, version and capabilities");
  }
  (void)DescribeLayout(peer.descriptor);
  for (const PdTransfer mode : {PdTransfer::kAuto, PdTransfer::kStaged, PdTransfer::kIpc}) {
    for (const bool local_can : {false, true}) {
      const absl::StatusOr<bool> want = WantDeviceRegions(mode, local_can, peer.capabilities);
      const bool offered = (peer.capabilities & kCapabilityDeviceIpc) != 0;
      if (want.ok() && *want && !(local_can && offered)) Fail("WantDeviceRegions", "asks a peer that cannot");
    }
  }
}

void CheckMappableExport(const DeviceExport& peer) {
  static const std::string host = LocalHostId();
  std::vector<RemoteRegion> hello(peer.regions.size());
  for (size_t i = 0; i < hello.size(); ++i) hello[i].size = peer.regions[i].size;
  const absl::Status status = CheckMappable(peer, hello);
  if (status.ok() != (peer.host_id == host && peer.process_token != LocalProcessToken())) {
    Fail("CheckMappable", "an export whose regions match its HELLO");
  }
  if (!peer.regions.empty() && CheckMappable(peer, {}).ok()) Fail("CheckMappable", "region count not checked");
}

// Prefill checks a destination against the region sizes of decode's HELLO before it puts into it, then
// coalesces it: inside exactly when every [offset, offset + length) fits (without wrapping), and coalescing
// keeps every byte and stays inside.
void CheckDestination(const std::vector<Segment>& segments) {
  static constexpr uint64_t kRegionSizes[] = {1 << 20, 4096, UINT64_MAX};
  bool fits = true;
  unsigned __int128 total = 0;
  for (const Segment& s : segments) {
    const bool inside = s.region < std::size(kRegionSizes) &&
                        static_cast<unsigned __int128>(s.offset) + s.length <= kRegionSizes[s.region];
    fits = fits && inside;
    total += s.length;
  }
  const absl::Status status = CheckSegmentsInside(segments, kRegionSizes, "destination");
  if (status.ok() != fits) Fail("CheckSegmentsInside", fits ? "refused segments inside their regions" : "accepted a segment outside");
  if (!fits) return;
  std::vector<Segment> src, dst;
  CoalesceSegments(segments, segments, src, dst);
  if (src != dst) Fail("CoalesceSegments", "one list coalesced two ways");
  unsigned __int128 coalesced = 0;
  for (const Segment& s : dst) {
    if (s.length == 0) Fail("CoalesceSegments", "an empty run");
    if (static_cast<unsigned __int128>(s.offset) + s.length > kRegionSizes[s.region]) Fail("CoalesceSegments", "a run outside");
    coalesced += s.length;
  }
  if (coalesced != total) Fail("CoalesceSegments", "lost or added bytes");
}

// One frame's payload, decoded as its receiver does.
void CheckPayload(FrameType type, std::string_view payload, size_t limit) {
  const std::string_view what = FrameTypeName(type);
  switch (type) {
    case FrameType::kHello:
    case FrameType::kHelloAccept: {
      Handshake h;
      // An explicit zero lease is the same as none, and re-encodes without it.
      const auto zero_lease = [](const Handshake& m, std::string_view in, std::string_view out) {
        return m.lease_ms == 0 && in.size() == out.size() + 4 && in.substr(0, out.size()) == out &&
               U32At(in, out.size()) == 0;
      };
      if (!RoundTrip("HELLO", payload, DecodeHandshake, zero_lease, &h)) return;
      if (h.regions.size() > kMaxRegions) Fail(what, "more regions than kMaxRegions");
      CheckCompatibility(h);
      return;
    }
    case FrameType::kRefuse: {
      StatusMessage m;
      const auto code = [](const StatusMessage& s, std::string_view in, std::string_view out) {
        return OnlyCodeDiffers(in, out, 0, s.code);
      };
      if (RoundTrip("REFUSE", payload, DecodeStatus, code, &m) && m.code == absl::StatusCode::kOk) {
        Fail(what, "a refusal that decodes as OK");
      }
      return;
    }
    case FrameType::kHeartbeat: return;  // ControlLoop drops heartbeats before any decoder
    case FrameType::kAck:
    case FrameType::kAbortAck: {
      RoomMessage m;
      const auto decode = [what](std::string_view p) { return DecodeRoom(p, what); };
      RoundTrip(what, payload, decode, kCanonical, &m);
      return;
    }
    case FrameType::kRoomRefused:
    case FrameType::kAbort: {
      RoomStatusMessage m;
      const auto decode = [what](std::string_view p) { return DecodeRoomStatus(p, what); };
      const auto code = [](const RoomStatusMessage& s, std::string_view in, std::string_view out) {
        return OnlyCodeDiffers(in, out, 8, s.code);
      };
      if (RoundTrip(what, payload, decode, code, &m) && m.code == absl::StatusCode::kOk) Fail(what, "decodes as OK");
      return;
    }
    case FrameType::kDestination: {
      DestinationMessage m;
      if (!RoundTrip(what, payload, DecodeDestination, kCanonical, &m)) return;
      if (m.segments.size() * 20 + 12 != payload.size()) Fail(what, "segment count does not match the payload");
      CheckDestination(m.segments);
      return;
    }
    case FrameType::kComplete: {
      CompleteMessage m;
      const auto decode = [limit](std::string_view p) { return DecodeComplete(p, limit); };
      if (RoundTrip(what, payload, decode, kCanonical, &m) && m.payload.size() > limit) Fail(what, "payload over the limit");
      return;
    }
    case FrameType::kDeviceRegions: {
      DeviceExport m;
      if (!RoundTrip(what, payload, DecodeDeviceExport, kCanonical, &m)) return;
      if (m.regions.size() > kMaxRegions) Fail(what, "more regions than kMaxRegions");
      CheckMappableExport(m);
      return;
    }
    case FrameType::kDeviceRegionsReply: {
      DeviceRegionsReply m;
      RoundTrip(what, payload, DecodeDeviceRegionsReply, kCanonical, &m);
      return;
    }
  }
  Fail(what, "a frame type without a decoder");
}

void CheckFrameHeader(std::string_view bytes, size_t limit) {
  const absl::StatusOr<FrameHeader> header = ParseFrameHeader(bytes, limit);
  if (!header.ok()) {
    if (header.status().code() != absl::StatusCode::kInvalidArgument || header.status().message().empty()) {
      Fail("frame header", "a refusal that is not InvalidArgument with a message");
    }
    return;
  }
  if (header->length > limit) Fail("frame header", "accepted a length over the limit");
  if (std::string_view(FrameTypeName(header->type)) == "?") Fail("frame header", "accepted an unnamed type");
  // The header is canonical (flags 0): EncodeFrame writes the same 12 bytes, and the payload after them.
  const size_t available = std::min<size_t>(header->length, bytes.size() - kFrameHeaderBytes);
  const std::string frame = EncodeFrame(header->type, bytes.substr(kFrameHeaderBytes, available));
  if (frame.substr(0, 8) != bytes.substr(0, 8)) Fail("frame header", "EncodeFrame writes another magic, type or flags");
  if (available == header->length && frame != bytes.substr(0, kFrameHeaderBytes + available)) {
    Fail("frame header", "EncodeFrame differs from the frame");
  }
  const absl::StatusOr<FrameHeader> again = ParseFrameHeader(frame, limit);
  if (!again.ok() || again->type != header->type || (available == header->length && again->length != header->length)) {
    Fail("frame header", "EncodeFrame's header does not parse back");
  }
}

// ControlLoop::ReadFrom's loop over a read buffer (whole frames only; a bad header ends the connection).
void CheckStream(std::string_view buffer, size_t limit) {
  size_t used = 0;
  while (buffer.size() - used >= kFrameHeaderBytes) {
    const std::string_view rest = buffer.substr(used);
    const absl::StatusOr<FrameHeader> header = ParseFrameHeader(rest.substr(0, kFrameHeaderBytes), limit);
    if (!header.ok()) return;
    if (rest.size() < kFrameHeaderBytes + header->length) return;
    used += kFrameHeaderBytes + header->length;
    CheckPayload(header->type, rest.substr(kFrameHeaderBytes, header->length), limit);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const int mode = data[0] % 14;
  const size_t limit = kLimits[(data[0] / 14) % std::size(kLimits)];
  const std::string_view rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (mode == 0) {
    CheckFrameHeader(rest, limit);
  } else if (mode == kStreamMode) {
    CheckStream(rest, limit);
  } else {
    CheckPayload(static_cast<FrameType>(mode), rest, limit);
  }
  return 0;
}
