#include "common/model/config.h"

#include <cmath>
#include <fstream>
#include <sstream>

namespace tandem::model {
namespace {

using nlohmann::json;

class Reader {
 public:
  explicit Reader(const json& doc) : doc_(doc) {}

  absl::Status Int(const char* key, int64_t* out, int64_t min_value, bool required = true) {
    auto it = doc_.find(key);
    if (it == doc_.end()) {
      return required ? absl::InvalidArgumentError(absl::StrCat("config.json: missing key ", key)) : absl::OkStatus();
    }
    if (!it->is_number_integer()) {
      return absl::InvalidArgumentError(absl::StrCat("config.json: key ", key, " must be an integer, got ", it->dump()));
    }
    *out = it->get<int64_t>();
    if (*out < min_value) {
      return absl::InvalidArgumentError(absl::StrCat("config.json: key ", key, " must be >= ", min_value, ", got ", *out));
    }
    return absl::OkStatus();
  }

  absl::Status Float(const char* key, double* out, bool positive, bool required = true) {
    auto it = doc_.find(key);
    if (it == doc_.end()) {
      return required ? absl::InvalidArgumentError(absl::StrCat("config.json: missing key ", key)) : absl::OkStatus();
    }
    if (!it->is_number()) {
      return absl::InvalidArgumentError(absl::StrCat("config.json: key ", key, " must be a number, got ", it->dump()));
    }
    *out = it->get<double>();
    if (!std::isfinite(*out) || (positive && *out <= 0)) {
      return absl::InvalidArgumentError(absl::StrCat("config.json: key ", key, " must be a positive number, got ", it->dump()));
    }
    return absl::OkStatus();
  }

 private:
  const json& doc_;
};

absl::Status Invalid(const std::string& key, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat("config.json: key ", key, " ", why));
}

}  // namespace

absl::StatusOr<ModelConfig> ParseConfig(const json& doc) {
  if (!doc.is_object()) return absl::InvalidArgumentError("config.json: top level must be a JSON object");
  ModelConfig c;
  Reader r(doc);
  TANDEM_RETURN_IF_ERROR(r.Int("hidden_size", &c.hidden_size, 1));
  TANDEM_RETURN_IF_ERROR(r.Int("num_hidden_layers", &c.num_hidden_layers, 1));
  TANDEM_RETURN_IF_ERROR(r.Int("num_attention_heads", &c.num_attention_heads, 1));
  TANDEM_RETURN_IF_ERROR(r.Int("num_key_value_heads", &c.num_key_value_heads, 1));
  TANDEM_RETURN_IF_ERROR(r.Int("head_dim", &c.head_dim, 1));
  TANDEM_RETURN_IF_ERROR(r.Int("qk_rope_head_dim", &c.qk_rope_head_dim, 2));
  TANDEM_RETURN_IF_ERROR(r.Int("q_lora_rank", &c.q_lora_rank, 1));
  TANDEM_RETURN_IF_ERROR(r.Int("o_groups", &c.o_groups, 1));
  TANDEM_RETURN_IF_ERROR(r.Int("o_lora_rank", &c.o_lora_rank, 1));
  if (doc.contains("sliding_window")) {
    TANDEM_RETURN_IF_ERROR(r.Int("sliding_window", &c.sliding_window, 1));
  } else {
    TANDEM_RETURN_IF_ERROR(r.Int("window_size", &c.sliding_window, 1));
  }
  TANDEM_RETURN_IF_ERROR(r.Float("rope_theta", &c.rope_theta, true));
  TANDEM_RETURN_IF_ERROR(r.Float("compress_rope_theta", &c.compress_rope_theta, true));
  TANDEM_RETURN_IF_ERROR(r.Int("max_position_embeddings", &c.max_position_embeddings, 1));
  TANDEM_RETURN_IF_ERROR(r.Int("index_n_heads", &c.index_n_heads, 1));
  TANDEM_RETURN_IF_ERROR(r.Int("index_head_dim", &c.index_head_dim, 1));
  TANDEM_RETURN_IF_ERROR(r.Int("index_topk", &c.index_topk, 1));
  TANDEM_RETURN_IF_ERROR(r.Int("n_routed_experts", &c.n_routed_experts, 1));
  TANDEM_RETURN_IF_ERROR(r.Int("n_shared_experts", &c.n_shared_experts, 0));
  TANDEM_RETURN_IF_ERROR(r.Int("num_experts_per_tok", &c.num_experts_per_tok, 1));
  TANDEM_RETURN_IF_ERROR(r.Int("moe_intermediate_size", &c.moe_intermediate_size, 1));
  TANDEM_RETURN_IF_ERROR(r.Int("num_hash_layers", &c.num_hash_layers, 0));
  TANDEM_RETURN_IF_ERROR(r.Float("routed_scaling_factor", &c.routed_scaling_factor, true));
  TANDEM_RETURN_IF_ERROR(r.Float("swiglu_limit", &c.swiglu_limit, true));
  TANDEM_RETURN_IF_ERROR(r.Int("hc_mult", &c.hc_mult, 1));
  TANDEM_RETURN_IF_ERROR(r.Int("hc_sinkhorn_iters", &c.hc_sinkhorn_iters, 1));
  TANDEM_RETURN_IF_ERROR(r.Float("hc_eps", &c.hc_eps, true));
  TANDEM_RETURN_IF_ERROR(r.Float("rms_norm_eps", &c.rms_norm_eps, true));
  TANDEM_RETURN_IF_ERROR(r.Int("vocab_size", &c.vocab_size, 2));
  TANDEM_RETURN_IF_ERROR(r.Int("num_nextn_predict_layers", &c.num_nextn_predict_layers, 0, /*required=*/false));
  TANDEM_RETURN_IF_ERROR(r.Int("bos_token_id", &c.bos_token_id, 0, false));
  TANDEM_RETURN_IF_ERROR(r.Int("eos_token_id", &c.eos_token_id, 0, false));

  // Checks the model's code relies on.
  if (c.num_key_value_heads != 1) return Invalid("num_key_value_heads", "must be 1 (DSV4 uses one shared KV head)");
  if (c.n_shared_experts != 1) return Invalid("n_shared_experts", "must be 1");
  if (c.num_nextn_predict_layers > 1) return Invalid("num_nextn_predict_layers", "must be 0 or 1");
  if (c.qk_rope_head_dim % 2 != 0 || c.qk_rope_head_dim >= c.head_dim) {
    return Invalid("qk_rope_head_dim", "must be even and smaller than head_dim");
  }
  if (c.nope_dim() % 64 != 0) return Invalid("head_dim", "minus qk_rope_head_dim must be a multiple of 64 (FP8 KV tiles)");
  if (c.num_attention_heads % c.o_groups != 0) return Invalid("o_groups", "must divide num_attention_heads");
  if ((c.index_head_dim & (c.index_head_dim - 1)) != 0 || c.index_head_dim <= c.qk_rope_head_dim) {
    return Invalid("index_head_dim", "must be a power of two larger than qk_rope_head_dim (Hadamard transform)");
  }
  if (c.num_experts_per_tok > c.n_routed_experts) return Invalid("num_experts_per_tok", "must be <= n_routed_experts");
  if (c.num_hash_layers > c.num_hidden_layers) return Invalid("num_hash_layers", "must be <= num_hidden_layers");
  if (c.moe_intermediate_size % 32 != 0) return Invalid("moe_intermediate_size", "must be a multiple of 32 (MXFP4 blocks)");
  if (c.hidden_size % 32 != 0) return Invalid("hidden_size", "must be a multiple of 32 (MXFP4 blocks)");
  if (c.bos_token_id >= c.vocab_size) return Invalid("bos_token_id", "must be < vocab_size");
  if (c.eos_token_id >= c.vocab_size) return Invalid("eos_token_id", "must be < vocab_size");

  if (auto it = doc.find("hidden_act"); it != doc.end() && (*it) != "silu") return Invalid("hidden_act", "must be \"silu\"");
  if (auto it = doc.find("scoring_func"); it != doc.end() && (*it) != "sqrtsoftplus") {
    return Invalid("scoring_func", "must be \"sqrtsoftplus\"");
  }

  if (auto it = doc.find("rope_scaling"); it != doc.end() && !it->is_null()) {
    if (!it->is_object()) return Invalid("rope_scaling", "must be an object");
    const json& rs = *it;
    auto number = [&](const char* key, double* out) -> absl::Status {
      auto f = rs.find(key);
      if (f == rs.end()) return absl::InvalidArgumentError(absl::StrCat("config.json: missing key rope_scaling.", key));
      if (!f->is_number() || f->get<double>() <= 0) {
        return absl::InvalidArgumentError(absl::StrCat("config.json: key rope_scaling.", key, " must be a positive number"));
      }
      *out = f->get<double>();
      return absl::OkStatus();
    };
    double original = 0;
    TANDEM_RETURN_IF_ERROR(number("factor", &c.rope_scaling.factor));
    TANDEM_RETURN_IF_ERROR(number("beta_fast", &c.rope_scaling.beta_fast));
    TANDEM_RETURN_IF_ERROR(number("beta_slow", &c.rope_scaling.beta_slow));
    TANDEM_RETURN_IF_ERROR(number("original_max_position_embeddings", &original));
    c.rope_scaling.original_max_position_embeddings = static_cast<int64_t>(original);
  }

  std::string expert_dtype = "fp4";
  if (auto it = doc.find("expert_dtype"); it != doc.end() && !it->is_null()) {
    if (!it->is_string()) return Invalid("expert_dtype", "must be \"fp4\" or \"fp8\"");
    expert_dtype = it->get<std::string>();
  }
  if (expert_dtype == "fp4") c.expert_dtype = ExpertDType::kFp4;
  else if (expert_dtype == "fp8") c.expert_dtype = ExpertDType::kFp8;
  else return Invalid("expert_dtype", absl::StrCat("must be \"fp4\" or \"fp8\", got \"", expert_dtype, "\""));

  auto ratios = doc.find("compress_ratios");
  if (ratios == doc.end()) return absl::InvalidArgumentError("config.json: missing key compress_ratios");
  if (!ratios->is_array()) return Invalid("compress_ratios", "must be an array");
  const int64_t want = c.num_hidden_layers + c.num_nextn_predict_layers;
  if (static_cast<int64_t>(ratios->size()) != want) {
    return Invalid("compress_ratios", absl::StrCat("must have num_hidden_layers + num_nextn_predict_layers = ", want,
                                                   " entries, got ", ratios->size()));
  }
  for (size_t i = 0; i < ratios->size(); ++i) {
    const json& v = (*ratios)[i];
    if (!v.is_number_integer() || (v.get<int>() != 0 && v.get<int>() != 4 && v.get<int>() != 128)) {
      return Invalid(absl::StrCat("compress_ratios[", i, "]"), absl::StrCat("must be 0, 4 or 128, got ", v.dump()));
    }
    c.compress_ratios.push_back(v.get<int>());
  }

  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    c.layers.push_back({static_cast<int>(i), c.compress_ratios[i], i < c.num_hash_layers, false});
  }
  // The MTP layer always runs as a window-only, learned-gate layer (its listed ratio is not used).
  if (c.has_mtp()) c.layers.push_back({static_cast<int>(c.num_hidden_layers), 0, false, true});
  return c;
}

absl::StatusOr<ModelConfig> LoadConfig(const std::string& model_dir) {
  const std::string path = model_dir + "/config.json";
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("model dir ", model_dir, ": config.json missing or unreadable"));
  std::stringstream text;
  text << in.rdbuf();
  json doc = json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, ": not valid JSON"));
  auto config = ParseConfig(doc);
  if (!config.ok()) return absl::Status(config.status().code(), absl::StrCat("model dir ", model_dir, ": ", config.status().message()));
  return config;
}

json ConfigToJson(const ModelConfig& c) {
  json doc = {
      {"architectures", {"DeepseekV4ForCausalLM"}},
      {"model_type", "deepseek_v4"},
      {"hidden_size", c.hidden_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_key_value_heads},
      {"head_dim", c.head_dim},
      {"qk_rope_head_dim", c.qk_rope_head_dim},
      {"qk_nope_head_dim", c.nope_dim()},
      {"q_lora_rank", c.q_lora_rank},
      {"o_groups", c.o_groups},
      {"o_lora_rank", c.o_lora_rank},
      {"sliding_window", c.sliding_window},
      {"compress_ratios", c.compress_ratios},
      {"rope_theta", c.rope_theta},
      {"compress_rope_theta", c.compress_rope_theta},
      {"max_position_embeddings", c.max_position_embeddings},
      {"index_n_heads", c.index_n_heads},
      {"index_head_dim", c.index_head_dim},
      {"index_topk", c.index_topk},
      {"n_routed_experts", c.n_routed_experts},
      {"n_shared_experts", c.n_shared_experts},
      {"num_experts_per_tok", c.num_experts_per_tok},
      {"moe_intermediate_size", c.moe_intermediate_size},
      {"num_hash_layers", c.num_hash_layers},
      {"scoring_func", "sqrtsoftplus"},
      {"topk_method", "noaux_tc"},
      {"norm_topk_prob", true},
      {"routed_scaling_factor", c.routed_scaling_factor},
      {"swiglu_limit", c.swiglu_limit},
      {"hidden_act", "silu"},
      {"first_k_dense_replace", 0},
      {"moe_layer_freq", 1},
      {"hc_mult", c.hc_mult},
      {"hc_sinkhorn_iters", c.hc_sinkhorn_iters},
      {"hc_eps", c.hc_eps},
      {"rms_norm_eps", c.rms_norm_eps},
      {"vocab_size", c.vocab_size},
      {"num_nextn_predict_layers", c.num_nextn_predict_layers},
      {"tie_word_embeddings", false},
      {"bos_token_id", c.bos_token_id},
      {"eos_token_id", c.eos_token_id},
      {"torch_dtype", "bfloat16"},
      {"expert_dtype", c.expert_dtype == ExpertDType::kFp4 ? "fp4" : "fp8"},
      {"quantization_config",
       {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"activation_scheme", "dynamic"}, {"scale_fmt", "ue8m0"},
        {"weight_block_size", {128, 128}}}},
  };
  if (c.rope_scaling.original_max_position_embeddings > 0) {
    doc["rope_scaling"] = {{"type", "yarn"},
                           {"factor", c.rope_scaling.factor},
                           {"beta_fast", c.rope_scaling.beta_fast},
                           {"beta_slow", c.rope_scaling.beta_slow},
                           {"original_max_position_embeddings", c.rope_scaling.original_max_position_embeddings}};
  }
  return doc;
}

}  // namespace tandem::model
