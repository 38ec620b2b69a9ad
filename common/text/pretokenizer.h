// The HF pre-tokenizer pipeline (Sequence of Split/ByteLevel steps) on PCRE2 with JIT: cuts raw
// text into the pieces that BPE encodes one by one.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/core/status.h"

namespace tandem::text {

// One compiled split pattern (an HF `Split` with behaviour Isolated, or ByteLevel's own regex).
class SplitPattern;

class PreTokenizer {
 public:
  PreTokenizer();
  ~PreTokenizer();
  PreTokenizer(PreTokenizer&&) noexcept;
  PreTokenizer& operator=(PreTokenizer&&) noexcept;

  // Builds the pipeline from tokenizer.json's "pre_tokenizer" value (null ⇒ the text is one piece).
  static absl::StatusOr<PreTokenizer> FromJson(const nlohmann::json& config);

  // Appends the pieces of `text` (well-formed UTF-8) to `pieces`, as views into `text`.
  void Split(std::string_view text, std::vector<std::string_view>& pieces) const;

 private:
  void SplitFrom(size_t level, std::string_view piece, std::vector<std::string_view>& pieces) const;

  std::vector<std::unique_ptr<SplitPattern>> patterns_;
};

// Rewrites an Oniguruma pattern (HF's regex engine) into PCRE2 syntax with the same meaning:
// `\s`/`\S` become Unicode White_Space classes (PCRE2's own \s differs, e.g. on U+180E), and
// `\p{L|M|N|P|S}` gain the characters Unicode 16.0 added after PCRE2's 14.0 tables.
absl::StatusOr<std::string> OnigurumaToPcre2(std::string_view pattern);

}  // namespace tandem::text
