#include "common/text/chat_json.h"

#include <array>

namespace tandem::text::chat_json {

std::string_view TaskToken(std::string_view task) {
  static constexpr std::array<std::pair<std::string_view, std::string_view>, 6> kTokens = {{
      {"action", "<｜action｜>"}, {"query", "<｜query｜>"}, {"authority", "<｜authority｜>"},
      {"domain", "<｜domain｜>"}, {"title", "<｜title｜>"}, {"read_url", "<｜read_url｜>"}}};
  for (const auto& [name, token] : kTokens) {
    if (name == task) return token;
  }
  return {};
}

absl::Status Invalid(std::string_view where, std::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(std::string(where), ": ", std::string(what)));
}

std::string Where(size_t index) { return absl::StrCat("messages[", index, "]"); }

std::string StringField(const Json& message, const char* key) {
  if (!message.contains(key)) return "";
  const Json& value = message[key];
  return value.is_string() ? value.get<std::string>() : std::string();
}

bool Truthy(const Json& message, const char* key) {
  if (!message.contains(key)) return false;
  const Json& value = message[key];
  if (value.is_null()) return false;
  if (value.is_boolean()) return value.get<bool>();
  if (value.is_string()) return !value.get_ref<const std::string&>().empty();
  if (value.is_array() || value.is_object()) return !value.empty();
  return true;
}

// Text of a content value: string, null (""), or a list of parts whose text parts join with "\n\n".
absl::StatusOr<std::string> ContentText(const Json& content, std::string_view where) {
  if (content.is_null()) return std::string();
  if (content.is_string()) return content.get<std::string>();
  if (content.is_array()) {
    std::string out;
    bool first = true;
    for (const Json& part : content) {
      if (!part.is_object()) return Invalid(where, "content parts must be objects");
      if (StringField(part, "type") != "text") continue;
      if (!first) out.append("\n\n");
      first = false;
      out.append(part.contains("text") && part["text"].is_string() ? part["text"].get<std::string>() : "");
    }
    return out;
  }
  return Invalid(where, "content must be a string, a list of parts or null");
}

absl::StatusOr<Json> ArgumentsObject(const Json& arguments, std::string_view where) {
  if (arguments.is_object()) return arguments;
  if (arguments.is_null()) return Json::object();
  if (arguments.is_string()) {
    Json parsed = Json::parse(arguments.get<std::string>(), nullptr, /*allow_exceptions=*/false);
    if (parsed.is_discarded()) return Invalid(where, "function.arguments is not valid JSON");
    if (!parsed.is_object()) return Invalid(where, "function.arguments must be a JSON object");
    return parsed;
  }
  return Invalid(where, "function.arguments must be a JSON object or a JSON string of one");
}

absl::Status ValidateTools(const Json& tools) {
  if (!tools.is_array()) return absl::InvalidArgumentError("tools must be a list");
  for (size_t i = 0; i < tools.size(); ++i) {
    const Json& tool = tools[i];
    const std::string where = absl::StrCat("tools[", i, "]");
    if (!tool.is_object() || !tool.contains("function") || !tool["function"].is_object()) {
      return Invalid(where, "expected {\"type\": \"function\", \"function\": {...}}");
    }
    const Json& function = tool["function"];
    if (!function.contains("name") || !function["name"].is_string() ||
        function["name"].get_ref<const std::string&>().empty()) {
      return Invalid(where, "function.name must be a non-empty string");
    }
  }
  return absl::OkStatus();
}

}  // namespace tandem::text::chat_json
