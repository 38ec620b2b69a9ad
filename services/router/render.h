// OpenAI JSON shapes of the router's answers (text-and-api.md §4.2/§4.3): chunks, messages,
// logprobs and usage, shared by the HTTP front and its tests.
#pragma once

#include <string>
#include <vector>

#include "services/router/api.h"
#include "services/router/session.h"

namespace tandem::router {

struct ResponseMeta {
  std::string id;
  int64_t created = 0;
  std::string model;
};

Json UsageJson(const Usage& usage);
// Chat logprobs {"content": [{token, bytes, logprob, top_logprobs}]}.
Json ChatLogprobs(const text::Tokenizer& tokenizer, const std::vector<v1::TokenLogprob>& entries);
// Completions logprobs {tokens, token_logprobs, top_logprobs, text_offset}.
Json CompletionLogprobs(const text::Tokenizer& tokenizer, const std::vector<v1::TokenLogprob>& entries);

// One SSE chunk's JSON for a delta (chat or completion). `first` adds the assistant role.
Json StreamChunk(const Job& job, const ResponseMeta& meta, const text::Tokenizer& tokenizer, const Delta& delta, bool first);
// The closing chunk: empty delta (chat) or text "" (completion), finish_reason and matched_stop.
Json FinishChunk(const Job& job, const ResponseMeta& meta, const Session& session);
Json UsageChunk(const Job& job, const ResponseMeta& meta, const Session& session);

// The whole non-streaming answer from the accumulated deltas.
struct Accumulated {
  std::string reasoning;
  std::string content;
  std::vector<v1::TokenLogprob> logprobs;
  void Add(const Delta& delta);
};
Json FullResponse(const Job& job, const ResponseMeta& meta, const text::Tokenizer& tokenizer, const Session& session,
                  const Accumulated& all);

// An id like "chatcmpl-<24 hex>".
std::string NewResponseId(const char* prefix);

}  // namespace tandem::router
