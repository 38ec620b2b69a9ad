// Per-level numbers of `tandem-bench serve` from its request records: throughput, latency
// percentiles and errors, printed as a table row and written as one CSV row.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <map>
#include <string>
#include <vector>

#include "bench/serve_load.h"

namespace tandem::bench {

// Linear interpolation between the closest ranks (NumPy's default); 0 for no values.
double Percentile(std::vector<double> values, double percent);

struct LevelStats {
  int concurrency = 0;
  int64_t requests = 0;   // sent
  int64_t completed = 0;  // finished OK
  int64_t errors = 0;     // any other outcome
  double wall_s = 0;
  double request_throughput = 0;   // completed requests / wall_s
  double output_tokens_per_s = 0;  // tokens of completed requests / wall_s
  double mean_prompt_tokens = 0;
  double mean_output_tokens = 0;
  // Milliseconds over completed requests (ITL over their tokens); 0 when there were none.
  double ttft_p50 = 0, ttft_p90 = 0, ttft_p99 = 0;
  double itl_p50 = 0, itl_p90 = 0, itl_p99 = 0;
  double e2e_p50 = 0, e2e_p99 = 0;
  std::map<std::string, int64_t> error_counts;  // message -> how many requests failed with it
};

LevelStats Summarize(const LevelRun& run);

// "3x RESOURCE_EXHAUSTED: queue full; 1x ..." (empty without errors).
std::string ErrorSummary(const LevelStats& stats);

void PrintServeHeader(std::ostream& out);
void PrintServeRow(std::ostream& out, const LevelStats& stats);  // then one line per distinct error

// One row per level; the header is kServeCsvColumns.
extern const char* const kServeCsvColumns;
bool WriteServeCsv(const std::string& path, const std::vector<LevelStats>& levels);

// One row per request: api, concurrency, index, prompt_tokens, output_tokens, ttft_ms, e2e_ms,
// itl_mean_ms, error. A request's prompt is a function of (seed, level, index), so two runs with the
// same flags can be paired row by row.
// runs[a]: the levels of apis[a].
bool WriteRequestsCsv(const std::string& path, const std::vector<std::string>& apis,
                      const std::vector<std::vector<LevelRun>>& runs);

}  // namespace tandem::bench
