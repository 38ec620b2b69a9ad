#include "services/router/grpc_front.h"

#include <chrono>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>

#include "services/router/render.h"
#include "services/router/session.h"

namespace tandem::router {
namespace {

using Clock = std::chrono::steady_clock;

grpc::Status ToGrpc(const absl::Status& status) {
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

void SamplingToJson(const v1::Sampling& s, Json& body) {
  if (s.has_temperature()) body["temperature"] = s.temperature();
  if (s.has_top_p()) body["top_p"] = s.top_p();
  if (s.has_top_k()) body["top_k"] = s.top_k();
  if (s.has_min_p()) body["min_p"] = s.min_p();
  if (s.has_repetition_penalty()) body["repetition_penalty"] = s.repetition_penalty();
  if (s.has_frequency_penalty()) body["frequency_penalty"] = s.frequency_penalty();
  if (s.has_presence_penalty()) body["presence_penalty"] = s.presence_penalty();
  if (s.has_seed()) body["seed"] = s.seed();
  if (s.has_max_tokens()) body["max_tokens"] = s.max_tokens();
  if (s.has_min_tokens()) body["min_tokens"] = s.min_tokens();
  if (s.has_ignore_eos()) body["ignore_eos"] = s.ignore_eos();
  if (s.stop_size() > 0) body["stop"] = Json(std::vector<std::string>(s.stop().begin(), s.stop().end()));
  if (s.stop_token_ids_size() > 0) body["stop_token_ids"] = Json(std::vector<int32_t>(s.stop_token_ids().begin(), s.stop_token_ids().end()));
  if (s.has_no_stop_trim()) body["no_stop_trim"] = s.no_stop_trim();
  if (s.has_skip_special_tokens()) body["skip_special_tokens"] = s.skip_special_tokens();
  if (s.logprobs()) body["logprobs"] = true;
  if (s.has_top_logprobs()) body["top_logprobs"] = s.top_logprobs();
}

}  // namespace

Json ChatRequestToJson(const v1::ChatCompletionRequest& request) {
  Json body = Json::object();
  if (!request.model().empty()) body["model"] = request.model();
  Json messages = Json::array();
  for (const auto& m : request.messages()) {
    Json message = Json::object();
    message["role"] = m.role();
    if (m.has_content()) message["content"] = m.content();
    if (m.has_reasoning_content()) message["reasoning_content"] = m.reasoning_content();
    if (m.tool_calls_size() > 0) {
      Json calls = Json::array();
      for (const auto& call : m.tool_calls()) {
        Json c = Json::object();
        c["id"] = call.id();
        c["type"] = "function";
        c["function"] = Json{{"name", call.function().name()}, {"arguments", call.function().arguments()}};
        calls.push_back(std::move(c));
      }
      message["tool_calls"] = std::move(calls);
    }
    if (m.has_tool_call_id()) message["tool_call_id"] = m.tool_call_id();
    if (m.has_name()) message["name"] = m.name();
    messages.push_back(std::move(message));
  }
  body["messages"] = std::move(messages);
  SamplingToJson(request.sampling(), body);
  if (request.tools_size() > 0) {
    Json tools = Json::array();
    for (const auto& tool : request.tools()) {
      Json function = Json::object();
      function["name"] = tool.name();
      if (!tool.description().empty()) function["description"] = tool.description();
      if (!tool.parameters_json().empty()) {
        // A bad schema stays a string and the shared parser rejects it with a 400-style error.
        Json parameters = Json::parse(tool.parameters_json(), nullptr, false);
        function["parameters"] = parameters.is_discarded() ? Json(tool.parameters_json()) : parameters;
      }
      tools.push_back(Json{{"type", "function"}, {"function", std::move(function)}});
    }
    body["tools"] = std::move(tools);
  }
  const std::string& choice = request.tool_choice();
  if (choice == "none" || choice == "auto" || choice == "required") {
    body["tool_choice"] = choice;
  } else if (!choice.empty()) {
    body["tool_choice"] = Json{{"type", "function"}, {"function", Json{{"name", choice}}}};
  }
  if (!request.reasoning_effort().empty()) body["reasoning_effort"] = request.reasoning_effort();
  if (request.has_thinking()) body["chat_template_kwargs"] = Json{{"thinking", request.thinking()}};
  if (request.has_separate_reasoning()) body["separate_reasoning"] = request.separate_reasoning();
  return body;
}

Json CompletionRequestToJson(const v1::CompletionRequest& request) {
  Json body = Json::object();
  if (!request.model().empty()) body["model"] = request.model();
  if (request.has_prompt_ids()) {
    body["prompt"] = Json(std::vector<int32_t>(request.prompt_ids().ids().begin(), request.prompt_ids().ids().end()));
  } else {
    body["prompt"] = request.prompt();
  }
  SamplingToJson(request.sampling(), body);
  return body;
}

class GrpcFront::Service final : public v1::Router::Service {
 public:
  explicit Service(RouterState* state) : state_(state) {}

  grpc::Status ChatCompletion(grpc::ServerContext* context, const v1::ChatCompletionRequest* request,
                              grpc::ServerWriter<v1::CompletionChunk>* writer) override {
    return Serve(context, ChatRequestToJson(*request), true, writer);
  }
  grpc::Status Completion(grpc::ServerContext* context, const v1::CompletionRequest* request,
                          grpc::ServerWriter<v1::CompletionChunk>* writer) override {
    return Serve(context, CompletionRequestToJson(*request), false, writer);
  }

 private:
  grpc::Status Serve(grpc::ServerContext* context, const Json& body, bool chat, grpc::ServerWriter<v1::CompletionChunk>* writer) {
    const char* endpoint = chat ? "chat" : "completion";
    const auto arrival = Clock::now();
    auto fail = [&](const absl::Status& status) {
      state_->metrics->Request("grpc", endpoint, HttpStatusOf(status));
      return ToGrpc(status);
    };
    std::string authorization;
    const auto& metadata = context->client_metadata();
    if (auto it = metadata.find("authorization"); it != metadata.end()) authorization.assign(it->second.data(), it->second.size());
    if (!state_->Authorized(authorization)) {
      return fail(absl::UnauthenticatedError("missing or invalid API key: send metadata authorization: Bearer <key>"));
    }
    const ServingContext serving = state_->Context();
    absl::StatusOr<Job> job = chat ? ParseChatRequest(body, serving) : ParseCompletionRequest(body, serving);
    if (!job.ok()) return fail(job.status());
    Session session(*job, *state_->tokenizer, state_->generator->Open(job->request));
    v1::CompletionChunk base;
    base.set_id(NewResponseId(chat ? "chatcmpl" : "cmpl"));
    base.set_model(state_->options.served_model_name);
    base.set_created(std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count());
    bool ended = false;
    bool first = true;
    bool any = false;
    auto last = Clock::now();
    while (!ended) {
      Delta delta;
      if (absl::Status status = session.Next(delta, ended); !status.ok()) return fail(status);
      if (context->IsCancelled()) {
        session.Cancel();
        return fail(absl::CancelledError("the client cancelled"));
      }
      v1::CompletionChunk chunk = base;
      if (first && chat) chunk.set_role("assistant");
      chunk.set_content(delta.content);
      chunk.set_reasoning_content(delta.reasoning);
      for (const auto& piece : delta.tool_calls) {
        auto* call = chunk.add_tool_calls();
        call->set_index(piece.index);
        call->set_id(piece.id);
        call->set_name(piece.name.value_or(""));
        call->set_arguments(piece.arguments);
      }
      for (const auto& entry : delta.logprobs) {
        auto* out = chunk.add_logprobs();
        out->set_token(state_->tokenizer->Decode({entry.token_id()}));
        out->set_logprob(entry.logprob());
        out->set_bytes(std::string(state_->tokenizer->TokenBytes(entry.token_id())));
        for (const auto& alternative : entry.top()) {
          auto* top = out->add_top();
          top->set_token(state_->tokenizer->Decode({alternative.token_id()}));
          top->set_logprob(alternative.logprob());
          top->set_bytes(std::string(state_->tokenizer->TokenBytes(alternative.token_id())));
        }
      }
      if (ended) {
        chunk.set_finish_reason(session.finish_reason());
        const Json matched = session.matched_stop();
        if (matched.is_string()) chunk.set_matched_stop(matched.get<std::string>());
        else if (!matched.is_null()) chunk.set_matched_stop(matched.dump());
        auto* usage = chunk.mutable_usage();
        usage->set_prompt_tokens(session.usage().prompt_tokens);
        usage->set_completion_tokens(session.usage().completion_tokens);
        usage->set_total_tokens(session.usage().prompt_tokens + session.usage().completion_tokens);
        usage->set_cached_tokens(session.usage().cached_tokens);
      }
      if (!delta.empty()) {
        const auto now = Clock::now();
        if (!any) state_->metrics->FirstToken(std::chrono::duration<double>(now - arrival).count());
        else state_->metrics->InterToken(std::chrono::duration<double>(now - last).count());
        any = true;
        last = now;
      }
      if (!writer->Write(chunk)) {
        session.Cancel();
        return fail(absl::CancelledError("the client went away"));
      }
      first = false;
    }
    state_->metrics->Request("grpc", endpoint, 200);
    state_->metrics->EndToEnd(std::chrono::duration<double>(Clock::now() - arrival).count());
    state_->metrics->Tokens(session.usage().prompt_tokens, session.usage().completion_tokens);
    return grpc::Status::OK;
  }

  RouterState* state_;
};

GrpcFront::GrpcFront(RouterState* state) : state_(state), service_(std::make_unique<Service>(state)) {}
GrpcFront::~GrpcFront() { Stop(); }

absl::Status GrpcFront::Start(const std::string& host, int port) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(absl::StrCat(host, ":", port), grpc::InsecureServerCredentials(), &port_);
  builder.RegisterService(service_.get());
  builder.SetMaxReceiveMessageSize(static_cast<int>(state_->options.max_request_bytes));
  server_ = builder.BuildAndStart();
  if (!server_ || port_ == 0) return absl::UnavailableError(absl::StrCat("grpc: cannot listen on ", host, ":", port, " (in use?)"));
  server_->GetHealthCheckService()->SetServingStatus("", true);
  server_->GetHealthCheckService()->SetServingStatus("tandem.v1.Router", true);
  return absl::OkStatus();
}

void GrpcFront::Stop() {
  if (server_) {
    server_->GetHealthCheckService()->SetServingStatus("", false);
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
    server_.reset();
  }
}

}  // namespace tandem::router
