// The ops `tandem-bench kernels` times for one model preset: dense projections, expert matmuls,
// small kernels and whole sublayers, over random weights shaped by the model code itself.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "bench/report.h"
#include "bench/synthetic.h"
#include "common/core/status.h"
#include "common/model/config.h"
#include "common/model/state.h"
#include "common/model/weights.h"

namespace tandem::bench {

struct BenchOp {
  std::string section;
  std::string op;
  std::string mode;
  bool deterministic = false;  // kernels::SetDeterministic while timed
  bool per_token = true;       // false: the work does not depend on M (timed at the first M only)
  std::function<Cost(int64_t tokens)> cost;
  // Allocates inputs for `tokens` rows; the returned call is what gets timed.
  std::function<std::function<void()>(int64_t tokens)> prepare;
};

// Random weights for a preset (every main layer plus the head), and one attention setup per compress
// ratio 0/4/128 with a prefilled request state.
class KernelSuite {
 public:
  // `context`: tokens already in the request state when attention runs; `max_tokens`: the largest M.
  static absl::StatusOr<std::unique_ptr<KernelSuite>> Create(const std::string& preset, int64_t context,
                                                             int64_t max_tokens, uint64_t seed);
  ~KernelSuite();

  const model::ModelConfig& config() const { return *config_; }
  int64_t context() const { return context_; }
  std::string Describe() const;  // shapes and where each attention setup comes from
  std::vector<BenchOp> Ops();

 private:
  struct AttentionSetup;
  KernelSuite() = default;
  const model::LayerWeights& Layer(int ratio) const;
  void AddDenseOps(std::vector<BenchOp>& ops);
  void AddExpertOps(std::vector<BenchOp>& ops);
  void AddSmallOps(std::vector<BenchOp>& ops);
  void AddSublayerOps(std::vector<BenchOp>& ops);

  std::string preset_;
  int64_t context_ = 0;
  int64_t max_tokens_ = 0;
  std::unique_ptr<model::ModelConfig> config_;
  std::unique_ptr<model::ModelWeights> weights_;
  std::vector<std::unique_ptr<AttentionSetup>> attention_;  // ratios 0, 4, 128
  int ffn_layer_ = 0;  // the (last learned-gate) layer whose MoE is timed
  Random random_{1};
};

}  // namespace tandem::bench
