#include "common/text/reasoning_parser.h"

#include <gtest/gtest.h>

#include <string_view>
#include <vector>

#include "common/text/output_parser.h"

namespace tandem::text {
namespace {

ReasoningSplit StreamPieces(const std::vector<std::string_view>& pieces, ReasoningOptions options) {
  ReasoningParser parser(options);
  ReasoningSplit streamed;
  for (const std::string_view piece : pieces) {
    const ReasoningSplit part = parser.Push(piece);
    streamed.reasoning += part.reasoning;
    streamed.content += part.content;
  }
  const ReasoningSplit last = parser.Finish();
  streamed.reasoning += last.reasoning;
  streamed.content += last.content;
  return streamed;
}

// The one-shot split, after checking that every two-way split of the text, and one byte per
// chunk, stream to the same.
ReasoningSplit SplitEverywhere(const std::string& text, ReasoningOptions options = {}) {
  const ReasoningSplit one_shot = ParseReasoning(text, options);
  const std::string_view view(text);
  for (size_t cut = 0; cut <= text.size(); ++cut) {
    const ReasoningSplit streamed = StreamPieces({view.substr(0, cut), view.substr(cut)}, options);
    EXPECT_EQ(streamed.reasoning, one_shot.reasoning) << "cut at " << cut << " of " << text;
    EXPECT_EQ(streamed.content, one_shot.content) << "cut at " << cut << " of " << text;
  }
  std::vector<std::string_view> bytes;
  for (size_t i = 0; i < text.size(); ++i) bytes.push_back(view.substr(i, 1));
  const ReasoningSplit streamed = StreamPieces(bytes, options);
  EXPECT_EQ(streamed.reasoning, one_shot.reasoning) << "byte by byte: " << text;
  EXPECT_EQ(streamed.content, one_shot.content) << "byte by byte: " << text;
  return one_shot;
}

ReasoningOptions Forced() { return {.force_reasoning = true}; }

TEST(ReasoningParser, ForcedSplitsAtEndOfThinking) {
  const auto split = SplitEverywhere("abc</think>def", Forced());
  EXPECT_EQ(split.reasoning, "abc");
  EXPECT_EQ(split.content, "def");
}

TEST(ReasoningParser, ForcedWithoutEndIsAllReasoning) {
  const auto split = SplitEverywhere("still thinking about it", Forced());
  EXPECT_EQ(split.reasoning, "still thinking about it");
  EXPECT_EQ(split.content, "");
}

TEST(ReasoningParser, UnforcedPlainTextIsContent) {
  const auto split = SplitEverywhere("hello");
  EXPECT_EQ(split.reasoning, "");
  EXPECT_EQ(split.content, "hello");
  EXPECT_EQ(SplitEverywhere("a <think> in the middle</think> stays").content, "a <think> in the middle</think> stays");
}

TEST(ReasoningParser, ExplicitThinkBlock) {
  auto split = SplitEverywhere("<think>x</think>y");
  EXPECT_EQ(split.reasoning, "x");
  EXPECT_EQ(split.content, "y");
  split = SplitEverywhere("<think><think>x</think>\n\ny", Forced());  // leading <think>s are stripped
  EXPECT_EQ(split.reasoning, "x");
  EXPECT_EQ(split.content, "\n\ny");
}

TEST(ReasoningParser, EndTagAcrossChunks) {
  ReasoningParser parser(Forced());
  EXPECT_EQ(parser.Push("abc</th").reasoning, "abc");
  const auto split = parser.Push("ink>def");
  EXPECT_EQ(split.reasoning, "");
  EXPECT_EQ(split.content, "def");
  EXPECT_FALSE(parser.in_reasoning());
}

TEST(ReasoningParser, StreamReasoningOffReleasesAtTheEndTag) {
  ReasoningParser parser({.force_reasoning = true, .stream_reasoning = false});
  EXPECT_EQ(parser.Push("a").reasoning, "");
  EXPECT_EQ(parser.Push("b").reasoning, "");
  const auto split = parser.Push("c</think>d");
  EXPECT_EQ(split.reasoning, "abc");
  EXPECT_EQ(split.content, "d");
  ReasoningParser truncated({.force_reasoning = true, .stream_reasoning = false});
  truncated.Push("cut sh");
  EXPECT_EQ(truncated.Finish().reasoning, "cut sh");
}

TEST(ReasoningParser, SeparateReasoningOffPassesEverythingThrough) {
  const auto split = SplitEverywhere("<think>x</think>y", {.force_reasoning = true, .separate_reasoning = false});
  EXPECT_EQ(split.reasoning, "");
  EXPECT_EQ(split.content, "<think>x</think>y");
}

TEST(ReasoningParser, PromptEndingInThinkForcesReasoning) {
  EXPECT_TRUE(PromptOpensThinking("<｜User｜>q<｜Assistant｜><think>"));
  EXPECT_FALSE(PromptOpensThinking("<｜User｜>q<｜Assistant｜></think>"));
}

TEST(AssistantOutputParser, ReasoningThenToolCall) {
  const std::string text =
      "r</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
      "<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n</｜DSML｜invoke>\n"
      "</｜DSML｜tool_calls>";
  for (size_t cut = 0; cut <= text.size(); ++cut) {
    AssistantOutputParser parser({.reasoning = Forced(), .parse_tool_calls = true});
    AssistantDelta total;
    for (const auto& delta : {parser.Push(text.substr(0, cut)), parser.Push(text.substr(cut)), parser.Finish()}) {
      total.reasoning += delta.reasoning;
      total.content += delta.content;
    }
    EXPECT_EQ(total.reasoning, "r");
    EXPECT_EQ(total.content, "");
    ASSERT_EQ(parser.tool_calls().size(), 1u);
    EXPECT_EQ(parser.tool_calls()[0].name, "get_weather");
    EXPECT_EQ(parser.tool_calls()[0].arguments, R"({"city": "Paris"})");
  }
}

TEST(AssistantOutputParser, DsmlInsideUnclosedThinkingStaysReasoning) {
  AssistantOutputParser parser({.reasoning = Forced(), .parse_tool_calls = true});
  const auto delta = parser.Push("<｜DSML｜invoke name=\"f\"/>");
  EXPECT_EQ(delta.reasoning, "<｜DSML｜invoke name=\"f\"/>");
  EXPECT_TRUE(parser.Finish().tool_calls.empty());
  EXPECT_TRUE(parser.tool_calls().empty());
}

}  // namespace
}  // namespace tandem::text
