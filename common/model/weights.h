// DSV4 weights in memory, and the one place that knows every checkpoint tensor's name, dtype and
// shape (VisitModelParams). The loader and the fixture generator are both visitors of it.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/core/status.h"
#include "common/core/tensor.h"
#include "common/kernels/kernels.h"
#include "common/model/config.h"

namespace tandem::model {

// A dense linear layer dequantized to f32 [out, in].
struct DenseWeight {
  int64_t out = 0;
  int64_t in = 0;
  std::vector<float> values;
};

// A routed expert matrix kept in its checkpoint format (MXFP4 or block FP8).
struct PackedWeight {
  Tensor codes;
  Tensor scales;
  kernels::QuantizedWeight view;  // points into codes/scales
};

struct ExpertWeights {
  PackedWeight w1, w2, w3;  // w1, w3: [I, D]; w2: [D, I]
};

struct CompressorWeights {
  int ratio = 0;
  int64_t dim = 0;  // d: head_dim for attention, index_head_dim for the indexer
  DenseWeight wkv, wgate;   // [c*d, D]
  std::vector<float> ape;   // [ratio, c*d]
  std::vector<float> norm;  // [d]
};

struct IndexerWeights {
  DenseWeight wq_b;          // [n_heads*head_dim, q_lora]
  DenseWeight weights_proj;  // [n_heads, D]
  CompressorWeights compressor;
};

struct AttentionWeights {
  std::vector<float> attn_sink;  // [H]
  DenseWeight wq_a, wq_b, wkv, wo_a, wo_b;
  std::vector<float> q_norm, kv_norm;
  std::unique_ptr<CompressorWeights> compressor;  // ratio > 0
  std::unique_ptr<IndexerWeights> indexer;        // ratio 4
};

struct MhcWeights {
  std::vector<float> fn;     // [(2+M)*M, M*D]
  std::vector<float> base;   // [(2+M)*M]
  std::vector<float> scale;  // [3]
};

struct HcHeadWeights {
  std::vector<float> fn;     // [M, M*D]
  std::vector<float> base;   // [M]
  std::vector<float> scale;  // [1]
};

struct MoeWeights {
  DenseWeight gate;               // [E, D]
  std::vector<float> bias;        // [E], learned-gate layers
  std::vector<int32_t> tid2eid;   // [V, k], hash layers
  std::vector<ExpertWeights> experts;
  ExpertWeights shared;           // block FP8
};

struct LayerWeights {
  LayerSpec spec;
  std::vector<float> attn_norm, ffn_norm;
  MhcWeights hc_attn, hc_ffn;
  AttentionWeights attn;
  MoeWeights ffn;
};

struct MtpWeights {
  LayerWeights layer;
  DenseWeight e_proj, h_proj;
  std::vector<float> enorm, hnorm, norm;
  HcHeadWeights hc_head;
};

struct LoadOptions {
  int begin_layer = 0;
  int end_layer = -1;             // -1: num_hidden_layers
  bool load_mtp = true;           // only on the last stage
  // Expert format to run with; a kFp4 checkpoint can run as kFp8 (converted exactly at load).
  std::optional<ExpertDType> expert_dtype;
  bool drop_cache_after_load = false;
  bool show_progress = true;
};

struct ModelWeights {
  ModelConfig config;
  int begin_layer = 0;
  int end_layer = 0;
  ExpertDType expert_dtype = ExpertDType::kFp4;
  Tensor embed;                   // [V, D] bf16, first stage (and MTP)
  DenseWeight head;               // [V, D], last stage
  std::vector<float> norm;        // [D], last stage
  HcHeadWeights hc_head;          // last stage
  std::vector<LayerWeights> layers;  // [begin_layer, end_layer)
  std::unique_ptr<MtpWeights> mtp;
  bool is_first_stage() const { return begin_layer == 0; }
  bool is_last_stage() const { return end_layer == config.num_hidden_layers; }
};

absl::StatusOr<std::unique_ptr<ModelWeights>> LoadModelWeights(const std::string& model_dir, const LoadOptions& options);

// ---- The checkpoint's parameters, as a visitor walk ----
// How a fixture generator should fill a parameter (the loader ignores it).
struct InitHint {
  enum class Kind { kNormal, kOnes, kZeros } kind = Kind::kNormal;
  double std = 0.02;
  double mean = 0.0;
};

class ParamVisitor {
 public:
  virtual ~ParamVisitor() = default;
  // `name`.weight e4m3 [out, in] + `name`.scale ue8m0 [ceil(out/128), ceil(in/128)].
  virtual void Fp8Linear(const std::string& name, int64_t out, int64_t in, DenseWeight* dst, InitHint init) = 0;
  // A bf16 [out, in] matrix named exactly `name`.
  virtual void Bf16Linear(const std::string& name, int64_t out, int64_t in, DenseWeight* dst, InitHint init) = 0;
  // A bf16 or f32 tensor of any shape named exactly `name`, read as f32.
  virtual void Vector(const std::string& name, DType dtype, const std::vector<int64_t>& shape, std::vector<float>* dst,
                      InitHint init) = 0;
  // A bf16 [rows, cols] table kept as bf16 (the embedding).
  virtual void Bf16Table(const std::string& name, int64_t rows, int64_t cols, Tensor* dst, InitHint init) = 0;
  // A routed expert matrix `name`.weight/.scale in `format`, logical [out, in].
  virtual void Expert(const std::string& name, int64_t out, int64_t in, ExpertDType format, PackedWeight* dst,
                      InitHint init) = 0;
  // The hash-routing table `name` I64 [vocab, k].
  virtual void RoutingTable(const std::string& name, int64_t vocab, int64_t k, int64_t experts,
                            std::vector<int32_t>* dst) = 0;
};

struct VisitScope {
  int begin_layer = 0;
  int end_layer = 0;
  bool embed = true;
  bool head = true;   // head, norm, hc_head
  bool mtp = true;
};

// Walks every tensor of the checkpoint within `scope`, filling `weights` through the visitor.
// ModelWeights::layers must hold end_layer - begin_layer default entries; mtp must be allocated if scope.mtp.
void VisitModelParams(const ModelConfig& config, ExpertDType stored_experts, const VisitScope& scope,
                      ParamVisitor& visitor, ModelWeights& weights);

}  // namespace tandem::model
