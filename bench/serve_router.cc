#include "bench/serve_router.h"

#include <fmt/format.h>
#include <grpcpp/grpcpp.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <map>
#include <memory>

#include "absl/strings/numbers.h"
#include "absl/strings/match.h"

namespace tandem::bench {
namespace {

using Clock = std::chrono::steady_clock;
using Json = nlohmann::json;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// Chunk arrivals of one stream: TTFT at the first one with tokens, then one ITL value per token.
struct Timing {
  explicit Timing(RequestRecord& r) : record(r) {}
  void Tokens(int64_t count, Clock::time_point now) {
    if (count <= 0) return;
    if (!any) {
      record.ttft_s = Seconds(now - start);
    } else {
      record.itl_s.insert(record.itl_s.end(), static_cast<size_t>(count), Seconds(now - last) / static_cast<double>(count));
    }
    any = true;
    last = now;
  }
  RequestRecord& record;
  Clock::time_point start = Clock::now();
  Clock::time_point last = start;
  bool any = false;
};

httplib::Client& ThreadClient(const HttpTarget& target, double timeout_s) {
  thread_local std::map<std::pair<std::string, int>, std::unique_ptr<httplib::Client>> clients;
  auto& client = clients[{target.host, target.port}];
  if (!client) {
    client = std::make_unique<httplib::Client>(target.host, target.port);
    client->set_keep_alive(true);
    client->set_tcp_nodelay(true);
    const auto seconds = static_cast<time_t>(timeout_s);
    client->set_read_timeout(seconds, 0);
    client->set_write_timeout(seconds, 0);
  }
  return *client;
}

}  // namespace

absl::StatusOr<HttpTarget> ParseHttpUrl(const std::string& url) {
  std::string rest = url;
  if (absl::StartsWith(rest, "http://")) rest = rest.substr(7);
  else if (rest.find("://") != std::string::npos) return absl::InvalidArgumentError(fmt::format("--url {}: only http:// is supported", url));
  rest = rest.substr(0, rest.find('/'));
  const size_t colon = rest.rfind(':');
  HttpTarget target;
  if (colon == std::string::npos || colon == 0 || !absl::SimpleAtoi(rest.substr(colon + 1), &target.port) || target.port <= 0 ||
      target.port > 65535) {
    return absl::InvalidArgumentError(fmt::format("--url wants http://HOST:PORT (e.g. http://127.0.0.1:8000), got \"{}\"", url));
  }
  target.host = rest.substr(0, colon);
  return target;
}

RequestRecord SendOneHttp(const HttpTarget& target, const LoadSpec& spec, int level, int64_t index) {
  RequestRecord record;
  record.index = index;
  const std::vector<int32_t> prompt = MakePrompt(spec.seed, level, index, spec.prompt_lengths, spec.vocab_size);
  record.prompt_tokens = static_cast<int64_t>(prompt.size());
  Json body = {{"prompt", prompt},
               {"max_tokens", spec.max_new_tokens},
               {"temperature", 0},
               {"seed", spec.seed},
               {"stream", true},
               {"stream_options", {{"include_usage", true}, {"continuous_usage_stats", true}}}};
  if (spec.ignore_eos) body["ignore_eos"] = true;

  httplib::Request request;
  request.method = "POST";
  request.path = "/v1/completions";
  request.body = body.dump();
  request.set_header("Content-Type", "application/json");
  request.set_header("Accept", "text/event-stream");
  std::string buffer;
  Timing timing(record);
  int64_t seen_tokens = 0;
  bool done = false, finished = false;
  std::string stream_error;
  // Events arrive as "data: {...}\n\n", possibly split or joined across reads.
  request.content_receiver = [&](const char* data, size_t size, uint64_t, uint64_t) {
    const auto now = Clock::now();
    buffer.append(data, size);
    size_t end;
    while ((end = buffer.find("\n\n")) != std::string::npos) {
      std::string event = buffer.substr(0, end);
      buffer.erase(0, end + 2);
      if (!absl::StartsWith(event, "data: ")) continue;
      event.erase(0, 6);
      if (event == "[DONE]") {
        done = true;
        continue;
      }
      const Json chunk = Json::parse(event, nullptr, false);
      if (chunk.is_discarded()) {
        stream_error = "an SSE event that is not JSON";
        continue;
      }
      if (chunk.value("object", "") == "error") {
        stream_error = chunk.value("message", "error event");
        continue;
      }
      if (chunk.contains("usage") && chunk["usage"].is_object()) {
        const int64_t total = chunk["usage"].value("completion_tokens", int64_t{0});
        timing.Tokens(total - seen_tokens, now);
        seen_tokens = std::max(seen_tokens, total);
      }
      if (chunk.contains("choices") && !chunk["choices"].empty() && !chunk["choices"][0]["finish_reason"].is_null()) finished = true;
    }
    return true;
  };
  httplib::Response response;
  httplib::Error error = httplib::Error::Success;
  const bool sent = ThreadClient(target, spec.request_timeout_s).send(request, response, error);
  record.e2e_s = Seconds(Clock::now() - timing.start);
  record.output_tokens = seen_tokens;
  if (!sent) {
    record.error = fmt::format("HTTP: {}", httplib::to_string(error));
  } else if (response.status != 200) {
    record.error = fmt::format("HTTP {}", response.status);
  } else if (!stream_error.empty()) {
    record.error = fmt::format("stream error: {}", stream_error);
  } else if (!done || !finished) {
    record.error = "the stream ended without a finish_reason and [DONE]";
  }
  return record;
}

RequestRecord SendOneRouterGrpc(v1::Router::Stub& stub, const LoadSpec& spec, int level, int64_t index) {
  RequestRecord record;
  record.index = index;
  v1::CompletionRequest request;
  for (int32_t id : MakePrompt(spec.seed, level, index, spec.prompt_lengths, spec.vocab_size)) {
    request.mutable_prompt_ids()->add_ids(id);
  }
  record.prompt_tokens = request.prompt_ids().ids_size();
  auto* sampling = request.mutable_sampling();
  sampling->set_temperature(0);
  sampling->set_max_tokens(spec.max_new_tokens);
  sampling->set_seed(spec.seed);
  if (spec.ignore_eos) sampling->set_ignore_eos(true);

  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(spec.request_timeout_s * 1000)));
  Timing timing(record);
  auto reader = stub.Completion(&context, request);
  v1::CompletionChunk chunk;
  bool finished = false;
  while (reader->Read(&chunk)) {
    const auto now = Clock::now();
    if (!chunk.content().empty()) timing.Tokens(1, now);
    if (!chunk.finish_reason().empty()) {
      finished = true;
      record.output_tokens = chunk.usage().completion_tokens();
      // A one-token answer may carry its text on the finishing chunk only.
      if (record.ttft_s < 0 && record.output_tokens > 0) timing.Tokens(1, now);
    }
  }
  const grpc::Status status = reader->Finish();
  record.e2e_s = Seconds(Clock::now() - timing.start);
  // Text held back by the detokenizer (an unfinished UTF-8 sequence, a possible stop string) can come
  // as one more chunk than there were tokens; n tokens have at most n - 1 gaps.
  const auto gaps = static_cast<size_t>(std::max<int64_t>(record.output_tokens - 1, 0));
  if (record.itl_s.size() > gaps) record.itl_s.resize(gaps);
  if (!status.ok()) {
    record.error = fmt::format("gRPC {}: {}", static_cast<int>(status.error_code()), status.error_message());
  } else if (!finished) {
    record.error = "the stream ended OK without a finish_reason";
  }
  return record;
}

}  // namespace tandem::bench
