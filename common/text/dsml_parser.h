// DeepSeek-V4 DSML tool-call parser (the `deepseekv4` detector, §2): model text → content plus
// tool calls, one-shot or streamed chunk by chunk. Never throws; malformed markup stays text.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_set.h"

namespace tandem::text {

namespace dsml {
inline constexpr std::string_view kSectionStart = "<｜DSML｜tool_calls>";
inline constexpr std::string_view kSectionEnd = "</｜DSML｜tool_calls>";
inline constexpr std::string_view kInvokeStart = "<｜DSML｜invoke";
inline constexpr std::string_view kInvokeEnd = "</｜DSML｜invoke>";
inline constexpr std::string_view kParameterStart = "<｜DSML｜parameter";
inline constexpr std::string_view kParameterEnd = "</｜DSML｜parameter>";
// For constrained decoding (structural tags): what starts and ends one call.
inline constexpr std::string_view kStructureTrigger = "<｜DSML｜invoke";
inline constexpr std::string_view kStructureEnd = "</｜DSML｜invoke>";
inline constexpr std::string_view kStructuralTagName = "deepseek_v4";
}  // namespace dsml

struct ToolCall {
  std::string name;
  std::string arguments;  // JSON object text
  bool complete = true;   // false: the text ended inside this call (arguments may be partial)
};

struct ToolParseResult {
  std::string content;
  std::vector<ToolCall> calls;
};

// One streaming update of one call: the first carries the name (arguments ""), later ones carry
// argument text to append. Concatenated arguments always equal the one-shot arguments.
struct ToolCallDelta {
  int index = 0;
  std::optional<std::string> name;
  std::string arguments;
};

struct ToolStreamUpdate {
  std::string content;
  std::vector<ToolCallDelta> calls;
};

// Known tool names; calls to other names are dropped. nullopt accepts every name.
using ToolNames = std::optional<absl::flat_hash_set<std::string>>;

class DsmlToolParser {
 public:
  explicit DsmlToolParser(ToolNames tool_names = std::nullopt);

  ToolStreamUpdate Push(std::string_view chunk);
  // End of the stream: releases held content and the unsent rest of an unfinished call.
  ToolStreamUpdate Finish();

  // Every call seen so far (names and full arguments as streamed).
  const std::vector<ToolCall>& calls() const { return calls_; }

 private:
  void ScanInvokes(ToolStreamUpdate& update);
  void EmitArguments(ToolStreamUpdate& update, const std::string& arguments, bool complete);
  void EmitContent(ToolStreamUpdate& update, std::string_view text);

  ToolNames tool_names_;
  std::string buffer_;
  bool in_tools_ = false;   // a section start or invoke was seen
  std::string separator_;   // the "\n\n" cut before the first marker (given back if no call parses)
  std::string consumed_;    // markup read while no call has parsed yet (given back likewise)
  // The invoke being read.
  bool invoke_open_ = false;
  bool invoke_skipped_ = false;  // unknown tool name: parsed but not reported
  std::string sent_arguments_;
  std::vector<ToolCall> calls_;
  bool finished_ = false;
};

// The one-shot parse: the same as streaming the whole text and finishing.
ToolParseResult ParseDsmlToolCalls(std::string_view text, ToolNames tool_names = std::nullopt);

// True when the text holds a section start or an invoke (the serving layer's has_tool_call).
bool HasDsmlToolCall(std::string_view text);

// An OpenAI tool-call id: "call_" + 24 random lowercase hex digits.
std::string NewToolCallId();

}  // namespace tandem::text
