// DeepSeek-V4 chat encoding: OpenAI-style messages → the prompt string the model was trained on
// (V4 ships no Jinja template), byte-exact to the checkpoint's encoding_dsv4.py (§1).
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "common/core/status.h"

namespace tandem::text {

namespace dsv4 {
inline constexpr std::string_view kBos = "<｜begin▁of▁sentence｜>";
inline constexpr std::string_view kEos = "<｜end▁of▁sentence｜>";
inline constexpr std::string_view kUser = "<｜User｜>";
inline constexpr std::string_view kAssistant = "<｜Assistant｜>";
inline constexpr std::string_view kLatestReminder = "<｜latest_reminder｜>";
inline constexpr std::string_view kThinkStart = "<think>";
inline constexpr std::string_view kThinkEnd = "</think>";
inline constexpr std::string_view kDsml = "｜DSML｜";
}  // namespace dsv4

// Which checkpoint's reasoning-effort prompts to use (§1.8).
enum class EffortProfile {
  kPreview,   // April V4-Flash/Pro: none|high|max, only max adds a prompt
  kOfficial,  // V4-Flash-0731+: low (default, nothing) | high | max
};

// How tool schemas are written into the tools block (§1.6).
enum class ToolSchemaStyle {
  kAsGiven,  // the client's `function` object, keys in client order (the reference encoder)
  kSglang,   // description, name, parameters, strict (sglang's pydantic dump) for cache parity
};

struct ChatEncodeOptions {
  bool thinking = false;
  bool drop_thinking = true;
  EffortProfile effort_profile = EffortProfile::kOfficial;
  // The profile's own level ("" = profile default): official low|high|max, preview none|high|max.
  std::string reasoning_effort;
  ToolSchemaStyle tool_schema_style = ToolSchemaStyle::kAsGiven;
};

// encode_messages: messages in the encoder's shape (roles system, developer, user, assistant, tool,
// latest_reminder; `tools` on a system/developer message; assistant `tool_calls` with object or
// JSON-string arguments; optional `task`, `reasoning_content`, `wo_eos`). Returns the prompt,
// starting with BOS. Bad input (unknown role, non-object arguments, bad task) → InvalidArgument.
absl::StatusOr<std::string> EncodeDsv4Messages(const nlohmann::ordered_json& messages,
                                               const ChatEncodeOptions& options);

// The request-level steps sglang applies before encoding (§1.2).
struct ChatRequestOptions {
  // Keep a trailing assistant message as text to continue (returned separately, no EOS).
  bool continue_final_message = false;
  // sglang attaches tools even for tool_choice "none"; by default we omit them, as the official API.
  bool tools_with_tool_choice_none = false;
  std::string tool_choice = "auto";
  std::optional<std::string> task;  // action|query|authority|domain|title|read_url
};

struct PreparedChat {
  nlohmann::ordered_json messages;
  // With continue_final_message: the trailing assistant text, to tokenize (no BOS) and append.
  std::optional<std::string> continuation;
};

// OpenAI `messages` + `tools` → encoder messages: parses history tool-call arguments, flattens
// list content, inserts the empty system message, attaches tools and task.
absl::StatusOr<PreparedChat> PrepareDsv4Messages(const nlohmann::ordered_json& messages,
                                                 const nlohmann::ordered_json& tools,
                                                 const ChatRequestOptions& options);

// Reasoning-effort request values (OpenAI / DeepSeek API names) resolved for a profile (§1.9).
struct EffortChoice {
  bool disables_thinking = false;  // "none"
  std::string encoder_effort;      // the profile level to pass in ChatEncodeOptions
};
absl::StatusOr<EffortChoice> ResolveReasoningEffort(std::string_view request_value, EffortProfile profile);

// The prompt text an effort level adds after BOS in thinking mode ("" for none).
absl::StatusOr<std::string> EffortPrefix(EffortProfile profile, std::string_view effort);

}  // namespace tandem::text
