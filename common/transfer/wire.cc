#include "common/transfer/wire.h"

#include <cstring>

namespace tandem::transfer {
namespace {

class Writer {
 public:
  void U16(uint16_t v) { Raw(&v, 2); }
  void U32(uint32_t v) { Raw(&v, 4); }
  void U64(uint64_t v) { Raw(&v, 8); }
  void Bytes(std::string_view s) {
    U32(static_cast<uint32_t>(s.size()));
    out.append(s);
  }
  std::string out;

 private:
  void Raw(const void* p, size_t n) { out.append(static_cast<const char*>(p), n); }  // little-endian hosts
};

// Reads fields in order; the first failure is kept and every later read fails too.
class Reader {
 public:
  Reader(std::string_view data, std::string_view what) : data_(data), what_(what) {}
  bool U16(const char* field, uint16_t* v) { return Raw(field, v, 2); }
  bool U32(const char* field, uint32_t* v) { return Raw(field, v, 4); }
  bool U64(const char* field, uint64_t* v) { return Raw(field, v, 8); }
  bool Bytes(const char* field, std::string* s, uint32_t max) {
    uint32_t n = 0;
    if (!U32(field, &n)) return false;
    if (n > max) return Fail(absl::StrCat("field '", field, "' claims ", n, " bytes, limit ", max));
    if (n > data_.size()) return Truncated(field, n);
    s->assign(data_.data(), n);
    data_.remove_prefix(n);
    return true;
  }
  // A list count whose elements take at least `min_element_bytes` each: more than the rest can hold is forged.
  bool Count(const char* field, uint32_t* n, size_t min_element_bytes, uint32_t max) {
    if (!U32(field, n)) return false;
    if (*n > max) return Fail(absl::StrCat("field '", field, "' claims ", *n, " elements, limit ", max));
    if (static_cast<uint64_t>(*n) * min_element_bytes > data_.size()) {
      return Fail(absl::StrCat("field '", field, "' claims ", *n, " elements but only ", data_.size(), " bytes follow"));
    }
    return true;
  }
  bool AtEnd() const { return data_.empty(); }
  absl::Status Finish() {
    if (status_.ok() && !data_.empty()) Fail(absl::StrCat(data_.size(), " trailing bytes after the last field"));
    return status_;
  }

 private:
  bool Raw(const char* field, void* v, size_t n) {
    if (!status_.ok()) return false;
    if (data_.size() < n) return Truncated(field, n);
    std::memcpy(v, data_.data(), n);
    data_.remove_prefix(n);
    return true;
  }
  bool Truncated(const char* field, size_t n) {
    return Fail(absl::StrCat("truncated at field '", field, "' (needs ", n, " bytes, ", data_.size(), " left)"));
  }
  bool Fail(std::string message) {
    if (status_.ok()) status_ = absl::InvalidArgumentError(absl::StrCat(std::string(what_), ": ", message));
    return false;
  }
  std::string_view data_;
  std::string_view what_;
  absl::Status status_;
};

}  // namespace

const char* FrameTypeName(FrameType type) {
  switch (type) {
    case FrameType::kHello: return "HELLO";
    case FrameType::kHelloAccept: return "HELLO_ACCEPT";
    case FrameType::kRefuse: return "REFUSE";
    case FrameType::kHeartbeat: return "HEARTBEAT";
    case FrameType::kDestination: return "DESTINATION";
    case FrameType::kRoomRefused: return "ROOM_REFUSED";
    case FrameType::kComplete: return "COMPLETE";
    case FrameType::kAck: return "ACK";
    case FrameType::kAbort: return "ABORT";
    case FrameType::kAbortAck: return "ABORT_ACK";
    case FrameType::kDeviceRegions: return "DEVICE_REGIONS";
    case FrameType::kDeviceRegionsReply: return "DEVICE_REGIONS_REPLY";
  }
  return "?";
}

absl::StatusOr<FrameHeader> ParseFrameHeader(std::string_view header, size_t max_frame_bytes) {
  if (header.size() < kFrameHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat("frame header truncated: ", header.size(), " of ", kFrameHeaderBytes, " bytes"));
  }
  uint32_t magic, length;
  uint16_t type, flags;
  std::memcpy(&magic, header.data(), 4);
  std::memcpy(&type, header.data() + 4, 2);
  std::memcpy(&flags, header.data() + 6, 2);
  std::memcpy(&length, header.data() + 8, 4);
  if (magic != kFrameMagic) {
    return absl::InvalidArgumentError(absl::StrCat("bad frame magic 0x", absl::Hex(magic), ": not a Tandem bootstrap peer"));
  }
  if (type < static_cast<uint16_t>(FrameType::kHello) || type > static_cast<uint16_t>(FrameType::kDeviceRegionsReply)) {
    return absl::InvalidArgumentError(absl::StrCat("unknown frame type ", type));
  }
  if (flags != 0) return absl::InvalidArgumentError(absl::StrCat("frame flags 0x", absl::Hex(flags), " not supported"));
  if (length > max_frame_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("frame of ", length, " bytes exceeds the ", max_frame_bytes, "-byte limit"));
  }
  return FrameHeader{static_cast<FrameType>(type), length};
}

std::string EncodeFrame(FrameType type, std::string_view payload) {
  Writer w;
  w.U32(kFrameMagic);
  w.U16(static_cast<uint16_t>(type));
  w.U16(0);
  w.U32(static_cast<uint32_t>(payload.size()));
  w.out.append(payload);
  return std::move(w.out);
}

absl::StatusCode CodeFromWire(uint32_t code) {
  if (code == 0 || code > static_cast<uint32_t>(absl::StatusCode::kUnauthenticated)) return absl::StatusCode::kUnknown;
  return static_cast<absl::StatusCode>(code);
}

std::string Encode(const Handshake& m) {
  Writer w;
  w.U32(m.protocol_version);
  w.U64(m.capabilities);
  w.Bytes(m.layout_hash);
  w.Bytes(m.descriptor.model_config_hash);
  w.U32(m.descriptor.page_size);
  w.Bytes(m.descriptor.dtype);
  w.U32(m.descriptor.layer_begin);
  w.U32(m.descriptor.layer_end);
  w.Bytes(m.transport_kind);
  w.Bytes(m.transport_address);
  w.U32(static_cast<uint32_t>(m.regions.size()));
  for (const RemoteRegion& r : m.regions) {
    w.Bytes(r.name);
    w.U64(r.base);
    w.U64(r.size);
    w.Bytes(r.key);
  }
  if (m.lease_ms != 0) w.U32(m.lease_ms);  // left off when unknown: the payload an older peer parses
  return std::move(w.out);
}

absl::StatusOr<Handshake> DecodeHandshake(std::string_view payload) {
  Reader r(payload, "HELLO");
  Handshake m;
  r.U32("protocol_version", &m.protocol_version);
  r.U64("capabilities", &m.capabilities);
  r.Bytes("layout_hash", &m.layout_hash, kMaxStringBytes);
  r.Bytes("model_config_hash", &m.descriptor.model_config_hash, kMaxStringBytes);
  r.U32("page_size", &m.descriptor.page_size);
  r.Bytes("dtype", &m.descriptor.dtype, kMaxStringBytes);
  r.U32("layer_begin", &m.descriptor.layer_begin);
  r.U32("layer_end", &m.descriptor.layer_end);
  r.Bytes("transport_kind", &m.transport_kind, kMaxStringBytes);
  r.Bytes("transport_address", &m.transport_address, kMaxStringBytes);
  uint32_t count = 0;
  if (r.Count("regions", &count, 4 + 8 + 8 + 4, kMaxRegions)) {
    m.regions.resize(count);
    for (RemoteRegion& region : m.regions) {
      r.Bytes("region.name", &region.name, kMaxStringBytes);
      r.U64("region.base", &region.base);
      r.U64("region.size", &region.size);
      r.Bytes("region.key", &region.key, kMaxStringBytes);
    }
  }
  if (!r.AtEnd()) r.U32("lease_ms", &m.lease_ms);  // an older peer ends before it: 0, unknown
  TANDEM_RETURN_IF_ERROR(r.Finish());
  return m;
}

std::string Encode(const StatusMessage& m) {
  Writer w;
  w.U32(static_cast<uint32_t>(m.code));
  w.Bytes(m.message);
  return std::move(w.out);
}

absl::StatusOr<StatusMessage> DecodeStatus(std::string_view payload) {
  Reader r(payload, "REFUSE");
  StatusMessage m;
  uint32_t code = 0;
  r.U32("code", &code);
  r.Bytes("message", &m.message, kMaxStringBytes);
  TANDEM_RETURN_IF_ERROR(r.Finish());
  m.code = CodeFromWire(code);
  return m;
}

std::string Encode(const RoomMessage& m) {
  Writer w;
  w.U64(m.room);
  return std::move(w.out);
}

absl::StatusOr<RoomMessage> DecodeRoom(std::string_view payload, std::string_view what) {
  Reader r(payload, what);
  RoomMessage m;
  r.U64("room", &m.room);
  TANDEM_RETURN_IF_ERROR(r.Finish());
  return m;
}

std::string Encode(const RoomStatusMessage& m) {
  Writer w;
  w.U64(m.room);
  w.U32(static_cast<uint32_t>(m.code));
  w.Bytes(m.message);
  return std::move(w.out);
}

absl::StatusOr<RoomStatusMessage> DecodeRoomStatus(std::string_view payload, std::string_view what) {
  Reader r(payload, what);
  RoomStatusMessage m;
  uint32_t code = 0;
  r.U64("room", &m.room);
  r.U32("code", &code);
  r.Bytes("message", &m.message, kMaxStringBytes);
  TANDEM_RETURN_IF_ERROR(r.Finish());
  m.code = CodeFromWire(code);
  return m;
}

std::string Encode(const DestinationMessage& m) {
  Writer w;
  w.U64(m.room);
  w.U32(static_cast<uint32_t>(m.segments.size()));
  for (const Segment& s : m.segments) {
    w.U32(s.region);
    w.U64(s.offset);
    w.U64(s.length);
  }
  return std::move(w.out);
}

absl::StatusOr<DestinationMessage> DecodeDestination(std::string_view payload) {
  Reader r(payload, "DESTINATION");
  DestinationMessage m;
  r.U64("room", &m.room);
  uint32_t count = 0;
  if (r.Count("segments", &count, 20, UINT32_MAX)) {
    m.segments.resize(count);
    for (Segment& s : m.segments) {
      r.U32("segment.region", &s.region);
      r.U64("segment.offset", &s.offset);
      r.U64("segment.length", &s.length);
    }
  }
  TANDEM_RETURN_IF_ERROR(r.Finish());
  return m;
}

std::string Encode(const CompleteMessage& m) {
  Writer w;
  w.U64(m.room);
  w.U32(static_cast<uint32_t>(m.first_token));
  w.U64(m.checksum);
  w.Bytes(m.payload);
  return std::move(w.out);
}

absl::StatusOr<CompleteMessage> DecodeComplete(std::string_view payload, size_t max_payload_bytes) {
  Reader r(payload, "COMPLETE");
  CompleteMessage m;
  uint32_t token = 0;
  r.U64("room", &m.room);
  r.U32("first_token", &token);
  r.U64("checksum", &m.checksum);
  r.Bytes("payload", &m.payload, static_cast<uint32_t>(std::min<size_t>(max_payload_bytes, UINT32_MAX)));
  TANDEM_RETURN_IF_ERROR(r.Finish());
  m.first_token = static_cast<int32_t>(token);
  return m;
}

std::string Encode(const DeviceExport& m) {
  Writer w;
  w.Bytes(m.host_id);
  w.U64(m.process_token);
  w.Bytes(m.location);
  w.U32(static_cast<uint32_t>(m.regions.size()));
  for (const DeviceRegionExport& r : m.regions) {
    w.U64(r.size);
    w.Bytes(r.handle);
  }
  return std::move(w.out);
}

absl::StatusOr<DeviceExport> DecodeDeviceExport(std::string_view payload) {
  Reader r(payload, "DEVICE_REGIONS");
  DeviceExport m;
  r.Bytes("host_id", &m.host_id, kMaxStringBytes);
  r.U64("process_token", &m.process_token);
  r.Bytes("location", &m.location, kMaxStringBytes);
  uint32_t count = 0;
  if (r.Count("regions", &count, 8 + 4, kMaxRegions)) {
    m.regions.resize(count);
    for (DeviceRegionExport& region : m.regions) {
      r.U64("region.size", &region.size);
      r.Bytes("region.handle", &region.handle, kMaxStringBytes);
    }
  }
  TANDEM_RETURN_IF_ERROR(r.Finish());
  return m;
}

std::string Encode(const DeviceRegionsReply& m) {
  Writer w;
  w.U32(m.accepted ? 1 : 0);
  w.Bytes(m.reason);
  return std::move(w.out);
}

absl::StatusOr<DeviceRegionsReply> DecodeDeviceRegionsReply(std::string_view payload) {
  Reader r(payload, "DEVICE_REGIONS_REPLY");
  DeviceRegionsReply m;
  uint32_t accepted = 0;
  r.U32("accepted", &accepted);
  r.Bytes("reason", &m.reason, kMaxStringBytes);
  TANDEM_RETURN_IF_ERROR(r.Finish());
  if (accepted > 1) return absl::InvalidArgumentError(absl::StrCat("DEVICE_REGIONS_REPLY: accepted is ", accepted, ", not 0 or 1"));
  m.accepted = accepted == 1;
  return m;
}

}  // namespace tandem::transfer
