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

void CheckStream(const ToolParseResult& expected, const std::vector<std::string_view>& chunks,
                 const ToolNames& names) {
  DsmlToolParser parser(names);
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
  if (size < 2) return 0;
  // data[0] & 1: only tools "f" and "get_weather" are known (others are dropped); data[1]: the cut.
  const ToolNames names = (data[0] & 1) ? ToolNames(absl::flat_hash_set<std::string>{"f", "get_weather"})
                                        : ToolNames(std::nullopt);
  const std::string_view text(reinterpret_cast<const char*>(data) + 2, size - 2);
  const ToolParseResult expected = ParseDsmlToolCalls(text, names);
  for (const ToolCall& call : expected.calls) {
    if (names.has_value() && !names->contains(call.name)) fuzz::Fail("a call to an unknown tool was kept");
  }
  const size_t cut = data[1] % (text.size() + 1);
  CheckStream(expected, {text.substr(0, cut), text.substr(cut)}, names);
  if (text.size() <= 128) {
    std::vector<std::string_view> bytes;
    for (size_t i = 0; i < text.size(); ++i) bytes.push_back(text.substr(i, 1));
    CheckStream(expected, bytes, names);
  }
  return 0;
}
