#include "bench/kernel_ops.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "common/core/threads.h"
#include "common/kernels/kernels.h"
#include "common/model/forward.h"
#include "common/model/generator.h"
#include "common/model/layers.h"

// FLOP counting (a multiply-add is 2 FLOPs):
//   linear layers          2*M*out*in
//   rms_norm               4 per element (square, add, scale, weight); 3 without a weight
//   rope                   6 per rotated pair (4 mul, 2 add); the sin/cos it computes are not counted
//   hadamard               n*log2(n) butterflies + n scalings per vector
//   hc_pre                 2*M*mix*(M_hc*D) projection + 2*M*M_hc*D rms + 2*M*M_hc*D weighted sum
//   hc_post                M*M_hc*D*(1 + 2*M_hc)
//   attention              its projections + per query, head and candidate 4*head_dim (score + value),
//                          + the indexer's 2*visible*index_heads*index_dim when it has to select
//   moe                    gate + 2*M*3*I*D per routed expert slot (k per token) and shared expert
// Bytes are the weights a call must read in the format it reads them (f32 for dense layers, packed for
// MXFP4/FP8), or for the KV ops the cache entries written or read; MoE counts the experts expected to
// be hit under uniform routing, E*(1-(1-k/E)^M).

namespace tandem::bench {
namespace {

using model::DenseWeight;
using model::ModelConfig;
using Format = kernels::QuantizedWeight::Format;

double PackedBytes(const kernels::QuantizedWeight& w) {
  const double elements = static_cast<double>(w.out) * static_cast<double>(w.in);
  if (w.format == Format::kMxfp4) return elements / 2 + elements / kMxfp4Block;
  const int64_t block = kFp8WeightBlock;
  return elements + static_cast<double>(((w.out + block - 1) / block) * ((w.in + block - 1) / block));
}

double ExpertBytes(const model::ExpertWeights& e) {
  return PackedBytes(e.w1.view) + PackedBytes(e.w2.view) + PackedBytes(e.w3.view);
}

double Elements(const DenseWeight& w) { return static_cast<double>(w.out) * static_cast<double>(w.in); }

// The preset with main layer 0's compress ratio replaced, re-validated like any config.json.
absl::StatusOr<ModelConfig> WithRatio(const ModelConfig& c, int ratio) {
  nlohmann::json doc = model::ConfigToJson(c);
  doc["compress_ratios"][0] = ratio;
  return model::ParseConfig(doc);
}

template <typename T>
std::shared_ptr<T> Shared(T value) {
  return std::make_shared<T>(std::move(value));
}

}  // namespace

struct KernelSuite::AttentionSetup {
  int ratio = 0;
  int layer_id = 0;
  bool swapped = false;                           // from a config copy with another ratio on layer 0
  std::unique_ptr<ModelConfig> own_config;        // swapped setups only
  std::unique_ptr<model::ModelWeights> weights;   // swapped setups only (attention weights only)
  const ModelConfig* config = nullptr;
  const model::LayerWeights* layer = nullptr;
  std::unique_ptr<model::HostSequenceState> state;
  std::vector<double> inv_freq;
};

KernelSuite::~KernelSuite() = default;

absl::StatusOr<std::unique_ptr<KernelSuite>> KernelSuite::Create(const std::string& preset, int64_t context,
                                                                 int64_t max_tokens, uint64_t seed) {
  TANDEM_ASSIGN_OR_RETURN(ModelConfig config, model::PresetConfig(preset));
  std::unique_ptr<KernelSuite> suite(new KernelSuite());
  suite->preset_ = preset;
  suite->context_ = context;
  suite->max_tokens_ = max_tokens;
  suite->random_ = Random(seed);
  suite->config_ = std::make_unique<ModelConfig>(std::move(config));
  const ModelConfig& c = *suite->config_;
  const model::VisitScope scope{0, static_cast<int>(c.num_hidden_layers), /*embed=*/false, /*head=*/true,
                                /*mtp=*/false};
  suite->weights_ = MakeRandomWeights(c, scope, seed);
  suite->ffn_layer_ = static_cast<int>(c.num_hidden_layers) - 1;
  for (const auto& spec : c.layers) {
    if (!spec.is_mtp && !spec.hash_routed) suite->ffn_layer_ = spec.layer_id;
  }
  for (int ratio : {0, 4, 128}) {
    auto s = std::make_unique<AttentionSetup>();
    s->ratio = ratio;
    s->layer_id = -1;
    for (const auto& spec : c.layers) {
      if (!spec.is_mtp && spec.compress_ratio == ratio) s->layer_id = spec.layer_id;
    }
    if (s->layer_id >= 0) {
      s->config = &c;
      s->layer = &suite->weights_->layers[static_cast<size_t>(s->layer_id)];
    } else {
      TANDEM_ASSIGN_OR_RETURN(ModelConfig swapped, WithRatio(c, ratio));
      s->own_config = std::make_unique<ModelConfig>(std::move(swapped));
      s->config = s->own_config.get();
      s->weights = MakeRandomWeights(*s->config, {0, 1, false, false, false}, seed + 1 + static_cast<uint64_t>(ratio),
                                     [](const std::string& name) { return name.find(".attn.") != std::string::npos; });
      s->layer = &s->weights->layers[0];
      s->layer_id = 0;
      s->swapped = true;
    }
    s->state = std::make_unique<model::HostSequenceState>(*s->config, 0, static_cast<int>(s->config->num_hidden_layers),
                                                          /*with_mtp=*/false);
    PrefillState(*s->config, s->layer_id, ratio, context, max_tokens, *s->state, suite->random_);
    s->inv_freq = model::RopeInverseFrequencies(c.qk_rope_head_dim, ratio > 0 ? c.compress_rope_theta : c.rope_theta,
                                                ratio > 0 ? &c.rope_scaling : nullptr);
    suite->attention_.push_back(std::move(s));
  }
  return suite;
}

const model::LayerWeights& KernelSuite::Layer(int ratio) const {
  for (const auto& s : attention_) {
    if (s->ratio == ratio) return *s->layer;
  }
  return weights_->layers.back();
}

std::string KernelSuite::Describe() const {
  const ModelConfig& c = *config_;
  std::string text = fmt::format(
      "{}: D {}, heads {} x {}, q_lora {}, o_groups {} x {}, index {} x {} top-{}, experts {} top-{} (I {}, {}), "
      "vocab {}, hc {}\n",
      preset_, c.hidden_size, c.num_attention_heads, c.head_dim, c.q_lora_rank, c.o_groups, c.o_lora_rank,
      c.index_n_heads, c.index_head_dim, c.index_topk, c.n_routed_experts, c.num_experts_per_tok,
      c.moe_intermediate_size, c.expert_dtype == model::ExpertDType::kFp4 ? "MXFP4" : "FP8", c.vocab_size, c.hc_mult);
  text += fmt::format("  attention at context {}:", context_);
  for (const auto& s : attention_) {
    text += s->swapped ? fmt::format(" ratio {} = layer 0 with its ratio swapped in;", s->ratio)
                       : fmt::format(" ratio {} = layer {};", s->ratio, s->layer_id);
  }
  text += fmt::format(" MoE, gate, hc = layer {}", ffn_layer_);
  return text;
}

std::vector<BenchOp> KernelSuite::Ops() {
  std::vector<BenchOp> ops;
  AddDenseOps(ops);
  AddExpertOps(ops);
  AddSmallOps(ops);
  AddSublayerOps(ops);
  return ops;
}

void KernelSuite::AddDenseOps(std::vector<BenchOp>& ops) {
  struct Spec {
    std::string name;
    const float* weight;
    int64_t out, in;
  };
  auto spec = [](std::string name, const DenseWeight& w) { return Spec{std::move(name), w.values.data(), w.out, w.in}; };
  const ModelConfig& c = *config_;
  const auto& a4 = Layer(4).attn;
  const auto& a128 = Layer(128).attn;
  // wkv and wgate of a compressor have one shape, so one of them is timed.
  const std::vector<Spec> specs = {
      spec("attn.wq_a", a4.wq_a),
      spec("attn.wq_b", a4.wq_b),
      spec("attn.wkv", a4.wkv),
      {fmt::format("attn.wo_a (1 of {} groups)", c.o_groups), a4.wo_a.values.data(), c.o_lora_rank, a4.wo_a.in},
      spec("attn.wo_b", a4.wo_b),
      spec("c4.compressor.wkv|wgate", a4.compressor->wkv),
      spec("c128.compressor.wkv|wgate", a128.compressor->wkv),
      spec("indexer.wq_b", a4.indexer->wq_b),
      spec("indexer.weights_proj", a4.indexer->weights_proj),
      spec("indexer.compressor.wkv|wgate", a4.indexer->compressor.wkv),
      spec("moe.gate", weights_->layers[static_cast<size_t>(ffn_layer_)].ffn.gate),
      spec("head", weights_->head),
  };
  for (const auto& s : specs) {
    for (bool deterministic : {false, true}) {
      BenchOp op;
      op.section = "dense projections: kernels::Linear on f32 weights";
      op.op = fmt::format("{} {}x{}", s.name, s.out, s.in);
      op.mode = deterministic ? "deterministic" : "openblas";
      op.deterministic = deterministic;
      op.cost = [s](int64_t m) {
        const double elements = static_cast<double>(s.out) * static_cast<double>(s.in);
        return Cost{2.0 * static_cast<double>(m) * elements, 4.0 * elements};
      };
      op.prepare = [this, s](int64_t m) -> std::function<void()> {
        auto x = Shared(random_.Vector(m * s.in));
        auto y = Shared(std::vector<float>(static_cast<size_t>(m * s.out)));
        return [s, m, x, y] { kernels::Linear(x->data(), m, s.in, s.weight, s.out, y->data()); };
      };
      ops.push_back(std::move(op));
    }
  }
}

void KernelSuite::AddExpertOps(std::vector<BenchOp>& ops) {
  const ModelConfig& c = *config_;
  const int64_t D = c.hidden_size, I = c.moe_intermediate_size;
  const std::string section = "routed expert matrices: kernels::QuantizedLinear (f32: kernels::Linear baseline)";
  const size_t first = ops.size();
  struct Shape {
    std::string name;
    int64_t out, in;
  };
  for (const Shape& shape : {Shape{"expert.w1|w3", I, D}, Shape{"expert.w2", D, I}}) {
    const double std = 1.0 / std::sqrt(static_cast<double>(shape.in));
    const double elements = static_cast<double>(shape.out) * static_cast<double>(shape.in);
    const std::string name = fmt::format("{} {}x{}", shape.name, shape.out, shape.in);
    for (Format format : {Format::kMxfp4, Format::kFp8Block}) {
      auto matrix = Shared(MakeQuantizedMatrix(format, shape.out, shape.in, std, random_));
      BenchOp op;
      op.section = section;
      op.op = name;
      op.mode = format == Format::kMxfp4 ? "mxfp4" : "fp8";
      op.cost = [elements, matrix](int64_t m) {
        return Cost{2.0 * static_cast<double>(m) * elements, static_cast<double>(matrix->bytes())};
      };
      op.prepare = [this, matrix, shape](int64_t m) -> std::function<void()> {
        auto x = Shared(random_.Vector(m * shape.in));
        auto y = Shared(std::vector<float>(static_cast<size_t>(m * shape.out)));
        return [matrix, m, x, y] { kernels::QuantizedLinear(x->data(), m, matrix->view, y->data()); };
      };
      ops.push_back(op);
      // The dequantization alone, the way QuantizedLinear spreads it over the pool (all rows at once).
      BenchOp dequant = op;
      dequant.op = fmt::format("{} dequant only", shape.name);
      dequant.per_token = false;
      dequant.cost = [matrix](int64_t) { return Cost{0, static_cast<double>(matrix->bytes())}; };
      dequant.prepare = [matrix, shape](int64_t) -> std::function<void()> {
        auto scratch = Shared(std::vector<float>(static_cast<size_t>(shape.out * shape.in)));
        return [matrix, shape, scratch] {
          ParallelFor(shape.out, [&](int64_t begin, int64_t end) {
            kernels::DequantizeRows(matrix->view, begin, end - begin, scratch->data() + begin * shape.in);
          });
        };
      };
      ops.push_back(std::move(dequant));
    }
    auto dense = Shared(random_.Vector(shape.out * shape.in, 0.0, std));
    BenchOp op;
    op.section = section;
    op.op = name;
    op.mode = "f32";
    op.cost = [elements](int64_t m) { return Cost{2.0 * static_cast<double>(m) * elements, 4.0 * elements}; };
    op.prepare = [this, dense, shape](int64_t m) -> std::function<void()> {
      auto x = Shared(random_.Vector(m * shape.in));
      auto y = Shared(std::vector<float>(static_cast<size_t>(m * shape.out)));
      return [dense, shape, m, x, y] { kernels::Linear(x->data(), m, shape.in, dense->data(), shape.out, y->data()); };
    };
    ops.push_back(std::move(op));
  }
  // The matmul rows first (per shape: mxfp4, fp8, f32), then the dequant-only rows.
  std::stable_partition(ops.begin() + static_cast<std::ptrdiff_t>(first), ops.end(), [](const BenchOp& op) { return op.op.find("dequant") == std::string::npos; });

  const model::ExpertWeights& shared = weights_->layers[static_cast<size_t>(ffn_layer_)].ffn.shared;
  const float limit = static_cast<float>(c.swiglu_limit);
  BenchOp op;
  op.section = section;
  op.op = fmt::format("shared expert w1,w3,w2 (I {})", I);
  op.mode = "fp8";
  op.cost = [&shared, D, I](int64_t m) {
    return Cost{2.0 * static_cast<double>(m) * 3.0 * static_cast<double>(D * I), ExpertBytes(shared)};
  };
  op.prepare = [this, &shared, D, I, limit](int64_t m) -> std::function<void()> {
    auto x = Shared(random_.Vector(m * D));
    auto a = Shared(std::vector<float>(static_cast<size_t>(m * I)));
    auto b = Shared(std::vector<float>(static_cast<size_t>(m * I)));
    auto y = Shared(std::vector<float>(static_cast<size_t>(m * D)));
    return [&shared, m, I, limit, x, a, b, y] {
      kernels::QuantizedLinear(x->data(), m, shared.w1.view, a->data());
      kernels::QuantizedLinear(x->data(), m, shared.w3.view, b->data());
      for (int64_t i = 0; i < m * I; ++i) {  // the clamped SwiGLU of moe.cc
        const float g = std::min((*a)[i], limit);
        (*a)[i] = g / (1.0f + std::exp(-g)) * std::clamp((*b)[i], -limit, limit);
      }
      kernels::QuantizedLinear(a->data(), m, shared.w2.view, y->data());
    };
  };
  ops.push_back(std::move(op));
}

void KernelSuite::AddSmallOps(std::vector<BenchOp>& ops) {
  const ModelConfig& c = *config_;
  const int64_t D = c.hidden_size, H = c.num_attention_heads, hd = c.head_dim, rd = c.qk_rope_head_dim;
  const int64_t nope = c.nope_dim(), index_heads = c.index_n_heads, index_dim = c.index_head_dim;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const kernels::KvFormat format{nope, rd};
  const std::vector<float>* norm = &weights_->layers[static_cast<size_t>(ffn_layer_)].attn_norm;
  const std::vector<double>* inv_freq = &attention_[1]->inv_freq;  // ratio 4: YaRN frequencies
  auto add = [&](std::string name, std::function<Cost(int64_t)> cost,
                 std::function<std::function<void()>(int64_t)> prepare) {
    BenchOp op;
    op.section = "small kernels";
    op.op = std::move(name);
    op.mode = "default";
    op.cost = std::move(cost);
    op.prepare = std::move(prepare);
    ops.push_back(std::move(op));
  };
  auto dm = [](int64_t m) { return static_cast<double>(m); };

  add(fmt::format("rms_norm [M, {}] weighted", D), [=](int64_t m) { return Cost{4.0 * dm(m) * D, 0}; },
      [this, D, eps, norm](int64_t m) -> std::function<void()> {
        auto x = Shared(random_.Vector(m * D));
        auto y = Shared(std::vector<float>(static_cast<size_t>(m * D)));
        return [=] { kernels::RmsNorm(x->data(), m, D, norm->data(), eps, y->data()); };
      });
  add(fmt::format("rms_norm q heads [M*{}, {}]", H, hd), [=](int64_t m) { return Cost{3.0 * dm(m) * H * hd, 0}; },
      [this, H, hd, eps](int64_t m) -> std::function<void()> {
        auto q = Shared(random_.Vector(m * H * hd));
        return [=] { kernels::RmsNorm(q->data(), m * H, hd, nullptr, eps, q->data()); };
      });
  add(fmt::format("apply_rope q [M, {}, {}]", H, rd), [=](int64_t m) { return Cost{3.0 * dm(m) * H * rd, 0}; },
      [this, H, hd, nope, rd, inv_freq](int64_t m) -> std::function<void()> {
        auto q = Shared(random_.Vector(m * H * hd));
        auto positions = Shared(std::vector<int64_t>(static_cast<size_t>(m)));
        for (int64_t i = 0; i < m; ++i) (*positions)[i] = context_ + i;
        return [=] {
          kernels::ApplyRope(q->data(), m, H * hd, H, hd, nope, rd, positions->data(), inv_freq->data(), false);
        };
      });
  const double log_n = std::log2(static_cast<double>(index_dim));
  add(fmt::format("hadamard indexer q [M*{}, {}]", index_heads, index_dim),
      [=](int64_t m) { return Cost{dm(m) * index_heads * index_dim * (log_n + 1), 0}; },
      [this, index_heads, index_dim](int64_t m) -> std::function<void()> {
        auto q = Shared(random_.Vector(m * index_heads * index_dim));
        return [=] {
          for (int64_t i = 0; i < m * index_heads; ++i) kernels::Hadamard(q->data() + i * index_dim, index_dim);
        };
      });
  add(fmt::format("kv quantize [M, {}] -> {} B", format.dim(), format.entry_bytes()),
      [=](int64_t m) { return Cost{0, dm(m) * format.entry_bytes()}; },
      [this, format](int64_t m) -> std::function<void()> {
        auto x = Shared(random_.Vector(m * format.dim()));
        auto entries = Shared(std::vector<uint8_t>(static_cast<size_t>(m * format.entry_bytes())));
        return [=] {
          for (int64_t t = 0; t < m; ++t) {
            uint8_t* e = entries->data() + t * format.entry_bytes();
            kernels::QuantizeKvEntry(format, x->data() + t * format.dim(), e, e + format.data_bytes());
          }
        };
      });
  add(fmt::format("kv dequantize {} B -> [M, {}]", format.entry_bytes(), format.dim()),
      [=](int64_t m) { return Cost{0, dm(m) * format.entry_bytes()}; },
      [this, format](int64_t m) -> std::function<void()> {
        auto x = Shared(random_.Vector(m * format.dim()));
        auto entries = Shared(std::vector<uint8_t>(static_cast<size_t>(m * format.entry_bytes())));
        for (int64_t t = 0; t < m; ++t) {
          uint8_t* e = entries->data() + t * format.entry_bytes();
          kernels::QuantizeKvEntry(format, x->data() + t * format.dim(), e, e + format.data_bytes());
        }
        return [=] {
          for (int64_t t = 0; t < m; ++t) {
            const uint8_t* e = entries->data() + t * format.entry_bytes();
            kernels::DequantizeKvEntry(format, e, e + format.data_bytes(), x->data() + t * format.dim());
          }
        };
      });
}

void KernelSuite::AddSublayerOps(std::vector<BenchOp>& ops) {
  const ModelConfig& c = *config_;
  const int64_t D = c.hidden_size, hc = c.hc_mult, MD = c.hc_dim(), mix = c.hc_mix_dim();
  const model::LayerWeights& ffn_layer = weights_->layers[static_cast<size_t>(ffn_layer_)];
  const std::string section = fmt::format("sublayers (model::internal), attention at context {}", context_);
  auto dm = [](int64_t m) { return static_cast<double>(m); };
  auto add = [&](std::string name, std::function<Cost(int64_t)> cost,
                 std::function<std::function<void()>(int64_t)> prepare) {
    BenchOp op;
    op.section = section;
    op.op = std::move(name);
    op.mode = "default";
    op.cost = std::move(cost);
    op.prepare = std::move(prepare);
    ops.push_back(std::move(op));
  };

  add(fmt::format("hc_pre [M, {}] -> [M, {}]", MD, D),
      [=](int64_t m) { return Cost{2.0 * dm(m) * mix * MD + 4.0 * dm(m) * MD, 4.0 * mix * MD}; },
      [this, &c, &ffn_layer, MD](int64_t m) -> std::function<void()> {
        auto x = Shared(random_.Vector(m * MD));
        auto y = Shared(std::vector<float>()), post = Shared(std::vector<float>()), comb = Shared(std::vector<float>());
        return [=, &c, &ffn_layer] { model::internal::HcPre(c, ffn_layer.hc_attn, *x, m, *y, *post, *comb); };
      });
  add(fmt::format("hc_post [M, {}]", MD), [=](int64_t m) { return Cost{dm(m) * MD * (1.0 + 2.0 * hc), 0}; },
      [this, &c, D, hc, MD](int64_t m) -> std::function<void()> {
        auto out = Shared(random_.Vector(m * D));
        auto post = Shared(random_.Vector(m * hc, 1.0, 0.1));
        auto comb = Shared(random_.Vector(m * hc * hc, 1.0 / static_cast<double>(hc), 0.02));
        auto x = Shared(random_.Vector(m * MD));
        return [=, &c] { model::internal::HcPost(c, *out, *post, *comb, m, *x); };
      });

  for (const auto& setup : attention_) {
    const AttentionSetup* s = setup.get();
    const int64_t context = context_;
    const char* kind = s->ratio == 0 ? "window" : s->ratio == 4 ? "C4 + indexer" : "C128";
    add(fmt::format("attention ratio {} ({})", s->ratio, kind),
        [s, context](int64_t m) {
          const ModelConfig& sc = *s->config;
          const auto& w = s->layer->attn;
          double elements = Elements(w.wq_a) + Elements(w.wq_b) + Elements(w.wkv) + Elements(w.wo_a) + Elements(w.wo_b);
          if (s->ratio > 0) elements += Elements(w.compressor->wkv) + Elements(w.compressor->wgate);
          if (s->ratio == 4) {
            const auto& ix = *w.indexer;
            elements += Elements(ix.wq_b) + Elements(ix.weights_proj) + Elements(ix.compressor.wkv) +
                        Elements(ix.compressor.wgate);
          }
          double flops = 2.0 * static_cast<double>(m) * elements;
          for (int64_t p = context; p < context + m; ++p) {
            const int64_t visible = s->ratio > 0 ? (p + 1) / s->ratio : 0;
            int64_t candidates = std::min<int64_t>(sc.sliding_window, p + 1);
            if (s->ratio == 128) candidates += visible;
            if (s->ratio == 4) {
              candidates += std::min(visible, sc.index_topk);
              if (visible > sc.index_topk) flops += 2.0 * static_cast<double>(visible * sc.index_n_heads * sc.index_head_dim);
            }
            flops += 4.0 * static_cast<double>(sc.num_attention_heads * candidates * sc.head_dim);
          }
          return Cost{flops, 4.0 * elements};
        },
        [this, s, context, D](int64_t m) -> std::function<void()> {
          struct Buffers {
            std::vector<float> y, out;
            std::vector<model::internal::ChunkRows> chunks;
            std::vector<int64_t> positions;
          };
          auto b = std::make_shared<Buffers>();
          b->y = random_.Vector(m * D);
          b->out.resize(static_cast<size_t>(m * D));
          b->chunks.push_back({s->state.get(), 0, m, context});
          for (int64_t i = 0; i < m; ++i) b->positions.push_back(context + i);
          // Every call rewrites the same positions' window slots and compressor rows: repeatable.
          return [s, b] {
            const model::internal::LayerContext ctx{*s->config, *s->layer, s->layer_id, s->ratio,
                                                    s->inv_freq.data(), b->chunks, b->positions};
            model::internal::Attention(ctx, b->y, b->out);
          };
        });
  }

  const int64_t E = c.n_routed_experts, k = c.num_experts_per_tok, I = c.moe_intermediate_size;
  const double routed_bytes = ExpertBytes(ffn_layer.ffn.experts[0]), shared_bytes = ExpertBytes(ffn_layer.ffn.shared);
  const int ffn_layer_id = ffn_layer_;
  add(fmt::format("moe (gate, top-{} of {}, shared)", k, E),
      [=, &c](int64_t m) {
        const double per_slot = 2.0 * 3.0 * static_cast<double>(I * D);
        const double flops = 2.0 * dm(m) * static_cast<double>(E * D) +
                             dm(m) * per_slot * static_cast<double>(k + c.n_shared_experts);
        const double hit = static_cast<double>(E) * (1.0 - std::pow(1.0 - static_cast<double>(k) / E, dm(m)));
        return Cost{flops, 4.0 * static_cast<double>(E * D) + shared_bytes + hit * routed_bytes};
      },
      [this, &c, &ffn_layer, ffn_layer_id, D](int64_t m) -> std::function<void()> {
        struct Buffers {
          std::vector<float> y, out;
          std::vector<int32_t> tokens;
          std::vector<int64_t> positions;
        };
        auto b = std::make_shared<Buffers>();
        b->y = random_.Vector(m * D);
        b->out.resize(static_cast<size_t>(m * D));
        for (int64_t i = 0; i < m; ++i) {
          b->tokens.push_back(static_cast<int32_t>(random_.Next() % static_cast<uint64_t>(c.vocab_size)));
          b->positions.push_back(context_ + i);
        }
        const int ratio = c.layers[static_cast<size_t>(ffn_layer_id)].compress_ratio;
        const double* inv_freq = attention_[0]->inv_freq.data();  // the MoE reads no rope
        return [&c, &ffn_layer, ffn_layer_id, ratio, inv_freq, b] {
          const model::internal::LayerContext ctx{c, ffn_layer, ffn_layer_id, ratio, inv_freq, {}, b->positions};
          model::internal::Moe(ctx, b->y, b->tokens, b->out);
        };
      });
}

}  // namespace tandem::bench
