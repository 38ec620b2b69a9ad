// Any bytes: encoding never fails, and decoding gives back the (lossily read) input.
#include <cstdint>
#include <string_view>

#include "common/text/utf8.h"
#include "tests/fuzz/text/fuzz_common.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tandem::text::fuzz::V4Tokenizer();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace tandem::text;
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const Tokenizer& tokenizer = fuzz::V4Tokenizer();
  const std::vector<TokenId> ids = tokenizer.Encode(input);
  for (const TokenId id : ids) {
    if (!tokenizer.IsKnown(id)) fuzz::Fail("encode produced an unknown id");
  }
  if (tokenizer.Decode(ids) != DecodeLossy(input)) fuzz::Fail("decode(encode(s)) != s");
  return 0;
}
