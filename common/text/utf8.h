// UTF-8 helpers shared by the tokenizer and the streaming detokenizer: lossy decoding with the
// "maximal subpart" rule (as Rust's from_utf8_lossy, which HF tokenizers uses) and prefix checks.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace tandem::text {

inline constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

// Length of the well-formed UTF-8 sequence starting at bytes[0], or 0 when the bytes there do not
// start one. `*maximal_subpart` (when not null) receives how many bytes one U+FFFD replaces
// (>= 1) in the invalid case, and 0 when the input ends in the middle of a valid prefix.
size_t ValidSequenceLength(std::string_view bytes, size_t* maximal_subpart = nullptr);

// Replaces every maximal invalid subsequence with U+FFFD.
std::string DecodeLossy(std::string_view bytes);

// True when the whole input is well-formed UTF-8.
bool IsValidUtf8(std::string_view bytes);

// Number of trailing bytes that form a proper prefix of a well-formed sequence (0..3): the part
// a streaming decoder must hold back because the next bytes may still complete it.
size_t IncompleteTailLength(std::string_view bytes);

// Decodes the code point at `pos` of well-formed UTF-8; advances pos.
char32_t NextCodePoint(std::string_view text, size_t& pos);

// Appends the UTF-8 encoding of code point `cp`.
void AppendCodePoint(std::string& out, char32_t cp);

}  // namespace tandem::text
