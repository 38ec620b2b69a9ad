#include "bench/serve_stats.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <ostream>

namespace tandem::bench {
namespace {

std::string Quote(const std::string& s) {
  std::string out = "\"";
  for (char c : s) out += c == '"' ? std::string("\"\"") : std::string(1, c);
  return out + "\"";
}

// Latency in ms with about three significant digits; "-" when there was nothing to measure.
std::string Ms(double ms) {
  if (ms <= 0) return "-";
  if (ms >= 100) return fmt::format("{:.0f}", ms);
  if (ms >= 10) return fmt::format("{:.1f}", ms);
  return fmt::format("{:.2f}", ms);
}

// An empty CSV cell when there was nothing to measure, so a plot never draws a fake zero.
std::string Cell(double value, bool measured) { return measured ? fmt::format("{:.6g}", value) : ""; }

}  // namespace

const char* const kServeCsvColumns =
    "concurrency,requests,completed,errors,wall_s,request_throughput,output_tokens_per_s,mean_prompt_tokens,"
    "mean_output_tokens,ttft_p50_ms,ttft_p90_ms,ttft_p99_ms,itl_p50_ms,itl_p90_ms,itl_p99_ms,e2e_p50_ms,e2e_p99_ms,"
    "error_summary";

double Percentile(std::vector<double> values, double percent) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const double rank = percent / 100.0 * static_cast<double>(values.size() - 1);
  const size_t low = static_cast<size_t>(std::floor(rank));
  const size_t high = std::min(low + 1, values.size() - 1);
  const double weight = rank - static_cast<double>(low);
  return values[low] * (1 - weight) + values[high] * weight;
}

LevelStats Summarize(const LevelRun& run) {
  LevelStats s;
  s.concurrency = run.concurrency;
  s.wall_s = run.wall_s;
  s.requests = static_cast<int64_t>(run.records.size());
  std::vector<double> ttft, itl, e2e;
  int64_t prompt_tokens = 0, output_tokens = 0;
  for (const RequestRecord& r : run.records) {
    if (!r.error.empty()) {
      ++s.errors;
      ++s.error_counts[r.error];
      continue;
    }
    ++s.completed;
    prompt_tokens += r.prompt_tokens;
    output_tokens += r.output_tokens;
    // A request that ended on eos before any token has no first token to time.
    if (r.ttft_s >= 0) ttft.push_back(r.ttft_s * 1e3);
    for (double gap : r.itl_s) itl.push_back(gap * 1e3);
    e2e.push_back(r.e2e_s * 1e3);
  }
  if (s.wall_s > 0) {
    s.request_throughput = static_cast<double>(s.completed) / s.wall_s;
    s.output_tokens_per_s = static_cast<double>(output_tokens) / s.wall_s;
  }
  if (s.completed > 0) {
    s.mean_prompt_tokens = static_cast<double>(prompt_tokens) / static_cast<double>(s.completed);
    s.mean_output_tokens = static_cast<double>(output_tokens) / static_cast<double>(s.completed);
  }
  s.ttft_p50 = Percentile(ttft, 50), s.ttft_p90 = Percentile(ttft, 90), s.ttft_p99 = Percentile(ttft, 99);
  s.itl_p50 = Percentile(itl, 50), s.itl_p90 = Percentile(itl, 90), s.itl_p99 = Percentile(itl, 99);
  s.e2e_p50 = Percentile(e2e, 50), s.e2e_p99 = Percentile(e2e, 99);
  return s;
}

std::string ErrorSummary(const LevelStats& stats) {
  std::string out;
  for (const auto& [message, count] : stats.error_counts) {
    out += fmt::format("{}{}x {}", out.empty() ? "" : "; ", count, message);
  }
  return out;
}

void PrintServeHeader(std::ostream& out) {
  const std::string head = fmt::format("{:>5} {:>5} {:>4} {:>7} {:>8} | {:>22} | {:>20} | {:>13}", "conc", "reqs", "err",
                                       "req/s", "tok/s", "TTFT ms p50/p90/p99", "ITL ms p50/p90/p99", "e2e ms p50/p99");
  out << head << "\n" << std::string(head.size(), '-') << "\n";
}

void PrintServeRow(std::ostream& out, const LevelStats& s) {
  out << fmt::format("{:>5} {:>5} {:>4} {:>7.2f} {:>8.1f} | {:>6} {:>7} {:>7} | {:>6} {:>6} {:>6} | {:>6} {:>6}\n",
                     s.concurrency, s.requests, s.errors, s.request_throughput, s.output_tokens_per_s, Ms(s.ttft_p50),
                     Ms(s.ttft_p90), Ms(s.ttft_p99), Ms(s.itl_p50), Ms(s.itl_p90), Ms(s.itl_p99), Ms(s.e2e_p50),
                     Ms(s.e2e_p99));
  for (const auto& [message, count] : s.error_counts) out << fmt::format("      error x{}: {}\n", count, message);
  out.flush();
}

bool WriteServeCsv(const std::string& path, const std::vector<LevelStats>& levels) {
  std::ofstream out(path);
  out << kServeCsvColumns << "\n";
  for (const LevelStats& s : levels) {
    const bool timed = s.completed > 0;
    out << fmt::format("{},{},{},{},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g},", s.concurrency, s.requests, s.completed, s.errors,
                       s.wall_s, s.request_throughput, s.output_tokens_per_s, s.mean_prompt_tokens, s.mean_output_tokens);
    out << Cell(s.ttft_p50, timed && s.ttft_p50 > 0) << ',' << Cell(s.ttft_p90, timed && s.ttft_p90 > 0) << ','
        << Cell(s.ttft_p99, timed && s.ttft_p99 > 0) << ',' << Cell(s.itl_p50, timed && s.itl_p50 > 0) << ','
        << Cell(s.itl_p90, timed && s.itl_p90 > 0) << ',' << Cell(s.itl_p99, timed && s.itl_p99 > 0) << ','
        << Cell(s.e2e_p50, timed) << ',' << Cell(s.e2e_p99, timed) << ',' << Quote(ErrorSummary(s)) << "\n";
  }
  return static_cast<bool>(out);
}

bool WriteRequestsCsv(const std::string& path, const std::vector<std::string>& apis,
                      const std::vector<std::vector<LevelRun>>& runs) {
  std::ofstream out(path);
  out << "api,concurrency,index,prompt_tokens,output_tokens,ttft_ms,e2e_ms,itl_mean_ms,error\n";
  for (size_t a = 0; a < apis.size() && a < runs.size(); ++a) {
    for (const LevelRun& run : runs[a]) {
      for (const RequestRecord& r : run.records) {
        double itl = 0;
        for (double v : r.itl_s) itl += v;
        const bool has_itl = !r.itl_s.empty();
        if (has_itl) itl /= static_cast<double>(r.itl_s.size());
        out << fmt::format("{},{},{},{},{},", apis[a], run.concurrency, r.index, r.prompt_tokens, r.output_tokens)
            << Cell(r.ttft_s * 1000, r.ttft_s >= 0) << ',' << fmt::format("{:.6g}", r.e2e_s * 1000) << ','
            << Cell(itl * 1000, has_itl) << ',' << Quote(r.error) << "\n";
      }
    }
  }
  return static_cast<bool>(out);
}

}  // namespace tandem::bench
