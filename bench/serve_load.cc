#include "bench/serve_load.h"

#include <fmt/format.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <optional>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "common/core/random.h"

namespace tandem::bench {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

const char* CodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "CANCELLED";
    case grpc::StatusCode::UNKNOWN: return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND: return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS: return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED: return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED: return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE: return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED: return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL: return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE: return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS: return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED: return "UNAUTHENTICATED";
    default: return "UNRECOGNIZED";
  }
}

// A different stream per (seed, level, index): SplitMix-style mixing of the three.
uint64_t PromptSeed(uint64_t seed, int level, int64_t index) {
  uint64_t h = seed * 0x9e3779b97f4a7c15ull;
  h ^= (static_cast<uint64_t>(level) + 1) * 0xbf58476d1ce4e5b9ull;
  h = (h ^ (h >> 31)) * 0x94d049bb133111ebull;
  h ^= static_cast<uint64_t>(index) + 0x632be59bd9b4e019ull;
  return h ^ (h >> 29);
}

v1::GenerateRequest BuildRequest(const LoadSpec& spec, int level, int64_t index) {
  v1::GenerateRequest request;
  for (int32_t id : MakePrompt(spec.seed, level, index, spec.prompt_lengths, spec.vocab_size)) request.add_input_ids(id);
  auto* sampling = request.mutable_sampling();
  sampling->set_temperature(0);
  sampling->set_max_new_tokens(spec.max_new_tokens);
  sampling->set_seed(spec.seed);
  if (spec.ignore_eos) sampling->set_ignore_eos(true);
  return request;
}

}  // namespace

absl::StatusOr<PromptLengths> ParsePromptLengths(const std::string& text, const std::string& distribution) {
  PromptLengths lengths;
  const std::vector<std::string> parts = absl::StrSplit(text, "..");
  bool parsed = false;
  if (parts.size() == 1) {
    parsed = absl::SimpleAtoi(parts[0], &lengths.min);
    lengths.max = lengths.min;
  } else if (parts.size() == 2) {
    parsed = absl::SimpleAtoi(parts[0], &lengths.min) && absl::SimpleAtoi(parts[1], &lengths.max);
  }
  if (!parsed || lengths.min < 1 || lengths.max < lengths.min) {
    return absl::InvalidArgumentError(
        fmt::format("--prompt-len wants N or A..B with 1 <= A <= B (e.g. 32..512), got \"{}\"", text));
  }
  if (distribution != "uniform" && distribution != "log-uniform") {
    return absl::InvalidArgumentError(fmt::format("--prompt-dist wants uniform or log-uniform, got \"{}\"", distribution));
  }
  lengths.log_uniform = distribution == "log-uniform";
  return lengths;
}

std::vector<int32_t> MakePrompt(uint64_t seed, int level, int64_t index, const PromptLengths& lengths, int64_t vocab_size) {
  Xoshiro256 rng(PromptSeed(seed, level, index));
  int64_t length = lengths.min;
  if (lengths.max > lengths.min) {
    const double u = rng.Uniform();
    const double span = static_cast<double>(lengths.max - lengths.min + 1);
    const double draw = lengths.log_uniform
                            ? std::exp(std::log(static_cast<double>(lengths.min)) +
                                       u * (std::log(static_cast<double>(lengths.max) + 1) - std::log(static_cast<double>(lengths.min))))
                            : static_cast<double>(lengths.min) + u * span;
    length = std::clamp(static_cast<int64_t>(draw), lengths.min, lengths.max);
  }
  // Ids 0 and 1 are left out: the DSV4 tokenizer keeps them for bos/eos.
  const uint64_t range = static_cast<uint64_t>(std::max<int64_t>(vocab_size - 2, 1));
  std::vector<int32_t> prompt(static_cast<size_t>(length));
  for (auto& id : prompt) id = static_cast<int32_t>(2 + rng.Next() % range);
  return prompt;
}

RequestRecord SendOne(v1::Engine::Stub& stub, const LoadSpec& spec, int level, int64_t index) {
  const v1::GenerateRequest request = BuildRequest(spec, level, index);
  RequestRecord record;
  record.index = index;
  record.prompt_tokens = request.input_ids_size();
  record.itl_s.reserve(static_cast<size_t>(spec.max_new_tokens));

  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(spec.request_timeout_s * 1000)));
  const auto start = Clock::now();
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader = stub.Generate(&context, request);
  v1::GenerateResponse response;
  std::optional<Clock::time_point> last_chunk;
  std::optional<v1::GenerateComplete> complete;
  while (reader->Read(&response)) {
    const auto now = Clock::now();
    if (response.has_complete()) {
      complete = response.complete();
      continue;
    }
    const int tokens = response.chunk().token_ids_size();
    if (tokens == 0) continue;
    if (!last_chunk) {
      record.ttft_s = Seconds(now - start);
    } else {
      // Tokens that arrive together share the gap: each is charged its part of it.
      record.itl_s.insert(record.itl_s.end(), static_cast<size_t>(tokens), Seconds(now - *last_chunk) / tokens);
    }
    last_chunk = now;
    record.output_tokens += tokens;
  }
  const grpc::Status status = reader->Finish();
  record.e2e_s = Seconds(Clock::now() - start);
  if (!status.ok()) {
    record.error = fmt::format("{}: {}", CodeName(status.error_code()), status.error_message());
  } else if (!complete) {
    record.error = "the stream ended OK without a complete message";
  } else if (complete->completion_tokens() != record.output_tokens) {
    record.error = fmt::format("received {} tokens but complete says {}", record.output_tokens, complete->completion_tokens());
  }
  return record;
}

LevelRun RunLevel(const SendFn& send, const LoadSpec& spec, int concurrency, int level) {
  LevelRun run;
  run.concurrency = concurrency;
  std::atomic<int64_t> next{0};
  std::vector<std::vector<RequestRecord>> per_thread(static_cast<size_t>(concurrency));
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(spec.duration_s));
  // One thread per stream: blocking reads keep the timing simple, and 64 threads are cheap.
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(concurrency));
  for (int t = 0; t < concurrency; ++t) {
    threads.emplace_back([&, t] {
      while (true) {
        if (spec.duration_s > 0 && Clock::now() >= deadline) return;
        const int64_t index = next.fetch_add(1);
        if (spec.duration_s <= 0 && index >= spec.requests) return;
        per_thread[static_cast<size_t>(t)].push_back(send(level, index));
      }
    });
  }
  for (auto& thread : threads) thread.join();
  run.wall_s = Seconds(Clock::now() - start);
  for (auto& records : per_thread) {
    for (auto& record : records) run.records.push_back(std::move(record));
  }
  return run;
}

std::vector<LevelRun> RunLevelInterleaved(const std::vector<SendFn>& senders, const LoadSpec& spec, int concurrency, int level) {
  const size_t n = senders.size();
  // records[t][a]: what thread t got from sender a.
  std::vector<std::vector<std::vector<RequestRecord>>> records(static_cast<size_t>(concurrency),
                                                                std::vector<std::vector<RequestRecord>>(n));
  std::atomic<int64_t> next{0};
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(spec.duration_s));
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(concurrency));
  for (int t = 0; t < concurrency; ++t) {
    threads.emplace_back([&, t] {
      while (true) {
        if (spec.duration_s > 0 && Clock::now() >= deadline) return;
        const int64_t index = next.fetch_add(1);
        if (spec.duration_s <= 0 && index >= spec.requests) return;
        for (size_t k = 0; k < n; ++k) {
          const size_t a = (static_cast<size_t>(index) + k) % n;
          records[static_cast<size_t>(t)][a].push_back(senders[a](level, index));
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  const double wall = Seconds(Clock::now() - start);
  std::vector<LevelRun> runs(n);
  for (size_t a = 0; a < n; ++a) {
    runs[a].concurrency = concurrency;
    runs[a].wall_s = wall;
    for (auto& per_thread : records) {
      for (auto& record : per_thread[a]) runs[a].records.push_back(std::move(record));
    }
  }
  return runs;
}

}  // namespace tandem::bench
