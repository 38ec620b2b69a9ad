// Reading OpenAI-shaped message JSON for the chat encoder: field access that tolerates absent or
// null values, content flattening, argument parsing and errors that name the offending field.
#pragma once

#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "common/core/status.h"

namespace tandem::text::chat_json {

using Json = nlohmann::ordered_json;

absl::Status Invalid(std::string_view where, std::string_view what);
std::string Where(size_t index);  // "messages[i]"
// The string value of `key`, or "" when absent or not a string.
std::string StringField(const Json& message, const char* key);
// Python truthiness of `key` (absent, null, false, "", [] and {} are false).
bool Truthy(const Json& message, const char* key);
// A content value as text: string, null (""), or text parts joined by "\n\n".
absl::StatusOr<std::string> ContentText(const Json& content, std::string_view where);
// Tool-call arguments as an object: an object, null ({}), or a JSON string of an object.
absl::StatusOr<Json> ArgumentsObject(const Json& arguments, std::string_view where);
// The special token of a task (action, query, authority, domain, title, read_url), or "".
std::string_view TaskToken(std::string_view task);
// OpenAI `tools`: each {"type": "function", "function": {"name": non-empty string, ...}}.
absl::Status ValidateTools(const Json& tools);

}  // namespace tandem::text::chat_json
