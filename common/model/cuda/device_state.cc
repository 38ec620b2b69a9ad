#include "common/model/cuda/device_state.h"

#include <cuda_runtime_api.h>

#include "common/kernels/cuda/check.h"

namespace tandem::model::cuda {
namespace {
size_t Align(size_t bytes) { return (bytes + 255) / 256 * 256; }
}  // namespace

absl::StatusOr<std::unique_ptr<DeviceSequenceState>> DeviceSequenceState::Create(const ModelConfig& config,
                                                                                 int64_t capacity, bool with_mtp) {
  if (capacity <= 0) return absl::InvalidArgumentError("DeviceSequenceState: capacity must be positive");
  std::unique_ptr<DeviceSequenceState> state(new DeviceSequenceState(config, capacity));
  state->format_ = kernels::KvFormat{config.nope_dim(), config.qk_rope_head_dim};
  const int64_t entry = state->format_.entry_bytes(), key = kernels::IndexerKeyBytes(config.index_head_dim);
  size_t offset = 0;
  auto add = [&](int ratio) {
    Layer l;
    l.ratio = ratio;
    l.window = offset;
    offset += Align(static_cast<size_t>(config.sliding_window * entry));
    if (ratio > 0) {
      l.compressed = offset;
      offset += Align(static_cast<size_t>(capacity / ratio * entry));
      l.rows = offset;
      offset += Align(static_cast<size_t>(CompressorRing(ratio) * 2 * CompressorWidth(ratio) * config.head_dim) * 4);
    }
    if (ratio == 4) {
      l.indexer = offset;
      offset += Align(static_cast<size_t>(capacity / ratio * key));
      l.indexer_rows = offset;
      offset += Align(static_cast<size_t>(CompressorRing(ratio) * 2 * CompressorWidth(ratio) * config.index_head_dim) * 4);
    }
    state->layers_.push_back(l);
  };
  for (int id = 0; id < config.num_hidden_layers; ++id) add(config.layers[id].compress_ratio);
  if (with_mtp && config.has_mtp()) add(0);
  TANDEM_CUDA_RETURN_IF_ERROR(cudaMalloc(reinterpret_cast<void**>(&state->base_), offset));
  state->bytes_ = offset;
  TANDEM_CUDA_RETURN_IF_ERROR(cudaMemset(state->base_, 0, offset));
  return state;
}

DeviceSequenceState::~DeviceSequenceState() {
  if (base_) cudaFree(base_);
}

DeviceSequenceState::Layer& DeviceSequenceState::layer(int id) {
  if (id == config_.num_hidden_layers) return layers_.back();
  return layers_[static_cast<size_t>(id)];
}

absl::Status DeviceSequenceState::Reserve(int64_t new_length) {
  if (new_length > capacity_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("device sequence state holds ", capacity_, " positions, ", new_length, " requested"));
  }
  return absl::OkStatus();
}

KvSlot DeviceSequenceState::window_kv(int id, int64_t pos) {
  uint8_t* entry = base_ + layer(id).window + (pos % config_.sliding_window) * format_.entry_bytes();
  return {entry, entry + format_.data_bytes()};
}

KvSlot DeviceSequenceState::compressed_kv(int id, int64_t index) {
  uint8_t* entry = base_ + layer(id).compressed + index * format_.entry_bytes();
  return {entry, entry + format_.data_bytes()};
}

uint8_t* DeviceSequenceState::indexer_key(int id, int64_t index) {
  return base_ + layer(id).indexer + index * kernels::IndexerKeyBytes(config_.index_head_dim);
}

float* DeviceSequenceState::compressor_row(int id, CompressorKind kind, int64_t pos) {
  auto& l = layer(id);
  const int64_t dim = kind == CompressorKind::kAttention ? config_.head_dim : config_.index_head_dim;
  const int64_t row = 2 * CompressorWidth(l.ratio) * dim;
  const size_t base = kind == CompressorKind::kAttention ? l.rows : l.indexer_rows;
  return reinterpret_cast<float*>(base_ + base) + (pos % CompressorRing(l.ratio)) * row;
}

void DeviceSequenceState::CompressedKvRuns(int id, int64_t n, std::vector<EntryRun>* runs) {
  if (n <= 0) return;
  uint8_t* base = base_ + layer(id).compressed;
  runs->push_back({0, n, base, format_.entry_bytes(), base + format_.data_bytes(), format_.entry_bytes()});
}

void DeviceSequenceState::IndexerKeyRuns(int id, int64_t n, std::vector<EntryRun>* runs) {
  if (n <= 0) return;
  runs->push_back({0, n, base_ + layer(id).indexer, kernels::IndexerKeyBytes(config_.index_head_dim), nullptr, 0});
}

}  // namespace tandem::model::cuda
