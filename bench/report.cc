#include "bench/report.h"

#include <fmt/format.h>
#include <spawn.h>
#include <sys/wait.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>

extern char** environ;

namespace tandem::bench {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

double Median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

// Three significant digits, no exponent for the range a table shows.
std::string Short(double v) {
  if (v <= 0) return "-";
  if (v >= 100) return fmt::format("{:.0f}", v);
  if (v >= 10) return fmt::format("{:.1f}", v);
  if (v >= 1) return fmt::format("{:.2f}", v);
  if (v >= 0.01) return fmt::format("{:.3f}", v);
  return fmt::format("{:.4f}", v);
}

constexpr int kOpWidth = 38;
constexpr int kModeWidth = 13;
constexpr int kCellWidth = 25;  // "   ms    GF/s   GB/s"

std::string Quote(const std::string& s) {
  std::string out = "\"";
  for (char c : s) out += c == '"' ? std::string("\"\"") : std::string(1, c);
  return out + "\"";
}

// The venv python: TANDEM_PYTHON, else .venv/bin/python in the executable's directory or above.
std::string FindPython() {
  if (const char* env = std::getenv("TANDEM_PYTHON"); env && *env) return env;
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (ec) return "";
  for (fs::path dir = exe.parent_path(); !dir.empty() && dir != dir.root_path(); dir = dir.parent_path()) {
    const fs::path python = dir / ".venv" / "bin" / "python";
    if (fs::exists(python, ec)) return python.string();
  }
  return "";
}

int Spawn(const std::vector<std::string>& args) {
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = 0;
  if (posix_spawn(&pid, argv[0], nullptr, nullptr, argv.data(), environ) != 0) return -1;
  int status = 0;
  if (waitpid(pid, &status, 0) < 0) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

}  // namespace

Timing TimeCall(const std::function<void()>& call, const TimingOptions& options) {
  auto start = Clock::now();
  call();
  const double warm = Seconds(Clock::now() - start);
  if (warm > options.max_call_s) return {warm, 1};
  // Batches of calls for sub-millisecond ops, so the clock's resolution and overhead do not show.
  const int batch = warm < 1e-3 ? static_cast<int>(std::clamp(2e-3 / std::max(warm, 1e-7), 1.0, 10000.0)) : 1;
  // Runs to fill the budget; at least 3 for calls under half a second, else at least 1.
  const double per_run = std::max(warm, 1e-9) * batch;
  const int floor_runs = std::min(warm <= 0.5 ? 3 : 1, options.repeat);
  const int runs = std::max(std::min(options.repeat, static_cast<int>(options.budget_s / per_run)), floor_runs);
  std::vector<double> samples;
  for (int r = 0; r < std::max(1, runs); ++r) {
    start = Clock::now();
    for (int b = 0; b < batch; ++b) call();
    samples.push_back(Seconds(Clock::now() - start) / batch);
  }
  return {Median(samples), static_cast<int>(samples.size())};
}

Table::Table(std::ostream& out, std::vector<int64_t> tokens) : out_(out), tokens_(std::move(tokens)) {}

void Table::Title(const std::string& title) {
  out_ << "\n" << title << "\n";
  std::string head = fmt::format("{:<{}} {:<{}}", "op", kOpWidth, "mode", kModeWidth);
  std::string units = fmt::format("{:<{}} {:<{}}", "", kOpWidth, "", kModeWidth);
  for (int64_t m : tokens_) {
    head += fmt::format("|{:^{}}", fmt::format("M={}", m), kCellWidth);
    units += fmt::format("|{:>9}{:>8}{:>8}", "ms", "GF/s", "GB/s");
  }
  out_ << head << "\n" << units << "\n" << std::string(head.size(), '-') << "\n";
}

void Table::Section(const std::string& name) { out_ << "-- " << name << "\n"; }

void Table::Row(const std::vector<Result>& cells) {
  if (cells.empty()) return;
  std::string line = fmt::format("{:<{}} {:<{}}", cells[0].op, kOpWidth, cells[0].mode, kModeWidth);
  for (const auto& c : cells) {
    if (!c.measured) {
      line += fmt::format("|{:>{}}", c.note.empty() ? "-" : c.note, kCellWidth);
      continue;
    }
    const std::string ms = Short(c.ms) + (c.note.empty() ? " " : "*");
    line += fmt::format("|{:>9}{:>8}{:>8}", ms, Short(c.gflops()), Short(c.gbps()));
  }
  out_ << line << std::endl;
}

bool WriteCsv(const std::string& path, const std::vector<Result>& results) {
  std::ofstream out(path);
  out << "config,section,op,mode,tokens,ms,gflops,gbps,flops,bytes,runs,note\n";
  for (const auto& r : results) {
    out << r.config << ',' << Quote(r.section) << ',' << Quote(r.op) << ',' << r.mode << ',' << r.tokens << ',';
    if (r.measured) {
      out << fmt::format("{:.6g},{:.6g},{:.6g}", r.ms, r.gflops(), r.gbps());
    } else {
      out << ",,";
    }
    out << fmt::format(",{:.6g},{:.6g},{},", r.cost.flops, r.cost.bytes, r.runs) << Quote(r.note) << "\n";
  }
  return static_cast<bool>(out);
}

bool MakePlot(const std::string& csv, const std::string& png) { return RunPlotScript(TANDEM_BENCH_PLOT_SCRIPT, csv, png); }

bool RunPlotScript(const std::string& script, const std::string& csv, const std::string& png) {
  const std::string python = FindPython();
  std::string why;
  std::error_code ec;
  if (python.empty()) {
    why = "no .venv/bin/python above the executable; set TANDEM_PYTHON";
  } else if (!fs::exists(script, ec)) {
    why = script + " is missing";
  } else if (const int status = Spawn({python, script, csv, png}); status != 0) {
    why = status < 0 ? "cannot run " + python : fmt::format("{} exited with status {}", script, status);
  } else {
    return true;
  }
  std::cerr << "tandem-bench: no plot made (" << why << "). To make it: <python with matplotlib> " << script << " "
            << csv << " " << png << "\n";
  return false;
}

}  // namespace tandem::bench
