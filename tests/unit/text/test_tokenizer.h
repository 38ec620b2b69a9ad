// Shared by the text tests: the real V4 tokenizer, loaded once (dir from TANDEM_TOKENIZER_DIR).
#pragma once

#include <cstdlib>
#include <memory>
#include <string>

#include <gtest/gtest.h>

#include "common/text/byte_level.h"
#include "common/text/tokenizer.h"

namespace tandem::text::testing {

inline const Tokenizer* V4Tokenizer() {
  static const std::unique_ptr<Tokenizer> tokenizer = []() -> std::unique_ptr<Tokenizer> {
    const char* env = std::getenv("TANDEM_TOKENIZER_DIR");
    std::string dir = env != nullptr && *env != '\0' ? env : "";
#ifdef TANDEM_TOKENIZER_DIR_DEFAULT
    if (dir.empty()) dir = TANDEM_TOKENIZER_DIR_DEFAULT;
#endif
    if (dir.empty()) return nullptr;
    auto loaded = Tokenizer::Load(dir);
    if (!loaded.ok()) return nullptr;
    return std::move(loaded).value();
  }();
  return tokenizer.get();
}

// The id of the single-byte token for `byte`.
inline TokenId ByteToken(const Tokenizer& tokenizer, unsigned char byte) {
  return *tokenizer.TokenToId(BytesToTokenString(std::string(1, static_cast<char>(byte))));
}

}  // namespace tandem::text::testing

#define TANDEM_REQUIRE_V4_TOKENIZER(var)                                        \
  const ::tandem::text::Tokenizer* var = ::tandem::text::testing::V4Tokenizer(); \
  if (var == nullptr) GTEST_SKIP() << "V4 tokenizer not found (TANDEM_TOKENIZER_DIR)"
