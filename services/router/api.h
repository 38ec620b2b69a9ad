// The OpenAI-compatible request layer: JSON bodies of /v1/chat/completions and /v1/completions →
// a validated Job (token ids, engine sampling, stops, output parsing); errors → OpenAI error objects.
#pragma once

#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "common/core/status.h"
#include "common/text/chat_encoding.h"
#include "common/text/detokenizer.h"
#include "common/text/output_parser.h"
#include "common/text/tokenizer.h"
#include "tandem/v1/engine.pb.h"

namespace tandem::router {

using Json = nlohmann::ordered_json;

// Errors carry the OpenAI `param` (and optionally `code`) as status payloads.
absl::Status InvalidParam(const std::string& param, const std::string& message, const std::string& code = "");
int HttpStatusOf(const absl::Status& status);
// {"error": {"message", "type", "param", "code"}}
Json ErrorBody(const absl::Status& status);

struct ServingContext {
  const text::Tokenizer* tokenizer = nullptr;
  std::string model_name;
  int64_t max_context_tokens = 0;   // 0: unknown (no worker reported yet)
  int64_t max_new_tokens_limit = 0;  // 0: unknown
  int64_t default_max_tokens = 256;  // when the context is unknown and the client gave none
  text::EffortProfile effort_profile = text::EffortProfile::kOfficial;
};

struct Job {
  bool chat = true;
  bool stream = false;
  bool include_usage = false;
  bool continuous_usage = false;
  bool logprobs = false;
  int top_logprobs = 0;
  v1::GenerateRequest request;  // input ids, sampling, logprob controls (no disaggregation yet)
  text::StopOptions stop;
  bool parse_output = false;  // chat: reasoning split and tool calls
  text::AssistantOutputOptions output;
  std::string prompt_text;  // chat: the encoded prompt
};

absl::StatusOr<Job> ParseChatRequest(const Json& body, const ServingContext& context);
absl::StatusOr<Job> ParseCompletionRequest(const Json& body, const ServingContext& context);
// An HTTP body as received: bad JSON is a 400 `invalid_json`, then the chat or completion parser.
// Never throws (the router's fuzz target, tests/fuzz/router, holds it to that).
absl::StatusOr<Job> ParseRequestBody(std::string_view body, bool chat, const ServingContext& context);

}  // namespace tandem::router
