#include "common/text/reasoning_parser.h"

#include <algorithm>

namespace tandem::text {
namespace {

constexpr std::string_view kThinkStart = "<think>";
constexpr std::string_view kThinkEnd = "</think>";

bool IsProperPrefixOf(std::string_view text, std::string_view token) {
  return text.size() < token.size() && token.substr(0, text.size()) == text;
}

bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

// Length of the longest tail of `text` that is a proper prefix of `token`.
size_t HeldTail(std::string_view text, std::string_view token) {
  for (size_t k = std::min(token.size() - 1, text.size()); k > 0; --k) {
    if (text.substr(text.size() - k) == token.substr(0, k)) return k;
  }
  return 0;
}

}  // namespace

ReasoningParser::ReasoningParser(ReasoningOptions options)
    : options_(options), state_(options.force_reasoning ? State::kReasoning : State::kStart) {
  if (!options_.separate_reasoning) state_ = State::kContent;
}

ReasoningSplit ReasoningParser::Push(std::string_view chunk) {
  ReasoningSplit out;
  if (finished_) return out;
  if (state_ == State::kContent) {
    out.content.assign(chunk);
    return out;
  }
  buffer_.append(chunk);
  Process(out, /*at_end=*/false);
  return out;
}

void ReasoningParser::Process(ReasoningSplit& out, bool at_end) {
  if (state_ == State::kStart) {
    // Only a <think> at the very start (after blank space) opens reasoning unless forced.
    size_t lead = 0;
    while (lead < buffer_.size() && IsSpace(buffer_[lead])) ++lead;
    const std::string_view rest = std::string_view(buffer_).substr(lead);
    if (!at_end && (rest.empty() || IsProperPrefixOf(rest, kThinkStart))) return;
    if (rest.substr(0, kThinkStart.size()) == kThinkStart) {
      buffer_.erase(0, lead + kThinkStart.size());
      state_ = State::kReasoning;
    } else {
      state_ = State::kContent;
      out.content.append(buffer_);
      buffer_.clear();
      return;
    }
  }
  if (state_ == State::kReasoning) {
    if (!reasoning_started_) {
      // Leading (repeated) <think> tokens are not reasoning text.
      while (buffer_.compare(0, kThinkStart.size(), kThinkStart) == 0) buffer_.erase(0, kThinkStart.size());
      if (!at_end && (buffer_.empty() || IsProperPrefixOf(buffer_, kThinkStart))) return;
      reasoning_started_ = true;
    }
    const size_t end = buffer_.find(kThinkEnd);
    if (end != std::string::npos) {
      pending_reasoning_.append(buffer_, 0, end);
      out.reasoning.append(pending_reasoning_);
      pending_reasoning_.clear();
      out.content.append(buffer_, end + kThinkEnd.size());
      buffer_.clear();
      state_ = State::kContent;
      return;
    }
    const size_t hold = at_end ? 0 : HeldTail(buffer_, kThinkEnd);
    pending_reasoning_.append(buffer_, 0, buffer_.size() - hold);
    buffer_.erase(0, buffer_.size() - hold);
    if (options_.stream_reasoning || at_end) {
      out.reasoning.append(pending_reasoning_);
      pending_reasoning_.clear();
    }
  }
}

ReasoningSplit ReasoningParser::Finish() {
  ReasoningSplit out;
  if (finished_) return out;
  finished_ = true;
  if (state_ != State::kContent) Process(out, /*at_end=*/true);
  if (state_ == State::kContent && !buffer_.empty()) {
    out.content.append(buffer_);
    buffer_.clear();
  }
  return out;
}

ReasoningSplit ParseReasoning(std::string_view text, ReasoningOptions options) {
  ReasoningParser parser(options);
  ReasoningSplit result = parser.Push(text);
  const ReasoningSplit rest = parser.Finish();
  result.reasoning.append(rest.reasoning);
  result.content.append(rest.content);
  return result;
}

bool PromptOpensThinking(std::string_view prompt) {
  return prompt.size() >= kThinkStart.size() && prompt.substr(prompt.size() - kThinkStart.size()) == kThinkStart;
}

}  // namespace tandem::text
