// GPT-2 byte-level mapping: every byte has a printable stand-in character in BPE vocabularies.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace tandem::text {

// The stand-in code point for a byte (0x21..0x7E, 0xA1..0xAC, 0xAE..0xFF map to themselves; the
// other 68 bytes, ascending, map to U+0100.. in order).
char32_t ByteToChar(uint8_t byte);
// The byte a stand-in code point encodes, or nullopt when the code point is not a stand-in.
std::optional<uint8_t> CharToByte(char32_t cp);

// A vocabulary string decoded as HF's ByteLevel decoder does for one token: the mapped bytes when
// every character is a stand-in, otherwise the token's own UTF-8 bytes.
std::string TokenStringToBytes(std::string_view token);
// Raw bytes → the vocabulary string form.
std::string BytesToTokenString(std::string_view bytes);

}  // namespace tandem::text
