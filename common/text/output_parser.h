// Everything the gateway does to one choice's generated text, per chunk: reasoning split first,
// then DSML tool calls on the content part (§3: "reasoning parser first, then tool parser").
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "common/text/dsml_parser.h"
#include "common/text/reasoning_parser.h"

namespace tandem::text {

struct AssistantOutputOptions {
  ReasoningOptions reasoning;
  bool parse_tool_calls = false;  // tools given and tool_choice != "none"
  ToolNames tool_names;
};

struct AssistantDelta {
  std::string reasoning;
  std::string content;
  std::vector<ToolCallDelta> tool_calls;
};

class AssistantOutputParser {
 public:
  explicit AssistantOutputParser(AssistantOutputOptions options);

  AssistantDelta Push(std::string_view text);
  AssistantDelta Finish();
  // Calls seen so far (for the final message and finish_reason "tool_calls").
  const std::vector<ToolCall>& tool_calls() const { return tools_.calls(); }

 private:
  void Route(const ReasoningSplit& split, AssistantDelta& delta);

  bool parse_tool_calls_;
  ReasoningParser reasoning_;
  DsmlToolParser tools_;
};

}  // namespace tandem::text
