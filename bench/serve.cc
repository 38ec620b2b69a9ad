// tandem-bench serve: a token-level load generator against a running engine (tandem-decode
// --mode mixed): a closed-loop sweep over concurrency levels, printed and written to DIR/serve.csv
// and DIR/serve.png.
#include <fmt/format.h>
#include <grpcpp/grpcpp.h>

#include <filesystem>
#include <iostream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/commands.h"
#include "bench/report.h"
#include "bench/serve_load.h"
#include "bench/serve_stats.h"

namespace tandem::bench {
namespace {

namespace fs = std::filesystem;

struct ServeArgs {
  std::string target = "localhost:30002";
  std::string concurrency = "1,4,16,64";
  int64_t requests = 64;
  double duration_s = 0;
  std::string prompt_len = "32..512";
  std::string prompt_dist = "uniform";
  int64_t max_new_tokens = 32;
  bool ignore_eos = false;
  uint64_t seed = 1;
  int warmup = 1;
  double request_timeout_s = 300;
  std::string out_dir = "bench/out";
  bool plot = true;
};

absl::StatusOr<std::vector<int>> ParseConcurrency(const std::string& text) {
  std::vector<int> levels;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    int level = 0;
    if (!absl::SimpleAtoi(part, &level) || level < 1 || level > 1024) {
      return absl::InvalidArgumentError(
          fmt::format("--concurrency wants integers in [1, 1024] separated by commas, got \"{}\"", text));
    }
    levels.push_back(level);
  }
  if (levels.empty()) return absl::InvalidArgumentError("--concurrency must not be empty");
  return levels;
}

// Model facts the prompts need, with a message that says what to check when the engine is not there.
absl::StatusOr<v1::GetModelInfoResponse> FetchModelInfo(v1::Engine::Stub& stub, const std::string& target) {
  grpc::ClientContext context;
  context.set_wait_for_ready(true);
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::GetModelInfoResponse info;
  const grpc::Status status = stub.GetModelInfo(&context, v1::GetModelInfoRequest{}, &info);
  if (!status.ok()) {
    return absl::UnavailableError(fmt::format("GetModelInfo on {} failed ({}); is tandem-decode --mode mixed serving there?",
                                              target, status.error_message()));
  }
  return info;
}

int RunServe(const ServeArgs& args) {
  auto levels = ParseConcurrency(args.concurrency);
  auto lengths = ParsePromptLengths(args.prompt_len, args.prompt_dist);
  for (const absl::Status& status : {levels.status(), lengths.status()}) {
    if (!status.ok()) {
      std::cerr << "tandem-bench: " << status.message() << "\n";
      return 2;
    }
  }
  std::error_code ec;
  fs::create_directories(args.out_dir, ec);
  if (ec) {
    std::cerr << "tandem-bench: cannot create " << args.out_dir << ": " << ec.message() << "\n";
    return 1;
  }

  auto channel = grpc::CreateChannel(args.target, grpc::InsecureChannelCredentials());
  auto stub = v1::Engine::NewStub(channel);
  auto info = FetchModelInfo(*stub, args.target);
  if (!info.ok()) {
    std::cerr << "tandem-bench: " << info.status().message() << "\n";
    return 1;
  }
  if (info->vocab_size() <= 2) {
    std::cerr << "tandem-bench: the engine reports vocab_size " << info->vocab_size() << "; prompts need ids in [2, vocab)\n";
    return 1;
  }
  if (info->max_new_tokens_limit() > 0 && args.max_new_tokens > info->max_new_tokens_limit()) {
    std::cerr << fmt::format("tandem-bench: --max-new-tokens {} is over the engine's limit {}\n", args.max_new_tokens,
                             info->max_new_tokens_limit());
    return 2;
  }
  if (info->max_context_tokens() > 0 && lengths->max + args.max_new_tokens > info->max_context_tokens()) {
    std::cerr << fmt::format("tandem-bench: the longest prompt ({}) plus --max-new-tokens ({}) is over the engine's {} context tokens\n",
                             lengths->max, args.max_new_tokens, info->max_context_tokens());
    return 2;
  }

  LoadSpec spec;
  spec.requests = args.requests;
  spec.duration_s = args.duration_s;
  spec.prompt_lengths = *lengths;
  spec.vocab_size = info->vocab_size();
  spec.max_new_tokens = args.max_new_tokens;
  spec.ignore_eos = args.ignore_eos;
  spec.seed = args.seed;
  spec.request_timeout_s = args.request_timeout_s;

  std::cout << fmt::format("tandem-bench serve: {} ({}, vocab {}, max {} running), prompts {} {}, {} new tokens{}, temperature 0\n",
                           args.target, info->served_model_name(), info->vocab_size(), info->max_running_requests(),
                           args.prompt_len, args.prompt_dist, args.max_new_tokens, args.ignore_eos ? " (ignore_eos)" : "");
  std::cout << (args.duration_s > 0 ? fmt::format("closed loop, {} s per level", args.duration_s)
                                    : fmt::format("closed loop, {} requests per level", args.requests));
  std::cout << fmt::format(", {} warm-up request{} first (not counted)\n", args.warmup, args.warmup == 1 ? "" : "s");
  for (int i = 0; i < args.warmup; ++i) {
    // Level -1: warm-up prompts never repeat a measured one, so they leave nothing in the prefix cache to hit.
    const RequestRecord warm = SendOne(*stub, spec, -1, i);
    if (!warm.error.empty()) {
      std::cerr << "tandem-bench: the warm-up request failed: " << warm.error << "\n";
      return 1;
    }
  }

  std::cout << "\n";
  PrintServeHeader(std::cout);
  std::vector<LevelStats> results;
  int64_t errors = 0;
  for (size_t l = 0; l < levels->size(); ++l) {
    const int concurrency = (*levels)[l];
    if (args.duration_s <= 0 && args.requests < concurrency) {
      std::cout << fmt::format("      note: {} requests cannot keep {} streams in flight\n", args.requests, concurrency);
    }
    LevelStats stats = Summarize(RunLevel(*stub, spec, concurrency, static_cast<int>(l)));
    PrintServeRow(std::cout, stats);
    errors += stats.errors;
    results.push_back(std::move(stats));
  }

  const std::string csv = (fs::path(args.out_dir) / "serve.csv").string();
  const std::string png = (fs::path(args.out_dir) / "serve.png").string();
  if (!WriteServeCsv(csv, results)) {
    std::cerr << "tandem-bench: cannot write " << csv << "\n";
    return 1;
  }
  std::cout << "\nTTFT: call to first token; ITL: gap between chunks / tokens in the chunk; both client side.\n"
            << "wrote " << csv << "\n";
  if (args.plot && RunPlotScript(TANDEM_BENCH_SERVE_PLOT_SCRIPT, csv, png)) std::cout << "wrote " << png << "\n";
  if (errors > 0) {
    std::cerr << fmt::format("tandem-bench: {} requests failed (see the error lines and the errors column)\n", errors);
    return 1;
  }
  return 0;
}

}  // namespace

void AddServeCommand(CLI::App& app, int& exit_code) {
  auto args = std::make_shared<ServeArgs>();
  auto* cmd = app.add_subcommand("serve", "closed-loop gRPC load against a running engine, swept over concurrency");
  cmd->add_option("--target", args->target, "engine gRPC address host:port")->capture_default_str();
  cmd->add_option("--concurrency", args->concurrency, "comma-separated in-flight stream counts, one level each")
      ->capture_default_str();
  auto* requests = cmd->add_option("--requests", args->requests, "requests per level")
                       ->check(CLI::PositiveNumber)
                       ->capture_default_str();
  cmd->add_option("--duration", args->duration_s, "seconds per level instead of a request count")
      ->check(CLI::PositiveNumber)
      ->excludes(requests);
  cmd->add_option("--prompt-len", args->prompt_len, "prompt tokens: N or A..B")->capture_default_str();
  cmd->add_option("--prompt-dist", args->prompt_dist, "how A..B is drawn: uniform or log-uniform")
      ->check(CLI::IsMember({"uniform", "log-uniform"}))
      ->capture_default_str();
  cmd->add_option("--max-new-tokens", args->max_new_tokens, "tokens to generate per request")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_flag("--ignore-eos", args->ignore_eos, "generate exactly --max-new-tokens (sampling.ignore_eos)");
  cmd->add_option("--seed", args->seed, "seed of the prompts (and of sampling)")->capture_default_str();
  cmd->add_option("--warmup", args->warmup, "requests sent and not counted before the sweep")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd->add_option("--request-timeout", args->request_timeout_s, "seconds before a request counts as DEADLINE_EXCEEDED")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--out", args->out_dir, "directory for serve.csv and serve.png")->capture_default_str();
  cmd->add_flag("!--no-plot", args->plot, "write the CSV only");
  cmd->callback([args, &exit_code] { exit_code = RunServe(*args); });
}

}  // namespace tandem::bench
