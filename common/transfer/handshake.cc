#include "common/transfer/handshake.h"

#include <algorithm>

#include "absl/strings/escaping.h"
#include "absl/strings/str_join.h"

namespace tandem::transfer {
namespace {

std::string CapabilityNames(uint64_t bits) {
  std::vector<std::string> names;
  if (bits & kCapabilityChecksum) names.push_back("checksum");
  if (bits & kCapabilityAbortAck) names.push_back("abort_ack");
  if (bits & kCapabilityChunkedShip) names.push_back("chunked_ship");
  if (bits & kCapabilityDeviceIpc) names.push_back("device_ipc");
  if (bits & kCapabilityPeerLease) names.push_back("peer_lease");
  return names.empty() ? "none" : absl::StrJoin(names, ",");
}

// A peer's string as it goes into an error (logged, and sent back in REFUSE): control bytes escaped and at
// most kShownBytes of it, so a hostile or broken peer cannot fill the log with megabytes of its bytes.
constexpr size_t kShownBytes = 64;
std::string Shown(std::string_view s) {
  std::string out = absl::CHexEscape(absl::string_view(s.data(), std::min(s.size(), kShownBytes)));
  if (s.size() > kShownBytes) absl::StrAppend(&out, "... (", s.size(), " bytes)");
  return out;
}
uint32_t Shown(uint32_t v) { return v; }

template <typename T>
absl::Status Differs(std::string_view field, const T& prefill, const T& decode) {
  return absl::FailedPreconditionError(absl::StrCat("incompatible peer: ", std::string(field), ": prefill ",
                                                    Shown(prefill), ", decode ", Shown(decode)));
}

}  // namespace

Handshake LocalHandshake(const LayoutDescriptor& descriptor, std::string layout_hash) {
  Handshake h;
  h.protocol_version = kProtocolVersion;
  h.capabilities = kRequiredCapabilities;
  h.layout_hash = std::move(layout_hash);
  h.descriptor = descriptor;
  return h;
}

absl::Status CheckCompatible(const Handshake& prefill, const Handshake& decode) {
  if (prefill.protocol_version != decode.protocol_version) {
    return Differs("protocol_version", prefill.protocol_version, decode.protocol_version);
  }
  const uint64_t missing_prefill = kRequiredCapabilities & ~prefill.capabilities;
  const uint64_t missing_decode = kRequiredCapabilities & ~decode.capabilities;
  if (missing_prefill != 0 || missing_decode != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "incompatible peer: capabilities: prefill lacks ", CapabilityNames(missing_prefill), ", decode lacks ",
        CapabilityNames(missing_decode)));
  }
  if (prefill.transport_kind != decode.transport_kind) {
    return Differs("transport", prefill.transport_kind, decode.transport_kind);
  }
  const LayoutDescriptor& p = prefill.descriptor;
  const LayoutDescriptor& d = decode.descriptor;
  if (p.model_config_hash != d.model_config_hash) return Differs("model_config_hash", p.model_config_hash, d.model_config_hash);
  if (p.page_size != d.page_size) return Differs("page_size", p.page_size, d.page_size);
  if (p.dtype != d.dtype) return Differs("dtype", p.dtype, d.dtype);
  if (p.layer_begin != d.layer_begin || p.layer_end != d.layer_end) {
    return Differs("layer_range", absl::StrCat("[", p.layer_begin, ", ", p.layer_end, ")"),
                   absl::StrCat("[", d.layer_begin, ", ", d.layer_end, ")"));
  }
  if (prefill.layout_hash != decode.layout_hash) return Differs("layout_hash", prefill.layout_hash, decode.layout_hash);
  return absl::OkStatus();
}

std::string DescribeLayout(const LayoutDescriptor& d) {
  return absl::StrCat("model ", d.model_config_hash, ", page_size ", d.page_size, ", dtype ", d.dtype, ", layers [",
                      d.layer_begin, ", ", d.layer_end, ")");
}

}  // namespace tandem::transfer
