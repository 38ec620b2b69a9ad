#include "common/model/weights.h"

#include <algorithm>
#include <cmath>

#include "common/core/dtype.h"
#include "common/model/safetensors.h"

namespace tandem::model {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

InitHint Normal(double std, double mean = 0.0) { return {InitHint::Kind::kNormal, std, mean}; }
InitHint Fan(int64_t fan_in) { return Normal(1.0 / std::sqrt(static_cast<double>(fan_in))); }
// Projections back into the residual streams: a sublayer moves the streams by a fraction of their
// size, as in trained models, instead of replacing them.
InitHint Residual(int64_t fan_in) { return Normal(0.25 / std::sqrt(static_cast<double>(fan_in))); }
const InitHint kNormInit = Normal(0.05, 1.0);

void VisitMhc(const ModelConfig& c, const std::string& prefix, ParamVisitor& v, MhcWeights& w) {
  const int64_t mix = c.hc_mix_dim();
  v.Vector(prefix + "_fn", DType::kF32, {mix, c.hc_dim()}, &w.fn, Fan(c.hc_dim()));
  v.Vector(prefix + "_base", DType::kF32, {mix}, &w.base, Normal(0.1));
  v.Vector(prefix + "_scale", DType::kF32, {3}, &w.scale, Normal(0.1, 0.5));
}

void VisitCompressor(const ModelConfig& c, const std::string& prefix, int ratio, int64_t dim, ParamVisitor& v,
                     CompressorWeights& w) {
  const int64_t width = (ratio == 4 ? 2 : 1) * dim;
  w.ratio = ratio;
  w.dim = dim;
  v.Bf16Linear(prefix + ".wkv.weight", width, c.hidden_size, &w.wkv, Fan(c.hidden_size));
  v.Bf16Linear(prefix + ".wgate.weight", width, c.hidden_size, &w.wgate, Fan(c.hidden_size));
  v.Vector(prefix + ".ape", DType::kF32, {ratio, width}, &w.ape, Normal(0.2));
  v.Vector(prefix + ".norm.weight", DType::kBF16, {dim}, &w.norm, kNormInit);
}

void VisitAttention(const ModelConfig& c, const LayerSpec& spec, const std::string& p, ParamVisitor& v,
                    AttentionWeights& w) {
  const int64_t heads = c.num_attention_heads, hd = c.head_dim;
  const int64_t group_in = heads / c.o_groups * hd;
  v.Vector(p + "attn_sink", DType::kF32, {heads}, &w.attn_sink, Normal(0.5));
  v.Fp8Linear(p + "wq_a", c.q_lora_rank, c.hidden_size, &w.wq_a, Fan(c.hidden_size));
  v.Vector(p + "q_norm.weight", DType::kBF16, {c.q_lora_rank}, &w.q_norm, kNormInit);
  v.Fp8Linear(p + "wq_b", heads * hd, c.q_lora_rank, &w.wq_b, Fan(c.q_lora_rank));
  v.Fp8Linear(p + "wkv", hd, c.hidden_size, &w.wkv, Fan(c.hidden_size));
  v.Vector(p + "kv_norm.weight", DType::kBF16, {hd}, &w.kv_norm, kNormInit);
  v.Fp8Linear(p + "wo_a", c.o_groups * c.o_lora_rank, group_in, &w.wo_a, Fan(group_in));
  v.Fp8Linear(p + "wo_b", c.hidden_size, c.o_groups * c.o_lora_rank, &w.wo_b, Residual(c.o_groups * c.o_lora_rank));
  if (spec.compress_ratio > 0) {
    if (!w.compressor) w.compressor = std::make_unique<CompressorWeights>();
    VisitCompressor(c, p + "compressor", spec.compress_ratio, hd, v, *w.compressor);
  }
  if (spec.compress_ratio == 4) {
    if (!w.indexer) w.indexer = std::make_unique<IndexerWeights>();
    auto& ix = *w.indexer;
    v.Fp8Linear(p + "indexer.wq_b", c.index_n_heads * c.index_head_dim, c.q_lora_rank, &ix.wq_b, Fan(c.q_lora_rank));
    v.Bf16Linear(p + "indexer.weights_proj.weight", c.index_n_heads, c.hidden_size, &ix.weights_proj, Fan(c.hidden_size));
    VisitCompressor(c, p + "indexer.compressor", 4, c.index_head_dim, v, ix.compressor);
  }
}

void VisitMoe(const ModelConfig& c, const LayerSpec& spec, ExpertDType experts, const std::string& p,
              ParamVisitor& v, MoeWeights& w) {
  const int64_t D = c.hidden_size, I = c.moe_intermediate_size, E = c.n_routed_experts;
  v.Bf16Linear(p + "gate.weight", E, D, &w.gate, Fan(D));
  if (spec.hash_routed) {
    v.RoutingTable(p + "gate.tid2eid", c.vocab_size, c.num_experts_per_tok, E, &w.tid2eid);
  } else {
    v.Vector(p + "gate.bias", DType::kF32, {E}, &w.bias, Normal(0.1));
  }
  w.experts.resize(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) {
    const std::string q = p + "experts." + std::to_string(e) + ".";
    v.Expert(q + "w1", I, D, experts, &w.experts[e].w1, Fan(D));
    v.Expert(q + "w2", D, I, experts, &w.experts[e].w2, Residual(I));
    v.Expert(q + "w3", I, D, experts, &w.experts[e].w3, Fan(D));
  }
  v.Expert(p + "shared_experts.w1", I, D, ExpertDType::kFp8, &w.shared.w1, Fan(D));
  v.Expert(p + "shared_experts.w2", D, I, ExpertDType::kFp8, &w.shared.w2, Residual(I));
  v.Expert(p + "shared_experts.w3", I, D, ExpertDType::kFp8, &w.shared.w3, Fan(D));
}

void VisitLayer(const ModelConfig& c, const LayerSpec& spec, ExpertDType experts, const std::string& p,
                ParamVisitor& v, LayerWeights& w) {
  w.spec = spec;
  v.Vector(p + "attn_norm.weight", DType::kBF16, {c.hidden_size}, &w.attn_norm, kNormInit);
  v.Vector(p + "ffn_norm.weight", DType::kBF16, {c.hidden_size}, &w.ffn_norm, kNormInit);
  VisitMhc(c, p + "hc_attn", v, w.hc_attn);
  VisitMhc(c, p + "hc_ffn", v, w.hc_ffn);
  VisitAttention(c, spec, p + "attn.", v, w.attn);
  VisitMoe(c, spec, experts, p + "ffn.", v, w.ffn);
}

void VisitHcHead(const ModelConfig& c, const std::string& p, ParamVisitor& v, HcHeadWeights& w) {
  v.Vector(p + "hc_head_fn", DType::kF32, {c.hc_mult, c.hc_dim()}, &w.fn, Fan(c.hc_dim()));
  v.Vector(p + "hc_head_base", DType::kF32, {c.hc_mult}, &w.base, Normal(0.1));
  v.Vector(p + "hc_head_scale", DType::kF32, {1}, &w.scale, Normal(0.1, 0.5));
}

}  // namespace

void VisitModelParams(const ModelConfig& c, ExpertDType stored_experts, const VisitScope& scope, ParamVisitor& v,
                      ModelWeights& w) {
  if (scope.embed) {
    v.Bf16Table("embed.weight", c.vocab_size, c.hidden_size, &w.embed, Normal(1.0));
  }
  for (int id = scope.begin_layer; id < scope.end_layer; ++id) {
    VisitLayer(c, c.layers[id], stored_experts, "layers." + std::to_string(id) + ".", v,
               w.layers[static_cast<size_t>(id - scope.begin_layer)]);
  }
  if (scope.head) {
    v.Vector("norm.weight", DType::kBF16, {c.hidden_size}, &w.norm, kNormInit);
    VisitHcHead(c, "", v, w.hc_head);
    v.Bf16Linear("head.weight", c.vocab_size, c.hidden_size, &w.head, Fan(c.hidden_size));
  }
  if (scope.mtp && c.has_mtp()) {
    auto& m = *w.mtp;
    const std::string p = "mtp.0.";
    VisitLayer(c, c.mtp_layer(), stored_experts, p, v, m.layer);
    v.Fp8Linear(p + "e_proj", c.hidden_size, c.hidden_size, &m.e_proj, Fan(c.hidden_size));
    v.Fp8Linear(p + "h_proj", c.hidden_size, c.hidden_size, &m.h_proj, Fan(c.hidden_size));
    v.Vector(p + "enorm.weight", DType::kBF16, {c.hidden_size}, &m.enorm, kNormInit);
    v.Vector(p + "hnorm.weight", DType::kBF16, {c.hidden_size}, &m.hnorm, kNormInit);
    v.Vector(p + "norm.weight", DType::kBF16, {c.hidden_size}, &m.norm, kNormInit);
    VisitHcHead(c, p, v, m.hc_head);
  }
}

namespace {

std::vector<float> ToFloat(const Tensor& t) {
  std::vector<float> out(static_cast<size_t>(t.numel()));
  switch (t.dtype()) {
    case DType::kF32:
      std::copy(t.as<float>(), t.as<float>() + t.numel(), out.begin());
      break;
    case DType::kBF16:
      for (int64_t i = 0; i < t.numel(); ++i) out[i] = Bf16ToFloat(t.as<uint16_t>()[i]);
      break;
    default:
      break;
  }
  return out;
}

// Re-encodes MXFP4 rows as block FP8 exactly when possible: per 128x128 tile the scale is
// max(block scales)/2^6... chosen as the largest block scale; a value v*s (|v| <= 6) becomes
// e4m3(v * s / tile_scale), exact while s/tile_scale >= 2^-6 (e4m3 subnormals reach 2^-9).
PackedWeight Mxfp4ToFp8(const PackedWeight& src) {
  const auto& q = src.view;
  PackedWeight dst;
  const int64_t block_rows = CeilDiv(q.out, kFp8WeightBlock), block_cols = CeilDiv(q.in, kFp8WeightBlock);
  dst.codes = Tensor(DType::kF8E4M3, {q.out, q.in});
  dst.scales = Tensor(DType::kF8E8M0, {block_rows, block_cols});
  const int64_t groups = q.in / kMxfp4Block;
  for (int64_t br = 0; br < block_rows; ++br) {
    for (int64_t bc = 0; bc < block_cols; ++bc) {
      uint8_t tile = 0;
      for (int64_t r = br * 128; r < std::min(q.out, br * 128 + 128); ++r)
        for (int64_t g = bc * 4; g < std::min(groups, bc * 4 + 4); ++g) tile = std::max(tile, q.scales[r * groups + g]);
      dst.scales.data()[br * block_cols + bc] = tile;
    }
  }
  std::vector<float> row(static_cast<size_t>(q.in));
  for (int64_t r = 0; r < q.out; ++r) {
    kernels::DequantizeRows(q, r, 1, row.data());
    for (int64_t c = 0; c < q.in; ++c) {
      const float scale = Ue8m0ToFloat(dst.scales.data()[(r / 128) * block_cols + c / 128]);
      dst.codes.data()[r * q.in + c] = FloatToFp8E4M3(row[c] / scale);
    }
  }
  dst.view = {kernels::QuantizedWeight::Format::kFp8Block, dst.codes.data(), dst.scales.data(), q.out, q.in};
  return dst;
}

class LoadVisitor final : public ParamVisitor {
 public:
  LoadVisitor(Checkpoint& checkpoint, ExpertDType run_experts) : ck_(checkpoint), run_experts_(run_experts) {}
  absl::Status status() const { return status_; }

  void Fp8Linear(const std::string& name, int64_t out, int64_t in, DenseWeight* dst, InitHint) override {
    if (!status_.ok()) return;
    auto codes = ck_.Load(name + ".weight", DType::kF8E4M3, {out, in});
    if (!Check(codes.status())) return;
    auto scales = ck_.Load(name + ".scale", DType::kF8E8M0, {CeilDiv(out, 128), CeilDiv(in, 128)});
    if (!Check(scales.status())) return;
    dst->out = out;
    dst->in = in;
    dst->values.resize(static_cast<size_t>(out * in));
    DequantizeFp8Blocks(codes->raw(), scales->raw(), out, in, dst->values);
  }

  void Bf16Linear(const std::string& name, int64_t out, int64_t in, DenseWeight* dst, InitHint) override {
    if (!status_.ok()) return;
    auto t = ck_.Load(name, DType::kBF16, {out, in});
    if (!Check(t.status())) return;
    dst->out = out;
    dst->in = in;
    dst->values = ToFloat(*t);
  }

  void Vector(const std::string& name, DType dtype, const std::vector<int64_t>& shape, std::vector<float>* dst,
              InitHint) override {
    if (!status_.ok()) return;
    auto t = ck_.Load(name, dtype, shape);
    if (!Check(t.status())) return;
    *dst = ToFloat(*t);
    for (float x : *dst) {
      if (!std::isfinite(x)) {
        status_ = absl::InvalidArgumentError(absl::StrCat("tensor ", name, ": holds a non-finite value"));
        return;
      }
    }
  }

  void Bf16Table(const std::string& name, int64_t rows, int64_t cols, Tensor* dst, InitHint) override {
    if (!status_.ok()) return;
    auto t = ck_.Load(name, DType::kBF16, {rows, cols});
    if (Check(t.status())) *dst = std::move(*t);
  }

  void Expert(const std::string& name, int64_t out, int64_t in, ExpertDType format, PackedWeight* dst,
              InitHint) override {
    if (!status_.ok()) return;
    if (format == ExpertDType::kFp4) {
      auto codes = ck_.Load(name + ".weight", DType::kI8, {out, in / 2});
      if (!Check(codes.status())) return;
      auto scales = ck_.Load(name + ".scale", DType::kF8E8M0, {out, in / kMxfp4Block});
      if (!Check(scales.status())) return;
      dst->codes = std::move(*codes);
      dst->scales = std::move(*scales);
      dst->view = {kernels::QuantizedWeight::Format::kMxfp4, dst->codes.data(), dst->scales.data(), out, in};
      if (run_experts_ == ExpertDType::kFp8) *dst = Mxfp4ToFp8(*dst);
      return;
    }
    auto codes = ck_.Load(name + ".weight", DType::kF8E4M3, {out, in});
    if (!Check(codes.status())) return;
    auto scales = ck_.Load(name + ".scale", DType::kF8E8M0, {CeilDiv(out, 128), CeilDiv(in, 128)});
    if (!Check(scales.status())) return;
    dst->codes = std::move(*codes);
    dst->scales = std::move(*scales);
    dst->view = {kernels::QuantizedWeight::Format::kFp8Block, dst->codes.data(), dst->scales.data(), out, in};
  }

  void RoutingTable(const std::string& name, int64_t vocab, int64_t k, int64_t experts,
                    std::vector<int32_t>* dst) override {
    if (!status_.ok()) return;
    auto t = ck_.Load(name, DType::kI64, {vocab, k});
    if (!Check(t.status())) return;
    dst->resize(static_cast<size_t>(vocab * k));
    for (int64_t i = 0; i < vocab * k; ++i) {
      const int64_t e = t->as<int64_t>()[i];
      if (e < 0 || e >= experts) {
        status_ = absl::InvalidArgumentError(
            absl::StrCat("tensor ", name, ": expert id ", e, " at row ", i / k, " is outside [0, ", experts, ")"));
        return;
      }
      (*dst)[i] = static_cast<int32_t>(e);
    }
  }

 private:
  bool Check(const absl::Status& s) {
    if (!s.ok()) status_ = s;
    return s.ok();
  }
  Checkpoint& ck_;
  ExpertDType run_experts_;
  absl::Status status_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<ModelWeights>> LoadModelWeights(const std::string& model_dir, const LoadOptions& options) {
  TANDEM_ASSIGN_OR_RETURN(ModelConfig config, LoadConfig(model_dir));
  auto w = std::make_unique<ModelWeights>();
  w->begin_layer = options.begin_layer;
  w->end_layer = options.end_layer < 0 ? static_cast<int>(config.num_hidden_layers) : options.end_layer;
  if (w->begin_layer < 0 || w->begin_layer >= w->end_layer || w->end_layer > config.num_hidden_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer range [", w->begin_layer, ", ", w->end_layer,
                                                   ") is not inside [0, ", config.num_hidden_layers, ")"));
  }
  w->expert_dtype = options.expert_dtype.value_or(config.expert_dtype);
  if (config.expert_dtype == ExpertDType::kFp8 && w->expert_dtype == ExpertDType::kFp4) {
    return absl::InvalidArgumentError(
        "--expert-dtype fp4: the checkpoint's experts are FP8 and cannot be converted to MXFP4 without loss");
  }
  w->config = std::move(config);
  const ModelConfig& c = w->config;
  VisitScope scope;
  scope.begin_layer = w->begin_layer;
  scope.end_layer = w->end_layer;
  scope.head = w->is_last_stage();
  scope.mtp = scope.head && options.load_mtp && c.has_mtp();
  scope.embed = w->is_first_stage() || scope.mtp;
  w->layers.resize(static_cast<size_t>(w->end_layer - w->begin_layer));
  if (scope.mtp) w->mtp = std::make_unique<MtpWeights>();

  CheckpointOptions ck_options;
  ck_options.drop_cache_after_load = options.drop_cache_after_load;
  ck_options.show_progress = options.show_progress;
  TANDEM_ASSIGN_OR_RETURN(auto checkpoint, Checkpoint::Open(model_dir, ck_options));
  LoadVisitor visitor(*checkpoint, w->expert_dtype);
  VisitModelParams(c, c.expert_dtype, scope, visitor, *w);
  checkpoint->Finish();
  TANDEM_RETURN_IF_ERROR(visitor.status());
  return w;
}

}  // namespace tandem::model
