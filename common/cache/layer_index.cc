#include "common/cache/layer_index.h"


#include "absl/strings/str_join.h"

namespace tandem::cache {

absl::StatusOr<LayerSchedule> LayerSchedule::FromRatios(std::span<const int> ratios, int num_hidden_layers) {
  if (num_hidden_layers <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("layer schedule: num_hidden_layers must be positive, got ", num_hidden_layers));
  }
  if (static_cast<int>(ratios.size()) < num_hidden_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer schedule: ", ratios.size(), " compress ratios for ",
                                                   num_hidden_layers, " layers"));
  }
  LayerSchedule schedule;
  for (int i = 0; i < num_hidden_layers; ++i) {
    const int ratio = ratios[static_cast<size_t>(i)];
    if (ratio != 0 && ratio != 4 && ratio != 128) {
      return absl::InvalidArgumentError(absl::StrCat("layer schedule: compress_ratios[", i, "] must be 0, 4 or 128, got ", ratio));
    }
    schedule.compress_ratios.push_back(ratio);
  }
  schedule.has_mtp = static_cast<int>(ratios.size()) > num_hidden_layers;
  return schedule;
}

absl::StatusOr<std::vector<StageRange>> SplitStages(int num_layers, int pp_size) {
  if (pp_size <= 0 || pp_size > num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("pipeline split: pp size ", pp_size, " must be in [1, ", num_layers, "]"));
  }
  const int base = num_layers / pp_size, rem = num_layers % pp_size;
  std::vector<int> counts(static_cast<size_t>(pp_size), base);
  for (int r = pp_size - rem; r < pp_size; ++r) counts[static_cast<size_t>(r)] += 1;
  return SplitStages(num_layers, counts);
}

absl::StatusOr<std::vector<StageRange>> SplitStages(int num_layers, std::span<const int> partition) {
  if (partition.empty()) return absl::InvalidArgumentError("pipeline split: empty partition");
  std::vector<StageRange> stages;
  int begin = 0;
  for (int count : partition) {
    if (count <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("pipeline split: partition ", absl::StrJoin(partition, ","),
                                                     " has a stage without layers"));
    }
    stages.push_back({begin, begin + count});
    begin += count;
  }
  if (begin != num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("pipeline split: partition ", absl::StrJoin(partition, ","), " sums to ",
                                                   begin, ", the model has ", num_layers, " layers"));
  }
  return stages;
}

absl::StatusOr<StageLayout> StageLayout::Create(const LayerSchedule& schedule, StageRange stage, bool with_mtp) {
  const int L = schedule.num_layers();
  if (stage.begin < 0 || stage.end > L || stage.begin >= stage.end) {
    return absl::InvalidArgumentError(
        absl::StrCat("stage layout: layer range [", stage.begin, ", ", stage.end, ") is not inside [0, ", L, ")"));
  }
  if (with_mtp && (!schedule.has_mtp || stage.end != L)) {
    return absl::InvalidArgumentError(absl::StrCat("stage layout: the MTP layer belongs to the last stage of a model with MTP; stage [",
                                                   stage.begin, ", ", stage.end, ") of ", L, " layers",
                                                   schedule.has_mtp ? "" : " (the model has no MTP layer)"));
  }
  StageLayout layout;
  layout.stage_ = stage;
  layout.num_model_layers_ = L;
  layout.has_mtp_ = with_mtp;
  const size_t table = static_cast<size_t>(L + 1);
  layout.ratio_.assign(table, 0);
  layout.stage_index_.assign(table, -1);
  layout.c4_index_.assign(table, -1);
  layout.c128_index_.assign(table, -1);
  layout.state_ordinal_.assign(table, -1);
  for (int g = 0; g < L; ++g) layout.ratio_[static_cast<size_t>(g)] = schedule.compress_ratios[static_cast<size_t>(g)];
  auto add = [&](int g) {
    const auto slot = static_cast<size_t>(g);
    layout.stage_index_[slot] = static_cast<int>(layout.stage_layers_.size());
    layout.stage_layers_.emplace_back(g);
    const int ratio = layout.ratio_[slot];
    if (ratio == 4) {
      layout.c4_index_[slot] = static_cast<int>(layout.c4_layers_.size());
      layout.c4_layers_.emplace_back(g);
    } else if (ratio == 128) {
      layout.c128_index_[slot] = static_cast<int>(layout.c128_layers_.size());
      layout.c128_layers_.emplace_back(g);
    }
    if (ratio > 0) {
      layout.state_ordinal_[slot] = static_cast<int>(layout.state_layers_.size());
      layout.state_layers_.emplace_back(g);
    }
  };
  for (int g = stage.begin; g < stage.end; ++g) add(g);
  if (with_mtp) add(L);
  return layout;
}

int StageLayout::Lookup(const std::vector<int>& table, GlobalLayerId layer) {
  const int g = layer.value();
  if (g < 0 || g >= static_cast<int>(table.size())) return -1;
  return table[static_cast<size_t>(g)];
}

int StageLayout::compress_ratio(GlobalLayerId layer) const {
  if (!Contains(layer)) return -1;
  return ratio_[static_cast<size_t>(layer.value())];
}

std::optional<StageLayerIndex> StageLayout::ToStage(GlobalLayerId layer) const {
  const int index = stage_index_of(layer);
  if (index < 0) return std::nullopt;
  return StageLayerIndex(index);
}

std::optional<StateOrdinal> StageLayout::ToStateOrdinal(GlobalLayerId layer) const {
  const int index = Lookup(state_ordinal_, layer);
  if (index < 0) return std::nullopt;
  return StateOrdinal(index);
}

std::string StageLayout::DebugString() const {
  auto ids = [](std::span<const GlobalLayerId> layers) {
    std::vector<int> values;
    for (auto g : layers) values.push_back(g.value());
    return absl::StrJoin(values, ",");
  };
  return absl::StrCat("stage [", stage_.begin, ", ", stage_.end, ")", has_mtp_ ? " + MTP" : "", ": C4 {", ids(c4_layers_),
                      "} C128 {", ids(c128_layers_), "}");
}

absl::StatusOr<ReceiverSlices> SlicesInWholeModel(const LayerSchedule& schedule, StageRange stage) {
  const int L = schedule.num_layers();
  if (stage.begin < 0 || stage.end > L || stage.begin >= stage.end) {
    return absl::InvalidArgumentError(
        absl::StrCat("receiver slices: layer range [", stage.begin, ", ", stage.end, ") is not inside [0, ", L, ")"));
  }
  // Counts of each kind among layers [0, g).
  auto count_before = [&](int g, auto&& keep) {
    int n = 0;
    for (int i = 0; i < g; ++i) n += keep(schedule.compress_ratios[static_cast<size_t>(i)]) ? 1 : 0;
    return n;
  };
  auto c4 = [](int r) { return r == 4; };
  auto c128 = [](int r) { return r == 128; };
  auto stateful = [](int r) { return r > 0; };
  const int c4_total = count_before(L, c4), c128_total = count_before(L, c128);
  ReceiverSlices s;
  s.c4_kv = {count_before(stage.begin, c4), count_before(stage.end, c4)};
  s.c4_indexer = {c4_total + s.c4_kv.begin, c4_total + s.c4_kv.end};
  s.c128_kv = {2 * c4_total + count_before(stage.begin, c128), 2 * c4_total + count_before(stage.end, c128)};
  s.kv_list_size = 2 * c4_total + c128_total;
  // The window list has one entry per main layer; the MTP window is not part of the transfer lists.
  s.window = {stage.begin, stage.end};
  s.compressor_state = {L + count_before(stage.begin, stateful), L + count_before(stage.end, stateful)};
  const int indexer_base = L + c4_total + c128_total;
  s.indexer_state = {indexer_base + s.c4_kv.begin, indexer_base + s.c4_kv.end};
  s.state_list_size = indexer_base + c4_total;
  return s;
}

}  // namespace tandem::cache
