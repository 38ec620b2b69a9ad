// DeepSeek-V4 reasoning parser (`deepseek-v4`, §3): splits model output into reasoning (inside
// <think>…</think>) and content, one-shot or streamed chunk by chunk.
#pragma once

#include <string>
#include <string_view>

namespace tandem::text {

struct ReasoningOptions {
  // The prompt ended with <think>: output starts inside reasoning (PromptOpensThinking).
  bool force_reasoning = false;
  bool separate_reasoning = true;  // false: no split, everything is content
  bool stream_reasoning = true;    // false: reasoning is released whole at </think> or the end
};

struct ReasoningSplit {
  std::string reasoning;
  std::string content;
};

class ReasoningParser {
 public:
  explicit ReasoningParser(ReasoningOptions options = {});

  ReasoningSplit Push(std::string_view chunk);
  // End of stream: releases anything held (reasoning cut short stays reasoning).
  ReasoningSplit Finish();
  bool in_reasoning() const { return state_ == State::kReasoning; }

 private:
  enum class State { kStart, kReasoning, kContent };
  void Process(ReasoningSplit& out, bool at_end);

  ReasoningOptions options_;
  State state_;
  bool reasoning_started_ = false;  // something after <think> was seen (leading <think>s are stripped)
  std::string buffer_;
  std::string pending_reasoning_;  // held when stream_reasoning is off
  bool finished_ = false;
};

// One-shot: the same as streaming the whole text and finishing.
ReasoningSplit ParseReasoning(std::string_view text, ReasoningOptions options = {});

// The parser-consistency rule: a prompt that ends with <think> makes the output reasoning.
bool PromptOpensThinking(std::string_view prompt);

}  // namespace tandem::text
