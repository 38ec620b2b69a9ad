#include <cstdlib>
#include <deque>
#include <random>
#include <string>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <httplib.h>

#include "absl/strings/match.h"
#include "services/router/grpc_front.h"
#include "services/router/http_front.h"
#include "services/router/policy.h"
#include "services/router/router.h"
#include "services/router/session.h"

namespace tandem::router {
namespace {

std::string ModelDir() {
  const char* models = std::getenv("TANDEM_TEST_MODELS");
  return std::string(models != nullptr ? models : "build/test-models") + "/tiny";
}

// --- breaker, addresses -------------------------------------------------------------------------

TEST(CircuitBreaker, OpensAfterThresholdProbesAndCloses) {
  CircuitBreaker breaker({.failure_threshold = 2, .open_seconds = 0.05, .success_threshold = 1});
  EXPECT_TRUE(breaker.Allow());
  breaker.RecordFailure();
  EXPECT_EQ(breaker.state(), CircuitBreaker::State::kClosed);
  breaker.RecordFailure();
  EXPECT_EQ(breaker.state(), CircuitBreaker::State::kOpen);
  EXPECT_FALSE(breaker.Allow());
  std::this_thread::sleep_for(std::chrono::milliseconds(60));
  EXPECT_TRUE(breaker.Allow());   // the one probe
  EXPECT_FALSE(breaker.Allow());  // only one at a time
  EXPECT_EQ(breaker.state(), CircuitBreaker::State::kHalfOpen);
  breaker.RecordFailure();
  EXPECT_EQ(breaker.state(), CircuitBreaker::State::kOpen);
  std::this_thread::sleep_for(std::chrono::milliseconds(60));
  EXPECT_TRUE(breaker.Allow());
  breaker.RecordSuccess();
  EXPECT_EQ(breaker.state(), CircuitBreaker::State::kClosed);
  EXPECT_EQ(breaker.transitions(), 5u);
}

TEST(WorkerAddress, ParsesAndRejects) {
  auto prefill = ParseWorkerAddress(WorkerRole::kPrefill, "10.0.0.1:30001,9000");
  ASSERT_TRUE(prefill.ok());
  EXPECT_EQ(prefill->host, "10.0.0.1");
  EXPECT_EQ(prefill->port, 30001);
  EXPECT_EQ(prefill->bootstrap_port, 9000);
  EXPECT_EQ(ParseWorkerAddress(WorkerRole::kPrefill, "h:1")->bootstrap_port, 8998);
  EXPECT_FALSE(ParseWorkerAddress(WorkerRole::kDecode, "h:1,2").ok());
  EXPECT_FALSE(ParseWorkerAddress(WorkerRole::kMixed, "nohost").ok());
  EXPECT_FALSE(ParseWorkerAddress(WorkerRole::kMixed, "h:99999").ok());
  EXPECT_FALSE(ParseWorkerAddress(WorkerRole::kPrefill, "h:1,x").ok());
}

TEST(WorkerFile, ParsesRolesAndComments) {
  auto workers = ParseWorkerFile("# fleet\nprefill 10.0.0.1:30001,9000\n\n  decode 10.0.0.2:30002\nmixed h:1  # not a comment here\n");
  EXPECT_FALSE(workers.ok());  // three fields on the last line
  workers = ParseWorkerFile("# fleet\nprefill 10.0.0.1:30001,9000\n\n  decode\t10.0.0.2:30002\nmixed h:1\n");
  ASSERT_TRUE(workers.ok()) << workers.status();
  ASSERT_EQ(workers->size(), 3u);
  EXPECT_EQ((*workers)[0].bootstrap_port, 9000);
  EXPECT_EQ((*workers)[1].role, WorkerRole::kDecode);
  EXPECT_FALSE(ParseWorkerFile("gpu h:1\n").ok());
  EXPECT_FALSE(ParseWorkerFile("decode h:x\n").ok());
}

TEST(WorkerRegistry, ReloadKeepsAddsAndRetires) {
  WorkerRegistry registry({WorkerAddress{WorkerRole::kMixed, "127.0.0.1", 1}, WorkerAddress{WorkerRole::kMixed, "127.0.0.1", 2}}, {}, {});
  Worker* kept = registry.Workers(WorkerRole::kMixed)[0];
  kept->AddInFlight(3);
  registry.Reload({WorkerAddress{WorkerRole::kMixed, "127.0.0.1", 1}, WorkerAddress{WorkerRole::kDecode, "127.0.0.1", 3}});
  ASSERT_EQ(registry.all().size(), 2u);
  EXPECT_EQ(registry.Workers(WorkerRole::kMixed)[0], kept);  // same object, its state kept
  EXPECT_EQ(kept->in_flight(), 3);
  EXPECT_EQ(registry.Workers(WorkerRole::kDecode).size(), 1u);
  EXPECT_FALSE(registry.Ready());  // new workers start unhealthy
}

// --- policies -----------------------------------------------------------------------------------

std::vector<std::unique_ptr<Worker>> Fleet(int n) {
  std::vector<std::unique_ptr<Worker>> out;
  for (int i = 0; i < n; ++i) out.push_back(std::make_unique<Worker>(WorkerAddress{WorkerRole::kMixed, "127.0.0.1", 1 + i}, BreakerOptions{}));
  return out;
}

std::vector<Worker*> Pointers(const std::vector<std::unique_ptr<Worker>>& fleet) {
  std::vector<Worker*> out;
  for (const auto& w : fleet) out.push_back(w.get());
  return out;
}

TEST(Policy, RoundRobinCycles) {
  auto fleet = Fleet(3);
  auto policy = *MakePolicy("round_robin");
  std::vector<size_t> picks;
  for (int i = 0; i < 6; ++i) picks.push_back(policy->Select(Pointers(fleet), {1, 2, 3}));
  EXPECT_THAT(picks, ::testing::ElementsAre(0, 1, 2, 0, 1, 2));
  EXPECT_FALSE(MakePolicy("random").ok());
}

// Requests arrive and never finish: a fair policy keeps every worker within a small margin, so no
// worker idles while another has 4 or more queued (pd-disaggregation.md §6 row 12).
void ExpectBalanced(const std::string& name, bool same_prefix) {
  auto fleet = Fleet(4);
  auto policy = *MakePolicy(name);
  std::vector<int32_t> prompt(256);
  for (int i = 0; i < 200; ++i) {
    for (size_t k = 0; k < prompt.size(); ++k) prompt[k] = static_cast<int32_t>(same_prefix ? k : k * 7 + static_cast<size_t>(i) * 13);
    const size_t pick = policy->Select(Pointers(fleet), prompt);
    fleet[pick]->AddInFlight(1);
    int64_t lowest = 1 << 30, highest = 0;
    for (const auto& w : fleet) {
      lowest = std::min(lowest, w->in_flight());
      highest = std::max(highest, w->in_flight());
    }
    ASSERT_FALSE(lowest == 0 && highest >= 4) << name << " after " << i;
    ASSERT_LE(highest - lowest, 3) << name << " after " << i;
    // Now and then one request finishes somewhere.
    if (i % 3 == 0) fleet[static_cast<size_t>(i / 3) % 4]->AddInFlight(fleet[static_cast<size_t>(i / 3) % 4]->in_flight() > 0 ? -1 : 0);
  }
}

TEST(Policy, LeastLoadAndCacheAwareNeverPileUp) {
  ExpectBalanced("least_load", false);
  ExpectBalanced("least_load", true);
  ExpectBalanced("cache_aware", false);
  ExpectBalanced("cache_aware", true);
}

TEST(Policy, CacheAwareKeepsAPrefixOnItsWorkerWhileBalanced) {
  auto fleet = Fleet(3);
  auto policy = *MakePolicy("cache_aware");
  std::vector<int32_t> a(64, 5), b(64, 9);
  const size_t first = policy->Select(Pointers(fleet), a);
  const size_t other = policy->Select(Pointers(fleet), b);
  EXPECT_NE(first, other);  // an unseen prefix goes to the least loaded, rotating
  // No load at all: the same prefix goes back where it was sent.
  for (int i = 0; i < 5; ++i) EXPECT_EQ(policy->Select(Pointers(fleet), a), first);
  EXPECT_EQ(PrefixBlockHashes(a, 16).size(), 4u);
}

// --- the text pipeline over a scripted engine ---------------------------------------------------

class ScriptedStream final : public TokenStream {
 public:
  ScriptedStream(std::vector<int32_t> tokens, v1::FinishReason reason, int prompt, std::atomic<int>* cancels)
      : tokens_(tokens.begin(), tokens.end()), reason_(reason), prompt_(prompt), cancels_(cancels) {}
  absl::Status Next(StreamEvent& event) override {
    if (!tokens_.empty()) {
      event.kind = StreamEvent::Kind::kChunk;
      event.chunk = v1::GenerateChunk();
      event.chunk.add_token_ids(tokens_.front());
      auto* lp = event.chunk.add_logprobs();
      lp->set_token_id(tokens_.front());
      lp->set_logprob(-0.5f);
      tokens_.pop_front();
      ++sent_;
      event.chunk.set_prompt_tokens(prompt_);
      event.chunk.set_completion_tokens(sent_);
      return absl::OkStatus();
    }
    event.kind = StreamEvent::Kind::kEnd;
    event.complete = v1::GenerateComplete();
    event.complete.set_finish_reason(reason_);
    event.complete.set_prompt_tokens(prompt_);
    event.complete.set_completion_tokens(sent_);
    if (reason_ == v1::FINISH_REASON_STOP) event.complete.set_matched_stop_token_id(1);
    return absl::OkStatus();
  }
  void Cancel() override { cancels_->fetch_add(1); }

 private:
  std::deque<int32_t> tokens_;
  v1::FinishReason reason_;
  int prompt_;
  int sent_ = 0;
  std::atomic<int>* cancels_;
};

// The engine "generates" the tokens of a fixed text.
class ScriptedGenerator final : public Generator {
 public:
  explicit ScriptedGenerator(const text::Tokenizer& tokenizer) : tokenizer_(tokenizer) {}
  std::unique_ptr<TokenStream> Open(const v1::GenerateRequest& request) override {
    last_request = request;
    std::vector<int32_t> tokens = tokenizer_.Encode(script);
    if (static_cast<int64_t>(tokens.size()) > request.sampling().max_new_tokens()) {
      tokens.resize(static_cast<size_t>(request.sampling().max_new_tokens()));
      return std::make_unique<ScriptedStream>(tokens, v1::FINISH_REASON_LENGTH, request.input_ids_size(), &cancels);
    }
    return std::make_unique<ScriptedStream>(tokens, v1::FINISH_REASON_STOP, request.input_ids_size(), &cancels);
  }
  std::string script;
  v1::GenerateRequest last_request;
  std::atomic<int> cancels{0};

 private:
  const text::Tokenizer& tokenizer_;
};

class FrontTest : public ::testing::Test {
 protected:
  void SetUp() override {
    RouterOptions options;
    options.model_dir = ModelDir();
    options.mixed = {"127.0.0.1:1"};  // never contacted: the scripted generator answers
    auto state = MakeRouterState(options);
    ASSERT_TRUE(state.ok()) << state.status();
    state_ = std::move(*state);
    generator_ = std::make_unique<ScriptedGenerator>(*state_->tokenizer);
    state_->generator = generator_.get();
    http_ = std::make_unique<HttpFront>(state_.get());
    ASSERT_TRUE(http_->Start("127.0.0.1", 0).ok());
    client_ = std::make_unique<httplib::Client>("127.0.0.1", http_->port());
  }
  void TearDown() override { http_->Stop(); }

  std::pair<int, Json> Post(const Json& body, const std::string& path = "/v1/chat/completions") {
    auto result = client_->Post(path.c_str(), body.dump(), "application/json");
    if (!result) return {0, Json()};
    return {result->status, Json::parse(result->body, nullptr, false)};
  }
  // The SSE events' JSON (without [DONE], which must come last).
  std::vector<Json> Stream(Json body) {
    body["stream"] = true;
    auto result = client_->Post("/v1/chat/completions", body.dump(), "application/json");
    EXPECT_TRUE(result);
    std::vector<Json> events;
    std::string text = result ? result->body : "";
    EXPECT_TRUE(text.ends_with("data: [DONE]\n\n")) << text;
    size_t at = 0;
    while ((at = text.find("data: ", at)) != std::string::npos) {
      const size_t end = text.find("\n\n", at);
      const std::string data = text.substr(at + 6, end - at - 6);
      if (data != "[DONE]") events.push_back(Json::parse(data));
      at = end;
    }
    return events;
  }

  static Json Tools() {
    return Json::parse(R"([{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"}}}}}])");
  }
  static std::string Call() {
    return "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
  }
  static Json Chat() { return Json::parse(R"({"model":"tiny","messages":[{"role":"user","content":"weather?"}]})"); }

  std::unique_ptr<RouterState> state_;
  std::unique_ptr<ScriptedGenerator> generator_;
  std::unique_ptr<HttpFront> http_;
  std::unique_ptr<httplib::Client> client_;
};

TEST_F(FrontTest, NonStreamingToolCallWithReasoning) {
  generator_->script = "Let me look it up.</think>" + Call();
  Json body = Chat();
  body["tools"] = Tools();
  body["chat_template_kwargs"] = {{"thinking", true}};
  auto [status, answer] = Post(body);
  ASSERT_EQ(status, 200) << answer.dump();
  const Json& choice = answer["choices"][0];
  EXPECT_EQ(choice["finish_reason"], "tool_calls");
  EXPECT_EQ(choice["message"]["reasoning_content"], "Let me look it up.");
  EXPECT_EQ(choice["message"]["content"], "");
  ASSERT_EQ(choice["message"]["tool_calls"].size(), 1u);
  const Json& call = choice["message"]["tool_calls"][0];
  EXPECT_THAT(call["id"].get<std::string>(), ::testing::StartsWith("call_"));
  EXPECT_EQ(call["type"], "function");
  EXPECT_EQ(call["function"]["name"], "get_weather");
  EXPECT_EQ(Json::parse(call["function"]["arguments"].get<std::string>()), Json::parse(R"({"city":"Paris"})"));
  // The prompt ended with <think> and the DSML markers were kept for the parser.
  EXPECT_TRUE(state_->tokenizer->Decode({generator_->last_request.input_ids().begin(), generator_->last_request.input_ids().end()})
                  .ends_with("<think>"));
}

TEST_F(FrontTest, StreamingChunkOrderForThinkingAndToolCall) {
  generator_->script = "Hmm.</think>Sure." + Call();
  Json body = Chat();
  body["tools"] = Tools();
  body["reasoning_effort"] = "max";
  body["stream_options"] = {{"include_usage", true}};
  const auto events = Stream(body);
  ASSERT_GE(events.size(), 6u);
  // role → reasoning* → content* → tool call head → argument diffs* → finish → usage
  EXPECT_EQ(events[0]["choices"][0]["delta"], Json::parse(R"({"role":"assistant","content":""})"));
  enum Phase { kRole, kReasoning, kContent, kToolHead, kArguments, kFinish, kUsage };
  int phase = kRole;
  std::string reasoning, content, arguments, call_id;
  for (size_t i = 1; i < events.size(); ++i) {
    const Json& e = events[i];
    EXPECT_EQ(e["object"], "chat.completion.chunk");
    if (e["choices"].empty()) {
      EXPECT_EQ(i, events.size() - 1);
      EXPECT_EQ(e["usage"]["completion_tokens"], e["usage"]["total_tokens"].get<int>() - e["usage"]["prompt_tokens"].get<int>());
      phase = kUsage;
      continue;
    }
    const Json& c = e["choices"][0];
    const Json& d = c["delta"];
    if (!c["finish_reason"].is_null()) {
      EXPECT_EQ(c["finish_reason"], "tool_calls");
      EXPECT_TRUE(d.empty());
      EXPECT_LT(phase, kFinish);
      phase = kFinish;
      continue;
    }
    if (d.contains("reasoning_content")) {
      EXPECT_LE(phase, kReasoning);
      phase = kReasoning;
      reasoning += d["reasoning_content"].get<std::string>();
    }
    if (d.contains("content")) {
      EXPECT_LE(phase, kContent);
      phase = kContent;
      content += d["content"].get<std::string>();
    }
    if (d.contains("tool_calls")) {
      for (const Json& call : d["tool_calls"]) {
        EXPECT_EQ(call["index"], 0);
        if (!call["function"]["name"].is_null()) {
          EXPECT_LT(phase, kToolHead);
          phase = kToolHead;
          EXPECT_EQ(call["function"]["name"], "get_weather");
          EXPECT_EQ(call["function"]["arguments"], "");
          call_id = call["id"].get<std::string>();
        } else {
          EXPECT_GE(phase, kToolHead);
          EXPECT_TRUE(call["id"].is_null());
          phase = kArguments;
          arguments += call["function"]["arguments"].get<std::string>();
        }
      }
    }
  }
  EXPECT_EQ(phase, kUsage);
  EXPECT_EQ(reasoning, "Hmm.");
  EXPECT_EQ(content, "Sure.");
  EXPECT_THAT(call_id, ::testing::StartsWith("call_"));
  EXPECT_EQ(Json::parse(arguments), Json::parse(R"({"city":"Paris"})"));
}

TEST_F(FrontTest, ToolChoiceNoneLeavesDsmlAsText) {
  generator_->script = "plain answer";
  Json body = Chat();
  body["tools"] = Tools();
  body["tool_choice"] = "none";
  auto [status, answer] = Post(body);
  ASSERT_EQ(status, 200);
  EXPECT_EQ(answer["choices"][0]["message"]["content"], "plain answer");
  EXPECT_TRUE(answer["choices"][0]["message"]["tool_calls"].is_null());
  EXPECT_EQ(answer["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(answer["choices"][0]["matched_stop"], 1);
}

TEST_F(FrontTest, StopStringCancelsTheEngineAndTrims) {
  generator_->script = "one two three four five";
  Json body = Chat();
  body["stop"] = "three";
  auto [status, answer] = Post(body);
  ASSERT_EQ(status, 200);
  EXPECT_EQ(answer["choices"][0]["message"]["content"], "one two ");
  EXPECT_EQ(answer["choices"][0]["matched_stop"], "three");
  EXPECT_GE(generator_->cancels.load(), 1);
  body["no_stop_trim"] = true;
  EXPECT_EQ(Post(body).second["choices"][0]["message"]["content"], "one two three");
}

TEST_F(FrontTest, LengthInsideReasoningLeavesContentEmpty) {
  generator_->script = "thinking about it for a long while";
  Json body = Chat();
  body["reasoning_effort"] = "high";
  body["max_tokens"] = 3;
  auto [status, answer] = Post(body);
  ASSERT_EQ(status, 200);
  EXPECT_EQ(answer["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(answer["choices"][0]["message"]["content"], "");
  EXPECT_FALSE(answer["choices"][0]["message"]["reasoning_content"].get<std::string>().empty());
  EXPECT_EQ(answer["usage"]["completion_tokens"], 3);
}

TEST_F(FrontTest, MaxCompletionTokensBeatsMaxTokensAndLogprobs) {
  generator_->script = "a b c d e f g h";
  Json body = Chat();
  body["max_tokens"] = 2;
  body["max_completion_tokens"] = 5;
  body["logprobs"] = true;
  auto [status, answer] = Post(body);
  ASSERT_EQ(status, 200);
  EXPECT_EQ(generator_->last_request.sampling().max_new_tokens(), 5);
  EXPECT_TRUE(generator_->last_request.return_logprobs());
  EXPECT_EQ(answer["choices"][0]["logprobs"]["content"].size(), 5u);
  EXPECT_FLOAT_EQ(answer["choices"][0]["logprobs"]["content"][0]["logprob"].get<float>(), -0.5f);
}

TEST_F(FrontTest, SamplingReachesTheEngineWithPresence) {
  generator_->script = "x";
  Json body = Chat();
  body["temperature"] = 0;
  body["top_k"] = 5;
  body["seed"] = 11;
  body["logit_bias"] = {{"42", -3.5}};
  ASSERT_EQ(Post(body).first, 200);
  const auto& s = generator_->last_request.sampling();
  EXPECT_TRUE(s.has_temperature());
  EXPECT_EQ(s.temperature(), 0);
  EXPECT_EQ(s.top_k(), 5);
  EXPECT_EQ(s.seed(), 11u);
  EXPECT_FALSE(s.has_top_p());
  ASSERT_EQ(s.logit_bias_size(), 1);
  EXPECT_EQ(s.logit_bias(0).token_id(), 42);
}

TEST(GrpcFront, ProtoRequestsBecomeTheOpenAiShape) {
  v1::ChatCompletionRequest request;
  request.set_model("tiny");
  auto* m = request.add_messages();
  m->set_role("user");
  m->set_content("hi");
  request.mutable_sampling()->set_max_tokens(4);
  request.mutable_sampling()->add_stop("END");
  auto* tool = request.add_tools();
  tool->set_name("f");
  tool->set_parameters_json(R"({"type":"object"})");
  request.set_tool_choice("f");
  request.set_reasoning_effort("max");
  request.set_thinking(true);
  const Json body = ChatRequestToJson(request);
  EXPECT_EQ(body["messages"][0]["content"], "hi");
  EXPECT_EQ(body["max_tokens"], 4);
  EXPECT_EQ(body["stop"], Json::array({"END"}));
  EXPECT_EQ(body["tools"][0]["function"]["parameters"]["type"], "object");
  EXPECT_EQ(body["tool_choice"]["function"]["name"], "f");
  EXPECT_EQ(body["chat_template_kwargs"]["thinking"], true);
  EXPECT_FALSE(body.contains("temperature"));
}

}  // namespace
}  // namespace tandem::router

namespace tandem::router {
namespace {

// Seeded mutations of valid bodies (byte flips, truncations, type swaps) through both parsers: every
// outcome is a Job or a 4xx error with a message, never a crash or a 5xx.
TEST(RequestParsing, MutatedBodiesGiveJobsOrClientErrors) {
  auto tokenizer = text::Tokenizer::Load(ModelDir());
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  ServingContext context;
  context.tokenizer = tokenizer->get();
  context.model_name = "tiny";
  context.max_context_tokens = 4096;
  context.max_new_tokens_limit = 1024;
  const std::vector<std::string> seeds = {
      R"({"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":4,"temperature":0.5,"stop":["a"],"stream":true,"stream_options":{"include_usage":true}})",
      R"({"messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"x"}]},{"role":"assistant","content":"","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},{"role":"tool","tool_call_id":"c","content":"r"}],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],"tool_choice":"auto","reasoning_effort":"max","logprobs":true,"top_logprobs":2})",
      R"({"prompt":[0,1,2,3],"max_tokens":3,"logprobs":2,"logit_bias":{"5":1.5},"seed":3})",
      R"({"prompt":"hello","stop":"x","top_k":3,"min_p":0.1,"chat_template_kwargs":{"thinking":true}})",
  };
  const std::vector<std::string> values = {"null", "true", "-1", "0", "1e309", "\"\"", "[]", "{}", "[1,\"a\"]", "9223372036854775807", "\"max\""};
  std::mt19937 random(12345);
  int jobs = 0, errors = 0;
  for (int round = 0; round < 3000; ++round) {
    std::string body = seeds[random() % seeds.size()];
    const int edits = 1 + static_cast<int>(random() % 3);
    for (int e = 0; e < edits && !body.empty(); ++e) {
      const size_t at = random() % body.size();
      switch (random() % 4) {
        case 0: body[at] = static_cast<char>(random() % 128); break;
        case 1: body.resize(at); break;
        case 2: {
          // Replace the value after some ':' with another JSON value (a type swap).
          const size_t colon = body.find(':', at);
          if (colon == std::string::npos) break;
          const size_t end = body.find_first_of(",}", colon + 1);
          body.replace(colon + 1, (end == std::string::npos ? body.size() : end) - colon - 1, values[random() % values.size()]);
          break;
        }
        default: body.insert(at, values[random() % values.size()]);
      }
    }
    const Json parsed = Json::parse(body, nullptr, false);
    if (parsed.is_discarded()) continue;  // the HTTP front answers those itself (invalid_json)
    for (bool chat : {true, false}) {
      auto job = chat ? ParseChatRequest(parsed, context) : ParseCompletionRequest(parsed, context);
      if (job.ok()) {
        ++jobs;
        EXPECT_GT(job->request.input_ids_size(), 0);
        EXPECT_GE(job->request.sampling().max_new_tokens(), 1);
        continue;
      }
      ++errors;
      const int status = HttpStatusOf(job.status());
      EXPECT_TRUE(status == 400 || status == 404) << status << " " << job.status() << " for " << body;
      const Json error = ErrorBody(job.status());
      EXPECT_FALSE(error["error"]["message"].get<std::string>().empty());
      // The safety net in the parsers should stay unused: each field is checked with a specific message.
      EXPECT_FALSE(absl::StrContains(job.status().message(), "malformed request")) << job.status() << " for " << body;
    }
  }
  EXPECT_GT(jobs, 50);
  EXPECT_GT(errors, 500);
}

}  // namespace
}  // namespace tandem::router
