#include "common/model/state.h"

#include <limits>

namespace tandem::model {

namespace {
// Appends entry (data, scales) to the last run when it continues it with the same strides.
void AppendEntry(std::vector<EntryRun>* runs, int64_t index, uint8_t* data, uint8_t* scales) {
  if (!runs->empty()) {
    EntryRun& r = runs->back();
    if (r.first + r.count == index) {
      if (r.count == 1) {
        r.data_stride = data - r.data;
        r.scale_stride = scales ? scales - r.scales : 0;
        ++r.count;
        return;
      }
      if (data == r.data + r.count * r.data_stride && (!scales || scales == r.scales + r.count * r.scale_stride)) {
        ++r.count;
        return;
      }
    }
  }
  runs->push_back({index, 1, data, 0, scales, 0});
}
}  // namespace

void SequenceState::CompressedKvRuns(int layer, int64_t n, std::vector<EntryRun>* runs) {
  for (int64_t j = 0; j < n; ++j) {
    const KvSlot slot = compressed_kv(layer, j);
    AppendEntry(runs, j, slot.data, slot.scales);
  }
}

void SequenceState::IndexerKeyRuns(int layer, int64_t n, std::vector<EntryRun>* runs) {
  for (int64_t j = 0; j < n; ++j) AppendEntry(runs, j, indexer_key(layer, j), nullptr);
}

EntryRun SequenceState::WindowRing(int layer, int64_t sliding_window) {
  const KvSlot first = window_kv(layer, 0);
  EntryRun ring{0, sliding_window, first.data, 0, first.scales, 0};
  if (sliding_window > 1) {
    const KvSlot second = window_kv(layer, 1);
    ring.data_stride = second.data - first.data;
    ring.scale_stride = second.scales - first.scales;
  }
  return ring;
}

HostSequenceState::HostSequenceState(const ModelConfig& config, int begin_layer, int end_layer, bool with_mtp)
    : config_(config), format_{config.nope_dim(), config.qk_rope_head_dim}, begin_layer_(begin_layer) {
  auto add = [&](int ratio) {
    Layer l;
    l.ratio = ratio;
    l.window.assign(static_cast<size_t>(config.sliding_window * format_.entry_bytes()), 0);
    if (ratio > 0) {
      const int64_t row = 2 * CompressorWidth(ratio) * config.head_dim;
      l.rows.assign(static_cast<size_t>(CompressorRing(ratio) * row), 0.0f);
    }
    if (ratio == 4) {
      const int64_t row = 2 * CompressorWidth(ratio) * config.index_head_dim;
      l.indexer_rows.assign(static_cast<size_t>(CompressorRing(ratio) * row), 0.0f);
    }
    layers_.push_back(std::move(l));
  };
  for (int id = begin_layer; id < end_layer; ++id) add(config.layers[id].compress_ratio);
  if (with_mtp && config.has_mtp()) add(0);
}

HostSequenceState::Layer& HostSequenceState::layer(int id) {
  if (id == config_.num_hidden_layers) return layers_.back();
  return layers_[static_cast<size_t>(id - begin_layer_)];
}

absl::Status HostSequenceState::Reserve(int64_t new_length) {
  if (new_length <= reserved_) return absl::OkStatus();
  for (auto& l : layers_) {
    if (l.ratio == 0) continue;
    const int64_t entries = new_length / l.ratio;
    l.compressed.resize(static_cast<size_t>(entries * format_.entry_bytes()));
    if (l.ratio == 4) l.indexer.resize(static_cast<size_t>(entries * kernels::IndexerKeyBytes(config_.index_head_dim)));
  }
  reserved_ = new_length;
  return absl::OkStatus();
}

KvSlot HostSequenceState::window_kv(int id, int64_t pos) {
  auto& l = layer(id);
  uint8_t* entry = l.window.data() + (pos % config_.sliding_window) * format_.entry_bytes();
  return {entry, entry + format_.data_bytes()};
}

KvSlot HostSequenceState::compressed_kv(int id, int64_t index) {
  uint8_t* entry = layer(id).compressed.data() + index * format_.entry_bytes();
  return {entry, entry + format_.data_bytes()};
}

uint8_t* HostSequenceState::indexer_key(int id, int64_t index) {
  return layer(id).indexer.data() + index * kernels::IndexerKeyBytes(config_.index_head_dim);
}

float* HostSequenceState::compressor_row(int id, CompressorKind kind, int64_t pos) {
  auto& l = layer(id);
  const int64_t dim = kind == CompressorKind::kAttention ? config_.head_dim : config_.index_head_dim;
  const int64_t row = 2 * CompressorWidth(l.ratio) * dim;
  auto& rows = kind == CompressorKind::kAttention ? l.rows : l.indexer_rows;
  return rows.data() + (pos % CompressorRing(l.ratio)) * row;
}

void HostSequenceState::CompressedKvRuns(int id, int64_t n, std::vector<EntryRun>* runs) {
  if (n <= 0) return;
  uint8_t* base = layer(id).compressed.data();
  runs->push_back({0, n, base, format_.entry_bytes(), base + format_.data_bytes(), format_.entry_bytes()});
}

void HostSequenceState::IndexerKeyRuns(int id, int64_t n, std::vector<EntryRun>* runs) {
  if (n <= 0) return;
  runs->push_back({0, n, layer(id).indexer.data(), kernels::IndexerKeyBytes(config_.index_head_dim), nullptr, 0});
}

size_t HostSequenceState::bytes() const {
  size_t total = 0;
  for (const auto& l : layers_) {
    total += l.window.size() + l.compressed.size() + l.indexer.size() + 4 * (l.rows.size() + l.indexer_rows.size());
  }
  return total;
}

}  // namespace tandem::model
