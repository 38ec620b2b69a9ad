#include "common/model/generator.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>

#include "common/core/dtype.h"
#include "common/core/logging.h"
#include "common/core/random.h"
#include "common/model/safetensors.h"
#include "common/model/weights.h"

namespace tandem::model {
namespace {

namespace fs = std::filesystem;

ModelConfig BaseConfig() {
  ModelConfig c;
  c.num_key_value_heads = 1;
  c.head_dim = 512;
  c.qk_rope_head_dim = 64;
  c.sliding_window = 128;
  c.rope_theta = 10000.0;
  c.compress_rope_theta = 160000.0;
  c.rope_scaling = {16.0, 32.0, 1.0, 65536};
  c.max_position_embeddings = 1048576;
  c.index_n_heads = 64;
  c.index_head_dim = 128;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 6;
  c.num_hash_layers = 3;
  c.routed_scaling_factor = 1.5;
  c.swiglu_limit = 10.0;
  c.hc_mult = 4;
  c.hc_sinkhorn_iters = 20;
  c.hc_eps = 1e-6;
  c.rms_norm_eps = 1e-6;
  c.vocab_size = 129280;
  c.num_nextn_predict_layers = 1;
  c.bos_token_id = 0;
  c.eos_token_id = 1;
  c.expert_dtype = ExpertDType::kFp4;
  return c;
}

using Rng = Xoshiro256;

uint64_t HashName(const std::string& name) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : name) h = (h ^ ch) * 1099511628211ull;
  return h;
}

class GenerateVisitor final : public ParamVisitor {
 public:
  explicit GenerateVisitor(uint64_t seed) : seed_(seed) {}
  std::vector<std::pair<std::string, Tensor>>& tensors() { return tensors_; }

  void Fp8Linear(const std::string& name, int64_t out, int64_t in, DenseWeight*, InitHint init) override {
    const auto values = Sample(name, out * in, init);
    AddFp8(name, out, in, values);
  }
  void Bf16Linear(const std::string& name, int64_t out, int64_t in, DenseWeight*, InitHint init) override {
    AddBf16(name, {out, in}, Sample(name, out * in, init));
  }
  void Bf16Table(const std::string& name, int64_t rows, int64_t cols, Tensor*, InitHint init) override {
    AddBf16(name, {rows, cols}, Sample(name, rows * cols, init));
  }
  void Vector(const std::string& name, DType dtype, const std::vector<int64_t>& shape, std::vector<float>*,
              InitHint init) override {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    const auto values = Sample(name, n, init);
    if (dtype == DType::kBF16) {
      AddBf16(name, shape, values);
      return;
    }
    Tensor t(DType::kF32, shape);
    std::copy(values.begin(), values.end(), t.as<float>());
    tensors_.emplace_back(name, std::move(t));
  }
  void Expert(const std::string& name, int64_t out, int64_t in, ExpertDType format, PackedWeight*,
              InitHint init) override {
    const auto values = Sample(name, out * in, init);
    if (format == ExpertDType::kFp8) {
      AddFp8(name, out, in, values);
      return;
    }
    Tensor codes(DType::kI8, {out, in / 2}), scales(DType::kF8E8M0, {out, in / kMxfp4Block});
    QuantizeMxfp4(values, out, in, codes.raw(), scales.raw());
    tensors_.emplace_back(name + ".weight", std::move(codes));
    tensors_.emplace_back(name + ".scale", std::move(scales));
  }
  void RoutingTable(const std::string& name, int64_t vocab, int64_t k, int64_t experts, std::vector<int32_t>*) override {
    Rng rng(seed_ ^ HashName(name));
    Tensor t(DType::kI64, {vocab, k});
    std::vector<int64_t> pool(static_cast<size_t>(experts));
    for (int64_t v = 0; v < vocab; ++v) {
      for (int64_t e = 0; e < experts; ++e) pool[e] = e;
      for (int64_t i = 0; i < k; ++i) {  // partial Fisher-Yates: k distinct experts
        const int64_t j = i + static_cast<int64_t>(rng.Next() % static_cast<uint64_t>(experts - i));
        std::swap(pool[i], pool[j]);
        t.as<int64_t>()[v * k + i] = pool[i];
      }
    }
    tensors_.emplace_back(name, std::move(t));
  }

 private:
  std::vector<float> Sample(const std::string& name, int64_t n, InitHint init) {
    std::vector<float> values(static_cast<size_t>(n));
    if (init.kind == InitHint::Kind::kOnes || init.kind == InitHint::Kind::kZeros) {
      std::fill(values.begin(), values.end(), init.kind == InitHint::Kind::kOnes ? 1.0f : 0.0f);
      return values;
    }
    Rng rng(seed_ ^ HashName(name));
    for (auto& v : values) v = static_cast<float>(init.mean + init.std * rng.Normal());
    return values;
  }
  void AddFp8(const std::string& name, int64_t out, int64_t in, const std::vector<float>& values) {
    Tensor codes(DType::kF8E4M3, {out, in});
    Tensor scales(DType::kF8E8M0, {(out + 127) / 128, (in + 127) / 128});
    QuantizeFp8Blocks(values, out, in, codes.raw(), scales.raw());
    tensors_.emplace_back(name + ".weight", std::move(codes));
    tensors_.emplace_back(name + ".scale", std::move(scales));
  }
  void AddBf16(const std::string& name, const std::vector<int64_t>& shape, const std::vector<float>& values) {
    Tensor t(DType::kBF16, shape);
    for (size_t i = 0; i < values.size(); ++i) t.as<uint16_t>()[i] = FloatToBf16(values[i]);
    tensors_.emplace_back(name, std::move(t));
  }

  uint64_t seed_;
  std::vector<std::pair<std::string, Tensor>> tensors_;
};

}  // namespace

absl::StatusOr<ModelConfig> PresetConfig(const std::string& preset) {
  ModelConfig c = BaseConfig();
  if (preset == "tiny") {
    c.hidden_size = 256;
    c.num_hidden_layers = 4;
    c.compress_ratios = {0, 4, 128, 4, 0};
    c.num_hash_layers = 2;
    c.num_attention_heads = 4;
    c.q_lora_rank = 128;
    c.o_groups = 2;
    c.o_lora_rank = 128;
    c.index_n_heads = 4;
    c.index_topk = 16;
    c.n_routed_experts = 8;
    c.num_experts_per_tok = 2;
    c.moe_intermediate_size = 128;
  } else if (preset == "small") {
    c.hidden_size = 2048;
    c.num_hidden_layers = 8;
    c.compress_ratios = {0, 0, 4, 128, 4, 128, 4, 128, 0};
    c.num_attention_heads = 32;
    c.q_lora_rank = 1024;
    c.o_groups = 4;
    c.o_lora_rank = 1024;
    c.index_topk = 512;
    c.n_routed_experts = 16;
    c.moe_intermediate_size = 1024;
  } else if (preset == "flash-layer") {
    c.hidden_size = 4096;
    c.num_hidden_layers = 1;
    c.num_nextn_predict_layers = 0;
    c.compress_ratios = {4};
    c.num_hash_layers = 0;
    c.num_attention_heads = 64;
    c.q_lora_rank = 1024;
    c.o_groups = 8;
    c.o_lora_rank = 1024;
    c.index_topk = 512;
    c.n_routed_experts = 256;
    c.moe_intermediate_size = 2048;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("unknown preset \"", preset, "\" (tiny, small, flash-layer)"));
  }
  // Round-trip through the parser: derives the layer schedule and validates the preset.
  return ParseConfig(ConfigToJson(c));
}

absl::Status GenerateCheckpoint(const ModelConfig& config, const std::string& out_dir, const GenerateOptions& options) {
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", out_dir, ": ", ec.message()));
  {
    std::ofstream out(out_dir + "/config.json");
    out << ConfigToJson(config).dump(2) << "\n";
    if (!out) return absl::InternalError(absl::StrCat("cannot write ", out_dir, "/config.json"));
  }
  GenerateVisitor visitor(options.seed);
  ModelWeights shapes;  // only used as the visitor's destination slots
  shapes.layers.resize(static_cast<size_t>(config.num_hidden_layers));
  if (config.has_mtp()) shapes.mtp = std::make_unique<MtpWeights>();
  VisitScope scope{0, static_cast<int>(config.num_hidden_layers), true, true, config.has_mtp()};
  VisitModelParams(config, config.expert_dtype, scope, visitor, shapes);
  if (!options.quiet) spdlog::info("writing {} tensors to {}", visitor.tensors().size(), out_dir);
  TANDEM_RETURN_IF_ERROR(WriteShardedCheckpoint(out_dir, std::move(visitor.tensors()), options.shard_bytes));
  if (!options.tokenizer_dir.empty()) {
    for (const char* file : {"tokenizer.json", "tokenizer_config.json"}) {
      fs::copy_file(fs::path(options.tokenizer_dir) / file, fs::path(out_dir) / file, fs::copy_options::overwrite_existing, ec);
      if (ec) return absl::NotFoundError(absl::StrCat("cannot copy ", file, " from ", options.tokenizer_dir, ": ", ec.message()));
    }
  }
  return absl::OkStatus();
}

}  // namespace tandem::model
