#include "common/text/output_parser.h"

namespace tandem::text {

AssistantOutputParser::AssistantOutputParser(AssistantOutputOptions options)
    : parse_tool_calls_(options.parse_tool_calls),
      reasoning_(options.reasoning),
      tools_(std::move(options.tool_names)) {}

void AssistantOutputParser::Route(const ReasoningSplit& split, AssistantDelta& delta) {
  delta.reasoning.append(split.reasoning);
  if (!parse_tool_calls_) {
    delta.content.append(split.content);
    return;
  }
  ToolStreamUpdate update = tools_.Push(split.content);
  delta.content.append(update.content);
  for (auto& call : update.calls) delta.tool_calls.push_back(std::move(call));
}

AssistantDelta AssistantOutputParser::Push(std::string_view text) {
  AssistantDelta delta;
  Route(reasoning_.Push(text), delta);
  return delta;
}

AssistantDelta AssistantOutputParser::Finish() {
  AssistantDelta delta;
  Route(reasoning_.Finish(), delta);
  if (parse_tool_calls_) {
    ToolStreamUpdate update = tools_.Finish();
    delta.content.append(update.content);
    for (auto& call : update.calls) delta.tool_calls.push_back(std::move(call));
  }
  return delta;
}

}  // namespace tandem::text
