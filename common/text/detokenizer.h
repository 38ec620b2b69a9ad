// Streaming detokenization: token ids in, text out as it becomes certain — complete UTF-8 only,
// stop strings held back while they may still match and trimmed once they do (§5.3, §7).
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/text/tokenizer.h"

namespace tandem::text {

// Turns a stream of token ids into text, emitting only complete UTF-8 characters. Concatenating
// every Push() and the final Finish() gives exactly Tokenizer::Decode of all the ids.
class IncrementalDetokenizer {
 public:
  IncrementalDetokenizer(const Tokenizer& tokenizer, bool skip_special_tokens);

  // Adds one token; returns the text that is now complete (often empty mid-character).
  std::string Push(TokenId id);
  // Releases what is held, lossily (a dangling partial character becomes U+FFFD).
  std::string Finish();
  bool holding() const { return !pending_.empty(); }

 private:
  const Tokenizer& tokenizer_;
  bool skip_special_tokens_;
  std::string pending_;  // bytes of an incomplete trailing character
};

// The "jail": passes text through but holds back any tail that is a prefix of a stop string, and
// reports the first stop string that completes.
class StopStringMatcher {
 public:
  StopStringMatcher(std::vector<std::string> stop_strings, bool keep_matched);

  struct Result {
    std::string text;                    // safe to emit now
    std::optional<size_t> matched;       // index into the stop strings once one matched
  };
  // After a match, further input is ignored.
  Result Push(std::string_view text);
  // End of stream: releases the held tail.
  std::string Finish();
  bool stopped() const { return stopped_; }
  const std::vector<std::string>& stop_strings() const { return stop_strings_; }

 private:
  std::vector<std::string> stop_strings_;
  bool keep_matched_;
  bool stopped_ = false;
  std::string held_;
};

struct StopOptions {
  std::vector<std::string> stop_strings;
  std::vector<TokenId> stop_token_ids;  // request stop ids plus EOS (unless ignore_eos)
  bool no_stop_trim = false;            // keep the matched stop string / stop token's text
  bool skip_special_tokens = true;
};

// What one streaming step produced.
struct DecodeStep {
  std::string text;
  bool finished = false;
  std::optional<TokenId> matched_token;
  std::optional<std::string> matched_string;
};

// Token stops first, then detokenization, then the stop-string jail: what the gateway runs on
// each decoded step of one choice.
class StreamDecoder {
 public:
  StreamDecoder(const Tokenizer& tokenizer, StopOptions options);

  DecodeStep Push(TokenId id);
  DecodeStep Push(const std::vector<TokenId>& ids);
  // End of stream for any other reason (length, abort): releases everything held.
  std::string Finish();
  bool finished() const { return finished_; }
  // All text emitted so far.
  const std::string& text() const { return text_; }

 private:
  std::string Emit(std::string text);

  StopOptions options_;
  IncrementalDetokenizer detokenizer_;
  StopStringMatcher jail_;
  bool finished_ = false;
  std::string text_;
};

}  // namespace tandem::text
