// Any text: the DSML parser never crashes, and streaming in any two chunks (or byte by byte)
// ends with exactly the one-shot content and calls.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/text/dsml_parser.h"
#include "tests/fuzz/text/fuzz_common.h"

namespace {

using namespace tandem::text;

void CheckStream(const ToolParseResult& expected, const std::vector<std::string_view>& chunks) {
  DsmlToolParser parser;
  std::string content;
  std::vector<ToolCall> calls;
  auto absorb = [&](const ToolStreamUpdate& update) {
    content += update.content;
    for (const ToolCallDelta& delta : update.calls) {
      if (delta.name.has_value()) {
        if (delta.index != static_cast<int>(calls.size())) fuzz::Fail("call index out of order");
        calls.push_back({*delta.name, "", true});
      } else {
        if (delta.index < 0 || delta.index >= static_cast<int>(calls.size())) fuzz::Fail("delta for unknown call");
        calls[static_cast<size_t>(delta.index)].arguments += delta.arguments;
      }
    }
  };
  for (const std::string_view chunk : chunks) absorb(parser.Push(chunk));
  absorb(parser.Finish());
  if (content != expected.content) fuzz::Fail("streamed content != one-shot content");
  if (calls.size() != expected.calls.size()) fuzz::Fail("streamed call count != one-shot");
  for (size_t i = 0; i < calls.size(); ++i) {
    if (calls[i].name != expected.calls[i].name) fuzz::Fail("streamed name != one-shot");
    if (calls[i].arguments != expected.calls[i].arguments) fuzz::Fail("streamed arguments != one-shot");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const std::string_view text(reinterpret_cast<const char*>(data) + 1, size - 1);
  const ToolParseResult expected = ParseDsmlToolCalls(text);
  const size_t cut = text.empty() ? 0 : data[0] % (text.size() + 1);
  CheckStream(expected, {text.substr(0, cut), text.substr(cut)});
  if (text.size() <= 128) {
    std::vector<std::string_view> bytes;
    for (size_t i = 0; i < text.size(); ++i) bytes.push_back(text.substr(i, 1));
    CheckStream(expected, bytes);
  }
  return 0;
}
