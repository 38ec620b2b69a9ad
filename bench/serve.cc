// tandem-bench serve: a load generator against a running engine (tandem-decode --mode mixed, token
// level over gRPC) or a router (its OpenAI HTTP API with SSE, or its gRPC API): a closed-loop sweep
// over concurrency levels, printed and written to DIR/serve.csv and DIR/serve.png.
#include <fmt/format.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <filesystem>
#include <iostream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "bench/commands.h"
#include "bench/report.h"
#include "bench/serve_load.h"
#include "bench/serve_router.h"
#include "bench/serve_stats.h"

namespace tandem::bench {
namespace {

namespace fs = std::filesystem;

struct ServeArgs {
  std::string api = "engine";
  std::string target = "localhost:30002";
  std::string url;
  std::string grpc_url;
  int64_t vocab_size = 129280;  // the router APIs: DSV4's vocabulary
  std::string requests_csv;
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

// "engine", "http", "grpc" or a comma-separated list of distinct ones (interleaved).
absl::StatusOr<std::vector<std::string>> ParseApis(const std::string& text) {
  std::vector<std::string> apis;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    const std::string api(part);
    if (api != "engine" && api != "http" && api != "grpc") {
      return absl::InvalidArgumentError(fmt::format("--api wants engine, http, grpc or a list of them, got \"{}\"", text));
    }
    if (std::find(apis.begin(), apis.end(), api) != apis.end()) {
      return absl::InvalidArgumentError(fmt::format("--api names {} twice", api));
    }
    apis.push_back(api);
  }
  if (apis.empty()) return absl::InvalidArgumentError("--api must not be empty");
  return apis;
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

  auto apis = ParseApis(args.api);
  if (!apis.ok()) {
    std::cerr << "tandem-bench: " << apis.status().message() << "\n";
    return 2;
  }
  const bool has_engine = std::find(apis->begin(), apis->end(), "engine") != apis->end();
  const bool has_http = std::find(apis->begin(), apis->end(), "http") != apis->end();
  const bool has_grpc = std::find(apis->begin(), apis->end(), "grpc") != apis->end();
  // --url names the router's HTTP front, or its gRPC front when that is the only router API asked for.
  const std::string grpc_url = !args.grpc_url.empty() ? args.grpc_url : (has_http ? "" : args.url);
  if ((has_http && args.url.empty()) || (has_grpc && grpc_url.empty())) {
    std::cerr << "tandem-bench: --api " << args.api << " needs "
              << (has_http && has_grpc ? "--url http://HOST:PORT and --grpc-url HOST:PORT"
                                       : has_http ? "--url http://HOST:PORT" : "--url HOST:PORT (the router's gRPC)")
              << "\n";
    return 2;
  }

  // The engine reports the vocabulary and limits; a router hides them behind its API.
  std::unique_ptr<v1::Engine::Stub> stub;
  std::unique_ptr<v1::Router::Stub> router_stub;
  HttpTarget http_target;
  v1::GetModelInfoResponse model;
  model.set_served_model_name("router");
  model.set_vocab_size(args.vocab_size);
  if (has_engine) {
    stub = v1::Engine::NewStub(grpc::CreateChannel(args.target, grpc::InsecureChannelCredentials()));
    auto info = FetchModelInfo(*stub, args.target);
    if (!info.ok()) {
      std::cerr << "tandem-bench: " << info.status().message() << "\n";
      return 1;
    }
    model = *info;
  }
  if (has_http) {
    auto parsed = ParseHttpUrl(args.url);
    if (!parsed.ok()) {
      std::cerr << "tandem-bench: " << parsed.status().message() << "\n";
      return 2;
    }
    http_target = *parsed;
  }
  if (has_grpc) router_stub = v1::Router::NewStub(grpc::CreateChannel(grpc_url, grpc::InsecureChannelCredentials()));
  const v1::GetModelInfoResponse* info = &model;
  if (info->vocab_size() <= 2) {
    std::cerr << "tandem-bench: the vocabulary size is " << info->vocab_size() << "; prompts need ids in [2, vocab)\n";
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

  std::vector<SendFn> senders;
  std::vector<std::string> where;
  for (const std::string& api : *apis) {
    if (api == "http") {
      senders.push_back([&](int level, int64_t index) { return SendOneHttp(http_target, spec, level, index); });
      where.push_back(fmt::format("http {}", args.url));
    } else if (api == "grpc") {
      senders.push_back([&](int level, int64_t index) { return SendOneRouterGrpc(*router_stub, spec, level, index); });
      where.push_back(fmt::format("grpc {}", grpc_url));
    } else {
      senders.push_back([&](int level, int64_t index) { return SendOne(*stub, spec, level, index); });
      where.push_back(fmt::format("engine {}", args.target));
    }
  }
  std::cout << fmt::format("tandem-bench serve: {} ({}, vocab {}, max {} running), prompts {} {}, {} new tokens{}, temperature 0\n",
                           absl::StrJoin(where, " | "), info->served_model_name(), info->vocab_size(), info->max_running_requests(),
                           args.prompt_len, args.prompt_dist, args.max_new_tokens, args.ignore_eos ? " (ignore_eos)" : "");
  std::cout << (args.duration_s > 0 ? fmt::format("closed loop, {} s per level", args.duration_s)
                                    : fmt::format("closed loop, {} requests per level", args.requests));
  if (senders.size() > 1) std::cout << ", each request sent to every API in turn (interleaved)";
  std::cout << fmt::format(", {} warm-up request{} first (not counted)\n", args.warmup, args.warmup == 1 ? "" : "s");
  for (size_t a = 0; a < senders.size(); ++a) {
    for (int i = 0; i < args.warmup; ++i) {
      // Level -1: warm-up prompts never repeat a measured one, so they leave nothing in the prefix cache to hit.
      const RequestRecord warm = senders[a](-1, i);
      if (!warm.error.empty()) {
        std::cerr << "tandem-bench: the warm-up request (" << (*apis)[a] << ") failed: " << warm.error << "\n";
        return 1;
      }
    }
  }

  // results[a][l]: API a at level l.
  std::vector<std::vector<LevelStats>> results(senders.size());
  std::vector<std::vector<LevelRun>> runs(senders.size());
  int64_t errors = 0;
  for (size_t l = 0; l < levels->size(); ++l) {
    const int concurrency = (*levels)[l];
    if (args.duration_s <= 0 && args.requests < concurrency) {
      std::cout << fmt::format("      note: {} requests cannot keep {} streams in flight\n", args.requests, concurrency);
    }
    std::vector<LevelRun> level_runs = senders.size() == 1
                                           ? std::vector<LevelRun>{RunLevel(senders[0], spec, concurrency, static_cast<int>(l))}
                                           : RunLevelInterleaved(senders, spec, concurrency, static_cast<int>(l));
    for (size_t a = 0; a < senders.size(); ++a) {
      results[a].push_back(Summarize(level_runs[a]));
      errors += results[a].back().errors;
      runs[a].push_back(std::move(level_runs[a]));
    }
  }
  for (size_t a = 0; a < senders.size(); ++a) {
    std::cout << "\n" << (senders.size() > 1 ? fmt::format("{}:\n", where[a]) : "");
    PrintServeHeader(std::cout);
    for (const LevelStats& stats : results[a]) PrintServeRow(std::cout, stats);
  }

  std::vector<std::string> written;
  for (size_t a = 0; a < senders.size(); ++a) {
    const std::string stem = senders.size() == 1 ? "serve" : fmt::format("serve-{}", (*apis)[a]);
    const std::string csv = (fs::path(args.out_dir) / (stem + ".csv")).string();
    const std::string png = (fs::path(args.out_dir) / (stem + ".png")).string();
    if (!WriteServeCsv(csv, results[a])) {
      std::cerr << "tandem-bench: cannot write " << csv << "\n";
      return 1;
    }
    written.push_back(csv);
    if (args.plot && RunPlotScript(TANDEM_BENCH_SERVE_PLOT_SCRIPT, csv, png)) written.push_back(png);
  }
  if (!args.requests_csv.empty()) {
    if (!WriteRequestsCsv(args.requests_csv, *apis, runs)) {
      std::cerr << "tandem-bench: cannot write " << args.requests_csv << "\n";
      return 1;
    }
    written.push_back(args.requests_csv);
  }
  std::cout << "\nTTFT: call to first token; ITL: gap between chunks / tokens in the chunk; both client side.\n";
  if (senders.size() > 1) {
    std::cout << "Interleaved: a level's wall time is shared by all APIs, so req/s and tok/s are per API over that shared time.\n";
  }
  for (const std::string& path : written) std::cout << "wrote " << path << "\n";
  if (errors > 0) {
    std::cerr << fmt::format("tandem-bench: {} requests failed (see the error lines and the errors column)\n", errors);
    return 1;
  }
  return 0;
}

}  // namespace

void AddServeCommand(CLI::App& app, int& exit_code) {
  auto args = std::make_shared<ServeArgs>();
  auto* cmd = app.add_subcommand("serve", "closed-loop load against a running engine or router, swept over concurrency");
  cmd->add_option("--api", args->api, "engine (token-level gRPC at --target), http (the router's OpenAI API at --url, SSE), "
                                      "grpc (the router's tandem.v1.Router at --url, or --grpc-url with http), or a comma list: "
                                      "each request is then sent to every one in turn")
      ->capture_default_str();
  cmd->add_option("--target", args->target, "engine gRPC address host:port (--api engine)")->capture_default_str();
  cmd->add_option("--url", args->url, "the router: http://HOST:PORT for --api http, HOST:PORT for --api grpc");
  cmd->add_option("--grpc-url", args->grpc_url, "the router's gRPC HOST:PORT when --api lists both http and grpc");
  cmd->add_option("--vocab-size", args->vocab_size, "prompt ids are drawn from [2, N) (router APIs; the engine reports its own)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--requests-csv", args->requests_csv, "also write one row per request (to pair runs request by request)");
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
