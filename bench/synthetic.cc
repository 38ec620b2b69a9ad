#include "bench/synthetic.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace tandem::bench {
namespace {


int64_t Count(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

void FillInit(Random& random, std::span<float> values, const model::InitHint& init) {
  switch (init.kind) {
    case model::InitHint::Kind::kOnes:
      std::fill(values.begin(), values.end(), 1.0f);
      return;
    case model::InitHint::Kind::kZeros:
      std::fill(values.begin(), values.end(), 0.0f);
      return;
    case model::InitHint::Kind::kNormal:
      random.Fill(values, init.mean, init.std);
      return;
  }
}

}  // namespace

void Random::Fill(std::span<float> values, double mean, double std) {
  // Uniform on [-1, 1) has standard deviation 1/sqrt(3). Two 32-bit draws per 64-bit step.
  const float scale = static_cast<float>(std * std::sqrt(3.0) * 0x1.0p-31);
  const float offset = static_cast<float>(mean);
  size_t i = 0;
  for (; i + 2 <= values.size(); i += 2) {
    const uint64_t bits = Next();
    values[i] = static_cast<float>(static_cast<int32_t>(bits)) * scale + offset;
    values[i + 1] = static_cast<float>(static_cast<int32_t>(bits >> 32)) * scale + offset;
  }
  if (i < values.size()) values[i] = static_cast<float>(static_cast<int32_t>(Next())) * scale + offset;
}

std::vector<float> Random::Vector(int64_t count, double mean, double std) {
  std::vector<float> values(static_cast<size_t>(count));
  Fill(values, mean, std);
  return values;
}

QuantizedMatrix MakeQuantizedMatrix(kernels::QuantizedWeight::Format format, int64_t out, int64_t in, double std,
                                    Random& random) {
  // One block row (128 rows) is quantized and repeated down the matrix: the kernels' work does not
  // depend on the values, and quantizing gigabytes of experts would take minutes.
  const int64_t block = kFp8WeightBlock, slab_rows = std::min(out, block);
  const std::vector<float> values = random.Vector(slab_rows * in, 0.0, std);
  const bool fp4 = format == kernels::QuantizedWeight::Format::kMxfp4;
  const int64_t row_bytes = fp4 ? in / 2 : in;
  const int64_t scale_row_bytes = fp4 ? in / kMxfp4Block : (in + block - 1) / block;  // per row / per block row
  std::vector<uint8_t> codes(static_cast<size_t>(slab_rows * row_bytes));
  std::vector<uint8_t> scales(static_cast<size_t>(fp4 ? slab_rows * scale_row_bytes : scale_row_bytes));
  if (fp4) {
    QuantizeMxfp4(values, slab_rows, in, codes, scales);
  } else {
    QuantizeFp8Blocks(values, slab_rows, in, codes, scales);
  }
  QuantizedMatrix m;
  m.codes.resize(static_cast<size_t>(out * row_bytes));
  const int64_t block_rows = (out + block - 1) / block;
  m.scales.resize(static_cast<size_t>(fp4 ? out * scale_row_bytes : block_rows * scale_row_bytes));
  for (int64_t r0 = 0; r0 < out; r0 += slab_rows) {
    const int64_t rows = std::min(slab_rows, out - r0);
    std::copy_n(codes.begin(), rows * row_bytes, m.codes.begin() + r0 * row_bytes);
    if (fp4) std::copy_n(scales.begin(), rows * scale_row_bytes, m.scales.begin() + r0 * scale_row_bytes);
  }
  if (!fp4) {
    for (int64_t b = 0; b < block_rows; ++b) std::copy_n(scales.begin(), scale_row_bytes, m.scales.begin() + b * scale_row_bytes);
  }
  m.view = {format, m.codes.data(), m.scales.data(), out, in};
  return m;
}

RandomWeightsVisitor::RandomWeightsVisitor(uint64_t seed, std::function<bool(const std::string&)> keep)
    : random_(seed), keep_(std::move(keep)) {}

void RandomWeightsVisitor::Dense(const std::string& name, int64_t out, int64_t in, model::DenseWeight* dst,
                                 model::InitHint init) {
  if (keep_ && !keep_(name)) return;
  dst->out = out;
  dst->in = in;
  dst->values.resize(static_cast<size_t>(out * in));
  FillInit(random_, dst->values, init);
}

void RandomWeightsVisitor::Fp8Linear(const std::string& name, int64_t out, int64_t in, model::DenseWeight* dst,
                                     model::InitHint init) {
  Dense(name, out, in, dst, init);  // the loader dequantizes FP8 linears to f32 too
}

void RandomWeightsVisitor::Bf16Linear(const std::string& name, int64_t out, int64_t in, model::DenseWeight* dst,
                                      model::InitHint init) {
  Dense(name, out, in, dst, init);
}

void RandomWeightsVisitor::Vector(const std::string& name, DType, const std::vector<int64_t>& shape,
                                  std::vector<float>* dst, model::InitHint init) {
  if (keep_ && !keep_(name)) return;
  dst->resize(static_cast<size_t>(Count(shape)));
  FillInit(random_, *dst, init);
}

void RandomWeightsVisitor::Bf16Table(const std::string& name, int64_t rows, int64_t cols, Tensor* dst,
                                     model::InitHint init) {
  if (keep_ && !keep_(name)) return;
  std::vector<float> row(static_cast<size_t>(cols));
  *dst = Tensor(DType::kBF16, {rows, cols});
  for (int64_t r = 0; r < rows; ++r) {
    FillInit(random_, row, init);
    for (int64_t c = 0; c < cols; ++c) dst->as<uint16_t>()[r * cols + c] = FloatToBf16(row[c]);
  }
}

void RandomWeightsVisitor::Expert(const std::string& name, int64_t out, int64_t in, model::ExpertDType format,
                                  model::PackedWeight* dst, model::InitHint init) {
  if (keep_ && !keep_(name)) return;
  const bool fp4 = format == model::ExpertDType::kFp4;
  auto key = std::make_tuple(out, in, format);
  auto it = prototypes_.find(key);
  if (it == prototypes_.end()) {
    const auto kind = fp4 ? kernels::QuantizedWeight::Format::kMxfp4 : kernels::QuantizedWeight::Format::kFp8Block;
    it = prototypes_.emplace(key, MakeQuantizedMatrix(kind, out, in, init.std, random_)).first;
  }
  const QuantizedMatrix& proto = it->second;
  const int64_t block = kFp8WeightBlock;
  dst->codes = fp4 ? Tensor(DType::kI8, {out, in / 2}) : Tensor(DType::kF8E4M3, {out, in});
  dst->scales = fp4 ? Tensor(DType::kF8E8M0, {out, in / kMxfp4Block})
                    : Tensor(DType::kF8E8M0, {(out + block - 1) / block, (in + block - 1) / block});
  std::memcpy(dst->codes.data(), proto.codes.data(), proto.codes.size());
  std::memcpy(dst->scales.data(), proto.scales.data(), proto.scales.size());
  dst->view = {proto.view.format, dst->codes.data(), dst->scales.data(), out, in};
}

void RandomWeightsVisitor::RoutingTable(const std::string& name, int64_t vocab, int64_t k, int64_t experts,
                                        std::vector<int32_t>* dst) {
  if (keep_ && !keep_(name)) return;
  dst->resize(static_cast<size_t>(vocab * k));
  std::vector<int32_t> pool(static_cast<size_t>(experts));
  for (int64_t v = 0; v < vocab; ++v) {
    for (int64_t e = 0; e < experts; ++e) pool[e] = static_cast<int32_t>(e);
    for (int64_t i = 0; i < k; ++i) {  // partial Fisher-Yates: k distinct experts per token
      const int64_t j = i + static_cast<int64_t>(random_.Next() % static_cast<uint64_t>(experts - i));
      std::swap(pool[i], pool[j]);
      (*dst)[v * k + i] = pool[i];
    }
  }
}

std::unique_ptr<model::ModelWeights> MakeRandomWeights(const model::ModelConfig& config, const model::VisitScope& scope,
                                                       uint64_t seed, std::function<bool(const std::string&)> keep) {
  auto weights = std::make_unique<model::ModelWeights>();
  weights->config = config;
  weights->begin_layer = scope.begin_layer;
  weights->end_layer = scope.end_layer;
  weights->expert_dtype = config.expert_dtype;
  weights->layers.resize(static_cast<size_t>(scope.end_layer - scope.begin_layer));
  if (scope.mtp && config.has_mtp()) weights->mtp = std::make_unique<model::MtpWeights>();
  RandomWeightsVisitor visitor(seed, std::move(keep));
  model::VisitModelParams(config, config.expert_dtype, scope, visitor, *weights);
  return weights;
}

void PrefillState(const model::ModelConfig& config, int layer_id, int ratio, int64_t context, int64_t extra,
                  model::HostSequenceState& state, Random& random) {
  const kernels::KvFormat format{config.nope_dim(), config.qk_rope_head_dim};
  state.Reserve(context + extra).IgnoreError();  // a host state only grows vectors
  state.set_length(context);
  std::vector<float> vector(static_cast<size_t>(format.dim()));
  auto write_kv = [&](model::KvSlot slot) {
    random.Fill(vector);
    kernels::QuantizeKvEntry(format, vector.data(), slot.data, slot.scales);
  };
  for (int64_t p = std::max<int64_t>(0, context - config.sliding_window); p < context; ++p) {
    write_kv(state.window_kv(layer_id, p));
  }
  if (ratio == 0) return;
  const int64_t entries = (context + extra) / ratio;
  for (int64_t j = 0; j < entries; ++j) write_kv(state.compressed_kv(layer_id, j));
  const int64_t ring = model::CompressorRing(ratio), width = model::CompressorWidth(ratio);
  auto fill_rows = [&](model::CompressorKind kind, int64_t dim) {
    std::vector<float> row(static_cast<size_t>(2 * width * dim));
    for (int64_t p = std::max<int64_t>(0, context - ring); p < context; ++p) {
      random.Fill(row);
      std::copy(row.begin(), row.end(), state.compressor_row(layer_id, kind, p));
    }
  };
  fill_rows(model::CompressorKind::kAttention, config.head_dim);
  if (ratio != 4) return;
  fill_rows(model::CompressorKind::kIndexer, config.index_head_dim);
  std::vector<float> key(static_cast<size_t>(config.index_head_dim));
  for (int64_t j = 0; j < entries; ++j) {
    random.Fill(key);
    kernels::QuantizeIndexerKey(key.data(), config.index_head_dim, state.indexer_key(layer_id, j));
  }
}

}  // namespace tandem::bench
