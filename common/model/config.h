// DSV4 model configuration: the HF config.json keys, validated, plus the derived layer schedule
// (compress ratio per layer, hash-routed layers, the MTP layer).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/core/status.h"

namespace tandem::model {

enum class ExpertDType { kFp4, kFp8 };

struct RopeScaling {
  double factor = 1.0;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  int64_t original_max_position_embeddings = 0;  // 0: no YaRN
};

struct LayerSpec {
  int layer_id = 0;          // global layer id; num_hidden_layers for the MTP layer
  int compress_ratio = 0;    // 0 (window only), 4 (C4 + indexer) or 128 (C128)
  bool hash_routed = false;  // token-id routed MoE (tid2eid) instead of learned gating
  bool is_mtp = false;
};

struct ModelConfig {
  int64_t hidden_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 1;
  int64_t head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t q_lora_rank = 0;
  int64_t o_groups = 0;
  int64_t o_lora_rank = 0;
  int64_t sliding_window = 0;
  std::vector<int> compress_ratios;  // num_hidden_layers + num_nextn_predict_layers entries
  double rope_theta = 0;
  double compress_rope_theta = 0;
  RopeScaling rope_scaling;
  int64_t max_position_embeddings = 0;
  int64_t index_n_heads = 0;
  int64_t index_head_dim = 0;
  int64_t index_topk = 0;
  int64_t n_routed_experts = 0;
  int64_t n_shared_experts = 1;
  int64_t num_experts_per_tok = 0;
  int64_t moe_intermediate_size = 0;
  int64_t num_hash_layers = 0;
  double routed_scaling_factor = 1.0;
  double swiglu_limit = 0;
  int64_t hc_mult = 0;
  int64_t hc_sinkhorn_iters = 0;
  double hc_eps = 0;
  double rms_norm_eps = 0;
  int64_t vocab_size = 0;
  int64_t num_nextn_predict_layers = 0;
  int64_t bos_token_id = 0;
  int64_t eos_token_id = 1;
  ExpertDType expert_dtype = ExpertDType::kFp4;

  // Derived.
  std::vector<LayerSpec> layers;  // main layers, then the MTP layer (when num_nextn_predict_layers == 1)
  int64_t nope_dim() const { return head_dim - qk_rope_head_dim; }
  int64_t hc_dim() const { return hc_mult * hidden_size; }
  int64_t hc_mix_dim() const { return (2 + hc_mult) * hc_mult; }
  bool has_mtp() const { return num_nextn_predict_layers > 0; }
  const LayerSpec& mtp_layer() const { return layers.back(); }
};

// Parses and validates a config.json document. Errors name the offending key:
// "config.json: missing key hidden_size", "config.json: key compress_ratios[3] must be 0, 4 or 128, got 7".
absl::StatusOr<ModelConfig> ParseConfig(const nlohmann::json& doc);
absl::StatusOr<ModelConfig> LoadConfig(const std::string& model_dir);
// The inverse of ParseConfig (writes every key ParseConfig reads, in the HF spelling).
nlohmann::json ConfigToJson(const ModelConfig& config);

}  // namespace tandem::model
