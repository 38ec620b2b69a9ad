// The whole-layer GPU benchmark on the flash-layer checkpoint (one DSV4 layer with exact V4-Flash shapes):
// decode steps at batch 1/16/64/256 over contexts of 4k and 32k tokens (batches up to 64 also as CUDA graph
// replays, kind decode-graphs; all eagerly with --cuda-attention bf16 too, kind decode-attn-bf16), and an
// 8k-token prefill (bf16x2, bf16, bf16 with bf16 attention), timed wall-clock around DeviceModel::ForwardLayers
// (what a serving step costs, host table building included). The same run measures the device-to-device copy bandwidth, and each decode row reports the
// bytes a step must at least read (weights it touches + the KV it attends + the indexer keys it scores)
// as a fraction of that ceiling.
//   gpu_layer_bench MODEL_DIR|synthetic OUT_DIR
// MODEL_DIR is generated (seed 1) when it has no config.json; `synthetic` builds flash-layer weights of
// the same shapes and formats in memory from a fast generator (minutes of checkpoint writing saved; the
// timings do not depend on the values).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <cuda_runtime_api.h>

#include "common/kernels/kernels.h"
#include "common/model/cuda/device_model.h"
#include "common/model/cuda/device_state.h"
#include "common/model/generator.h"
#include "common/model/weights.h"

namespace tandem {
namespace {

using Clock = std::chrono::steady_clock;

#define BENCH_CHECK(expr)                                                             \
  do {                                                                                \
    const ::absl::Status s_ = (expr);                                                 \
    if (!s_.ok()) {                                                                   \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, s_.ToString().c_str()); \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)
#define BENCH_CUDA(expr) BENCH_CHECK((expr) == cudaSuccess ? absl::OkStatus() : absl::InternalError(#expr))

// Flash-layer weights straight into memory: dense layers uniform with the init's standard deviation,
// experts random MXFP4/FP8 codes with scales near 2^-6, norms as initialized.
class SyntheticVisitor final : public model::ParamVisitor {
 public:
  void Fp8Linear(const std::string&, int64_t out, int64_t in, model::DenseWeight* dst, model::InitHint init) override {
    Dense(out, in, dst, init);
  }
  void Bf16Linear(const std::string&, int64_t out, int64_t in, model::DenseWeight* dst, model::InitHint init) override {
    Dense(out, in, dst, init);
  }
  void Vector(const std::string&, DType, const std::vector<int64_t>& shape, std::vector<float>* dst,
              model::InitHint init) override {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    dst->resize(static_cast<size_t>(n));
    for (auto& v : *dst) v = Value(init);
  }
  void Bf16Table(const std::string&, int64_t rows, int64_t cols, Tensor* dst, model::InitHint) override {
    *dst = Tensor(DType::kBF16, {rows, cols});
    auto* bits = dst->as<uint16_t>();
    for (int64_t i = 0; i < rows * cols; ++i) bits[i] = static_cast<uint16_t>(0x3c00 | (Next() & 0x807f));  // |x| < 2^-6
  }
  void Expert(const std::string&, int64_t out, int64_t in, model::ExpertDType format, model::PackedWeight* dst,
              model::InitHint) override {
    const bool fp4 = format == model::ExpertDType::kFp4;
    dst->codes = Tensor(fp4 ? DType::kI8 : DType::kF8E4M3, {out, fp4 ? in / 2 : in});
    dst->scales = fp4 ? Tensor(DType::kF8E8M0, {out, in / 32}) : Tensor(DType::kF8E8M0, {(out + 127) / 128, (in + 127) / 128});
    uint8_t* codes = dst->codes.data();
    for (size_t i = 0; i + 8 <= dst->codes.bytes(); i += 8) {
      uint64_t r = Next();
      if (!fp4) r &= 0xbfbfbfbfbfbfbfbfull;  // e4m3 codes below 2 in magnitude, never NaN
      std::memcpy(codes + i, &r, 8);
    }
    std::memset(dst->scales.data(), 121, dst->scales.bytes());
    dst->view = {fp4 ? kernels::QuantizedWeight::Format::kMxfp4 : kernels::QuantizedWeight::Format::kFp8Block,
                 dst->codes.data(), dst->scales.data(), out, in};
  }
  void RoutingTable(const std::string&, int64_t vocab, int64_t k, int64_t experts, std::vector<int32_t>* dst) override {
    dst->resize(static_cast<size_t>(vocab * k));
    for (auto& e : *dst) e = static_cast<int32_t>(Next() % static_cast<uint64_t>(experts));
  }

 private:
  uint64_t Next() {
    state_ += 0x9e3779b97f4a7c15ull;
    uint64_t z = state_;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  float Value(const model::InitHint& init) {
    switch (init.kind) {
      case model::InitHint::Kind::kOnes: return 1.0f;
      case model::InitHint::Kind::kZeros: return 0.0f;
      default: break;
    }
    const double u = static_cast<double>(Next() >> 11) * 0x1.0p-53 * 2.0 - 1.0;
    return static_cast<float>(init.mean + init.std * std::sqrt(3.0) * u);
  }
  void Dense(int64_t out, int64_t in, model::DenseWeight* dst, const model::InitHint& init) {
    dst->out = out;
    dst->in = in;
    dst->values.resize(static_cast<size_t>(out * in));
    for (auto& v : dst->values) v = Value(init);
  }
  uint64_t state_ = 1;
};

std::shared_ptr<const model::ModelWeights> SyntheticFlashLayer() {
  auto config = model::PresetConfig("flash-layer");
  BENCH_CHECK(config.status());
  auto w = std::make_shared<model::ModelWeights>();
  w->config = *config;
  w->begin_layer = 0;
  w->end_layer = static_cast<int>(config->num_hidden_layers);
  w->expert_dtype = config->expert_dtype;
  w->layers.resize(static_cast<size_t>(w->end_layer));
  model::VisitScope scope;
  scope.begin_layer = 0;
  scope.end_layer = w->end_layer;
  scope.mtp = false;
  SyntheticVisitor visitor;
  model::VisitModelParams(w->config, config->expert_dtype, scope, visitor, *w);
  return w;
}

// Device-to-device copy bandwidth (read + write bytes per second) over 1 GiB.
double CopyBandwidth() {
  const size_t bytes = size_t{1} << 30;
  void *a = nullptr, *b = nullptr;
  BENCH_CUDA(cudaMalloc(&a, bytes));
  BENCH_CUDA(cudaMalloc(&b, bytes));
  cudaEvent_t start, stop;
  BENCH_CUDA(cudaEventCreate(&start));
  BENCH_CUDA(cudaEventCreate(&stop));
  BENCH_CUDA(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice));
  BENCH_CUDA(cudaEventRecord(start));
  const int reps = 10;
  for (int i = 0; i < reps; ++i) BENCH_CUDA(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice));
  BENCH_CUDA(cudaEventRecord(stop));
  BENCH_CUDA(cudaEventSynchronize(stop));
  float ms = 0;
  BENCH_CUDA(cudaEventElapsedTime(&ms, start, stop));
  cudaFree(a);
  cudaFree(b);
  return 2.0 * static_cast<double>(bytes) * reps / (ms * 1e-3);
}

struct Patterns {
  std::vector<uint8_t> entries;  // kPattern KV entries
  std::vector<uint8_t> keys;     // kPattern indexer keys
};
constexpr int64_t kPattern = 2048;

Patterns MakePatterns(const model::ModelConfig& c) {
  Patterns p;
  const kernels::KvFormat format{c.nope_dim(), c.qk_rope_head_dim};
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(std::max(format.dim(), c.index_head_dim)));
  p.entries.resize(static_cast<size_t>(kPattern * format.entry_bytes()));
  p.keys.resize(static_cast<size_t>(kPattern * kernels::IndexerKeyBytes(c.index_head_dim)));
  for (int64_t i = 0; i < kPattern; ++i) {
    for (auto& v : x) v = normal(rng);
    uint8_t* e = p.entries.data() + i * format.entry_bytes();
    kernels::QuantizeKvEntry(format, x.data(), e, e + format.data_bytes());
    kernels::QuantizeIndexerKey(x.data(), c.index_head_dim, p.keys.data() + i * kernels::IndexerKeyBytes(c.index_head_dim));
  }
  return p;
}

// Copies `count` items of `item` bytes to dst, tiling the pattern.
void Tile(uint8_t* dst, const std::vector<uint8_t>& pattern, int64_t item, int64_t count) {
  const int64_t per = static_cast<int64_t>(pattern.size()) / item;
  for (int64_t done = 0; done < count; done += per) {
    const int64_t n = std::min(per, count - done);
    BENCH_CUDA(cudaMemcpy(dst + done * item, pattern.data(), static_cast<size_t>(n * item), cudaMemcpyHostToDevice));
  }
}

// A state that looks `context` tokens long: window, compressed entries and indexer keys filled.
std::unique_ptr<model::cuda::DeviceSequenceState> FilledState(const model::ModelConfig& c, const Patterns& p,
                                                              int64_t context, int64_t spare) {
  auto state = model::cuda::DeviceSequenceState::Create(c, context + spare, false);
  BENCH_CHECK(state.status());
  const kernels::KvFormat format{c.nope_dim(), c.qk_rope_head_dim};
  for (const auto& spec : c.layers) {
    if (spec.is_mtp) continue;
    Tile((*state)->window_kv(spec.layer_id, 0).data, p.entries, format.entry_bytes(), c.sliding_window);
    if (spec.compress_ratio > 0) {
      Tile((*state)->compressed_kv(spec.layer_id, 0).data, p.entries, format.entry_bytes(), context / spec.compress_ratio);
    }
    if (spec.compress_ratio == 4) {
      Tile((*state)->indexer_key(spec.layer_id, 0), p.keys, kernels::IndexerKeyBytes(c.index_head_dim), context / 4);
    }
  }
  (*state)->set_length(context);
  return std::move(*state);
}

// The bytes one decode step must read at least: every dense weight (bf16), the shared expert, the
// routed experts the batch can touch (min(E, B*k) of them), and per token its attended KV entries
// and the indexer keys it scores.
double MinDecodeBytes(const model::ModelWeights& w, int64_t batch, int64_t context) {
  const auto& c = w.config;
  double dense = 0, expert = 0, shared = 0;
  auto add = [&](const model::DenseWeight& d) { dense += 2.0 * static_cast<double>(d.out) * d.in; };
  auto packed = [](const model::ExpertWeights& e) {
    return static_cast<double>(e.w1.codes.bytes() + e.w1.scales.bytes() + e.w2.codes.bytes() + e.w2.scales.bytes() +
                               e.w3.codes.bytes() + e.w3.scales.bytes());
  };
  double kv = 0;
  const kernels::KvFormat format{c.nope_dim(), c.qk_rope_head_dim};
  for (const auto& l : w.layers) {
    const auto& a = l.attn;
    for (const auto* d : {&a.wq_a, &a.wq_b, &a.wkv, &a.wo_a, &a.wo_b, &l.ffn.gate}) add(*d);
    if (a.compressor) {
      add(a.compressor->wkv);
      add(a.compressor->wgate);
    }
    if (a.indexer) {
      add(a.indexer->wq_b);
      add(a.indexer->weights_proj);
      add(a.indexer->compressor.wkv);
      add(a.indexer->compressor.wgate);
    }
    expert = packed(l.ffn.experts.front());
    shared += packed(l.ffn.shared);
    const int ratio = l.spec.compress_ratio;
    const double window = static_cast<double>(std::min(c.sliding_window, context + 1));
    double compressed = ratio == 128 ? context / 128.0 : ratio == 4 ? std::min<double>(c.index_topk, context / 4.0) : 0.0;
    kv += batch * (window + compressed) * format.entry_bytes();
    if (ratio == 4) kv += batch * (context / 4.0) * kernels::IndexerKeyBytes(c.index_head_dim);
    kv += std::min<double>(c.n_routed_experts, static_cast<double>(batch * c.num_experts_per_tok)) * expert;
  }
  return dense + shared + kv;
}

}  // namespace
}  // namespace tandem

int main(int argc, char** argv) {
  using namespace tandem;
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s MODEL_DIR OUT_DIR\n", argv[0]);
    return 2;
  }
  const std::string model_dir = argv[1], out_dir = argv[2];
  kernels::SetThreads(0);
  std::shared_ptr<const model::ModelWeights> weights;
  const auto t_load = Clock::now();
  if (model_dir == "synthetic") {
    weights = SyntheticFlashLayer();
  } else {
    if (!std::filesystem::exists(model_dir + "/config.json")) {
      auto config = model::PresetConfig("flash-layer");
      BENCH_CHECK(config.status());
      BENCH_CHECK(model::GenerateCheckpoint(*config, model_dir, {}));
    }
    model::LoadOptions load;
    load.show_progress = false;
    load.load_mtp = false;
    auto loaded = model::LoadModelWeights(model_dir, load);
    BENCH_CHECK(loaded.status());
    weights = std::shared_ptr<const model::ModelWeights>(std::move(*loaded));
  }
  std::printf("weights (%s) ready in %.1f s\n", model_dir.c_str(),
              std::chrono::duration<double>(Clock::now() - t_load).count());
  const auto& c = weights->config;
  auto created = model::cuda::DeviceModel::Create(weights);
  BENCH_CHECK(created.status());
  auto& gpu = **created;
  const double copy_bw = CopyBandwidth();
  std::printf("device-to-device copy: %.0f GB/s; weights on device %.2f GiB\n", copy_bw / 1e9,
              static_cast<double>(gpu.weight_bytes()) / (1 << 30));
  const Patterns patterns = MakePatterns(c);
  std::ofstream csv(out_dir + "/gpu-layer.csv");
  csv << "kind,batch,context,tokens,ms,tokens_per_s,min_bytes,fraction_of_copy_bw,copy_gbps\n";
  std::ofstream profile(out_dir + "/gpu-layer-profile.csv");
  profile << "batch,context,op,ms_per_step\n";
  std::mt19937 rng(3);

  // TANDEM_LAYER_BENCH_PREFILL_ONLY=1: only the prefill rows (a short run for the prefill kernels).
  const char* prefill_only_env = std::getenv("TANDEM_LAYER_BENCH_PREFILL_ONLY");
  const bool prefill_only = prefill_only_env && std::string(prefill_only_env) == "1";
  for (const int64_t context : {int64_t{4096}, int64_t{32768}}) {
    for (const int64_t batch : {int64_t{1}, int64_t{16}, int64_t{64}, int64_t{256}}) {
      if (prefill_only) break;
      constexpr int kWarmup = 2, kSteps = 10, kProfiled = 3;
      // Batches up to 64 also time the steps as CUDA graph replays (warm-up: the signature's eager first
      // step, then its capture).
      const bool graphs = batch <= 64;
      std::vector<std::unique_ptr<model::cuda::DeviceSequenceState>> states;
      // Room for every step below: eager + profiled, graphs, and the bf16-attention steps + their profile.
      const int64_t spare = (graphs ? 3 : 2) * (kWarmup + kSteps) + 2 * kProfiled + 1;
      for (int64_t b = 0; b < batch; ++b) states.push_back(FilledState(c, patterns, context, spare));
      std::vector<int32_t> tokens(static_cast<size_t>(batch));
      for (auto& t : tokens) t = static_cast<int32_t>(rng() % c.vocab_size);
      std::vector<model::SequenceChunk> chunk_list;
      for (int64_t b = 0; b < batch; ++b) chunk_list.push_back({states[b].get(), {&tokens[b], 1}, false});
      for (int i = 0; i < kWarmup; ++i) BENCH_CHECK(gpu.ForwardLayers(chunk_list));
      const auto t0 = Clock::now();
      for (int i = 0; i < kSteps; ++i) BENCH_CHECK(gpu.ForwardLayers(chunk_list));
      const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count() / kSteps;
      // Where the step's time goes: three more steps with an event after each op group.
      gpu.SetProfiling(true);
      for (int i = 0; i < kProfiled; ++i) BENCH_CHECK(gpu.ForwardLayers(chunk_list));
      gpu.SetProfiling(false);
      for (const auto& [op, total] : gpu.TakeProfile()) {
        profile << batch << "," << context << ",\"" << op << "\"," << total / kProfiled << "\n";
        std::printf("    %-48s %8.3f ms\n", op.c_str(), total / kProfiled);
      }
      const double bytes = MinDecodeBytes(*weights, batch, context);
      const double fraction = bytes / (ms * 1e-3) / copy_bw;
      std::printf("decode  B=%4ld ctx=%6ld: %8.3f ms/step  %9.0f tok/s  min bytes %.1f MB  %.2f of copy bandwidth\n",
                  static_cast<long>(batch), static_cast<long>(context), ms, batch / (ms * 1e-3), bytes / 1e6, fraction);
      csv << "decode," << batch << "," << context << "," << batch << "," << ms << "," << batch / (ms * 1e-3) << ","
          << bytes << "," << fraction << "," << copy_bw / 1e9 << "\n";
      if (graphs) {
        gpu.SetGraphs(true);
        const model::cuda::GraphStats before = gpu.graph_stats();
        for (int i = 0; i < kWarmup; ++i) BENCH_CHECK(gpu.ForwardLayers(chunk_list));
        const auto g0 = Clock::now();
        for (int i = 0; i < kSteps; ++i) BENCH_CHECK(gpu.ForwardLayers(chunk_list));
        const double graph_ms = std::chrono::duration<double, std::milli>(Clock::now() - g0).count() / kSteps;
        gpu.SetGraphs(false);
        const model::cuda::GraphStats after = gpu.graph_stats();
        const double graph_fraction = bytes / (graph_ms * 1e-3) / copy_bw;
        std::printf("decode  B=%4ld ctx=%6ld: %8.3f ms/step  %9.0f tok/s  as CUDA graphs (%.2fx; %ld of %d timed steps "
                    "replayed, %ld captured)\n",
                    static_cast<long>(batch), static_cast<long>(context), graph_ms, batch / (graph_ms * 1e-3), ms / graph_ms,
                    static_cast<long>(after.replays - before.replays), kSteps,
                    static_cast<long>(after.captures - before.captures));
        csv << "decode-graphs," << batch << "," << context << "," << batch << "," << graph_ms << ","
            << batch / (graph_ms * 1e-3) << "," << bytes << "," << graph_fraction << "," << copy_bw / 1e9 << "\n";
      }
      // The same steps with --cuda-attention bf16 (eager; the attention's share shows in its profile).
      {
        gpu.SetAttentionBf16(true);
        for (int i = 0; i < kWarmup; ++i) BENCH_CHECK(gpu.ForwardLayers(chunk_list));
        const auto b0 = Clock::now();
        for (int i = 0; i < kSteps; ++i) BENCH_CHECK(gpu.ForwardLayers(chunk_list));
        const double bf16_ms = std::chrono::duration<double, std::milli>(Clock::now() - b0).count() / kSteps;
        gpu.SetProfiling(true);
        for (int i = 0; i < kProfiled; ++i) BENCH_CHECK(gpu.ForwardLayers(chunk_list));
        gpu.SetProfiling(false);
        gpu.SetAttentionBf16(false);
        for (const auto& [op, total] : gpu.TakeProfile()) {
          if (op.find("sparse attention") == std::string::npos) continue;
          profile << batch << "," << context << ",\"" << op << " (bf16 math)\"," << total / kProfiled << "\n";
          std::printf("    %-48s %8.3f ms\n", (op + " (bf16 math)").c_str(), total / kProfiled);
        }
        std::printf("decode  B=%4ld ctx=%6ld: %8.3f ms/step  %9.0f tok/s  with bf16 attention (%.2fx)\n",
                    static_cast<long>(batch), static_cast<long>(context), bf16_ms, batch / (bf16_ms * 1e-3), ms / bf16_ms);
        csv << "decode-attn-bf16," << batch << "," << context << "," << batch << "," << bf16_ms << ","
            << batch / (bf16_ms * 1e-3) << "," << bytes << "," << bytes / (bf16_ms * 1e-3) / copy_bw << ","
            << copy_bw / 1e9 << "\n";
      }
    }
  }
  // Prefill in the default format (bf16x2: two bf16 GEMMs per dense layer at this size), in plain bf16
  // (one; an opt-in mode, in a model of its own), and in plain bf16 with bf16 attention math; the first two
  // also with the routed experts on the per-expert cuBLASLt lanes instead of the fused MXFP4 kernel (the
  // baseline of that kernel, same run; models of their own).
  using model::cuda::DenseFormat;
  struct PrefillCase {
    const char* kind;
    DenseFormat dense;
    bool fused_experts, attention_bf16;
  };
  // Models other than the default one (bf16x2, fused experts), by (format, fused experts).
  std::map<std::pair<DenseFormat, bool>, std::unique_ptr<model::cuda::DeviceModel>> others;
  for (const PrefillCase& p : {PrefillCase{"prefill", DenseFormat::kBf16x2, true, false},
                               PrefillCase{"prefill-bf16", DenseFormat::kBf16, true, false},
                               PrefillCase{"prefill-bf16-attn-bf16", DenseFormat::kBf16, true, true},
                               PrefillCase{"prefill-expert-lanes", DenseFormat::kBf16x2, false, false},
                               PrefillCase{"prefill-bf16-expert-lanes", DenseFormat::kBf16, false, false}}) {
    const char* kind = p.kind;
    model::cuda::DeviceModel* model = created->get();
    if (p.dense != DenseFormat::kBf16x2 || !p.fused_experts) {
      std::unique_ptr<model::cuda::DeviceModel>& other = others[{p.dense, p.fused_experts}];
      if (!other) {
        model::cuda::DeviceModelOptions options;
        options.dense = p.dense;
        options.fused_prefill_experts = p.fused_experts;
        auto made = model::cuda::DeviceModel::Create(weights, options);
        BENCH_CHECK(made.status());
        other = std::move(*made);
      }
      model = other.get();
    }
    auto& gpu = *model;
    gpu.SetAttentionBf16(p.attention_bf16);
    const int64_t tokens = 8192;
    auto state = model::cuda::DeviceSequenceState::Create(c, tokens, false);
    BENCH_CHECK(state.status());
    std::vector<int32_t> ids(static_cast<size_t>(tokens));
    for (auto& t : ids) t = static_cast<int32_t>(rng() % c.vocab_size);
    model::SequenceChunk chunk{state->get(), {ids.data(), ids.size()}, false};
    BENCH_CHECK(gpu.ForwardLayers({&chunk, 1}));  // warm-up (plans the GEMM shapes)
    constexpr int kRuns = 3;
    double total = 0;
    for (int i = 0; i < kRuns; ++i) {
      (*state)->set_length(0);
      const auto t0 = Clock::now();
      BENCH_CHECK(gpu.ForwardLayers({&chunk, 1}));
      total += std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    }
    const double ms = total / kRuns;
    (*state)->set_length(0);
    gpu.SetProfiling(true);
    BENCH_CHECK(gpu.ForwardLayers({&chunk, 1}));
    gpu.SetProfiling(false);
    for (const auto& [op, t] : gpu.TakeProfile()) {
      profile << kind << "-" << tokens << ",0,\"" << op << "\"," << t << "\n";
      std::printf("    %-48s %8.3f ms\n", op.c_str(), t);
    }
    std::printf("%s T=%ld: %.2f ms  %.0f tok/s\n", kind, static_cast<long>(tokens), ms, tokens / (ms * 1e-3));
    csv << kind << ",1,0," << tokens << "," << ms << "," << tokens / (ms * 1e-3) << ",0,0," << copy_bw / 1e9 << "\n";
  }
  return 0;
}
