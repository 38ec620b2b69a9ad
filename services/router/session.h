// One request's text pipeline: engine token chunks → detokenized text with stop strings → (chat)
// reasoning and DSML tool-call split → client-visible deltas, usage and the finish reason.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "services/router/api.h"
#include "services/router/dispatch.h"

namespace tandem::router {

struct ToolCallPiece {
  int index = 0;
  std::string id;                   // first piece of a call only
  std::optional<std::string> name;  // first piece of a call only
  std::string arguments;
};

struct Delta {
  std::string reasoning;
  std::string content;
  std::vector<ToolCallPiece> tool_calls;
  std::vector<v1::TokenLogprob> logprobs;  // the tokens of this step, when asked for
  bool empty() const { return reasoning.empty() && content.empty() && tool_calls.empty() && logprobs.empty(); }
};

struct Usage {
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  int64_t cached_tokens = 0;
};

class Session {
 public:
  Session(const Job& job, const text::Tokenizer& tokenizer, std::unique_ptr<TokenStream> stream);
  ~Session();

  // Blocks for the next delta. Sets `ended` once the generation is over (the delta may still
  // carry the last text). Errors: the engine or dispatch failure, after which the session is over.
  absl::Status Next(Delta& delta, bool& ended);
  void Cancel();

  const std::string& finish_reason() const { return finish_reason_; }
  // null, the matched stop string, or the matched stop token id.
  Json matched_stop() const { return matched_stop_; }
  const Usage& usage() const { return usage_; }
  // Final tool calls (ids as streamed), for non-streaming answers.
  std::vector<ToolCallPiece> FinalToolCalls() const;
  bool any_output() const { return any_output_; }

 private:
  void Route(const std::string& text, Delta& delta);
  void Absorb(const text::AssistantDelta& parsed, Delta& delta);
  void EndText(Delta& delta);

  const Job& job_;
  const text::Tokenizer& tokenizer_;
  std::unique_ptr<TokenStream> stream_;
  text::StreamDecoder decoder_;
  std::optional<text::AssistantOutputParser> parser_;
  std::vector<std::string> call_ids_;
  std::string finish_reason_;
  Json matched_stop_;
  Usage usage_;
  bool ended_ = false;
  bool any_output_ = false;
};

}  // namespace tandem::router
