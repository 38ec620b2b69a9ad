// Timing and reporting for tandem-bench: a median-of-runs timer with a per-call time limit, the
// printed table, the CSV file and the call to the plot script.
#pragma once

#include <cstdint>
#include <functional>
#include <iosfwd>
#include <string>
#include <vector>

namespace tandem::bench {

// Work of one call: FLOPs and the weight (or cache) bytes it must read. 0: not meaningful.
struct Cost {
  double flops = 0;
  double bytes = 0;
};

struct TimingOptions {
  int repeat = 10;            // timed runs at most (after one warm-up)
  double budget_s = 1.0;      // fewer runs when `repeat` of them would take longer (>= 3 under 0.5 s)
  double max_call_s = 2.0;    // a call slower than this is run once, and larger token counts skipped
};

struct Timing {
  double seconds = 0;  // median per call
  int runs = 0;
};

// One warm-up call, then timed runs; calls under a millisecond are timed in batches.
Timing TimeCall(const std::function<void()>& call, const TimingOptions& options);

// One measured (or skipped) cell: an op in a mode at a token count.
struct Result {
  std::string config, section, op, mode;
  int64_t tokens = 0;
  bool measured = false;
  double ms = 0;
  int runs = 0;
  Cost cost;
  std::string note;  // why skipped, or "over the limit: 1 run"
  double gflops() const { return measured && cost.flops > 0 ? cost.flops / (ms * 1e6) : 0; }
  double gbps() const { return measured && cost.bytes > 0 ? cost.bytes / (ms * 1e6) : 0; }
};

// The printed table: one line per (op, mode), one column group per token count.
class Table {
 public:
  Table(std::ostream& out, std::vector<int64_t> tokens);
  void Title(const std::string& title);
  void Section(const std::string& name);
  void Row(const std::vector<Result>& cells);  // one per token count, in order

 private:
  std::ostream& out_;
  std::vector<int64_t> tokens_;
};

// Writes every result as CSV (header: config,section,op,mode,tokens,ms,gflops,gbps,flops,bytes,runs,note).
bool WriteCsv(const std::string& path, const std::vector<Result>& results);

// Runs `script CSV PNG` with the project venv's python (TANDEM_PYTHON, else the nearest .venv above
// the executable). Returns false after printing how to make the plot by hand.
bool RunPlotScript(const std::string& script, const std::string& csv, const std::string& png);

// RunPlotScript with plot_kernels.py.
bool MakePlot(const std::string& csv, const std::string& png);

}  // namespace tandem::bench
