// Any id sequence: streamed text equals one-shot decoding, is always complete UTF-8, and the
// stop-string jail never emits past (or a piece of) the first stop string.
#include <cstdint>
#include <string>
#include <vector>

#include "common/text/byte_level.h"
#include "common/text/detokenizer.h"
#include "common/text/utf8.h"
#include "tests/fuzz/text/fuzz_common.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tandem::text::fuzz::V4Tokenizer();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace tandem::text;
  if (size < 1) return 0;
  const Tokenizer& tokenizer = fuzz::V4Tokenizer();
  const uint8_t flags = data[0];
  const bool skip_special = flags & 1;
  std::vector<TokenId> ids;
  for (size_t i = 1; i + 2 < size; i += 3) {
    const uint32_t value = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16);
    if (data[i + 2] & 0x80) {
      // Single-byte tokens: partial and invalid UTF-8 sequences.
      ids.push_back(*tokenizer.TokenToId(BytesToTokenString(std::string(1, static_cast<char>(data[i])))));
    } else {
      ids.push_back(static_cast<TokenId>(value % tokenizer.vocab_size()));
    }
  }
  const std::string full = tokenizer.Decode(ids, skip_special);

  IncrementalDetokenizer detokenizer(tokenizer, skip_special);
  std::string streamed;
  for (const TokenId id : ids) {
    const std::string piece = detokenizer.Push(id);
    if (!IsValidUtf8(piece)) fuzz::Fail("detokenizer emitted malformed UTF-8");
    streamed += piece;
  }
  streamed += detokenizer.Finish();
  if (streamed != full) fuzz::Fail("streamed text != one-shot decode");

  static const std::vector<std::string> kStops[] = {{"END"}, {"\n\n", "e"}, {"\xEF\xBF\xBD"}, {"ab", "abc", "b"}};
  const std::vector<std::string>& stops = kStops[(flags >> 1) % 4];
  StreamDecoder decoder(tokenizer, {.stop_strings = stops, .skip_special_tokens = skip_special});
  for (const TokenId id : ids) {
    if (decoder.Push(id).finished) break;
  }
  decoder.Finish();
  const std::string& text = decoder.text();
  if (full.compare(0, text.size(), text) != 0) fuzz::Fail("stop decoder text is not a prefix of the decode");
  size_t first_stop = std::string::npos;
  for (const std::string& stop : stops) first_stop = std::min(first_stop, full.find(stop));
  if (first_stop == std::string::npos ? text != full : text.size() != first_stop) {
    fuzz::Fail("stop decoder did not cut at the first stop string");
  }
  return 0;
}
