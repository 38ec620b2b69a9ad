#include "common/text/dsml_parser.h"

#include <gtest/gtest.h>

#include "common/text/detokenizer.h"
#include "common/text/dsml_structure.h"
#include "common/text/utf8.h"
#include "tests/unit/text/test_tokenizer.h"

namespace tandem::text {
namespace {

struct StreamOutcome {
  std::string content;
  std::vector<ToolCall> calls;  // names and concatenated argument deltas
  size_t argument_deltas = 0;
};

StreamOutcome Stream(const std::vector<std::string>& chunks, const ToolNames& names) {
  DsmlToolParser parser(names);
  StreamOutcome outcome;
  auto absorb = [&](const ToolStreamUpdate& update) {
    outcome.content += update.content;
    for (const ToolCallDelta& delta : update.calls) {
      if (delta.name.has_value()) {
        EXPECT_EQ(delta.index, static_cast<int>(outcome.calls.size()));
        EXPECT_TRUE(delta.arguments.empty());
        outcome.calls.push_back({*delta.name, "", true});
      } else {
        ASSERT_LT(delta.index, static_cast<int>(outcome.calls.size()));
        outcome.calls[static_cast<size_t>(delta.index)].arguments += delta.arguments;
        ++outcome.argument_deltas;
      }
    }
  };
  for (const std::string& chunk : chunks) absorb(parser.Push(chunk));
  absorb(parser.Finish());
  return outcome;
}

// Chunkings: one character at a time, every two-way split, and the V4 tokenizer's tokens.
std::vector<std::vector<std::string>> Chunkings(const std::string& text) {
  std::vector<std::vector<std::string>> result;
  std::vector<size_t> boundaries;
  for (size_t pos = 0; pos < text.size();) {
    boundaries.push_back(pos);
    NextCodePoint(text, pos);
  }
  std::vector<std::string> chars;
  for (size_t i = 0; i < boundaries.size(); ++i) {
    const size_t end = i + 1 < boundaries.size() ? boundaries[i + 1] : text.size();
    chars.push_back(text.substr(boundaries[i], end - boundaries[i]));
  }
  result.push_back(chars);
  for (const size_t split : boundaries) result.push_back({text.substr(0, split), text.substr(split)});
  if (const Tokenizer* tokenizer = testing::V4Tokenizer()) {
    IncrementalDetokenizer detokenizer(*tokenizer, false);
    std::vector<std::string> tokens;
    for (const TokenId id : tokenizer->Encode(text)) tokens.push_back(detokenizer.Push(id));
    tokens.push_back(detokenizer.Finish());
    result.push_back(tokens);
  }
  return result;
}

// The one-shot result, after checking every streamed chunking ends with exactly that result.
ToolParseResult ParseEverywhere(const std::string& text, const ToolNames& names = std::nullopt) {
  const ToolParseResult one_shot = ParseDsmlToolCalls(text, names);
  for (const auto& chunks : Chunkings(text)) {
    const StreamOutcome streamed = Stream(chunks, names);
    EXPECT_EQ(streamed.content, one_shot.content) << "chunks: " << chunks.size() << " text: " << text;
    EXPECT_EQ(streamed.calls.size(), one_shot.calls.size()) << text;
    for (size_t i = 0; i < std::min(streamed.calls.size(), one_shot.calls.size()); ++i) {
      EXPECT_EQ(streamed.calls[i].name, one_shot.calls[i].name);
      EXPECT_EQ(streamed.calls[i].arguments, one_shot.calls[i].arguments) << "chunks: " << chunks.size();
    }
  }
  return one_shot;
}

void ExpectCalls(const ToolParseResult& result, const std::vector<std::pair<std::string, std::string>>& expected) {
  ASSERT_EQ(result.calls.size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(result.calls[i].name, expected[i].first);
    EXPECT_EQ(result.calls[i].arguments, expected[i].second);
    EXPECT_TRUE(result.calls[i].complete);
  }
}

const std::string kWeatherCall =
    "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
    "<｜DSML｜parameter name=\"location\" string=\"true\">杭州</｜DSML｜parameter>\n"
    "<｜DSML｜parameter name=\"date\" string=\"true\">2024-01-16</｜DSML｜parameter>\n"
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>";

TEST(DsmlToolParser, DetectsToolCalls) {
  EXPECT_TRUE(HasDsmlToolCall("x <｜DSML｜tool_calls>"));
  EXPECT_TRUE(HasDsmlToolCall("<｜DSML｜invoke name=\"f\"/>"));
  EXPECT_FALSE(HasDsmlToolCall("plain <｜User｜> text"));
  EXPECT_EQ(dsml::kStructureTrigger, "<｜DSML｜invoke");
  EXPECT_EQ(dsml::kStructureEnd, "</｜DSML｜invoke>");
}

TEST(DsmlToolParser, ToolCallIdsLookLikeOpenAis) {
  const std::string id = NewToolCallId();
  ASSERT_EQ(id.size(), 29u);
  EXPECT_EQ(id.substr(0, 5), "call_");
  EXPECT_EQ(id.find_first_not_of("0123456789abcdef", 5), std::string::npos);
  EXPECT_NE(NewToolCallId(), id);
}

TEST(DsmlToolParser, SingleXmlCallKeepsUnicodeUnescaped) {
  const auto result = ParseEverywhere(kWeatherCall);
  EXPECT_EQ(result.content, "");
  ExpectCalls(result, {{"get_weather", R"({"location": "杭州", "date": "2024-01-16"})"}});
}

TEST(DsmlToolParser, ProseThenTwoInvokesWithTypedParameters) {
  const std::string text =
      "Let me search for that.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"search\">\n"
      "<｜DSML｜parameter name=\"query\" string=\"true\">DeepSeek V4 release</｜DSML｜parameter>\n"
      "<｜DSML｜parameter name=\"topn\" string=\"false\">10</｜DSML｜parameter>\n"
      "</｜DSML｜invoke>\n<｜DSML｜invoke name=\"open\">\n"
      "<｜DSML｜parameter name=\"flags\" string=\"false\">{\"safe\": true, \"tags\": [\"a\", 2.5]}</｜DSML｜parameter>\n"
      "</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
  const auto result = ParseEverywhere(text);
  EXPECT_EQ(result.content, "Let me search for that.");
  ExpectCalls(result, {{"search", R"({"query": "DeepSeek V4 release", "topn": 10})"},
                       {"open", R"({"flags": {"safe": true, "tags": ["a", 2.5]}})"}});
}

TEST(DsmlToolParser, JsonBodiesAreTakenAsGiven) {
  const std::string text =
      "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n{\"location\": \"Beijing\", \"n\":1}\n"
      "</｜DSML｜invoke>\n<｜DSML｜invoke name=\"get_time\">\n  {\"tz\": \"UTC\"}  \n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
  const auto result = ParseEverywhere(text);
  ExpectCalls(result, {{"get_weather", R"({"location": "Beijing", "n":1})"}, {"get_time", R"({"tz": "UTC"})"}});
}

TEST(DsmlToolParser, ZeroParameterInvokesGiveEmptyObjects) {
  for (const char* body : {"\n", "\n\n", ""}) {
    const std::string text = std::string("<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"list_files\">") + body +
                             "</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
    ExpectCalls(ParseEverywhere(text), {{"list_files", "{}"}});
  }
}

TEST(DsmlToolParser, SelfClosingInvokes) {
  const auto alone = ParseEverywhere(
      "Final answer.\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"submit\"/>\n</｜DSML｜tool_calls>");
  EXPECT_EQ(alone.content, "Final answer.\n");
  EXPECT_EQ(alone.content.find("DSML"), std::string::npos);
  ExpectCalls(alone, {{"submit", "{}"}});
  const auto mixed = ParseEverywhere(
      "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"first\" />\n<｜DSML｜invoke name=\"second\">\n"
      "<｜DSML｜parameter name=\"x\" string=\"false\">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n"
      "<｜DSML｜invoke name=\"third\"/>\n</｜DSML｜tool_calls>");
  ExpectCalls(mixed, {{"first", "{}"}, {"second", R"({"x": 1})"}, {"third", "{}"}});
}

TEST(DsmlToolParser, LeadingTextLosesOnlyTheSeparator) {
  const auto result = ParseEverywhere("I will check the weather. \n\n" + kWeatherCall);
  EXPECT_EQ(result.content, "I will check the weather. ");
  ASSERT_EQ(result.calls.size(), 1u);
}

TEST(DsmlToolParser, TextWithoutCallsIsUnchanged) {
  for (const std::string text : {"Just an answer.", "a < b and c <| d", "ends with <", "line\n\n", "｜DSML｜ alone",
                                 "x <｜DSML｜param y"}) {
    const auto result = ParseEverywhere(text);
    EXPECT_EQ(result.content, text);
    EXPECT_TRUE(result.calls.empty());
  }
}

TEST(DsmlToolParser, ParameterValuesAreTrimmedAndFallBackToStrings) {
  const std::string text =
      "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n"
      "<｜DSML｜parameter name=\"s\" string=\"true\"> a </｜DSML｜parameter>\n"
      "<｜DSML｜parameter name=\"bad\" string=\"false\">abc</｜DSML｜parameter>\n"
      "<｜DSML｜parameter name=\"n\" string=\"false\"> 2.50 </｜DSML｜parameter>\n"
      "<｜DSML｜parameter name=\"s\" string=\"true\">again</｜DSML｜parameter>\n"
      "</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
  // A repeated name is written again; JSON readers keep the last value.
  ExpectCalls(ParseEverywhere(text), {{"f", R"({"s": "a", "bad": "abc", "n": 2.5, "s": "again"})"}});
}

TEST(DsmlToolParser, UnknownToolsAreDropped) {
  const ToolNames names = absl::flat_hash_set<std::string>{"get_weather"};
  const std::string text = "ok\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"rm_rf\">\n</｜DSML｜invoke>\n" +
                           kWeatherCall.substr(std::string("<｜DSML｜tool_calls>\n").size());
  const auto result = ParseEverywhere(text, names);
  EXPECT_EQ(result.content, "ok");
  ExpectCalls(result, {{"get_weather", R"({"location": "杭州", "date": "2024-01-16"})"}});
  // Only unknown calls: nothing parsed, so the text stays content.
  const auto only_unknown = ParseEverywhere("<｜DSML｜invoke name=\"rm_rf\"/>", names);
  EXPECT_TRUE(only_unknown.calls.empty());
  EXPECT_EQ(only_unknown.content, "<｜DSML｜invoke name=\"rm_rf\"/>");
}

TEST(DsmlToolParser, BareInvokesAndSeveralSections) {
  ExpectCalls(ParseEverywhere("<｜DSML｜invoke name=\"f\">\n{\"a\": 1}\n</｜DSML｜invoke>"), {{"f", R"({"a": 1})"}});
  const auto two = ParseEverywhere(
      "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"a\"/>\n</｜DSML｜tool_calls>\ntrailing text\n"
      "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"b\"/>\n</｜DSML｜tool_calls>");
  EXPECT_EQ(two.content, "");
  ExpectCalls(two, {{"a", "{}"}, {"b", "{}"}});
}

TEST(DsmlToolParser, MalformedMarkupNeverThrowsAndIsSkipped) {
  const auto result = ParseEverywhere(
      "<｜DSML｜tool_calls>\n<｜DSML｜invokename=\"x\">\n<｜DSML｜invoke name=\"\">\n<｜DSML｜invoke name=\"ok\">\n"
      "<｜DSML｜parameter name=\"p\">no string attr</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>");
  ExpectCalls(result, {{"ok", "{}"}});
  // An invoke left open when the section closes ends there.
  ExpectCalls(ParseEverywhere("<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" "
                              "string=\"false\">1</｜DSML｜parameter>\n</｜DSML｜tool_calls>"),
              {{"f", R"({"a": 1})"}});
  // A parameter left open when the invoke closes runs to the invoke's end.
  ExpectCalls(ParseEverywhere("<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" string=\"true\">hi\n"
                              "</｜DSML｜invoke>"),
              {{"f", R"({"a": "hi"})"}});
  // A body that starts like JSON is passed through as written.
  ExpectCalls(ParseEverywhere("<｜DSML｜invoke name=\"f\">{\"a\": 1</｜DSML｜invoke>"), {{"f", R"({"a": 1)"}});
}

TEST(DsmlToolParser, UnfinishedCallIsReportedIncomplete) {
  const std::string text =
      "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" string=\"false\">1"
      "</｜DSML｜parameter>\n<｜DSML｜parameter name=\"b\" string=\"true\">hel";
  const auto result = ParseEverywhere(text);
  ASSERT_EQ(result.calls.size(), 1u);
  EXPECT_FALSE(result.calls[0].complete);
  EXPECT_EQ(result.calls[0].arguments, R"({"a": 1, "b": "hel)");
  // A header cut short gives no call, and the text stays content.
  const auto header_only = ParseEverywhere("Hi\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_w");
  EXPECT_TRUE(header_only.calls.empty());
  EXPECT_EQ(header_only.content, "Hi\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_w");
}

TEST(DsmlToolParser, StreamsArgumentsPieceByPiece) {
  const std::string text =
      "Checking.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"book\">\n"
      "<｜DSML｜parameter name=\"note\" string=\"true\">a window seat, please</｜DSML｜parameter>\n"
      "<｜DSML｜parameter name=\"prefs\" string=\"false\">{\"meal\": \"veg\", \"bags\": [1, 2]}</｜DSML｜parameter>\n"
      "</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
  // One character per chunk, and (with the V4 tokenizer) one token per chunk as the model emits it.
  std::vector<std::vector<std::string>> chunkings = {Chunkings(text).front()};
  if (testing::V4Tokenizer() != nullptr) chunkings.push_back(Chunkings(text).back());
  for (const auto& chunks : chunkings) {
    const StreamOutcome streamed = Stream(chunks, std::nullopt);
    EXPECT_GT(streamed.argument_deltas, 8u) << chunks.size() << " chunks";
    ASSERT_EQ(streamed.calls.size(), 1u);
    EXPECT_EQ(streamed.calls[0].arguments,
              R"({"note": "a window seat, please", "prefs": {"meal": "veg", "bags": [1, 2]}})");
    EXPECT_EQ(streamed.content, "Checking.");
  }
}

// A JSON-body invoke streamed token by token: deltas arrive before the call closes, and they add
// up to the one-shot arguments.
TEST(DsmlToolParser, StreamsJsonBodiesPieceByPiece) {
  const std::string text =
      "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n{\"location\": \"Beijing\", \"unit\": \"celsius\"}\n"
      "</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
  const ToolParseResult one_shot = ParseEverywhere(text);
  ExpectCalls(one_shot, {{"get_weather", R"({"location": "Beijing", "unit": "celsius"})"}});
  const StreamOutcome streamed = Stream(Chunkings(text).front(), std::nullopt);
  EXPECT_GT(streamed.argument_deltas, 1u);
  ASSERT_EQ(streamed.calls.size(), 1u);
  EXPECT_EQ(streamed.calls[0].arguments, one_shot.calls[0].arguments);
}

TEST(DsmlToolParser, PlainTextStreamsImmediately) {
  DsmlToolParser parser;
  EXPECT_EQ(parser.Push("Hello, ").content, "Hello, ");
  EXPECT_EQ(parser.Push("world").content, "world");
  EXPECT_EQ(parser.Push(" a <").content, " a ");  // "<" may start a call: held
  EXPECT_EQ(parser.Push("b").content, "<b");      // ... and released
  EXPECT_EQ(parser.Push("\n").content, "");        // a newline may precede a call
  EXPECT_EQ(parser.Finish().content, "\n");
}

TEST(DsmlToolParser, ClosingTagsNeverReachContent) {
  DsmlToolParser parser;
  std::string content = parser.Push("a</｜DSML｜tool").content;
  content += parser.Push("_calls>b</｜DSML｜invoke>c").content;
  content += parser.Finish().content;
  EXPECT_EQ(content, "abc");
  const auto after = ParseEverywhere(kWeatherCall + "\n");
  EXPECT_EQ(after.content.find("tool_calls"), std::string::npos);
}

// §2.5 structural tag / structure_info: the trigger and the end tag (one newline, not two), and
// what a grammar following the structure writes parses back to the constrained arguments.
TEST(DsmlStructure, StructureInfoOfTheV4Detector) {
  const DsmlCallStructure structure = DsmlStructureFor("get_weather");
  EXPECT_EQ(structure.begin, "<｜DSML｜invoke name=\"get_weather\">\n");
  EXPECT_EQ(structure.end, "</｜DSML｜invoke>\n");
  EXPECT_EQ(structure.end.find("\n\n"), std::string::npos);
  EXPECT_EQ(structure.trigger, "<｜DSML｜invoke");
  EXPECT_EQ(dsml::kStructuralTagName, "deepseek_v4");
  // A section written along the structure (as a grammar would) parses to exactly the body.
  const std::string text = "Let me look.\n\n<｜DSML｜tool_calls>\n" + structure.begin + R"({"city": "Paris", "days": 2})" +
                           structure.end + DsmlStructureFor("get_time").begin + "{}" + DsmlStructureFor("get_time").end +
                           "</｜DSML｜tool_calls>";
  const auto result = ParseEverywhere(text);
  EXPECT_EQ(result.content, "Let me look.");
  ExpectCalls(result, {{"get_weather", R"({"city": "Paris", "days": 2})"}, {"get_time", "{}"}});
}

TEST(DsmlStructure, StructuralTagForAutoAndNamedToolChoice) {
  const auto tools = nlohmann::ordered_json::parse(R"([
      {"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
      {"type": "function", "function": {"name": "get_time"}}])");
  const auto tag = DsmlStructuralTag(tools);
  ASSERT_TRUE(tag.ok()) << tag.status();
  EXPECT_EQ((*tag)["type"], "structural_tag");
  EXPECT_EQ((*tag)["triggers"], nlohmann::ordered_json::array({"<｜DSML｜invoke"}));
  ASSERT_EQ((*tag)["structures"].size(), 2u);
  EXPECT_EQ((*tag)["structures"][0]["begin"], "<｜DSML｜invoke name=\"get_weather\">\n");
  EXPECT_EQ((*tag)["structures"][0]["end"], "</｜DSML｜invoke>\n");
  EXPECT_EQ((*tag)["structures"][0]["schema"]["required"][0], "city");
  EXPECT_EQ((*tag)["structures"][1]["schema"], nlohmann::ordered_json::parse(R"({"type": "object"})"));
  // A named tool_choice keeps only that tool; naming a missing tool is a 400.
  const auto named = DsmlStructuralTag(tools, "get_time");
  ASSERT_TRUE(named.ok());
  ASSERT_EQ((*named)["structures"].size(), 1u);
  EXPECT_EQ((*named)["structures"][0]["begin"], "<｜DSML｜invoke name=\"get_time\">\n");
  EXPECT_EQ(DsmlStructuralTag(tools, "nope").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(DsmlStructuralTag(nlohmann::ordered_json::parse(R"([{"type": "function"}])")).ok());
  EXPECT_FALSE(DsmlStructuralTag(nlohmann::ordered_json::object()).ok());
}

}  // namespace
}  // namespace tandem::text
