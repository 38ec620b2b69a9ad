// The HF byte-level BPE tokenizer, loaded from a model directory's tokenizer.json: encode text to
// ids and decode ids to text with exact parity to HF `tokenizers` (added tokens, pre-tokenizer, BPE).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "common/core/status.h"

namespace tandem::text {

using TokenId = int32_t;

// One entry of tokenizer.json's "added_tokens".
struct AddedToken {
  TokenId id = 0;
  std::string content;
  bool special = false;
  bool normalized = false;
  bool lstrip = false;
  bool rstrip = false;
  bool single_word = false;
};

class Tokenizer {
 public:
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Loads DIR/tokenizer.json (and DIR/tokenizer_config.json for BOS/EOS when present).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& dir);
  // From the text of tokenizer.json and (optionally, may be empty) tokenizer_config.json.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJsonText(std::string_view tokenizer_json,
                                                                std::string_view config_json);

  // Text → ids. Added tokens in the text become their ids (as HF with split_special_tokens off).
  // Malformed UTF-8 is first replaced with U+FFFD (what a lossy reader would hand HF). Thread-safe.
  std::vector<TokenId> Encode(std::string_view text) const;
  // Ids → text, lossy on malformed UTF-8; unknown ids are skipped (as HF).
  std::string Decode(const std::vector<TokenId>& ids, bool skip_special_tokens = false) const;
  // The raw bytes a token stands for (empty for unknown ids); may be a partial UTF-8 sequence.
  std::string_view TokenBytes(TokenId id) const;
  bool IsSpecial(TokenId id) const;
  bool IsKnown(TokenId id) const;

  // The token's vocabulary string (byte-level form for BPE tokens), or nullopt.
  std::optional<std::string> IdToToken(TokenId id) const;
  std::optional<TokenId> TokenToId(std::string_view token) const;

  // Highest id + 1 over vocabulary and added tokens.
  size_t vocab_size() const;
  std::optional<TokenId> bos_id() const { return bos_id_; }
  std::optional<TokenId> eos_id() const { return eos_id_; }
  const std::vector<AddedToken>& added_tokens() const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);

  std::unique_ptr<Impl> impl_;
  std::optional<TokenId> bos_id_;
  std::optional<TokenId> eos_id_;
};

}  // namespace tandem::text
