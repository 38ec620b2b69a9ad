// tandem-bench kernels: per-op CPU timings of the DSV4 forward at the tiny and exact V4-Flash shapes,
// printed as a table and written to DIR/kernels-cpu.csv and DIR/kernels-cpu.png.
#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <iostream>
#include <map>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/commands.h"
#include "bench/kernel_ops.h"
#include "bench/report.h"
#include "common/core/threads.h"
#include "common/kernels/kernels.h"
#include "common/model/generator.h"

namespace tandem::bench {
namespace {

namespace fs = std::filesystem;

struct KernelsArgs {
  std::string device = "cpu";
  std::string out_dir = "bench/out";
  std::string shapes = "tiny,flash-layer";
  std::string tokens = "1,16,128";
  std::string only;
  int threads = 0;
  int64_t context = 0;
  uint64_t seed = 1;
  bool plot = true;
  TimingOptions timing;
};

// Default request context for attention: 1024 tokens for tiny (its window, C128 and indexer all
// active), 4096 for the real shapes (the indexer selects 512 of 1024 compressed entries).
int64_t DefaultContext(const std::string& preset) { return preset == "tiny" ? 1024 : 4096; }

// A measured call: token count, seconds, FLOPs.
struct Point {
  int64_t tokens;
  double seconds;
  double flops;
};

// Predicted seconds per call at `m` (with `flops`) from the measured points of smaller M: affine
// through the last two; from one, its time plus the added FLOPs at its own rate but no slower than
// 2 GFLOP/s (so ops dominated by per-call work, like dequantizing expert weights, are not written off).
double Predict(const std::vector<Point>& points, int64_t m, double flops) {
  if (points.empty()) return 0;
  const Point& last = points.back();
  if (points.size() == 1) {
    if (flops <= 0 || last.flops <= 0) return last.seconds * static_cast<double>(m) / static_cast<double>(last.tokens);
    const double rate = std::max(last.flops / last.seconds, 2e9);
    return last.seconds + (flops - last.flops) / rate;
  }
  const Point& before = points[points.size() - 2];
  return last.seconds + (last.seconds - before.seconds) / static_cast<double>(last.tokens - before.tokens) *
                            static_cast<double>(m - last.tokens);
}

// Times every op of `suite` at every token count, printing a row per (op, mode) as it completes.
// A call over the limit is kept as its single run and larger M are skipped; so are M predicted to
// take over 1.5x the limit (3x when predicted from one point, the rougher guess).
std::vector<Result> RunSuite(const std::string& preset, KernelSuite& suite, const std::vector<int64_t>& tokens,
                             const KernelsArgs& args) {
  std::vector<Result> results;
  Table table(std::cout, tokens);
  table.Title(suite.Describe());
  std::string section;
  const double limit = args.timing.max_call_s;
  for (const BenchOp& op : suite.Ops()) {
    if (!args.only.empty() && op.op.find(args.only) == std::string::npos) continue;
    if (op.section != section) table.Section(section = op.section);
    std::vector<Result> cells;
    std::vector<Point> measured;
    bool over = false;
    for (size_t i = 0; i < tokens.size(); ++i) {
      const int64_t m = tokens[i];
      Result r{preset, op.section, op.op, op.mode, m};
      r.cost = op.cost(m);
      const double predicted = Predict(measured, m, r.cost.flops);
      if (!op.per_token && i > 0) {
        r.note = "same for all M";
      } else if (over) {
        r.note = fmt::format("skip: M={} >{:g}s", measured.back().tokens, limit);
      } else if (predicted > (measured.size() == 1 ? 3 : 1.5) * limit) {
        r.note = fmt::format("skip: ~{:.0f}s predicted", predicted);
      } else {
        const std::function<void()> call = op.prepare(m);
        kernels::SetDeterministic(op.deterministic);
        const Timing t = TimeCall(call, args.timing);
        kernels::SetDeterministic(false);
        r.measured = true;
        r.ms = t.seconds * 1e3;
        r.runs = t.runs;
        if (t.seconds > limit) {
          r.note = fmt::format("over {:g}s: 1 run", limit);
          over = true;
        }
        measured.push_back({m, t.seconds, r.cost.flops});
      }
      cells.push_back(r);
    }
    table.Row(cells);
    results.insert(results.end(), cells.begin(), cells.end());
  }
  return results;
}

// "label: M=1: 1.23x (12 ops)  M=16: ...": per token count, the geometric mean over ops of
// time(mode_a) / time(mode_b), over ops whose name contains `filter` measured in both modes.
std::string RatioLine(const std::vector<Result>& results, const std::string& label, const std::string& filter,
                      const std::string& mode_a, const std::string& mode_b, const std::vector<int64_t>& tokens) {
  std::map<std::pair<std::string, int64_t>, std::map<std::string, double>> ms;
  for (const auto& r : results) {
    if (r.measured && r.op.find(filter) != std::string::npos) ms[{r.op, r.tokens}][r.mode] = r.ms;
  }
  std::string line;
  for (int64_t m : tokens) {
    double log_sum = 0;
    int count = 0;
    for (const auto& [key, modes] : ms) {
      if (key.second != m || !modes.contains(mode_a) || !modes.contains(mode_b)) continue;
      log_sum += std::log(modes.at(mode_a) / modes.at(mode_b));
      ++count;
    }
    if (count > 0) line += fmt::format("  M={}: {:.2f}x ({} ops)", m, std::exp(log_sum / count), count);
  }
  return line.empty() ? "" : fmt::format("{}:{}\n", label, line);
}

// "dequantization share of QuantizedLinear at M=1: mxfp4 88%, fp8 95%": the dequant-only rows
// against the matmul rows of the same expert matrix.
std::string DequantShareLine(const std::vector<Result>& results, int64_t m) {
  std::string line;
  for (const std::string mode : {"mxfp4", "fp8"}) {
    double dequant = 0, matmul = 0;
    for (const auto& r : results) {
      if (!r.measured || r.mode != mode || r.tokens != m || r.op.find("dequant only") == std::string::npos) continue;
      const std::string matrix = r.op.substr(0, r.op.find(' ') + 1);
      for (const auto& q : results) {
        if (q.measured && q.mode == mode && q.tokens == m && q.op.rfind(matrix, 0) == 0 &&
            q.op.find("dequant") == std::string::npos) {
          dequant += r.ms;
          matmul += q.ms;
        }
      }
    }
    if (matmul > 0) line += fmt::format("{} {} {:.0f}%", line.empty() ? "" : ",", mode, 100 * dequant / matmul);
  }
  return line.empty() ? "" : fmt::format("dequantization share of QuantizedLinear time at M={}:{}\n", m, line);
}

void PrintSummary(const std::vector<Result>& results, const std::vector<int64_t>& tokens) {
  std::cout << "\n"
            << RatioLine(results, "deterministic / openblas time, dense projections", "", "deterministic", "openblas",
                         tokens)
            << RatioLine(results, "mxfp4 / f32 time, expert matrices", "expert.", "mxfp4", "f32", tokens)
            << RatioLine(results, "fp8 / f32 time, expert matrices", "expert.", "fp8", "f32", tokens)
            << DequantShareLine(results, tokens.front())
            << "(* = over the per-call limit, timed once; ms = median per call; GB/s = weight or cache bytes read)\n";
}

int RunKernels(const KernelsArgs& args) {
  if (args.device == "cuda") {
#ifdef TANDEM_BENCH_WITH_CUDA
    std::cerr << "tandem-bench: --device cuda is not implemented yet; use --device cpu\n";
#else
    std::cerr << "tandem-bench: --device cuda needs a CUDA build\n";
#endif
    return 2;
  }
  std::vector<int64_t> tokens;
  for (absl::string_view part : absl::StrSplit(args.tokens, ',', absl::SkipEmpty())) {
    int64_t m = 0;
    if (!absl::SimpleAtoi(part, &m) || m <= 0) {
      std::cerr << "tandem-bench: --tokens wants positive integers separated by commas, got \"" << args.tokens << "\"\n";
      return 2;
    }
    tokens.push_back(m);
  }
  const std::vector<std::string> presets = absl::StrSplit(args.shapes, ',', absl::SkipEmpty());
  if (tokens.empty() || presets.empty()) {
    std::cerr << "tandem-bench: --tokens and --shapes must not be empty\n";
    return 2;
  }
  for (const std::string& preset : presets) {
    if (auto config = model::PresetConfig(preset); !config.ok()) {
      std::cerr << "tandem-bench: --shapes " << preset << ": " << config.status().message() << "\n";
      return 2;
    }
  }
  std::error_code ec;
  fs::create_directories(args.out_dir, ec);
  if (ec) {
    std::cerr << "tandem-bench: cannot create " << args.out_dir << ": " << ec.message() << "\n";
    return 1;
  }
  kernels::SetThreads(args.threads);
  std::cout << fmt::format("tandem-bench kernels: cpu, {} threads, M in {{{}}}, median of up to {} runs\n", NumThreads(),
                           args.tokens, args.timing.repeat);

  const auto start = std::chrono::steady_clock::now();
  std::vector<Result> all;
  for (const std::string& preset : presets) {
    const auto setup_start = std::chrono::steady_clock::now();
    const int64_t context = args.context > 0 ? args.context : DefaultContext(preset);
    auto suite = KernelSuite::Create(preset, context, tokens.back(), args.seed);
    if (!suite.ok()) {
      std::cerr << "tandem-bench: --shapes " << preset << ": " << suite.status().message() << "\n";
      return 2;
    }
    const double setup_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - setup_start).count();
    std::cout << fmt::format("\n[{}] random weights and state ready in {:.1f} s", preset, setup_s);
    std::vector<Result> results = RunSuite(preset, **suite, tokens, args);
    PrintSummary(results, tokens);
    all.insert(all.end(), results.begin(), results.end());
  }

  const std::string csv = (fs::path(args.out_dir) / "kernels-cpu.csv").string();
  const std::string png = (fs::path(args.out_dir) / "kernels-cpu.png").string();
  if (!WriteCsv(csv, all)) {
    std::cerr << "tandem-bench: cannot write " << csv << "\n";
    return 1;
  }
  const double total_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::cout << fmt::format("\nwrote {} ({} rows) in {:.0f} s\n", csv, all.size(), total_s);
  if (args.plot && MakePlot(csv, png)) std::cout << "wrote " << png << "\n";
  return 0;
}

}  // namespace

void AddKernelsCommand(CLI::App& app, int& exit_code) {
  auto args = std::make_shared<KernelsArgs>();
  auto* cmd = app.add_subcommand("kernels", "time the forward's kernels and sublayers at tiny and V4-Flash shapes");
  cmd->add_option("--device", args->device, "cpu, or cuda (needs a CUDA build)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  cmd->add_option("--out", args->out_dir, "directory for kernels-cpu.csv and kernels-cpu.png")->capture_default_str();
  cmd->add_option("--shapes", args->shapes, "comma-separated model presets (tiny, small, flash-layer)")
      ->capture_default_str();
  cmd->add_option("--tokens", args->tokens, "comma-separated token counts M per call")->capture_default_str();
  cmd->add_option("--threads", args->threads, "kernel and OpenBLAS threads (0: all cores)")->capture_default_str();
  cmd->add_option("--repeat", args->timing.repeat, "timed runs per measurement at most (after one warm-up)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--max-seconds", args->timing.max_call_s,
                  "a call slower than this is timed once and larger M are skipped")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--context", args->context, "tokens in the request state for attention (0: 1024 tiny, 4096 others)")
      ->capture_default_str();
  cmd->add_option("--only", args->only, "time only ops whose name contains this");
  cmd->add_option("--seed", args->seed, "seed of the random weights and inputs")->capture_default_str();
  cmd->add_flag("!--no-plot", args->plot, "write the CSV only");
  cmd->callback([args, &exit_code] { exit_code = RunKernels(*args); });
}

}  // namespace tandem::bench
