// The four layer index spaces of a DSV4 pipeline stage as distinct types, and the one place that converts
// between them. Transfer keys are stage-local; every pool is looked up in its own space (runtime-features.md §2, §4).
#pragma once

#include <compare>
#include <optional>
#include <ostream>
#include <span>
#include <string>
#include <vector>

#include "common/core/status.h"

namespace tandem::cache {

// A layer index tagged with the space it lives in; indices of different spaces never convert implicitly.
template <typename Tag>
class LayerIndex {
 public:
  constexpr LayerIndex() = default;
  constexpr explicit LayerIndex(int value) : value_(value) {}
  constexpr int value() const { return value_; }
  friend constexpr auto operator<=>(LayerIndex, LayerIndex) = default;
  friend std::ostream& operator<<(std::ostream& out, LayerIndex index) { return out << index.value_; }

 private:
  int value_ = -1;
};

struct GlobalLayerTag {};
struct StageLayerTag {};
template <int Ratio>
struct CompressedLayerTag {};
struct StateOrdinalTag {};

// Global layer id: 0..L-1 for the main layers and L for the MTP layer (as model::LayerSpec::layer_id).
// Compressor-state pools are indexed by it.
using GlobalLayerId = LayerIndex<GlobalLayerTag>;
// Position inside the stage: g - begin for g in [begin, end), then the MTP layer when the stage holds it.
// The window (SWA) pool is indexed by it, and so are per-layer transfer keys.
using StageLayerIndex = LayerIndex<StageLayerTag>;
// Index among the stage's layers of one compress ratio (4 or 128), restarting at 0 on every stage (sglang's
// layer_mapping[g].compress_layer_id under PP). The C4 KV, C4 indexer and C128 KV pools are indexed by it.
template <int Ratio>
using CompressedLayerIndex = LayerIndex<CompressedLayerTag<Ratio>>;
// Index among the stage's layers that carry compressor state (ratio > 0), in layer order: the key of the
// compressor-state transfer list. (The indexer-state list is keyed by CompressedLayerIndex<4>.)
using StateOrdinal = LayerIndex<StateOrdinalTag>;

// Half-open range of main layers [begin, end) held by one pipeline stage.
struct StageRange {
  int begin = 0;
  int end = 0;
  int size() const { return end - begin; }
  friend bool operator==(const StageRange&, const StageRange&) = default;
};

// The model's compress ratio per main layer, and whether an MTP (window-only) layer follows them.
struct LayerSchedule {
  std::vector<int> compress_ratios;  // num_hidden_layers entries, each 0, 4 or 128
  bool has_mtp = false;

  int num_layers() const { return static_cast<int>(compress_ratios.size()); }
  // From config.json's compress_ratios (num_hidden_layers main entries, then one per MTP layer, which is
  // window-only whatever its entry says).
  static absl::StatusOr<LayerSchedule> FromRatios(std::span<const int> ratios, int num_hidden_layers);
};

// sglang's even split: base = L / pp; the last L % pp stages take one layer more.
absl::StatusOr<std::vector<StageRange>> SplitStages(int num_layers, int pp_size);
// An explicit partition (SGLANG_PP_LAYER_PARTITION style): one positive count per stage, summing to L.
absl::StatusOr<std::vector<StageRange>> SplitStages(int num_layers, std::span<const int> partition);

// The layers of one stage seen through every index space. All conversions live here.
class StageLayout {
 public:
  // with_mtp: the stage also holds the MTP layer's window (only the last stage can).
  static absl::StatusOr<StageLayout> Create(const LayerSchedule& schedule, StageRange stage, bool with_mtp);

  StageRange stage() const { return stage_; }
  int num_model_layers() const { return num_model_layers_; }
  bool has_mtp() const { return has_mtp_; }
  GlobalLayerId mtp_layer() const { return GlobalLayerId(num_model_layers_); }

  bool Contains(GlobalLayerId layer) const { return stage_index_of(layer) >= 0; }
  // 0 for window-only layers (and the MTP layer); undefined outside the stage (returns -1).
  int compress_ratio(GlobalLayerId layer) const;

  // Stage-local index.
  int num_stage_layers() const { return static_cast<int>(stage_layers_.size()); }
  std::optional<StageLayerIndex> ToStage(GlobalLayerId layer) const;
  GlobalLayerId ToGlobal(StageLayerIndex index) const { return stage_layers_.at(static_cast<size_t>(index.value())); }

  // Per-ratio compressed index (Ratio is 4 or 128).
  template <int Ratio>
  int num_compressed() const {
    return static_cast<int>(layers_of<Ratio>().size());
  }
  template <int Ratio>
  std::optional<CompressedLayerIndex<Ratio>> ToCompressed(GlobalLayerId layer) const {
    const int index = Lookup(Ratio == 4 ? c4_index_ : c128_index_, layer);
    if (index < 0) return std::nullopt;
    return CompressedLayerIndex<Ratio>(index);
  }
  template <int Ratio>
  GlobalLayerId ToGlobal(CompressedLayerIndex<Ratio> index) const {
    return layers_of<Ratio>().at(static_cast<size_t>(index.value()));
  }

  // State ordinal.
  int num_state_layers() const { return static_cast<int>(state_layers_.size()); }
  std::optional<StateOrdinal> ToStateOrdinal(GlobalLayerId layer) const;
  GlobalLayerId ToGlobal(StateOrdinal ordinal) const { return state_layers_.at(static_cast<size_t>(ordinal.value())); }

  // The stage's layers by kind, in layer order (global ids).
  std::span<const GlobalLayerId> stage_layers() const { return stage_layers_; }
  std::span<const GlobalLayerId> c4_layers() const { return c4_layers_; }
  std::span<const GlobalLayerId> c128_layers() const { return c128_layers_; }
  std::span<const GlobalLayerId> state_layers() const { return state_layers_; }

  std::string DebugString() const;

 private:
  template <int Ratio>
  const std::vector<GlobalLayerId>& layers_of() const {
    static_assert(Ratio == 4 || Ratio == 128, "DSV4 compress ratios are 4 and 128");
    if constexpr (Ratio == 4) {
      return c4_layers_;
    } else {
      return c128_layers_;
    }
  }
  // Tables indexed by global id (0..L, L = MTP), -1 where the layer has no index in that space.
  static int Lookup(const std::vector<int>& table, GlobalLayerId layer);
  int stage_index_of(GlobalLayerId layer) const { return Lookup(stage_index_, layer); }

  StageRange stage_;
  int num_model_layers_ = 0;
  bool has_mtp_ = false;
  std::vector<int> ratio_;  // by global id; MTP = 0
  std::vector<int> stage_index_, c4_index_, c128_index_, state_ordinal_;
  std::vector<GlobalLayerId> stage_layers_, c4_layers_, c128_layers_, state_layers_;
};

// Where one prefill stage's buffers sit in the flat per-type lists of a receiver that holds the whole model
// (PD with a PP prefill and a PP1 decode, runtime-features.md §4): kv_data = [C4 | C4 indexer | C128],
// state_data = [window (one per main layer) | compressor state of ratio>0 layers | C4 indexer state].
struct IndexRange {
  int begin = 0;
  int end = 0;
  int size() const { return end - begin; }
  friend bool operator==(const IndexRange&, const IndexRange&) = default;
};
struct ReceiverSlices {
  IndexRange c4_kv, c4_indexer, c128_kv;               // into kv_data
  IndexRange window, compressor_state, indexer_state;  // into state_data
  int kv_list_size = 0;
  int state_list_size = 0;
  int kv_count() const { return c4_kv.size() + c4_indexer.size() + c128_kv.size(); }
  int state_count() const { return window.size() + compressor_state.size() + indexer_state.size(); }
};
absl::StatusOr<ReceiverSlices> SlicesInWholeModel(const LayerSchedule& schedule, StageRange stage);

}  // namespace tandem::cache
