// The client side of `tandem-bench serve`: seeded random prompts, and one closed-loop level of
// Generate streams against a running engine, each request timed from the client.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "tandem/v1/engine.grpc.pb.h"

namespace tandem::bench {

// Prompt lengths: uniform in [min, max], or log-uniform (more short prompts than long ones).
struct PromptLengths {
  int64_t min = 0;
  int64_t max = 0;
  bool log_uniform = false;
};

// "N" or "A..B" (1 <= A <= B), with `distribution` "uniform" or "log-uniform".
absl::StatusOr<PromptLengths> ParsePromptLengths(const std::string& text, const std::string& distribution);

// The prompt of request `index` at sweep level `level`: its length from `lengths`, its ids in
// [2, vocab_size). A pure function of its arguments, so threads and levels never change a prompt,
// and no two requests share a prefix the engine's prefix cache could reuse.
std::vector<int32_t> MakePrompt(uint64_t seed, int level, int64_t index, const PromptLengths& lengths, int64_t vocab_size);

// What one level sends: either `requests` requests, or as many as start before `duration_s` passes.
struct LoadSpec {
  int64_t requests = 0;
  double duration_s = 0;  // > 0: run for this long (requests in flight at the end still finish)
  PromptLengths prompt_lengths;
  int64_t vocab_size = 0;
  int64_t max_new_tokens = 0;
  bool ignore_eos = false;
  uint64_t seed = 0;
  double request_timeout_s = 300;
};

// One request, seen from the client. Times in seconds from the moment the call was made.
struct RequestRecord {
  int64_t index = -1;          // the request's index in its level (its prompt)
  int64_t prompt_tokens = 0;
  int64_t output_tokens = 0;   // token ids received in chunks
  double ttft_s = -1;          // first chunk with tokens; < 0: none came
  double e2e_s = 0;            // until the call's status arrived
  std::vector<double> itl_s;   // one per token after the first chunk's: the chunk gap / its tokens
  std::string error;           // empty: OK; else "CODE: message"
};

struct LevelRun {
  int concurrency = 0;
  double wall_s = 0;  // the level's first call to its last status
  std::vector<RequestRecord> records;
};

// Sends request `index` of `level` and times it (the engine, the router's HTTP or its gRPC API).
using SendFn = std::function<RequestRecord(int level, int64_t index)>;

// Runs one level closed-loop: `concurrency` threads, each sending its next request as soon as its
// previous one ends. `level` only seeds the prompts.
LevelRun RunLevel(const SendFn& send, const LoadSpec& spec, int concurrency, int level);

// The same level against several targets: each thread sends request i to every sender in turn (the
// first one rotating with i, so none always goes first), so the targets see the same requests under
// the same machine load. One LevelRun per sender, all with the level's wall time.
std::vector<LevelRun> RunLevelInterleaved(const std::vector<SendFn>& senders, const LoadSpec& spec, int concurrency, int level);

// One Generate stream against the engine.
RequestRecord SendOne(v1::Engine::Stub& stub, const LoadSpec& spec, int level, int64_t index);

}  // namespace tandem::bench
