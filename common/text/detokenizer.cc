#include "common/text/detokenizer.h"

#include <algorithm>

#include "common/text/utf8.h"

namespace tandem::text {

IncrementalDetokenizer::IncrementalDetokenizer(const Tokenizer& tokenizer, bool skip_special_tokens)
    : tokenizer_(tokenizer), skip_special_tokens_(skip_special_tokens) {}

std::string IncrementalDetokenizer::Push(TokenId id) {
  if (!tokenizer_.IsKnown(id) || (skip_special_tokens_ && tokenizer_.IsSpecial(id))) return {};
  pending_.append(tokenizer_.TokenBytes(id));
  const size_t held = IncompleteTailLength(pending_);
  const std::string_view ready = std::string_view(pending_).substr(0, pending_.size() - held);
  if (ready.empty()) return {};
  std::string out = IsValidUtf8(ready) ? std::string(ready) : DecodeLossy(ready);
  pending_.erase(0, ready.size());
  return out;
}

std::string IncrementalDetokenizer::Finish() {
  std::string out = DecodeLossy(pending_);
  pending_.clear();
  return out;
}

StopStringMatcher::StopStringMatcher(std::vector<std::string> stop_strings, bool keep_matched)
    : keep_matched_(keep_matched) {
  for (auto& stop : stop_strings) {
    if (!stop.empty()) stop_strings_.push_back(std::move(stop));
  }
}

StopStringMatcher::Result StopStringMatcher::Push(std::string_view text) {
  Result result;
  if (stopped_) return result;
  held_.append(text);
  // Earliest occurrence wins; at the same position the earlier-listed stop string.
  size_t best_pos = std::string::npos;
  size_t best_index = 0;
  for (size_t i = 0; i < stop_strings_.size(); ++i) {
    const size_t pos = held_.find(stop_strings_[i]);
    if (pos < best_pos) {
      best_pos = pos;
      best_index = i;
    }
  }
  if (best_pos != std::string::npos) {
    const size_t end = best_pos + (keep_matched_ ? stop_strings_[best_index].size() : 0);
    result.text = held_.substr(0, end);
    result.matched = best_index;
    stopped_ = true;
    held_.clear();
    return result;
  }
  // Hold the longest tail that could still grow into a stop string.
  size_t hold = 0;
  for (const std::string& stop : stop_strings_) {
    const size_t longest = std::min(stop.size() - 1, held_.size());
    for (size_t k = longest; k > hold; --k) {
      if (held_.compare(held_.size() - k, k, stop, 0, k) == 0) {
        hold = k;
        break;
      }
    }
  }
  result.text = held_.substr(0, held_.size() - hold);
  held_.erase(0, held_.size() - hold);
  return result;
}

std::string StopStringMatcher::Finish() {
  std::string out;
  out.swap(held_);
  return out;
}

StreamDecoder::StreamDecoder(const Tokenizer& tokenizer, StopOptions options)
    : options_(std::move(options)),
      detokenizer_(tokenizer, options_.skip_special_tokens),
      jail_(options_.stop_strings, options_.no_stop_trim) {}

std::string StreamDecoder::Emit(std::string text) {
  text_.append(text);
  return text;
}

DecodeStep StreamDecoder::Push(TokenId id) {
  DecodeStep step;
  if (finished_) {
    step.finished = true;
    return step;
  }
  const bool stop_token = std::find(options_.stop_token_ids.begin(), options_.stop_token_ids.end(), id) !=
                          options_.stop_token_ids.end();
  if (stop_token) {
    // A visible stop token contributes its text; either way everything held is released.
    std::string text = options_.no_stop_trim ? detokenizer_.Push(id) : std::string();
    text.append(detokenizer_.Finish());
    std::string released = jail_.Push(text).text;
    released.append(jail_.Finish());
    finished_ = true;
    step.finished = true;
    step.matched_token = id;
    step.text = Emit(std::move(released));
    return step;
  }
  auto result = jail_.Push(detokenizer_.Push(id));
  if (result.matched.has_value()) {
    finished_ = true;
    step.finished = true;
    step.matched_string = jail_.stop_strings()[*result.matched];
  }
  step.text = Emit(std::move(result.text));
  return step;
}

DecodeStep StreamDecoder::Push(const std::vector<TokenId>& ids) {
  DecodeStep total;
  for (const TokenId id : ids) {
    DecodeStep step = Push(id);
    total.text.append(step.text);
    if (step.finished) {
      total.finished = true;
      total.matched_token = step.matched_token;
      total.matched_string = step.matched_string;
      break;
    }
  }
  return total;
}

std::string StreamDecoder::Finish() {
  if (finished_) return {};
  finished_ = true;
  auto result = jail_.Push(detokenizer_.Finish());
  std::string out = std::move(result.text);
  out.append(jail_.Finish());
  return Emit(std::move(out));
}

}  // namespace tandem::text
