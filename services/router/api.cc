#include "services/router/api.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/cord.h"
#include "absl/strings/numbers.h"
#include "common/text/reasoning_parser.h"

namespace tandem::router {
namespace {

constexpr const char* kParamUrl = "tandem/param";
constexpr const char* kCodeUrl = "tandem/code";

std::string Payload(const absl::Status& status, const char* url) {
  auto payload = status.GetPayload(url);
  return payload.has_value() ? std::string(*payload) : std::string();
}

// Typed field readers: absent (or null) → nullopt; present with the wrong type → a 400 naming it.
absl::StatusOr<std::optional<double>> Number(const Json& body, const char* key) {
  if (!body.contains(key) || body[key].is_null()) return std::optional<double>();
  const Json& v = body[key];
  if (!v.is_number() || v.is_boolean()) return InvalidParam(key, absl::StrCat(key, " must be a number"));
  const double value = v.get<double>();
  if (!std::isfinite(value)) return InvalidParam(key, absl::StrCat(key, " must be finite"));
  return std::optional<double>(value);
}

absl::StatusOr<std::optional<int64_t>> Integer(const Json& body, const char* key) {
  if (!body.contains(key) || body[key].is_null()) return std::optional<int64_t>();
  const Json& v = body[key];
  if (v.is_number_integer()) return std::optional<int64_t>(v.get<int64_t>());
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9e15) return std::optional<int64_t>(static_cast<int64_t>(d));
  }
  return InvalidParam(key, absl::StrCat(key, " must be an integer"));
}

absl::StatusOr<std::optional<bool>> Bool(const Json& body, const char* key) {
  if (!body.contains(key) || body[key].is_null()) return std::optional<bool>();
  if (!body[key].is_boolean()) return InvalidParam(key, absl::StrCat(key, " must be a boolean"));
  return std::optional<bool>(body[key].get<bool>());
}

absl::Status Range(const char* key, std::optional<double> value, double low, double high, bool low_open) {
  if (!value.has_value()) return absl::OkStatus();
  if (*value > high || *value < low || (low_open && *value == low)) {
    return InvalidParam(key, absl::StrCat(key, " must be in ", low_open ? "(" : "[", low, ", ", high, "], got ", *value));
  }
  return absl::OkStatus();
}

absl::Status CheckModel(const Json& body, const ServingContext& context) {
  if (!body.contains("model") || body["model"].is_null()) return absl::OkStatus();
  if (!body["model"].is_string()) return InvalidParam("model", "model must be a string");
  const std::string model = body["model"].get<std::string>();
  if (model == context.model_name || model == "default") return absl::OkStatus();
  absl::Status status = absl::NotFoundError(
      absl::StrCat("The model `", model, "` does not exist; this router serves `", context.model_name, "`"));
  status.SetPayload(kParamUrl, absl::Cord("model"));
  status.SetPayload(kCodeUrl, absl::Cord("model_not_found"));
  return status;
}

// Sampling, stops, logprobs and length: the fields both endpoints share.
absl::Status ParseCommon(const Json& body, const ServingContext& context, Job& job) {
  if (!body.is_object()) return InvalidParam("", "the request body must be a JSON object");
  TANDEM_RETURN_IF_ERROR(CheckModel(body, context));
  TANDEM_ASSIGN_OR_RETURN(auto n, Integer(body, "n"));
  if (n.has_value() && *n != 1) return InvalidParam("n", absl::StrCat("n must be 1 (got ", *n, "): only one choice per request is supported"));
  TANDEM_ASSIGN_OR_RETURN(auto stream, Bool(body, "stream"));
  job.stream = stream.value_or(false);
  if (body.contains("stream_options") && !body["stream_options"].is_null()) {
    const Json& options = body["stream_options"];
    if (!options.is_object()) return InvalidParam("stream_options", "stream_options must be an object");
    TANDEM_ASSIGN_OR_RETURN(auto usage, Bool(options, "include_usage"));
    TANDEM_ASSIGN_OR_RETURN(auto continuous, Bool(options, "continuous_usage_stats"));
    job.include_usage = usage.value_or(false);
    job.continuous_usage = continuous.value_or(false);
  }
  auto& sampling = *job.request.mutable_sampling();
  TANDEM_ASSIGN_OR_RETURN(auto temperature, Number(body, "temperature"));
  TANDEM_RETURN_IF_ERROR(Range("temperature", temperature, 0, 2, false));
  if (temperature) sampling.set_temperature(*temperature);
  TANDEM_ASSIGN_OR_RETURN(auto top_p, Number(body, "top_p"));
  TANDEM_RETURN_IF_ERROR(Range("top_p", top_p, 0, 1, true));
  if (top_p) sampling.set_top_p(*top_p);
  TANDEM_ASSIGN_OR_RETURN(auto top_k, Integer(body, "top_k"));
  if (top_k && *top_k != -1 && *top_k < 1) return InvalidParam("top_k", absl::StrCat("top_k must be -1 (all) or >= 1, got ", *top_k));
  if (top_k) sampling.set_top_k(*top_k);
  TANDEM_ASSIGN_OR_RETURN(auto min_p, Number(body, "min_p"));
  TANDEM_RETURN_IF_ERROR(Range("min_p", min_p, 0, 1, false));
  if (min_p) sampling.set_min_p(*min_p);
  TANDEM_ASSIGN_OR_RETURN(auto frequency, Number(body, "frequency_penalty"));
  TANDEM_RETURN_IF_ERROR(Range("frequency_penalty", frequency, -2, 2, false));
  if (frequency) sampling.set_frequency_penalty(*frequency);
  TANDEM_ASSIGN_OR_RETURN(auto presence, Number(body, "presence_penalty"));
  TANDEM_RETURN_IF_ERROR(Range("presence_penalty", presence, -2, 2, false));
  if (presence) sampling.set_presence_penalty(*presence);
  TANDEM_ASSIGN_OR_RETURN(auto repetition, Number(body, "repetition_penalty"));
  TANDEM_RETURN_IF_ERROR(Range("repetition_penalty", repetition, 0, 2, true));
  if (repetition) sampling.set_repetition_penalty(*repetition);
  TANDEM_ASSIGN_OR_RETURN(auto seed, Integer(body, "seed"));
  if (seed && *seed < 0) return InvalidParam("seed", "seed must be a non-negative integer");
  if (seed) sampling.set_seed(static_cast<uint64_t>(*seed));
  TANDEM_ASSIGN_OR_RETURN(auto ignore_eos, Bool(body, "ignore_eos"));
  if (ignore_eos) sampling.set_ignore_eos(*ignore_eos);

  const auto vocab = static_cast<int64_t>(context.tokenizer->vocab_size());
  if (body.contains("stop") && !body["stop"].is_null()) {
    const Json& stop = body["stop"];
    if (stop.is_string()) {
      job.stop.stop_strings.push_back(stop.get<std::string>());
    } else if (stop.is_array()) {
      for (const Json& s : stop) {
        if (!s.is_string()) return InvalidParam("stop", "stop must be a string or a list of strings");
        job.stop.stop_strings.push_back(s.get<std::string>());
      }
    } else {
      return InvalidParam("stop", "stop must be a string or a list of strings");
    }
    if (job.stop.stop_strings.size() > 16) return InvalidParam("stop", "at most 16 stop strings are allowed");
    for (const auto& s : job.stop.stop_strings) {
      if (s.empty()) return InvalidParam("stop", "stop strings must not be empty");
    }
  }
  if (body.contains("stop_token_ids") && !body["stop_token_ids"].is_null()) {
    if (!body["stop_token_ids"].is_array()) return InvalidParam("stop_token_ids", "stop_token_ids must be a list of token ids");
    for (const Json& id : body["stop_token_ids"]) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= vocab) {
        return InvalidParam("stop_token_ids", absl::StrCat("stop_token_ids entries must be token ids in [0, ", vocab, ")"));
      }
      sampling.add_stop_token_ids(id.get<int32_t>());
    }
  }
  if (body.contains("logit_bias") && !body["logit_bias"].is_null()) {
    if (!body["logit_bias"].is_object()) return InvalidParam("logit_bias", "logit_bias must be an object of token id → bias");
    for (auto it = body["logit_bias"].begin(); it != body["logit_bias"].end(); ++it) {
      int64_t id = 0;
      if (!absl::SimpleAtoi(it.key(), &id) || id < 0 || id >= vocab) {
        return InvalidParam("logit_bias", absl::StrCat("logit_bias key \"", it.key(), "\" is not a token id in [0, ", vocab, ")"));
      }
      if (!it.value().is_number() || it.value().is_boolean() || std::fabs(it.value().get<double>()) > 100) {
        return InvalidParam("logit_bias", "logit_bias values must be numbers in [-100, 100]");
      }
      auto* bias = sampling.add_logit_bias();
      bias->set_token_id(static_cast<int32_t>(id));
      bias->set_bias(it.value().get<double>());
    }
  }
  TANDEM_ASSIGN_OR_RETURN(auto no_stop_trim, Bool(body, "no_stop_trim"));
  job.stop.no_stop_trim = no_stop_trim.value_or(false);
  TANDEM_ASSIGN_OR_RETURN(auto skip_special, Bool(body, "skip_special_tokens"));
  job.stop.skip_special_tokens = skip_special.value_or(true);

  // Length: max_completion_tokens wins over the deprecated max_tokens; absent → the rest of the context.
  TANDEM_ASSIGN_OR_RETURN(auto max_tokens, Integer(body, "max_tokens"));
  TANDEM_ASSIGN_OR_RETURN(auto max_completion, Integer(body, "max_completion_tokens"));
  const char* length_param = max_completion ? "max_completion_tokens" : "max_tokens";
  if (max_completion) max_tokens = max_completion;
  if (max_tokens && *max_tokens < 1) return InvalidParam(length_param, absl::StrCat(length_param, " must be >= 1, got ", *max_tokens));
  TANDEM_ASSIGN_OR_RETURN(auto min_tokens, Integer(body, "min_tokens"));
  if (min_tokens && *min_tokens < 0) return InvalidParam("min_tokens", "min_tokens must be >= 0");
  if (min_tokens && max_tokens && *min_tokens > *max_tokens) {
    return InvalidParam("min_tokens", absl::StrCat("min_tokens (", *min_tokens, ") must not exceed ", length_param, " (", *max_tokens, ")"));
  }
  if (min_tokens) sampling.set_min_new_tokens(*min_tokens);

  // Logprobs: a bool on chat; on completions an integer count of alternatives.
  if (job.chat) {
    TANDEM_ASSIGN_OR_RETURN(auto logprobs, Bool(body, "logprobs"));
    TANDEM_ASSIGN_OR_RETURN(auto top, Integer(body, "top_logprobs"));
    job.logprobs = logprobs.value_or(false);
    if (top && (*top < 0 || *top > 20)) return InvalidParam("top_logprobs", "top_logprobs must be in [0, 20]");
    if (top && *top > 0 && !job.logprobs) return InvalidParam("top_logprobs", "top_logprobs needs logprobs: true");
    job.top_logprobs = static_cast<int>(top.value_or(0));
  } else {
    TANDEM_ASSIGN_OR_RETURN(auto logprobs, Integer(body, "logprobs"));
    if (logprobs && (*logprobs < 0 || *logprobs > 20)) return InvalidParam("logprobs", "logprobs must be in [0, 20]");
    job.logprobs = logprobs.has_value();
    job.top_logprobs = static_cast<int>(logprobs.value_or(0));
  }
  job.request.set_return_logprobs(job.logprobs);
  if (job.top_logprobs > 0) job.request.set_top_logprobs(job.top_logprobs);

  const auto prompt_tokens = static_cast<int64_t>(job.request.input_ids_size());
  if (prompt_tokens == 0) return InvalidParam(job.chat ? "messages" : "prompt", "the prompt is empty");
  for (int32_t id : job.request.input_ids()) {
    if (id < 0 || id >= vocab) return InvalidParam("prompt", absl::StrCat("prompt token id ", id, " is outside the vocabulary [0, ", vocab, ")"));
  }
  const int64_t limit = context.max_new_tokens_limit;
  if (max_tokens && limit > 0 && *max_tokens > limit) {
    return InvalidParam(length_param, absl::StrCat(length_param, " is ", *max_tokens, "; the workers allow at most ", limit, " new tokens"));
  }
  const int64_t context_tokens = context.max_context_tokens;
  if (context_tokens > 0) {
    if (prompt_tokens >= context_tokens) {
      return InvalidParam(job.chat ? "messages" : "prompt",
                          absl::StrCat("the prompt is ", prompt_tokens, " tokens; this model's context is ", context_tokens,
                                       " tokens (prompt + output)"),
                          "context_length_exceeded");
    }
    if (max_tokens && prompt_tokens + *max_tokens > context_tokens) {
      return InvalidParam(length_param,
                          absl::StrCat(length_param, " is ", *max_tokens, " but the prompt is ", prompt_tokens,
                                       " tokens and the context holds ", context_tokens, ": at most ",
                                       context_tokens - prompt_tokens, " new tokens fit"),
                          "context_length_exceeded");
    }
    int64_t rest = context_tokens - prompt_tokens;
    if (limit > 0) rest = std::min(rest, limit);
    sampling.set_max_new_tokens(max_tokens.value_or(rest));
  } else {
    sampling.set_max_new_tokens(max_tokens.value_or(context.default_max_tokens));
  }
  if (body.contains("response_format") && !body["response_format"].is_null()) {
    const Json& format = body["response_format"];
    if (!format.is_object() || !format.contains("type") || !format["type"].is_string()) {
      return InvalidParam("response_format", "response_format must be an object with a string type");
    }
    if (format["type"].get<std::string>() != "text") {
      return InvalidParam("response_format", absl::StrCat("response_format type \"", format["type"].get<std::string>(),
                                                          "\" is not supported (no constrained decoding); use \"text\""));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ToolChoice(const Json& body, const Json& tools, text::ToolNames& names) {
  const bool has_tools = tools.is_array() && !tools.empty();
  std::string choice = has_tools ? "auto" : "none";
  if (!body.contains("tool_choice") || body["tool_choice"].is_null()) return choice;
  const Json& value = body["tool_choice"];
  if (value.is_string()) {
    choice = value.get<std::string>();
    if (choice != "none" && choice != "auto" && choice != "required") {
      return InvalidParam("tool_choice", absl::StrCat("tool_choice \"", choice, "\" must be none, auto, required or a named function"));
    }
    if (choice == "required" && !has_tools) return InvalidParam("tool_choice", "tool_choice \"required\" needs tools");
    return choice;
  }
  if (value.is_object() && value.contains("function") && value["function"].is_object() &&
      value["function"].contains("name") && value["function"]["name"].is_string()) {
    const std::string name = value["function"]["name"].get<std::string>();
    if (!has_tools || !names.has_value() || !names->contains(name)) {
      return InvalidParam("tool_choice", absl::StrCat("tool_choice names function \"", name, "\", which is not among the tools"));
    }
    return std::string("required");
  }
  return InvalidParam("tool_choice", "tool_choice must be a string or {\"type\": \"function\", \"function\": {\"name\": ...}}");
}

}  // namespace

absl::Status InvalidParam(const std::string& param, const std::string& message, const std::string& code) {
  absl::Status status = absl::InvalidArgumentError(message);
  if (!param.empty()) status.SetPayload(kParamUrl, absl::Cord(param));
  if (!code.empty()) status.SetPayload(kCodeUrl, absl::Cord(code));
  return status;
}

int HttpStatusOf(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kOk: return 200;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kFailedPrecondition: return 400;
    case absl::StatusCode::kUnauthenticated: return 401;
    case absl::StatusCode::kPermissionDenied: return 403;
    case absl::StatusCode::kNotFound: return 404;
    case absl::StatusCode::kResourceExhausted: return 429;
    case absl::StatusCode::kUnavailable: return 503;
    case absl::StatusCode::kDeadlineExceeded: return 504;
    case absl::StatusCode::kCancelled: return 499;
    default: return 500;
  }
}

Json ErrorBody(const absl::Status& status) {
  const int http = HttpStatusOf(status);
  std::string type = "server_error";
  if (http == 401) type = "authentication_error";
  else if (http == 404 || (http >= 400 && http < 500 && http != 429)) type = "invalid_request_error";
  else if (http == 429) type = "rate_limit_error";
  else if (http == 503) type = "service_unavailable";
  Json error = Json::object();
  error["message"] = std::string(status.message());
  error["type"] = type;
  const std::string param = Payload(status, kParamUrl);
  const std::string code = Payload(status, kCodeUrl);
  error["param"] = param.empty() ? Json() : Json(param);
  error["code"] = code.empty() ? Json(http) : Json(code);
  Json body = Json::object();
  body["error"] = std::move(error);
  return body;
}

namespace {
absl::StatusOr<Job> ParseChat(const Json& body, const ServingContext& context) {
  Job job;
  job.chat = true;
  if (!body.is_object()) return InvalidParam("", "the request body must be a JSON object");
  TANDEM_RETURN_IF_ERROR(CheckModel(body, context));
  if (!body.contains("messages")) return InvalidParam("messages", "messages is required");
  if (!body["messages"].is_array() || body["messages"].empty()) return InvalidParam("messages", "messages must be a non-empty list");

  // Content parts are checked here too: the text layer assumes a string `type` (it would throw).
  for (size_t i = 0; i < body["messages"].size(); ++i) {
    const Json& message = body["messages"][i];
    if (!message.is_object() || !message.contains("content") || !message["content"].is_array()) continue;
    for (size_t j = 0; j < message["content"].size(); ++j) {
      const Json& part = message["content"][j];
      if (!part.is_object() || !part.contains("type") || !part["type"].is_string()) {
        return InvalidParam(absl::StrCat("messages[", i, "].content[", j, "]"), "each content part needs a string type");
      }
    }
  }
  Json tools = body.contains("tools") ? body["tools"] : Json();
  text::ToolNames names;
  if (!tools.is_null()) {
    if (!tools.is_array()) return InvalidParam("tools", "tools must be a list");
    names.emplace();
    for (size_t i = 0; i < tools.size(); ++i) {
      const Json& tool = tools[i];
      const bool function_type = !tool.is_object() || !tool.contains("type") ||
                                 (tool["type"].is_string() && tool["type"].get<std::string>() == "function");
      if (!tool.is_object() || !function_type || !tool.contains("function") ||
          !tool["function"].is_object() || !tool["function"].contains("name") || !tool["function"]["name"].is_string() ||
          tool["function"]["name"].get<std::string>().empty()) {
        return InvalidParam(absl::StrCat("tools[", i, "]"),
                            "each tool must be {\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": ...}}");
      }
      if (tool["function"].contains("parameters") && !tool["function"]["parameters"].is_object() &&
          !tool["function"]["parameters"].is_null()) {
        return InvalidParam(absl::StrCat("tools[", i, "].function.parameters"), "tool parameters must be a JSON Schema object");
      }
      names->insert(tool["function"]["name"].get<std::string>());
    }
  }
  TANDEM_ASSIGN_OR_RETURN(std::string tool_choice, ToolChoice(body, tools, names));

  // Thinking (§1.10): chat_template_kwargs.thinking, else the effort, else DeepSeek's thinking.type.
  std::optional<bool> thinking;
  std::string effort_value;
  if (body.contains("reasoning_effort") && !body["reasoning_effort"].is_null()) {
    if (!body["reasoning_effort"].is_string()) {
      return InvalidParam("reasoning_effort", "reasoning_effort must be one of none, minimal, low, medium, high, xhigh, max");
    }
    effort_value = body["reasoning_effort"].get<std::string>();
  }
  if (body.contains("chat_template_kwargs") && !body["chat_template_kwargs"].is_null()) {
    const Json& kwargs = body["chat_template_kwargs"];
    if (!kwargs.is_object()) return InvalidParam("chat_template_kwargs", "chat_template_kwargs must be an object");
    for (const char* key : {"thinking", "enable_thinking"}) {
      if (kwargs.contains(key) && !kwargs[key].is_null()) {
        if (!kwargs[key].is_boolean()) return InvalidParam(absl::StrCat("chat_template_kwargs.", key), absl::StrCat("chat_template_kwargs.", key, " must be a boolean"));
        thinking = kwargs[key].get<bool>();
      }
    }
    if (effort_value.empty() && kwargs.contains("reasoning_effort") && kwargs["reasoning_effort"].is_string()) {
      effort_value = kwargs["reasoning_effort"].get<std::string>();
    }
  }
  text::ChatEncodeOptions encode;
  encode.effort_profile = context.effort_profile;
  if (!effort_value.empty()) {
    auto effort = text::ResolveReasoningEffort(effort_value, context.effort_profile);
    if (!effort.ok()) return InvalidParam("reasoning_effort", std::string(effort.status().message()));
    encode.reasoning_effort = effort->encoder_effort;
    if (!thinking.has_value()) thinking = !effort->disables_thinking;
  }
  if (!thinking.has_value() && body.contains("thinking") && body["thinking"].is_object()) {
    const std::string type = body["thinking"].contains("type") && body["thinking"]["type"].is_string()
                                 ? body["thinking"]["type"].get<std::string>() : "";
    if (type != "enabled" && type != "disabled") return InvalidParam("thinking", "thinking.type must be \"enabled\" or \"disabled\"");
    thinking = type == "enabled";
  }
  encode.thinking = thinking.value_or(false);

  text::ChatRequestOptions prepare;
  prepare.tool_choice = tool_choice;
  TANDEM_ASSIGN_OR_RETURN(auto continue_final, Bool(body, "continue_final_message"));
  prepare.continue_final_message = continue_final.value_or(false);
  auto prepared = text::PrepareDsv4Messages(body["messages"], tools, prepare);
  if (!prepared.ok()) return InvalidParam("messages", std::string(prepared.status().message()));
  auto prompt = text::EncodeDsv4Messages(prepared->messages, encode);
  if (!prompt.ok()) return InvalidParam("messages", std::string(prompt.status().message()));
  job.prompt_text = *prompt;
  std::vector<text::TokenId> ids = context.tokenizer->Encode(*prompt);
  if (prepared->continuation.has_value()) {
    const auto more = context.tokenizer->Encode(*prepared->continuation);
    ids.insert(ids.end(), more.begin(), more.end());
    job.prompt_text += *prepared->continuation;
  }
  for (text::TokenId id : ids) job.request.add_input_ids(id);

  TANDEM_RETURN_IF_ERROR(ParseCommon(body, context, job));

  job.parse_output = true;
  job.output.parse_tool_calls = names.has_value() && !names->empty() && tool_choice != "none";
  job.output.tool_names = names;
  TANDEM_ASSIGN_OR_RETURN(auto separate, Bool(body, "separate_reasoning"));
  TANDEM_ASSIGN_OR_RETURN(auto stream_reasoning, Bool(body, "stream_reasoning"));
  job.output.reasoning.separate_reasoning = separate.value_or(true);
  job.output.reasoning.stream_reasoning = stream_reasoning.value_or(true);
  job.output.reasoning.force_reasoning = text::PromptOpensThinking(job.prompt_text);
  // DSML markers are special tokens: keep them in the text while tools are active.
  if (job.output.parse_tool_calls) job.stop.skip_special_tokens = false;
  return job;
}

absl::StatusOr<Job> ParseCompletion(const Json& body, const ServingContext& context) {
  Job job;
  job.chat = false;
  if (!body.is_object()) return InvalidParam("", "the request body must be a JSON object");
  TANDEM_RETURN_IF_ERROR(CheckModel(body, context));
  if (!body.contains("prompt") || body["prompt"].is_null()) return InvalidParam("prompt", "prompt is required");
  const Json& prompt = body["prompt"];
  std::vector<text::TokenId> ids;
  const auto encode = [&](const std::string& text) {
    ids = context.tokenizer->Encode(text);
    const auto bos = context.tokenizer->bos_id();
    if (bos.has_value() && (ids.empty() || ids[0] != *bos)) ids.insert(ids.begin(), *bos);
  };
  if (prompt.is_string()) {
    if (prompt.get<std::string>().empty()) return InvalidParam("prompt", "the prompt is empty");
    encode(prompt.get<std::string>());
  } else if (prompt.is_array() && !prompt.empty() && prompt[0].is_number_integer()) {
    for (const Json& id : prompt) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX) {
        return InvalidParam("prompt", "a token-id prompt must be a list of non-negative integers");
      }
      ids.push_back(id.get<int32_t>());
    }
  } else if (prompt.is_array() && prompt.size() == 1 && prompt[0].is_string()) {
    encode(prompt[0].get<std::string>());
  } else if (prompt.is_array() && prompt.size() > 1) {
    return InvalidParam("prompt", "batched prompts are not supported: send one prompt per request");
  } else {
    return InvalidParam("prompt", "prompt must be a string or a list of token ids");
  }
  TANDEM_ASSIGN_OR_RETURN(auto echo, Bool(body, "echo"));
  if (echo.value_or(false)) return InvalidParam("echo", "echo is not supported");
  if (body.contains("suffix") && !body["suffix"].is_null()) return InvalidParam("suffix", "suffix is not supported");
  for (text::TokenId id : ids) job.request.add_input_ids(id);
  TANDEM_RETURN_IF_ERROR(ParseCommon(body, context, job));
  return job;
}

}  // namespace

// The typed readers above check every field they read; the text layer's JSON walkers may still meet a
// shape they do not expect. Whatever slips through is a 400, never an exception out of the router.
absl::StatusOr<Job> ParseChatRequest(const Json& body, const ServingContext& context) {
  try {
    return ParseChat(body, context);
  } catch (const Json::exception& error) {
    return InvalidParam("messages", absl::StrCat("malformed request: ", error.what()));
  }
}

absl::StatusOr<Job> ParseCompletionRequest(const Json& body, const ServingContext& context) {
  try {
    return ParseCompletion(body, context);
  } catch (const Json::exception& error) {
    return InvalidParam("prompt", absl::StrCat("malformed request: ", error.what()));
  }
}

absl::StatusOr<Job> ParseRequestBody(std::string_view body, bool chat, const ServingContext& context) {
  Json parsed;
  try {
    parsed = Json::parse(body);
  } catch (const Json::exception& error) {
    return InvalidParam("", absl::StrCat("the request body is not valid JSON: ", error.what()), "invalid_json");
  }
  return chat ? ParseChatRequest(parsed, context) : ParseCompletionRequest(parsed, context);
}

}  // namespace tandem::router
