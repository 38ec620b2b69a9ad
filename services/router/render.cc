#include "services/router/render.h"

#include <random>

#include "absl/strings/str_format.h"

namespace tandem::router {
namespace {

Json BytesOf(std::string_view bytes) {
  Json out = Json::array();
  for (unsigned char c : bytes) out.push_back(static_cast<int>(c));
  return out;
}

Json ToolCallsJson(const std::vector<ToolCallPiece>& pieces, bool streaming) {
  Json out = Json::array();
  for (const auto& piece : pieces) {
    Json call = Json::object();
    call["index"] = piece.index;
    call["id"] = piece.id.empty() ? Json() : Json(piece.id);
    call["type"] = "function";
    Json function = Json::object();
    function["name"] = piece.name.has_value() ? Json(*piece.name) : Json();
    function["arguments"] = piece.arguments;
    call["function"] = std::move(function);
    if (!streaming) call.erase("index");
    out.push_back(std::move(call));
  }
  return out;
}

}  // namespace

std::string NewResponseId(const char* prefix) {
  thread_local std::mt19937_64 random(std::random_device{}());
  return absl::StrFormat("%s-%016x%08x", prefix, random(), static_cast<uint32_t>(random()));
}

Json UsageJson(const Usage& usage) {
  Json out = Json::object();
  out["prompt_tokens"] = usage.prompt_tokens;
  out["completion_tokens"] = usage.completion_tokens;
  out["total_tokens"] = usage.prompt_tokens + usage.completion_tokens;
  Json details = Json::object();
  details["cached_tokens"] = usage.cached_tokens;
  out["prompt_tokens_details"] = std::move(details);
  return out;
}

Json ChatLogprobs(const text::Tokenizer& tokenizer, const std::vector<v1::TokenLogprob>& entries) {
  Json content = Json::array();
  for (const auto& entry : entries) {
    Json item = Json::object();
    item["token"] = tokenizer.Decode({entry.token_id()});
    item["bytes"] = BytesOf(tokenizer.TokenBytes(entry.token_id()));
    item["logprob"] = entry.logprob();
    Json top = Json::array();
    for (const auto& alternative : entry.top()) {
      Json t = Json::object();
      t["token"] = tokenizer.Decode({alternative.token_id()});
      t["bytes"] = BytesOf(tokenizer.TokenBytes(alternative.token_id()));
      t["logprob"] = alternative.logprob();
      top.push_back(std::move(t));
    }
    item["top_logprobs"] = std::move(top);
    content.push_back(std::move(item));
  }
  Json out = Json::object();
  out["content"] = std::move(content);
  return out;
}

Json CompletionLogprobs(const text::Tokenizer& tokenizer, const std::vector<v1::TokenLogprob>& entries) {
  Json tokens = Json::array(), values = Json::array(), tops = Json::array(), offsets = Json::array();
  size_t offset = 0;
  for (const auto& entry : entries) {
    const std::string token = tokenizer.Decode({entry.token_id()});
    tokens.push_back(token);
    values.push_back(entry.logprob());
    Json top = Json::object();
    for (const auto& alternative : entry.top()) top[tokenizer.Decode({alternative.token_id()})] = alternative.logprob();
    tops.push_back(std::move(top));
    offsets.push_back(offset);
    offset += token.size();
  }
  Json out = Json::object();
  out["tokens"] = std::move(tokens);
  out["token_logprobs"] = std::move(values);
  out["top_logprobs"] = std::move(tops);
  out["text_offset"] = std::move(offsets);
  return out;
}

namespace {

Json Envelope(const Job& job, const ResponseMeta& meta, bool chunk) {
  Json out = Json::object();
  out["id"] = meta.id;
  out["object"] = job.chat ? (chunk ? "chat.completion.chunk" : "chat.completion") : "text_completion";
  out["created"] = meta.created;
  out["model"] = meta.model;
  return out;
}

}  // namespace

Json StreamChunk(const Job& job, const ResponseMeta& meta, const text::Tokenizer& tokenizer, const Delta& delta, bool first) {
  Json out = Envelope(job, meta, true);
  Json choice = Json::object();
  choice["index"] = 0;
  if (job.chat) {
    Json d = Json::object();
    if (first) {
      d["role"] = "assistant";
      d["content"] = "";
    }
    if (!delta.reasoning.empty()) d["reasoning_content"] = delta.reasoning;
    if (!delta.content.empty()) d["content"] = delta.content;
    if (!delta.tool_calls.empty()) d["tool_calls"] = ToolCallsJson(delta.tool_calls, true);
    choice["delta"] = std::move(d);
    choice["logprobs"] = delta.logprobs.empty() ? Json() : ChatLogprobs(tokenizer, delta.logprobs);
  } else {
    choice["text"] = delta.content;
    choice["logprobs"] = delta.logprobs.empty() ? Json() : CompletionLogprobs(tokenizer, delta.logprobs);
  }
  choice["finish_reason"] = Json();
  choice["matched_stop"] = Json();
  out["choices"] = Json::array({std::move(choice)});
  return out;
}

Json FinishChunk(const Job& job, const ResponseMeta& meta, const Session& session) {
  Json out = Envelope(job, meta, true);
  Json choice = Json::object();
  choice["index"] = 0;
  if (job.chat) {
    choice["delta"] = Json::object();
  } else {
    choice["text"] = "";
  }
  choice["logprobs"] = Json();
  choice["finish_reason"] = session.finish_reason();
  choice["matched_stop"] = session.matched_stop();
  out["choices"] = Json::array({std::move(choice)});
  if (job.continuous_usage) out["usage"] = UsageJson(session.usage());
  return out;
}

Json UsageChunk(const Job& job, const ResponseMeta& meta, const Session& session) {
  Json out = Envelope(job, meta, true);
  out["choices"] = Json::array();
  out["usage"] = UsageJson(session.usage());
  return out;
}

void Accumulated::Add(const Delta& delta) {
  reasoning += delta.reasoning;
  content += delta.content;
  logprobs.insert(logprobs.end(), delta.logprobs.begin(), delta.logprobs.end());
}

Json FullResponse(const Job& job, const ResponseMeta& meta, const text::Tokenizer& tokenizer, const Session& session,
                  const Accumulated& all) {
  Json out = Envelope(job, meta, false);
  Json choice = Json::object();
  choice["index"] = 0;
  if (job.chat) {
    Json message = Json::object();
    message["role"] = "assistant";
    message["content"] = all.content;
    message["reasoning_content"] = all.reasoning.empty() ? Json() : Json(all.reasoning);
    const auto calls = session.FinalToolCalls();
    message["tool_calls"] = calls.empty() ? Json() : ToolCallsJson(calls, false);
    choice["message"] = std::move(message);
    choice["logprobs"] = job.logprobs ? ChatLogprobs(tokenizer, all.logprobs) : Json();
  } else {
    choice["text"] = all.content;
    choice["logprobs"] = job.logprobs ? CompletionLogprobs(tokenizer, all.logprobs) : Json();
  }
  choice["finish_reason"] = session.finish_reason();
  choice["matched_stop"] = session.matched_stop();
  out["choices"] = Json::array({std::move(choice)});
  out["usage"] = UsageJson(session.usage());
  return out;
}

}  // namespace tandem::router
