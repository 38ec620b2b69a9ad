#include "services/router/session.h"

#include "common/text/dsml_parser.h"

namespace tandem::router {

Session::Session(const Job& job, const text::Tokenizer& tokenizer, std::unique_ptr<TokenStream> stream)
    : job_(job), tokenizer_(tokenizer), stream_(std::move(stream)), decoder_(tokenizer, job.stop) {
  if (job.parse_output) parser_.emplace(job.output);
  usage_.prompt_tokens = job.request.input_ids_size();
}

Session::~Session() {
  if (!ended_) stream_->Cancel();
}

void Session::Cancel() { stream_->Cancel(); }

void Session::Absorb(const text::AssistantDelta& parsed, Delta& delta) {
  delta.reasoning += parsed.reasoning;
  delta.content += parsed.content;
  for (const auto& call : parsed.tool_calls) {
    ToolCallPiece piece;
    piece.index = call.index;
    while (static_cast<int>(call_ids_.size()) <= call.index) call_ids_.push_back(text::NewToolCallId());
    if (call.name.has_value()) {
      piece.id = call_ids_[static_cast<size_t>(call.index)];
      piece.name = call.name;
    }
    piece.arguments = call.arguments;
    delta.tool_calls.push_back(std::move(piece));
  }
}

void Session::Route(const std::string& text, Delta& delta) {
  if (text.empty()) return;
  if (parser_.has_value()) {
    Absorb(parser_->Push(text), delta);
  } else {
    delta.content += text;
  }
}

void Session::EndText(Delta& delta) {
  Route(decoder_.Finish(), delta);
  if (parser_.has_value()) Absorb(parser_->Finish(), delta);
  if (finish_reason_ == "stop" && parser_.has_value() && !parser_->tool_calls().empty()) finish_reason_ = "tool_calls";
  ended_ = true;
}

absl::Status Session::Next(Delta& delta, bool& ended) {
  delta = Delta();
  ended = ended_;
  if (ended_) return absl::OkStatus();
  while (true) {
    StreamEvent event;
    absl::Status status = stream_->Next(event);
    if (!status.ok()) {
      ended_ = true;
      return status;
    }
    if (event.kind == StreamEvent::Kind::kEnd) {
      const auto& complete = event.complete;
      usage_.prompt_tokens = complete.prompt_tokens() > 0 ? complete.prompt_tokens() : usage_.prompt_tokens;
      usage_.cached_tokens = complete.cached_tokens();
      if (complete.completion_tokens() > usage_.completion_tokens) usage_.completion_tokens = complete.completion_tokens();
      if (complete.finish_reason() == v1::FINISH_REASON_LENGTH) {
        finish_reason_ = "length";
      } else {
        finish_reason_ = "stop";
        if (complete.has_matched_stop_token_id()) matched_stop_ = complete.matched_stop_token_id();
      }
      EndText(delta);
      ended = true;
      any_output_ = any_output_ || !delta.empty();
      return absl::OkStatus();
    }
    const auto& chunk = event.chunk;
    if (chunk.prompt_tokens() > 0) usage_.prompt_tokens = chunk.prompt_tokens();
    usage_.cached_tokens = chunk.cached_tokens();
    for (int i = 0; i < chunk.token_ids_size(); ++i) {
      ++usage_.completion_tokens;
      if (job_.logprobs && i < chunk.logprobs_size()) delta.logprobs.push_back(chunk.logprobs(i));
      const text::DecodeStep step = decoder_.Push(chunk.token_ids(i));
      Route(step.text, delta);
      if (step.finished) {
        // A stop string (or request stop token) matched in the router: end both legs now.
        finish_reason_ = "stop";
        if (step.matched_string.has_value()) matched_stop_ = *step.matched_string;
        else if (step.matched_token.has_value()) matched_stop_ = *step.matched_token;
        stream_->Cancel();
        EndText(delta);
        ended = true;
        any_output_ = any_output_ || !delta.empty();
        return absl::OkStatus();
      }
    }
    if (!delta.empty()) {
      any_output_ = true;
      return absl::OkStatus();
    }
  }
}

std::vector<ToolCallPiece> Session::FinalToolCalls() const {
  std::vector<ToolCallPiece> out;
  if (!parser_.has_value()) return out;
  const auto& calls = parser_->tool_calls();
  for (size_t i = 0; i < calls.size(); ++i) {
    ToolCallPiece piece;
    piece.index = static_cast<int>(i);
    piece.id = i < call_ids_.size() ? call_ids_[i] : text::NewToolCallId();
    piece.name = calls[i].name;
    piece.arguments = calls[i].arguments;
    out.push_back(std::move(piece));
  }
  return out;
}

}  // namespace tandem::router
