// Shared by the text fuzzers: the V4 tokenizer from TANDEM_TOKENIZER_DIR and a hard failure.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include <spdlog/spdlog.h>

#include "common/text/tokenizer.h"

namespace tandem::text::fuzz {

// The library warns on odd input (e.g. a call to an unknown tool); at fuzzing rates that flood
// only slows the run down, so logging is off in every fuzz binary.
inline const bool kLoggingOff = [] {
  spdlog::set_level(spdlog::level::off);
  return true;
}();

inline const Tokenizer& V4Tokenizer() {
  static const std::unique_ptr<Tokenizer> tokenizer = [] {
    const char* dir = std::getenv("TANDEM_TOKENIZER_DIR");
    if (dir == nullptr) {
      std::fprintf(stderr, "set TANDEM_TOKENIZER_DIR to the V4 tokenizer directory\n");
      std::abort();
    }
    auto loaded = Tokenizer::Load(dir);
    if (!loaded.ok()) {
      std::fprintf(stderr, "%s\n", std::string(loaded.status().message()).c_str());
      std::abort();
    }
    return std::move(loaded).value();
  }();
  return *tokenizer;
}

[[noreturn]] inline void Fail(const char* what) {
  std::fprintf(stderr, "invariant broken: %s\n", what);
  std::abort();
}

}  // namespace tandem::text::fuzz
