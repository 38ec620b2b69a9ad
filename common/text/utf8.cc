#include "common/text/utf8.h"

namespace tandem::text {
namespace {

// Allowed range of the second byte for each lead byte (Unicode Table 3-7); later bytes are 80..BF.
bool SecondByteOk(unsigned char lead, unsigned char second) {
  if (lead == 0xE0) return second >= 0xA0 && second <= 0xBF;
  if (lead == 0xED) return second >= 0x80 && second <= 0x9F;
  if (lead == 0xF0) return second >= 0x90 && second <= 0xBF;
  if (lead == 0xF4) return second >= 0x80 && second <= 0x8F;
  return second >= 0x80 && second <= 0xBF;
}

size_t SequenceLengthForLead(unsigned char lead) {
  if (lead < 0x80) return 1;
  if (lead >= 0xC2 && lead <= 0xDF) return 2;
  if (lead >= 0xE0 && lead <= 0xEF) return 3;
  if (lead >= 0xF0 && lead <= 0xF4) return 4;
  return 0;
}

}  // namespace

size_t ValidSequenceLength(std::string_view bytes, size_t* maximal_subpart) {
  auto set_subpart = [&](size_t n) {
    if (maximal_subpart != nullptr) *maximal_subpart = n;
  };
  if (bytes.empty()) {
    set_subpart(0);
    return 0;
  }
  const auto lead = static_cast<unsigned char>(bytes[0]);
  const size_t need = SequenceLengthForLead(lead);
  if (need == 0) {
    set_subpart(1);
    return 0;
  }
  for (size_t i = 1; i < need; ++i) {
    if (i >= bytes.size()) {  // ran out while still a valid prefix
      set_subpart(0);
      return 0;
    }
    const auto b = static_cast<unsigned char>(bytes[i]);
    const bool ok = i == 1 ? SecondByteOk(lead, b) : (b >= 0x80 && b <= 0xBF);
    if (!ok) {
      set_subpart(i);
      return 0;
    }
  }
  set_subpart(0);
  return need;
}

std::string DecodeLossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  size_t pos = 0;
  while (pos < bytes.size()) {
    // Fast path for ASCII runs.
    size_t ascii_end = pos;
    while (ascii_end < bytes.size() && static_cast<unsigned char>(bytes[ascii_end]) < 0x80) ++ascii_end;
    if (ascii_end > pos) {
      out.append(bytes.data() + pos, ascii_end - pos);
      pos = ascii_end;
      continue;
    }
    size_t subpart = 0;
    const size_t len = ValidSequenceLength(bytes.substr(pos), &subpart);
    if (len > 0) {
      out.append(bytes.data() + pos, len);
      pos += len;
    } else {
      out.append(kReplacementChar);
      // subpart == 0 means a truncated valid prefix at the very end: it is one maximal subpart.
      pos += subpart == 0 ? bytes.size() - pos : subpart;
    }
  }
  return out;
}

bool IsValidUtf8(std::string_view bytes) {
  size_t pos = 0;
  while (pos < bytes.size()) {
    if (static_cast<unsigned char>(bytes[pos]) < 0x80) {
      ++pos;
      continue;
    }
    const size_t len = ValidSequenceLength(bytes.substr(pos));
    if (len == 0) return false;
    pos += len;
  }
  return true;
}

size_t IncompleteTailLength(std::string_view bytes) {
  // A proper prefix is at most 3 bytes long; find the lead byte among the last 3.
  const size_t lookback = bytes.size() < 3 ? bytes.size() : 3;
  for (size_t back = 1; back <= lookback; ++back) {
    const auto b = static_cast<unsigned char>(bytes[bytes.size() - back]);
    if (b >= 0x80 && b <= 0xBF) continue;  // continuation byte: keep looking for the lead
    size_t subpart = 0;
    const size_t len = ValidSequenceLength(bytes.substr(bytes.size() - back), &subpart);
    return (len == 0 && subpart == 0) ? back : 0;
  }
  return 0;
}

char32_t NextCodePoint(std::string_view text, size_t& pos) {
  const auto b0 = static_cast<unsigned char>(text[pos]);
  if (b0 < 0x80) {
    ++pos;
    return b0;
  }
  const size_t len = SequenceLengthForLead(b0);
  if (len == 0 || pos + len > text.size()) {  // not expected on well-formed input
    ++pos;
    return 0xFFFD;
  }
  char32_t cp = b0 & (0x7F >> len);
  for (size_t i = 1; i < len; ++i) cp = (cp << 6) | (static_cast<unsigned char>(text[pos + i]) & 0x3F);
  pos += len;
  return cp;
}

void AppendCodePoint(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

}  // namespace tandem::text
