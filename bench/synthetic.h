// Random stand-ins for a checkpoint and a request's cache, with the shapes the model code defines:
// what the kernel benchmark times against. Values are plausible in range, meaningless otherwise.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <tuple>
#include <vector>

#include "common/core/dtype.h"
#include "common/core/random.h"
#include "common/model/state.h"
#include "common/model/weights.h"

namespace tandem::bench {

// xoshiro256** with uniform draws: filling gigabytes of weights must take about a second, so no
// Box-Muller; a uniform of the same mean and standard deviation times the same.
class Random {
 public:
  explicit Random(uint64_t seed) : rng_(seed) {}
  uint64_t Next() { return rng_.Next(); }
  // Uniform with the given mean and standard deviation.
  void Fill(std::span<float> values, double mean = 0.0, double std = 1.0);
  std::vector<float> Vector(int64_t count, double mean = 0.0, double std = 1.0);

 private:
  Xoshiro256 rng_;
};

// A routed-expert-style matrix in MXFP4 or block FP8, quantized from random values with the dtype.h
// quantizers (the checkpoint formats), owning its bytes.
struct QuantizedMatrix {
  std::vector<uint8_t> codes;
  std::vector<uint8_t> scales;
  kernels::QuantizedWeight view;
  int64_t bytes() const { return static_cast<int64_t>(codes.size() + scales.size()); }
};
QuantizedMatrix MakeQuantizedMatrix(kernels::QuantizedWeight::Format format, int64_t out, int64_t in, double std,
                                    Random& random);

// Fills every parameter VisitModelParams walks with random values of its declared shape. Parameters
// whose name `keep` rejects are left empty. Routed experts copy one quantized prototype per shape.
class RandomWeightsVisitor final : public model::ParamVisitor {
 public:
  RandomWeightsVisitor(uint64_t seed, std::function<bool(const std::string&)> keep);

  void Fp8Linear(const std::string& name, int64_t out, int64_t in, model::DenseWeight* dst,
                 model::InitHint init) override;
  void Bf16Linear(const std::string& name, int64_t out, int64_t in, model::DenseWeight* dst,
                  model::InitHint init) override;
  void Vector(const std::string& name, DType dtype, const std::vector<int64_t>& shape, std::vector<float>* dst,
              model::InitHint init) override;
  void Bf16Table(const std::string& name, int64_t rows, int64_t cols, Tensor* dst, model::InitHint init) override;
  void Expert(const std::string& name, int64_t out, int64_t in, model::ExpertDType format, model::PackedWeight* dst,
              model::InitHint init) override;
  void RoutingTable(const std::string& name, int64_t vocab, int64_t k, int64_t experts,
                    std::vector<int32_t>* dst) override;

 private:
  void Dense(const std::string& name, int64_t out, int64_t in, model::DenseWeight* dst, model::InitHint init);

  Random random_;
  std::function<bool(const std::string&)> keep_;
  std::map<std::tuple<int64_t, int64_t, model::ExpertDType>, QuantizedMatrix> prototypes_;
};

// Random weights for `scope` of `config` (ModelWeights::layers/mtp sized as VisitModelParams needs).
std::unique_ptr<model::ModelWeights> MakeRandomWeights(const model::ModelConfig& config, const model::VisitScope& scope,
                                                       uint64_t seed,
                                                       std::function<bool(const std::string&)> keep = nullptr);

// Makes `state` look like a request `context` tokens long at global layer `layer_id` (compress ratio
// `ratio`): a full window, every compressed entry and indexer key, and the compressor rings, all
// random but valid cache bytes. Room is reserved for `extra` more tokens.
void PrefillState(const model::ModelConfig& config, int layer_id, int ratio, int64_t context, int64_t extra,
                  model::HostSequenceState& state, Random& random);

}  // namespace tandem::bench
