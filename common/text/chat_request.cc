// The request-level half of chat encoding: OpenAI request fields → encoder messages (§1.2) and
// reasoning-effort names → profile levels (§1.9).
#include <algorithm>
#include <array>

#include "common/text/chat_encoding.h"
#include "common/text/chat_json.h"

namespace tandem::text {

using namespace chat_json;  // NOLINT

absl::StatusOr<EffortChoice> ResolveReasoningEffort(std::string_view value, EffortProfile profile) {
  EffortChoice choice;
  std::string level;
  if (value == "none") {
    choice.disables_thinking = true;
    level = "low";
  } else if (value == "minimal" || value == "low") {
    level = "low";
  } else if (value == "medium" || value == "high") {
    level = "high";
  } else if (value == "xhigh" || value == "max") {
    level = "max";
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "reasoning_effort \"", std::string(value), "\" must be one of none, minimal, low, medium, high, xhigh, max"));
  }
  if (profile == EffortProfile::kPreview) {
    choice.encoder_effort = level == "low" ? "none" : level;
  } else {
    choice.encoder_effort = level;
  }
  return choice;
}

absl::StatusOr<PreparedChat> PrepareDsv4Messages(const Json& messages, const Json& tools,
                                                 const ChatRequestOptions& options) {
  if (!messages.is_array() || messages.empty()) {
    return absl::InvalidArgumentError("messages must be a non-empty list");
  }
  PreparedChat prepared;
  Json out = Json::array();
  for (size_t i = 0; i < messages.size(); ++i) {
    const Json& original = messages[i];
    const std::string where = Where(i);
    if (!original.is_object() || !original.contains("role") || !original["role"].is_string()) {
      return Invalid(where, "each message needs a string role");
    }
    Json message = original;
    const std::string role = message["role"].get<std::string>();
    static constexpr std::array<std::string_view, 6> kRoles = {"system", "developer", "user", "assistant",
                                                               "tool", "latest_reminder"};
    if (std::find(kRoles.begin(), kRoles.end(), role) == kRoles.end()) {
      return Invalid(where, absl::StrCat("unknown role \"", role, "\""));
    }
    if (message.contains("content") && message["content"].is_array()) {
      for (const Json& part : message["content"]) {
        if (!part.is_object() || StringField(part, "type") != "text") {
          return Invalid(where, "only text content parts are supported by this text-only model");
        }
      }
    }
    if (role != "tool") {
      TANDEM_ASSIGN_OR_RETURN(std::string text, ContentText(message.value("content", Json()), where));
      message["content"] = std::move(text);
    }
    if (role == "assistant" && Truthy(message, "tool_calls")) {
      if (!message["tool_calls"].is_array()) return Invalid(where, "tool_calls must be a list");
      for (size_t j = 0; j < message["tool_calls"].size(); ++j) {
        Json& call = message["tool_calls"][j];
        const std::string call_where = absl::StrCat(where, ".tool_calls[", j, "]");
        if (!call.is_object() || !call.contains("function") || !call["function"].is_object()) {
          return Invalid(call_where, "expected {\"function\": {\"name\", \"arguments\"}}");
        }
        TANDEM_ASSIGN_OR_RETURN(Json arguments,
                                ArgumentsObject(call["function"].value("arguments", Json()), call_where));
        call["function"]["arguments"] = std::move(arguments);
      }
    }
    out.push_back(std::move(message));
  }
  if (StringField(out.back(), "role") == "assistant") {
    if (options.continue_final_message) {
      prepared.continuation = StringField(out.back(), "content");
      out.erase(out.size() - 1);
    } else {
      out.back()["role"] = "user";  // what sglang does with a trailing assistant turn
    }
  }
  if (out.empty() || StringField(out[0], "role") != "system") {
    Json system = Json::object();
    system["role"] = "system";
    system["content"] = "";
    out.insert(out.begin(), std::move(system));
  }
  const bool has_tools = tools.is_array() && !tools.empty();
  if (!tools.is_null() && !tools.is_array()) return absl::InvalidArgumentError("tools must be a list");
  if (has_tools && (options.tool_choice != "none" || options.tools_with_tool_choice_none)) {
    TANDEM_RETURN_IF_ERROR(ValidateTools(tools));
    out[0]["tools"] = tools;
  }
  if (options.task.has_value()) {
    if (TaskToken(*options.task).empty()) {
      return absl::InvalidArgumentError("task must be one of action, query, authority, domain, title, read_url");
    }
    int last = -1;
    for (size_t i = 0; i < out.size(); ++i) {
      const std::string role = StringField(out[i], "role");
      if (role == "user" || role == "developer") last = static_cast<int>(i);
    }
    if (last < 0) return absl::InvalidArgumentError("task needs at least one user or developer message");
    out[static_cast<size_t>(last)]["task"] = *options.task;
  }
  prepared.messages = std::move(out);
  return prepared;
}

}  // namespace tandem::text
