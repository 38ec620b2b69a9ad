#include "common/text/chat_encoding.h"

#include <gtest/gtest.h>

#include "common/text/python_json.h"
#include "tests/unit/text/test_tokenizer.h"

namespace tandem::text {
namespace {

using Json = nlohmann::ordered_json;

const std::string kBos = "<｜begin▁of▁sentence｜>";
const std::string kEos = "<｜end▁of▁sentence｜>";

std::string Encode(const std::string& messages_json, ChatEncodeOptions options = {}) {
  auto prompt = EncodeDsv4Messages(Json::parse(messages_json), options);
  EXPECT_TRUE(prompt.ok()) << prompt.status();
  return prompt.value_or("");
}

ChatEncodeOptions Thinking() {
  ChatEncodeOptions options;
  options.thinking = true;
  return options;
}

// What a request goes through: the sglang-style preparation, then the encoder.
std::string EncodeRequest(const std::string& messages_json, const std::string& tools_json,
                          ChatEncodeOptions options = {}, ChatRequestOptions request = {}) {
  auto prepared = PrepareDsv4Messages(Json::parse(messages_json), Json::parse(tools_json), request);
  EXPECT_TRUE(prepared.ok()) << prepared.status();
  if (!prepared.ok()) return "";
  auto prompt = EncodeDsv4Messages(prepared->messages, options);
  EXPECT_TRUE(prompt.ok()) << prompt.status();
  return prompt.value_or("");
}

const char* kWeatherTool = R"([{"type": "function", "function": {"name": "get_weather",
  "description": "Weather for a city", "parameters": {"type": "object",
  "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}}])";

TEST(ChatEncoding, ChatModePrimesAssistantWithEndOfThinking) {
  EXPECT_EQ(Encode(R"([{"role": "user", "content": "Hello"}])"),
            kBos + "<｜User｜>Hello<｜Assistant｜></think>");
  EXPECT_EQ(Encode(R"([{"role": "user", "content": "Hello"}])", Thinking()),
            kBos + "<｜User｜>Hello<｜Assistant｜><think>");
}

TEST(ChatEncoding, SystemTextFollowsBos) {
  EXPECT_EQ(EncodeRequest(R"([{"role": "system", "content": "You are a helpful assistant."},
                              {"role": "user", "content": "What is 2+2?"}])",
                          "null", Thinking()),
            kBos + "You are a helpful assistant.<｜User｜>What is 2+2?<｜Assistant｜><think>");
}

TEST(ChatEncoding, ThinkingDropsEarlierReasoning) {
  const std::string messages = R"([{"role": "user", "content": "hello"},
      {"role": "assistant", "content": "Hi", "reasoning_content": "r"},
      {"role": "user", "content": "1+1=?"}])";
  EXPECT_EQ(Encode(messages, Thinking()),
            kBos + "<｜User｜>hello<｜Assistant｜></think>Hi" + kEos + "<｜User｜>1+1=?<｜Assistant｜><think>");
  // Chat mode renders no reasoning at all.
  EXPECT_EQ(Encode(messages),
            kBos + "<｜User｜>hello<｜Assistant｜></think>Hi" + kEos + "<｜User｜>1+1=?<｜Assistant｜></think>");
  // drop_thinking off keeps it.
  ChatEncodeOptions keep = Thinking();
  keep.drop_thinking = false;
  EXPECT_EQ(Encode(messages, keep), kBos + "<｜User｜>hello<｜Assistant｜><think>r</think>Hi" + kEos +
                                        "<｜User｜>1+1=?<｜Assistant｜><think>");
}

TEST(ChatEncoding, ToolsKeepAllReasoningAndRenderTheToolsBlock) {
  const std::string prompt = EncodeRequest(R"([{"role": "user", "content": "hello"},
      {"role": "assistant", "content": "Hi", "reasoning_content": "r"},
      {"role": "user", "content": "1+1=?"}])",
                                           kWeatherTool, Thinking());
  const std::string tools_block =
      "\n\n## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke "
      "tools by writing a \"<｜DSML｜tool_calls>\" block like the following:\n\n<｜DSML｜tool_calls>\n"
      "<｜DSML｜invoke name=\"$TOOL_NAME\">\n<｜DSML｜parameter name=\"$PARAMETER_NAME\" "
      "string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n...\n</｜DSML｜invoke>\n"
      "<｜DSML｜invoke name=\"$TOOL_NAME2\">\n...\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>\n\n"
      "String parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, "
      "booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\n"
      "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside "
      "<think>...</think> BEFORE any tool calls or final response.\n\nOtherwise, output directly after "
      "</think> with tool calls or final response.\n\n### Available Tool Schemas\n\n"
      "{\"name\": \"get_weather\", \"description\": \"Weather for a city\", \"parameters\": {\"type\": "
      "\"object\", \"properties\": {\"city\": {\"type\": \"string\"}, \"days\": {\"type\": \"integer\"}}, "
      "\"required\": [\"city\"]}}\n\nYou MUST strictly follow the above defined tool name and parameter "
      "schemas to invoke tool calls.\n";
  EXPECT_EQ(prompt, kBos + tools_block + "<｜User｜>hello<｜Assistant｜><think>r</think>Hi" + kEos +
                        "<｜User｜>1+1=?<｜Assistant｜><think>");
}

TEST(ChatEncoding, SglangToolSchemaStyleIsCanonical) {
  ChatEncodeOptions options;
  options.tool_schema_style = ToolSchemaStyle::kSglang;
  const std::string prompt = EncodeRequest(R"([{"role": "user", "content": "x"}])",
                                           R"([{"type": "function", "function": {"name": "f"}}])", options);
  EXPECT_NE(prompt.find("{\"description\": null, \"name\": \"f\", \"parameters\": null, \"strict\": false}\n"),
            std::string::npos);
}

TEST(ChatEncoding, HistoryToolCallsRenderAsDsml) {
  const std::string expected_call =
      "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
      "<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n"
      "<｜DSML｜parameter name=\"days\" string=\"false\">3</｜DSML｜parameter>\n"
      "</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
  for (const char* arguments : {R"("{\"city\":\"Paris\",\"days\":3}")", R"({"city": "Paris", "days": 3})"}) {
    const std::string messages = std::string(R"([{"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
          "function": {"name": "get_weather", "arguments": )") + arguments + R"(}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])";
    EXPECT_EQ(EncodeRequest(messages, "null"),
              kBos + "<｜User｜>weather?<｜Assistant｜></think>" + expected_call + kEos +
                  "<｜User｜><tool_result>sunny</tool_result><｜Assistant｜></think>");
  }
}

TEST(ChatEncoding, ArgumentValuesUsePythonJson) {
  const std::string prompt = Encode(R"([{"role": "user", "content": "q"},
      {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments":
        {"s": "杭州 \"q\"", "o": {"a": [1, 2.5, true, null]}, "n": 1e16, "e": {}}}}]}])");
  EXPECT_NE(prompt.find("<｜DSML｜parameter name=\"s\" string=\"true\">杭州 \"q\"</｜DSML｜parameter>\n"
                        "<｜DSML｜parameter name=\"o\" string=\"false\">{\"a\": [1, 2.5, true, null]}</｜DSML｜parameter>\n"
                        "<｜DSML｜parameter name=\"n\" string=\"false\">1e+16</｜DSML｜parameter>\n"
                        "<｜DSML｜parameter name=\"e\" string=\"false\">{}</｜DSML｜parameter>\n</｜DSML｜invoke>"),
            std::string::npos)
      << prompt;
  // Zero arguments leave an empty line between the tags.
  const std::string empty = Encode(R"([{"role": "user", "content": "q"},
      {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}])");
  EXPECT_NE(empty.find("<｜DSML｜invoke name=\"f\">\n\n</｜DSML｜invoke>"), std::string::npos);
}

TEST(ChatEncoding, ToolResultsAreOrderedByCallAndMergedWithUserText) {
  const std::string prompt = EncodeRequest(R"([{"role": "user", "content": "both"},
      {"role": "assistant", "content": "", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "b", "content": "result b"},
      {"role": "tool", "tool_call_id": "a", "content": "result a"},
      {"role": "user", "content": "and now?"}])",
                                           "null");
  const std::string tail = kEos +
                           "<｜User｜><tool_result>result a</tool_result>\n\n<tool_result>result b</tool_result>"
                           "\n\nand now?<｜Assistant｜></think>";
  ASSERT_GE(prompt.size(), tail.size());
  EXPECT_EQ(prompt.substr(prompt.size() - tail.size()), tail);
  EXPECT_EQ(prompt.find("<｜User｜>", prompt.find(kEos)), prompt.rfind("<｜User｜>"));  // one user turn
}

TEST(ChatEncoding, ToolResultAfterThinkingOpensThinkingAgain) {
  // Tool requests keep all reasoning, and the merged tool-result user turn is the last one.
  const std::string prompt = EncodeRequest(R"([{"role": "user", "content": "q"},
      {"role": "assistant", "content": "", "reasoning_content": "plan",
       "tool_calls": [{"id": "a", "function": {"name": "get_weather", "arguments": {"city": "X"}}}]},
      {"role": "tool", "tool_call_id": "a", "content": [{"type": "text", "text": "t1"}, {"type": "text", "text": "t2"}]}])",
                                           kWeatherTool, Thinking());
  const std::string tail = "<｜User｜>q<｜Assistant｜><think>plan</think>\n\n<｜DSML｜tool_calls>\n"
                           "<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter name=\"city\" "
                           "string=\"true\">X</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>" +
                           kEos + "<｜User｜><tool_result>t1\n\nt2</tool_result><｜Assistant｜><think>";
  ASSERT_GE(prompt.size(), tail.size());
  EXPECT_EQ(prompt.substr(prompt.size() - tail.size()), tail);
}

TEST(ChatEncoding, HistoryToolCallsWithoutRequestToolsDropEarlierReasoning) {
  // No tools in the request: earlier reasoning goes, and the merged tool-result turn is the last
  // user turn, so thinking opens after it.
  const std::string prompt = Encode(R"([{"role": "user", "content": "q"},
      {"role": "assistant", "content": "", "reasoning_content": "plan",
       "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": {}}}]},
      {"role": "tool", "tool_call_id": "a", "content": "r"}])",
                                    Thinking());
  EXPECT_EQ(prompt, kBos + "<｜User｜>q<｜Assistant｜></think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n\n"
                           "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" +
                        kEos + "<｜User｜><tool_result>r</tool_result><｜Assistant｜><think>");
}

TEST(ChatEncoding, ReasoningEffortPrefixes) {
  const std::string messages = R"([{"role": "system", "content": "S"}, {"role": "user", "content": "u"}])";
  const std::string a_start = "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n";
  const std::string b_start = "Reasoning Effort: Beyond maximum \u2014 exhaustive, relentless, and uncompromising.\n";
  auto with = [&](EffortProfile profile, const char* effort, bool thinking) {
    ChatEncodeOptions options;
    options.thinking = thinking;
    options.effort_profile = profile;
    options.reasoning_effort = effort;
    return Encode(messages, options);
  };
  const std::string plain = kBos + "S<｜User｜>u<｜Assistant｜><think>";
  EXPECT_EQ(with(EffortProfile::kPreview, "max", true).substr(0, kBos.size() + a_start.size()), kBos + a_start);
  EXPECT_EQ(with(EffortProfile::kPreview, "high", true), plain);
  EXPECT_EQ(with(EffortProfile::kPreview, "none", true), plain);
  EXPECT_EQ(with(EffortProfile::kOfficial, "low", true), plain);
  EXPECT_EQ(with(EffortProfile::kOfficial, "", true), plain);
  const std::string high = with(EffortProfile::kOfficial, "high", true);
  EXPECT_EQ(high.substr(0, kBos.size() + a_start.size()), kBos + a_start);
  EXPECT_NE(high.find("left unchecked.\n\nS<｜User｜>u"), std::string::npos);
  const std::string max = with(EffortProfile::kOfficial, "max", true);
  EXPECT_EQ(max.substr(0, kBos.size() + b_start.size()), kBos + b_start);
  EXPECT_NE(max.find("no error remains undiscovered.\n\nS<｜User｜>"), std::string::npos);
  // Chat mode never gets a prefix.
  EXPECT_EQ(with(EffortProfile::kOfficial, "max", false), kBos + "S<｜User｜>u<｜Assistant｜></think>");
  EXPECT_EQ(with(EffortProfile::kPreview, "max", false), kBos + "S<｜User｜>u<｜Assistant｜></think>");
  EXPECT_FALSE(EncodeDsv4Messages(Json::parse(messages), {.thinking = true, .reasoning_effort = "medium"}).ok());
}

TEST(ChatEncoding, ResolvesRequestEffortAliases) {
  auto official = [](const char* value) { return ResolveReasoningEffort(value, EffortProfile::kOfficial); };
  EXPECT_TRUE(official("none")->disables_thinking);
  EXPECT_EQ(official("minimal")->encoder_effort, "low");
  EXPECT_EQ(official("medium")->encoder_effort, "high");
  EXPECT_EQ(official("xhigh")->encoder_effort, "max");
  EXPECT_EQ(official("max")->encoder_effort, "max");
  EXPECT_EQ(ResolveReasoningEffort("low", EffortProfile::kPreview)->encoder_effort, "none");
  EXPECT_EQ(ResolveReasoningEffort("max", EffortProfile::kPreview)->encoder_effort, "max");
  EXPECT_FALSE(official("extreme").ok());
}

TEST(ChatEncoding, TasksEndThePrompt) {
  ChatRequestOptions domain;
  domain.task = "domain";
  EXPECT_EQ(EncodeRequest(R"([{"role": "user", "content": "q"}])", "null", {}, domain),
            kBos + "<｜User｜>q<｜domain｜>");
  ChatRequestOptions action;
  action.task = "action";
  EXPECT_EQ(EncodeRequest(R"([{"role": "user", "content": "q"}])", "null", {}, action),
            kBos + "<｜User｜>q<｜Assistant｜></think><｜action｜>");
  EXPECT_EQ(EncodeRequest(R"([{"role": "user", "content": "q"}])", "null", Thinking(), action),
            kBos + "<｜User｜>q<｜Assistant｜><think><｜action｜>");
  // A task answer is rendered without thinking.
  EXPECT_EQ(Encode(R"([{"role": "user", "content": "q", "task": "title"}, {"role": "assistant", "content": "T",
                       "reasoning_content": "r"}, {"role": "user", "content": "next"}])",
                   Thinking()),
            kBos + "<｜User｜>q<｜title｜>T" + kEos + "<｜User｜>next<｜Assistant｜><think>");
  ChatRequestOptions bad;
  bad.task = "nope";
  EXPECT_FALSE(PrepareDsv4Messages(Json::parse(R"([{"role": "user", "content": "q"}])"), Json(), bad).ok());
}

// As the reference: a reminder does not stop the transition after the developer turn.
TEST(ChatEncoding, DeveloperReminderAndResponseFormat) {
  EXPECT_EQ(Encode(R"([{"role": "system", "content": "S", "response_format": {"type": "json_object"}},
                      {"role": "developer", "content": "D"},
                      {"role": "latest_reminder", "content": "R"},
                      {"role": "assistant", "content": "A"}])"),
            kBos + "S\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
                   "{\"type\": \"json_object\"}<｜User｜>D<｜Assistant｜></think><｜latest_reminder｜>RA" +
                kEos);
  EXPECT_FALSE(EncodeDsv4Messages(Json::parse(R"([{"role": "developer", "content": ""}])"), {}).ok());
  EXPECT_FALSE(EncodeDsv4Messages(Json::parse(R"([{"role": "robot", "content": "x"}])"), {}).ok());
}

TEST(ChatEncoding, ConsecutiveUserMessagesMergeIntoOneTurn) {
  EXPECT_EQ(Encode(R"([{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": "b"}]}])"),
            kBos + "<｜User｜>a\n\nb<｜Assistant｜></think>");
}

TEST(ChatEncoding, RequestPreparation) {
  const Json messages = Json::parse(R"([{"role": "user", "content": [{"type": "text", "text": "x"}]},
                                        {"role": "assistant", "content": "partial"}])");
  ChatRequestOptions continue_options;
  continue_options.continue_final_message = true;
  auto continued = PrepareDsv4Messages(messages, Json(), continue_options);
  ASSERT_TRUE(continued.ok());
  EXPECT_EQ(continued->continuation, "partial");
  EXPECT_EQ(*EncodeDsv4Messages(continued->messages, {}), kBos + "<｜User｜>x<｜Assistant｜></think>");
  // Without continue_final_message the trailing assistant turn becomes a user turn (sglang).
  auto relabeled = PrepareDsv4Messages(messages, Json(), {});
  ASSERT_TRUE(relabeled.ok());
  EXPECT_EQ(*EncodeDsv4Messages(relabeled->messages, {}), kBos + "<｜User｜>x\n\npartial<｜Assistant｜></think>");
  // tool_choice "none" omits the tools block by default.
  ChatRequestOptions none;
  none.tool_choice = "none";
  EXPECT_EQ(EncodeRequest(R"([{"role": "user", "content": "q"}])", kWeatherTool, {}, none),
            kBos + "<｜User｜>q<｜Assistant｜></think>");
  none.tools_with_tool_choice_none = true;
  EXPECT_NE(EncodeRequest(R"([{"role": "user", "content": "q"}])", kWeatherTool, {}, none).find("## Tools"),
            std::string::npos);
}

TEST(ChatEncoding, BadRequestsAreInvalidArgument) {
  auto prepare = [](const char* messages, const char* tools = "null") {
    return PrepareDsv4Messages(Json::parse(messages), Json::parse(tools), {}).status();
  };
  EXPECT_EQ(prepare("[]").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(prepare(R"([{"content": "x"}])").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(prepare(R"([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}])")
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(prepare(R"([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}])")
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(prepare(R"([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])").code(),
            absl::StatusCode::kInvalidArgument);
  // A content part whose type is not a string is a clear error, not a JSON exception.
  EXPECT_EQ(prepare(R"([{"role": "user", "content": [{"type": true, "text": "x"}]}])").code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(prepare(R"([{"role": "user", "content": [{"type": 7}]}])").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(prepare(R"([{"role": "user", "content": "x"}])", R"([{"type": "function"}])").code(),
            absl::StatusCode::kInvalidArgument);
  const auto status = prepare(R"([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"function":
      {"name": "f", "arguments": 5}}]}])");
  EXPECT_NE(status.message().find("messages[1].tool_calls[0]"), std::string_view::npos) << status;
}

// §1.3 over several turns: in thinking mode with drop_thinking, only the turn being generated opens
// <think>; earlier assistants lose their reasoning and an earlier developer turn is dropped.
TEST(ChatEncoding, ManyTurnsThinkingDropsEarlierReasoningAndDeveloperTurns) {
  const std::string messages = R"([{"role": "system", "content": "S"},
      {"role": "user", "content": "u1"},
      {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
      {"role": "developer", "content": "D"},
      {"role": "user", "content": "u2"},
      {"role": "assistant", "content": "a2", "reasoning_content": "r2"},
      {"role": "latest_reminder", "content": "L"},
      {"role": "user", "content": "u3"}])";
  EXPECT_EQ(Encode(messages, Thinking()),
            kBos + "S<｜User｜>u1<｜Assistant｜></think>a1" + kEos + "<｜User｜>u2<｜Assistant｜></think>a2" + kEos +
                "<｜latest_reminder｜>L<｜User｜>u3<｜Assistant｜><think>");
  // Chat mode drops nothing: the developer turn is a user turn of its own.
  EXPECT_EQ(Encode(messages),
            kBos + "S<｜User｜>u1<｜Assistant｜></think>a1" + kEos + "<｜User｜>D<｜User｜>u2<｜Assistant｜></think>a2" +
                kEos + "<｜latest_reminder｜>L<｜User｜>u3<｜Assistant｜></think>");
  // Without dropping, every turn opens thinking and every assistant keeps its reasoning.
  ChatEncodeOptions keep = Thinking();
  keep.drop_thinking = false;
  EXPECT_EQ(Encode(messages, keep),
            kBos + "S<｜User｜>u1<｜Assistant｜><think>r1</think>a1" + kEos +
                "<｜User｜>D<｜User｜>u2<｜Assistant｜><think>r2</think>a2" + kEos +
                "<｜latest_reminder｜>L<｜User｜>u3<｜Assistant｜><think>");
}

TEST(ChatEncoding, AssistantAfterTheLastUserTurnKeepsItsReasoning) {
  EXPECT_EQ(Encode(R"([{"role": "user", "content": "q"}, {"role": "assistant", "content": "A", "reasoning_content": "r"}])",
                   Thinking()),
            kBos + "<｜User｜>q<｜Assistant｜><think>r</think>A" + kEos);
  // wo_eos (internal): the turn is left open.
  EXPECT_EQ(Encode(R"([{"role": "user", "content": "q"}, {"role": "assistant", "content": "A", "wo_eos": true}])"),
            kBos + "<｜User｜>q<｜Assistant｜></think>A");
}

// §1.3 + §1.7: a tool call loop with tools in the request keeps all reasoning across many turns.
TEST(ChatEncoding, ToolLoopOverSeveralTurnsKeepsAllReasoning) {
  const std::string prompt = EncodeRequest(R"([{"role": "user", "content": "weather in Paris and Rome?"},
      {"role": "assistant", "content": "", "reasoning_content": "r1", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
      {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
      {"role": "assistant", "content": "", "reasoning_content": "r2", "tool_calls": [
        {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\", \"days\": 2}"}}]},
      {"role": "tool", "tool_call_id": "c2", "content": "rain"},
      {"role": "assistant", "content": "Paris sunny, Rome rain.", "reasoning_content": "r3"},
      {"role": "user", "content": "thanks"}])",
                                           kWeatherTool, Thinking());
  const auto call = [](const std::string& params) {
    return "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n" + params +
           "\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
  };
  const std::string history =
      "<｜User｜>weather in Paris and Rome?<｜Assistant｜><think>r1</think>" +
      call("<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>") + kEos +
      "<｜User｜><tool_result>sunny</tool_result><｜Assistant｜><think>r2</think>" +
      call("<｜DSML｜parameter name=\"city\" string=\"true\">Rome</｜DSML｜parameter>\n"
           "<｜DSML｜parameter name=\"days\" string=\"false\">2</｜DSML｜parameter>") +
      kEos + "<｜User｜><tool_result>rain</tool_result><｜Assistant｜><think>r3</think>Paris sunny, Rome rain." + kEos +
      "<｜User｜>thanks<｜Assistant｜><think>";
  ASSERT_GE(prompt.size(), history.size());
  EXPECT_EQ(prompt.substr(prompt.size() - history.size()), history);
  EXPECT_EQ(prompt.substr(0, kBos.size() + 10), kBos + "\n\n## Tools");
}

TEST(ChatEncoding, ToolResultsWithUnknownIdsSortFirstAndOddContentIsRendered) {
  const std::string prompt = Encode(R"([{"role": "user", "content": "go"},
      {"role": "assistant", "content": "", "tool_calls": [
        {"id": "a", "function": {"name": "f", "arguments": {}}}, {"id": "b", "function": {"name": "g", "arguments": {}}}]},
      {"role": "tool", "tool_call_id": "b", "content": [{"type": "text", "text": "B"}, {"type": "image_url"}]},
      {"role": "tool", "tool_call_id": "zzz", "content": {"k": [1, "杭州"]}},
      {"role": "tool", "tool_call_id": "a", "content": null}])");
  const std::string tail = kEos + "<｜User｜><tool_result>{\"k\": [1, \"杭州\"]}</tool_result>\n\n<tool_result></tool_result>"
                                  "\n\n<tool_result>B\n\n[Unsupported image_url]</tool_result><｜Assistant｜></think>";
  ASSERT_GE(prompt.size(), tail.size());
  EXPECT_EQ(prompt.substr(prompt.size() - tail.size()), tail);
}

TEST(ChatEncoding, DeveloperTurnCarriesToolsAndResponseFormat) {
  const std::string prompt = Encode(std::string(R"([{"role": "developer", "content": "D", "tools": )") + kWeatherTool +
                                    R"(, "response_format": {"type": "json_object"}}])");
  const std::string head = kBos + "<｜User｜>D\n\n## Tools\n\n";
  ASSERT_GE(prompt.size(), head.size());
  EXPECT_EQ(prompt.substr(0, head.size()), head);
  const std::string tail = "tool calls.\n\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to "
                           "reply:\n{\"type\": \"json_object\"}<｜Assistant｜></think>";
  ASSERT_GE(prompt.size(), tail.size());
  EXPECT_EQ(prompt.substr(prompt.size() - tail.size()), tail);
}

TEST(ChatEncoding, EffortPrefixComesBeforeSystemTextAndTools) {
  ChatEncodeOptions options = Thinking();
  options.reasoning_effort = "max";
  const std::string prompt = EncodeRequest(R"([{"role": "user", "content": "q"}])", kWeatherTool, options);
  const std::string b_start = "Reasoning Effort: Beyond maximum \u2014 exhaustive";
  EXPECT_EQ(prompt.substr(0, kBos.size() + b_start.size()), kBos + b_start);
  EXPECT_NE(prompt.find("undiscovered.\n\n\n\n## Tools\n\n"), std::string::npos);  // empty system text, then tools
  EXPECT_EQ(prompt.substr(prompt.size() - std::string("<｜User｜>q<｜Assistant｜><think>").size()),
            "<｜User｜>q<｜Assistant｜><think>");
  // The effort is a thinking-mode prompt only, also with tools.
  options.thinking = false;
  EXPECT_EQ(EncodeRequest(R"([{"role": "user", "content": "q"}])", kWeatherTool, options).find("Reasoning Effort"),
            std::string::npos);
}

TEST(ChatEncoding, PromptTokensStartWithOneBos) {
  TANDEM_REQUIRE_V4_TOKENIZER(tokenizer);
  const auto ids = tokenizer->Encode(Encode(R"([{"role": "user", "content": "Hello"}])"));
  ASSERT_GE(ids.size(), 2u);
  EXPECT_EQ(ids[0], 0);
  EXPECT_EQ(ids[1], 128803);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 0), 1);
  EXPECT_NE(std::find(ids.begin(), ids.end(), 128804), ids.end());
  EXPECT_EQ(ids.back(), 128822);
}

TEST(PythonJson, MatchesJsonDumps) {
  EXPECT_EQ(PythonJsonDumps(Json::parse(R"({"b": 1, "a": [1.0, 0.5, -0.0, 1e-05, 1e15, 1e16, 123456789012345678.0]})")),
            R"({"b": 1, "a": [1.0, 0.5, -0.0, 1e-05, 1000000000000000.0, 1e+16, 1.2345678901234568e+17]})");
  EXPECT_EQ(PythonJsonDumps(Json("tab\t nl\n \x01 \"q\" \\ é 中")), "\"tab\\t nl\\n \\u0001 \\\"q\\\" \\\\ é 中\"");
  EXPECT_EQ(PythonJsonDumps(Json::parse("[]")), "[]");
  EXPECT_EQ(PythonJsonDumps(Json::parse("{}")), "{}");
  EXPECT_EQ(PythonFloatRepr(0.0001), "0.0001");
  EXPECT_EQ(PythonFloatRepr(1.5e-7), "1.5e-07");
  EXPECT_EQ(PythonFloatRepr(12345.678), "12345.678");
}

}  // namespace
}  // namespace tandem::text
