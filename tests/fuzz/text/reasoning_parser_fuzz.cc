// Any text and options: the reasoning parser never crashes, streaming in two chunks or byte by
// byte equals the one-shot split, and nothing is lost or invented.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/text/output_parser.h"
#include "common/text/reasoning_parser.h"
#include "tests/fuzz/text/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace tandem::text;
  if (size < 2) return 0;
  const ReasoningOptions options{.force_reasoning = (data[0] & 1) != 0,
                                 .separate_reasoning = (data[0] & 2) == 0,
                                 .stream_reasoning = (data[0] & 4) == 0};
  const std::string_view text(reinterpret_cast<const char*>(data) + 2, size - 2);
  const ReasoningSplit expected = ParseReasoning(text, options);
  if (expected.reasoning.size() + expected.content.size() > text.size()) fuzz::Fail("split invented text");

  const size_t cut = data[1] % (text.size() + 1);
  std::vector<std::vector<std::string_view>> chunkings = {{text.substr(0, cut), text.substr(cut)}};
  if (text.size() <= 128) {
    chunkings.emplace_back();
    for (size_t i = 0; i < text.size(); ++i) chunkings.back().push_back(text.substr(i, 1));
  }
  for (const auto& chunks : chunkings) {
    ReasoningParser parser(options);
    ReasoningSplit streamed;
    for (const std::string_view chunk : chunks) {
      const ReasoningSplit part = parser.Push(chunk);
      streamed.reasoning += part.reasoning;
      streamed.content += part.content;
    }
    const ReasoningSplit last = parser.Finish();
    streamed.reasoning += last.reasoning;
    streamed.content += last.content;
    if (streamed.reasoning != expected.reasoning) fuzz::Fail("streamed reasoning != one-shot");
    if (streamed.content != expected.content) fuzz::Fail("streamed content != one-shot");
  }

  // The combined parser with tool calls on: must not crash either.
  AssistantOutputParser combined({.reasoning = options, .parse_tool_calls = true});
  combined.Push(text.substr(0, cut));
  combined.Push(text.substr(cut));
  combined.Finish();
  return 0;
}
