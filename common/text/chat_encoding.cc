#include "common/text/chat_encoding.h"

#include <algorithm>
#include <map>
#include <vector>

#include "common/text/chat_json.h"
#include "common/text/python_json.h"

namespace tandem::text {
namespace {

using namespace chat_json;  // NOLINT: the encoder is written in terms of these readers

constexpr std::string_view kEffortA =
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the "
    "root cause, rigorously stress-testing your logic against all potential paths, edge cases, and "
    "adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n";

constexpr std::string_view kEffortB =
    "Reasoning Effort: Beyond maximum \u2014 exhaustive, relentless, and uncompromising.\n"
    "You MUST reason with the utmost depth and rigor, leaving absolutely nothing to chance: exhaustively "
    "decompose the problem into its most fundamental components, trace every causal chain to its root, "
    "and resolve the underlying cause rather than any surface symptom.\n"
    "Do not stop reasoning until you have independently verified the solution from multiple angles and "
    "are certain that no assumption remains unchecked and no error remains undiscovered.\n\n";

constexpr std::string_view kToolsHead =
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools by "
    "writing a \"<｜DSML｜tool_calls>\" block like the following:\n\n"
    "<｜DSML｜tool_calls>\n"
    "<｜DSML｜invoke name=\"$TOOL_NAME\">\n"
    "<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n"
    "...\n"
    "</｜DSML｜invoke>\n"
    "<｜DSML｜invoke name=\"$TOOL_NAME2\">\n"
    "...\n"
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>\n\n"
    "String parameters should be specified as is and set `string=\"true\"`. For all other types "
    "(numbers, booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\n"
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside "
    "<think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n";

constexpr std::string_view kToolsTail =
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n";

constexpr std::string_view kResponseFormatHead =
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n";

absl::StatusOr<std::string> RenderTools(const Json& tools, ToolSchemaStyle style) {
  TANDEM_RETURN_IF_ERROR(ValidateTools(tools));
  std::string schemas;
  for (size_t i = 0; i < tools.size(); ++i) {
    const Json& function = tools[i]["function"];
    if (i > 0) schemas.push_back('\n');
    if (style == ToolSchemaStyle::kAsGiven) {
      schemas.append(PythonJsonDumps(function));
    } else {
      Json canonical = Json::object();
      canonical["description"] = function.value("description", Json());
      canonical["name"] = function["name"];
      canonical["parameters"] = function.value("parameters", Json());
      canonical["strict"] = function.contains("strict") && function["strict"].is_boolean()
                                ? function["strict"].get<bool>()
                                : false;
      schemas.append(PythonJsonDumps(canonical));
    }
  }
  return absl::StrCat(std::string(kToolsHead), schemas, std::string(kToolsTail));
}

absl::StatusOr<std::string> RenderToolCalls(const Json& tool_calls, std::string_view where) {
  std::vector<std::string> invokes;
  for (size_t i = 0; i < tool_calls.size(); ++i) {
    const Json& call = tool_calls[i];
    const std::string call_where = absl::StrCat(std::string(where), ".tool_calls[", i, "]");
    if (!call.is_object() || !call.contains("function") || !call["function"].is_object()) {
      return Invalid(call_where, "expected {\"function\": {\"name\", \"arguments\"}}");
    }
    const Json& function = call["function"];
    const std::string name = function.contains("name") && function["name"].is_string()
                                 ? function["name"].get<std::string>()
                                 : "";
    if (name.empty()) return Invalid(call_where, "function.name must be a non-empty string");
    TANDEM_ASSIGN_OR_RETURN(Json arguments,
                            ArgumentsObject(function.value("arguments", Json()), call_where));
    std::string invoke = absl::StrCat("<｜DSML｜invoke name=\"", name, "\">\n");
    bool first = true;
    for (const auto& [key, value] : arguments.items()) {
      if (!first) invoke.push_back('\n');
      first = false;
      const bool is_string = value.is_string();
      absl::StrAppend(&invoke, "<｜DSML｜parameter name=\"", key, "\" string=\"", is_string ? "true" : "false",
                      "\">", is_string ? value.get<std::string>() : PythonJsonDumps(value),
                      "</｜DSML｜parameter>");
    }
    invoke.append("\n</｜DSML｜invoke>");
    invokes.push_back(std::move(invoke));
  }
  std::string block = "\n\n<｜DSML｜tool_calls>\n";
  for (size_t i = 0; i < invokes.size(); ++i) {
    if (i > 0) block.push_back('\n');
    block.append(invokes[i]);
  }
  block.append("\n</｜DSML｜tool_calls>");
  return block;
}

int LastUserIndex(const std::vector<Json>& messages) {
  for (int i = static_cast<int>(messages.size()) - 1; i >= 0; --i) {
    const std::string role = StringField(messages[static_cast<size_t>(i)], "role");
    if (role == "user" || role == "developer") return i;
  }
  return -1;
}

// Tool messages become tool_result blocks of user messages; consecutive user turns merge (§1.7).
absl::StatusOr<std::vector<Json>> MergeToolMessages(const Json& messages) {
  std::vector<Json> merged;
  for (size_t i = 0; i < messages.size(); ++i) {
    Json message = messages[i];
    const std::string role = StringField(message, "role");
    auto last_is_open_user = [&](bool require_no_task) {
      if (merged.empty()) return false;
      const Json& last = merged.back();
      if (StringField(last, "role") != "user" || !last.contains("content_blocks")) return false;
      return !require_no_task || !last.contains("task") || last["task"].is_null();
    };
    if (role == "tool") {
      Json block = Json::object();
      block["type"] = "tool_result";
      block["tool_use_id"] = StringField(message, "tool_call_id");
      block["content"] = message.contains("content") && !message["content"].is_null() ? message["content"] : Json("");
      if (last_is_open_user(false)) {
        merged.back()["content_blocks"].push_back(std::move(block));
      } else {
        Json user = Json::object();
        user["role"] = "user";
        user["content_blocks"] = Json::array({std::move(block)});
        merged.push_back(std::move(user));
      }
    } else if (role == "user") {
      Json blocks;
      if (message.contains("content_blocks") && message["content_blocks"].is_array()) {
        blocks = message["content_blocks"];
      } else if (message.contains("content") && message["content"].is_array()) {
        blocks = message["content"];
      } else {
        TANDEM_ASSIGN_OR_RETURN(std::string text, ContentText(message.value("content", Json()), Where(i)));
        Json block = Json::object();
        block["type"] = "text";
        block["text"] = std::move(text);
        blocks = Json::array({std::move(block)});
      }
      if (last_is_open_user(true)) {
        for (auto& block : blocks) merged.back()["content_blocks"].push_back(std::move(block));
      } else {
        message["content_blocks"] = std::move(blocks);
        merged.push_back(std::move(message));
      }
    } else {
      merged.push_back(std::move(message));
    }
  }
  return merged;
}

std::string ToolCallId(const Json& call) {
  if (call.contains("id") && call["id"].is_string() && !call["id"].get_ref<const std::string&>().empty()) {
    return call["id"].get<std::string>();
  }
  if (call.contains("function") && call["function"].is_object()) return StringField(call["function"], "id");
  return "";
}

void SortToolResultsByCallOrder(std::vector<Json>& messages) {
  std::map<std::string, int> call_order;
  for (Json& message : messages) {
    const std::string role = StringField(message, "role");
    if (role == "assistant" && Truthy(message, "tool_calls") && message["tool_calls"].is_array()) {
      call_order.clear();
      int index = 0;
      for (const Json& call : message["tool_calls"]) {
        const std::string id = ToolCallId(call);
        if (!id.empty()) call_order[id] = index;
        ++index;
      }
    } else if (role == "user" && message.contains("content_blocks") && message["content_blocks"].is_array()) {
      Json& blocks = message["content_blocks"];
      std::vector<Json> results;
      for (const Json& block : blocks) {
        if (block.is_object() && StringField(block, "type") == "tool_result") results.push_back(block);
      }
      if (results.size() <= 1 || call_order.empty()) continue;
      std::stable_sort(results.begin(), results.end(), [&](const Json& a, const Json& b) {
        auto order = [&](const Json& block) {
          const auto it = call_order.find(StringField(block, "tool_use_id"));
          return it == call_order.end() ? 0 : it->second;
        };
        return order(a) < order(b);
      });
      size_t next = 0;
      for (Json& block : blocks) {
        if (block.is_object() && StringField(block, "type") == "tool_result") block = results[next++];
      }
    }
  }
}

std::vector<Json> DropThinking(const std::vector<Json>& messages) {
  const int last_user = LastUserIndex(messages);
  std::vector<Json> kept;
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string role = StringField(messages[i], "role");
    const bool always = role == "user" || role == "system" || role == "tool" || role == "latest_reminder" ||
                        role == "direct_search_results";
    if (always || static_cast<int>(i) >= last_user) {
      kept.push_back(messages[i]);
    } else if (role == "assistant") {
      Json copy = messages[i];
      copy.erase("reasoning_content");
      kept.push_back(std::move(copy));
    }
  }
  return kept;
}

absl::StatusOr<std::string> RenderUserBlocks(const Json& blocks, std::string_view where) {
  std::string out;
  bool first = true;
  for (const Json& block : blocks) {
    if (!first) out.append("\n\n");
    first = false;
    if (!block.is_object()) return Invalid(where, "content blocks must be objects");
    const std::string type = StringField(block, "type");
    if (type == "text") {
      out.append(StringField(block, "text"));
    } else if (type == "tool_result") {
      const Json content = block.value("content", Json(""));
      std::string text;
      if (content.is_array()) {
        bool first_part = true;
        for (const Json& part : content) {
          if (!first_part) text.append("\n\n");
          first_part = false;
          const std::string part_type = part.is_object() ? StringField(part, "type") : "";
          if (part_type == "text") {
            text.append(StringField(part, "text"));
          } else {
            absl::StrAppend(&text, "[Unsupported ", part_type.empty() ? "None" : part_type, "]");
          }
        }
      } else if (content.is_string()) {
        text = content.get<std::string>();
      } else if (!content.is_null()) {
        text = PythonJsonDumps(content);
      }
      absl::StrAppend(&out, "<tool_result>", text, "</tool_result>");
    } else {
      absl::StrAppend(&out, "[Unsupported ", type.empty() ? "None" : type, "]");
    }
  }
  return out;
}

struct RenderContext {
  const std::vector<Json>& messages;
  bool thinking;
  bool drop_thinking;
  int last_user;
  std::string effort_prefix;
  ToolSchemaStyle style;
};

absl::StatusOr<std::string> RenderMessage(size_t index, const RenderContext& context) {
  const Json& message = context.messages[index];
  const std::string where = Where(index);
  const std::string role = StringField(message, "role");
  std::string prompt;
  if (index == 0 && context.thinking) prompt.append(context.effort_prefix);

  auto extras = [&](std::string& out) -> absl::Status {
    if (Truthy(message, "tools")) {
      if (!message["tools"].is_array()) return Invalid(where, "tools must be a list");
      TANDEM_ASSIGN_OR_RETURN(std::string tools, RenderTools(message["tools"], context.style));
      absl::StrAppend(&out, "\n\n", tools);
    }
    if (Truthy(message, "response_format")) {
      absl::StrAppend(&out, "\n\n", std::string(kResponseFormatHead), PythonJsonDumps(message["response_format"]));
    }
    return absl::OkStatus();
  };

  if (role == "system") {
    TANDEM_ASSIGN_OR_RETURN(std::string content, ContentText(message.value("content", Json()), where));
    prompt.append(content);
    TANDEM_RETURN_IF_ERROR(extras(prompt));
  } else if (role == "developer") {
    TANDEM_ASSIGN_OR_RETURN(std::string content, ContentText(message.value("content", Json()), where));
    if (content.empty()) return Invalid(where, "a developer message needs non-empty content");
    prompt.append(dsv4::kUser).append(content);
    TANDEM_RETURN_IF_ERROR(extras(prompt));
  } else if (role == "user") {
    prompt.append(dsv4::kUser);
    if (message.contains("content_blocks") && message["content_blocks"].is_array() &&
        !message["content_blocks"].empty()) {
      TANDEM_ASSIGN_OR_RETURN(std::string text, RenderUserBlocks(message["content_blocks"], where));
      prompt.append(text);
    } else {
      TANDEM_ASSIGN_OR_RETURN(std::string content, ContentText(message.value("content", Json()), where));
      prompt.append(content);
    }
  } else if (role == "latest_reminder") {
    TANDEM_ASSIGN_OR_RETURN(std::string content, ContentText(message.value("content", Json()), where));
    prompt.append(dsv4::kLatestReminder).append(content);
  } else if (role == "assistant") {
    std::string tool_calls;
    if (Truthy(message, "tool_calls")) {
      if (!message["tool_calls"].is_array()) return Invalid(where, "tool_calls must be a list");
      TANDEM_ASSIGN_OR_RETURN(tool_calls, RenderToolCalls(message["tool_calls"], where));
    }
    TANDEM_ASSIGN_OR_RETURN(std::string content, ContentText(message.value("content", Json()), where));
    const bool previous_has_task = index > 0 && context.messages[index - 1].contains("task") &&
                                   !context.messages[index - 1]["task"].is_null();
    std::string reasoning;
    if (context.thinking && !previous_has_task &&
        (!context.drop_thinking || static_cast<int>(index) > context.last_user)) {
      reasoning = StringField(message, "reasoning_content");
      reasoning.append(dsv4::kThinkEnd);
    }
    absl::StrAppend(&prompt, reasoning, content, tool_calls);
    const bool without_eos = message.contains("wo_eos") && message["wo_eos"].is_boolean() &&
                             message["wo_eos"].get<bool>();
    if (!without_eos) prompt.append(dsv4::kEos);
  } else if (role == "tool") {
    return Invalid(where, "tool messages must be merged first (internal error)");
  } else {
    return Invalid(where, absl::StrCat("unknown role \"", role, "\""));
  }

  // Transition to what follows: nothing if the next turn is not the assistant's.
  if (index + 1 < context.messages.size()) {
    const std::string next_role = StringField(context.messages[index + 1], "role");
    if (next_role != "assistant" && next_role != "latest_reminder") return prompt;
  }
  if (message.contains("task") && !message["task"].is_null()) {
    const std::string task = message["task"].is_string() ? message["task"].get<std::string>() : "";
    const std::string_view token = TaskToken(task);
    if (token.empty()) {
      return Invalid(where, "task must be one of action, query, authority, domain, title, read_url");
    }
    if (task != "action") {
      prompt.append(token);
    } else {
      prompt.append(dsv4::kAssistant).append(context.thinking ? dsv4::kThinkStart : dsv4::kThinkEnd).append(token);
    }
  } else if (role == "user" || role == "developer") {
    prompt.append(dsv4::kAssistant);
    const bool open_thinking =
        context.thinking && (!context.drop_thinking || static_cast<int>(index) >= context.last_user);
    prompt.append(open_thinking ? dsv4::kThinkStart : dsv4::kThinkEnd);
  }
  return prompt;
}

}  // namespace

absl::StatusOr<std::string> EffortPrefix(EffortProfile profile, std::string_view effort) {
  if (profile == EffortProfile::kOfficial) {
    if (effort.empty() || effort == "low") return std::string();
    if (effort == "high") return std::string(kEffortA);
    if (effort == "max") return std::string(kEffortB);
    return absl::InvalidArgumentError(
        absl::StrCat("reasoning effort \"", std::string(effort), "\" is not one of low, high, max"));
  }
  if (effort.empty() || effort == "none" || effort == "high") return std::string();
  if (effort == "max") return std::string(kEffortA);
  return absl::InvalidArgumentError(
      absl::StrCat("reasoning effort \"", std::string(effort), "\" is not one of none, high, max"));
}

absl::StatusOr<std::string> EncodeDsv4Messages(const Json& messages, const ChatEncodeOptions& options) {
  if (!messages.is_array()) return absl::InvalidArgumentError("messages must be a list");
  for (size_t i = 0; i < messages.size(); ++i) {
    if (!messages[i].is_object() || !messages[i].contains("role") || !messages[i]["role"].is_string()) {
      return Invalid(Where(i), "each message needs a string role");
    }
  }
  TANDEM_ASSIGN_OR_RETURN(std::vector<Json> merged, MergeToolMessages(messages));
  SortToolResultsByCallOrder(merged);

  bool any_tools = false;
  for (const Json& message : merged) any_tools = any_tools || Truthy(message, "tools");
  const bool effective_drop = options.drop_thinking && !any_tools;
  if (options.thinking && effective_drop) merged = DropThinking(merged);

  std::string effort_prefix;
  if (options.thinking) {
    TANDEM_ASSIGN_OR_RETURN(effort_prefix, EffortPrefix(options.effort_profile, options.reasoning_effort));
  } else {
    TANDEM_RETURN_IF_ERROR(EffortPrefix(options.effort_profile, options.reasoning_effort).status());
  }
  const RenderContext context{merged, options.thinking, effective_drop, LastUserIndex(merged),
                              std::move(effort_prefix), options.tool_schema_style};
  std::string prompt(dsv4::kBos);
  for (size_t i = 0; i < merged.size(); ++i) {
    TANDEM_ASSIGN_OR_RETURN(std::string rendered, RenderMessage(i, context));
    prompt.append(rendered);
  }
  return prompt;
}

}  // namespace tandem::text
