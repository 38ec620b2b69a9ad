// Any bytes as the body of POST /v1/chat/completions or /v1/completions: the router's request parser
// (services/router/api.cc, ParseRequestBody) never throws or crashes, every refusal is a 4xx with an
// OpenAI error object, and every accepted request fits the vocabulary, the context and the length limit.
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "services/router/api.h"
#include "tests/fuzz/text/fuzz_common.h"

namespace {

using namespace tandem;
using tandem::text::fuzz::Fail;

constexpr int64_t kContext = 4096;
constexpr int64_t kNewTokensLimit = 1024;

const router::ServingContext& Context() {
  static const router::ServingContext context = [] {
    router::ServingContext c;
    c.tokenizer = &text::fuzz::V4Tokenizer();
    c.model_name = "tiny";
    c.max_context_tokens = kContext;
    c.max_new_tokens_limit = kNewTokensLimit;
    return c;
  }();
  return context;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  // data[0] & 1: the completions endpoint, else chat; the rest is the body.
  const bool chat = (data[0] & 1) == 0;
  const std::string_view body(reinterpret_cast<const char*>(data) + 1, size - 1);
  const router::ServingContext& context = Context();
  const absl::StatusOr<router::Job> job = router::ParseRequestBody(body, chat, context);
  if (!job.ok()) {
    const int http = router::HttpStatusOf(job.status());
    if (http != 400 && http != 404) Fail("a refused request is not a 400 or 404");
    const router::Json error = router::ErrorBody(job.status());
    if (error["error"]["message"].get<std::string>().empty()) Fail("an error without a message");
    (void)error.dump(-1, ' ', false, router::Json::error_handler_t::replace);
    return 0;
  }
  const auto& request = job->request;
  const auto vocab = static_cast<int64_t>(context.tokenizer->vocab_size());
  if (request.input_ids_size() == 0) Fail("an accepted request with an empty prompt");
  for (const int32_t id : request.input_ids()) {
    if (id < 0 || id >= vocab) Fail("an accepted prompt id outside the vocabulary");
  }
  for (const int32_t id : request.sampling().stop_token_ids()) {
    if (id < 0 || id >= vocab) Fail("an accepted stop id outside the vocabulary");
  }
  const int64_t max_new = request.sampling().max_new_tokens();
  if (max_new < 1 || max_new > kNewTokensLimit) Fail("max_new_tokens outside [1, limit]");
  if (request.input_ids_size() + max_new > kContext) Fail("prompt + max_new_tokens exceeds the context");
  if (job->chat != chat) Fail("the job's endpoint is not the one asked");
  return 0;
}
