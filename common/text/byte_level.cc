#include "common/text/byte_level.h"

#include <array>

#include "common/text/utf8.h"

namespace tandem::text {
namespace {

struct ByteTables {
  std::array<char32_t, 256> byte_to_char{};
  std::array<int16_t, 0x144> char_to_byte{};  // stand-ins are all below U+0144

  ByteTables() {
    char_to_byte.fill(-1);
    char32_t next_extra = 0x100;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const char32_t cp = printable ? static_cast<char32_t>(b) : next_extra++;
      byte_to_char[b] = cp;
      char_to_byte[cp] = static_cast<int16_t>(b);
    }
  }
};

const ByteTables& Tables() {
  static const ByteTables tables;
  return tables;
}

}  // namespace

char32_t ByteToChar(uint8_t byte) { return Tables().byte_to_char[byte]; }

std::optional<uint8_t> CharToByte(char32_t cp) {
  if (cp >= Tables().char_to_byte.size()) return std::nullopt;
  const int16_t b = Tables().char_to_byte[cp];
  if (b < 0) return std::nullopt;
  return static_cast<uint8_t>(b);
}

std::string TokenStringToBytes(std::string_view token) {
  std::string bytes;
  bytes.reserve(token.size());
  size_t pos = 0;
  while (pos < token.size()) {
    const auto b = CharToByte(NextCodePoint(token, pos));
    if (!b.has_value()) return std::string(token);
    bytes.push_back(static_cast<char>(*b));
  }
  return bytes;
}

std::string BytesToTokenString(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (const char c : bytes) AppendCodePoint(out, ByteToChar(static_cast<uint8_t>(c)));
  return out;
}

}  // namespace tandem::text
