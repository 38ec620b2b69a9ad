#include "common/engine/paged_state.h"

#include <algorithm>

#include <cassert>

#include <spdlog/spdlog.h>

namespace tandem::engine {

cache::CacheShapes CacheShapesFor(const model::ModelConfig& config, int64_t page_size, int64_t kv_page_alignment) {
  cache::CacheShapes shapes;
  shapes.page_size = page_size;
  shapes.sliding_window = config.sliding_window;
  shapes.nope_dim = config.nope_dim();
  shapes.rope_dim = config.qk_rope_head_dim;
  shapes.head_dim = config.head_dim;
  shapes.index_head_dim = config.index_head_dim;
  shapes.kv_page_alignment = kv_page_alignment;
  return shapes;
}

absl::StatusOr<cache::LayerSchedule> LayerScheduleFor(const model::ModelConfig& config) {
  return cache::LayerSchedule::FromRatios(config.compress_ratios, static_cast<int>(config.num_hidden_layers));
}

absl::StatusOr<cache::StageLayout> StageLayoutFor(const model::ModelConfig& config, int begin_layer, int end_layer,
                                                  bool with_mtp) {
  TANDEM_ASSIGN_OR_RETURN(const cache::LayerSchedule schedule, LayerScheduleFor(config));
  return cache::StageLayout::Create(schedule, {begin_layer, end_layer}, with_mtp && config.has_mtp());
}

PagedSequenceState::PagedSequenceState(cache::StatePools* pools)
    : pools_(pools),
      layout_(pools->layout()),
      page_size_(pools->page_size()),
      window_(pools->shapes().sliding_window) {}

PagedSequenceState::~PagedSequenceState() { Release(); }

absl::Status PagedSequenceState::Reserve(int64_t new_length) {
  if (new_length <= reserved_) return absl::OkStatus();
  const int64_t pages = (new_length + page_size_ - 1) / page_size_ - static_cast<int64_t>(page_table_.size());
  auto& token_pages = pools_->token_pages();
  // Check the token pages first so a short pool does not even touch the slots.
  if (pages > token_pages.free()) {
    return absl::ResourceExhaustedError(absl::StrCat("cache full: positions up to ", new_length, " need ", pages,
                                                     " more token pages (c4_kv, c4_indexer, c128_kv), ", token_pages.free(),
                                                     " of ", token_pages.total(), " free"));
  }
  const bool took_slots = slots_.window == cache::kNoPage;
  if (took_slots) {
    auto slots = pools_->AcquireSlots();
    if (!slots.ok()) {
      return absl::ResourceExhaustedError(absl::StrCat("cache full: a request's window and compressor state: ", slots.status().message()));
    }
    slots_ = *slots;
  }
  const size_t before = page_table_.size();
  if (auto status = token_pages.Allocate(pages, &page_table_); !status.ok()) {
    page_table_.resize(before);
    if (took_slots) pools_->ReleaseSlots(slots_).IgnoreError();
    return absl::ResourceExhaustedError(absl::StrCat("cache full: positions up to ", new_length, ": ", status.message()));
  }
  reserved_ = static_cast<int64_t>(page_table_.size()) * page_size_;
  return absl::OkStatus();
}

model::KvSlot PagedSequenceState::window_kv(int layer, int64_t pos) {
  const auto stage = layout_.ToStage(cache::GlobalLayerId(layer));
  assert(stage && slots_.window != cache::kNoPage);
  const cache::KvEntryRef entry = pools_->window_kv(*stage, slots_.window, pos % window_);
  return {entry.data, entry.scales};
}

model::KvSlot PagedSequenceState::compressed_kv(int layer, int64_t index) {
  const cache::GlobalLayerId id(layer);
  cache::KvEntryRef entry;
  if (const auto c4 = layout_.ToCompressed<4>(id)) {
    assert(index * 4 < reserved_);
    entry = pools_->c4_kv(*c4, page_of(index * 4), index % (page_size_ / 4));
  } else {
    const auto c128 = layout_.ToCompressed<128>(id);
    assert(c128 && index * 128 < reserved_);
    entry = pools_->c128_kv(*c128, page_of(index * 128), index % (page_size_ / 128));
  }
  return {entry.data, entry.scales};
}

uint8_t* PagedSequenceState::indexer_key(int layer, int64_t index) {
  const auto c4 = layout_.ToCompressed<4>(cache::GlobalLayerId(layer));
  assert(c4 && index * 4 < reserved_);
  return pools_->c4_indexer_key(*c4, page_of(index * 4), index % (page_size_ / 4));
}

float* PagedSequenceState::compressor_row(int layer, model::CompressorKind kind, int64_t pos) {
  const cache::GlobalLayerId id(layer);
  if (layout_.compress_ratio(id) == 128) return pools_->compressor_row(id, cache::StateKind::kC128, slots_.c128_state, pos);
  if (kind == model::CompressorKind::kAttention) {
    return pools_->compressor_row(id, cache::StateKind::kC4Attention, slots_.c4_state, pos);
  }
  return pools_->compressor_row(id, cache::StateKind::kC4Indexer, slots_.c4_indexer_state, pos);
}

void PagedSequenceState::CompressedKvRuns(int layer, int64_t n, std::vector<model::EntryRun>* runs) {
  const int64_t per_page = page_size_ / layout_.compress_ratio(cache::GlobalLayerId(layer));
  for (int64_t j = 0; j < n; j += per_page) {
    const int64_t count = std::min(per_page, n - j);
    const model::KvSlot a = compressed_kv(layer, j);
    model::EntryRun run{j, count, a.data, 0, a.scales, 0};
    if (count > 1) {
      const model::KvSlot b = compressed_kv(layer, j + 1);
      run.data_stride = b.data - a.data;
      run.scale_stride = b.scales - a.scales;
    }
    runs->push_back(run);
  }
}

void PagedSequenceState::IndexerKeyRuns(int layer, int64_t n, std::vector<model::EntryRun>* runs) {
  const int64_t per_page = page_size_ / 4;
  for (int64_t j = 0; j < n; j += per_page) {
    const int64_t count = std::min(per_page, n - j);
    uint8_t* a = indexer_key(layer, j);
    runs->push_back({j, count, a, count > 1 ? indexer_key(layer, j + 1) - a : 0, nullptr, 0});
  }
}

void PagedSequenceState::Release() {
  absl::Status status;
  if (cache_ && locked_.valid()) status.Update(cache_->Unlock(locked_));
  cache_ = nullptr;
  locked_ = {};
  status.Update(pools_->token_pages().Release(page_table_));
  page_table_.clear();
  status.Update(pools_->ReleaseSlots(slots_));
  for (auto& snapshot : snapshots_) status.Update(pools_->ReleaseSnapshot(snapshot));
  snapshots_.clear();
  length_ = mtp_length_ = reserved_ = cached_prefix_ = 0;
  if (!status.ok()) spdlog::error("paged state: release: {}", status.ToString());
}

absl::Status PagedSequenceState::AdoptPrefix(cache::RadixCache* cache, const cache::RadixCache::Match& match) {
  if (length_ != 0 || !page_table_.empty() || locked_.valid()) {
    return absl::FailedPreconditionError("paged state: a cached prefix can only start a fresh request");
  }
  if (match.tokens == 0) return absl::OkStatus();
  if (match.tokens % page_size_ != 0 || static_cast<int64_t>(match.pages.size()) * page_size_ != match.tokens ||
      match.snapshot.length != match.tokens || !match.node.valid()) {
    return absl::InvalidArgumentError(absl::StrCat("paged state: inconsistent prefix match of ", match.tokens, " tokens"));
  }
  const bool took_slots = slots_.window == cache::kNoPage;
  if (took_slots) {
    TANDEM_ASSIGN_OR_RETURN(slots_, pools_->AcquireSlots());
  }
  auto undo = [&](absl::Status error) {
    if (took_slots) pools_->ReleaseSlots(slots_).IgnoreError();
    return error;
  };
  if (auto status = pools_->token_pages().AddRef(match.pages); !status.ok()) return undo(status);
  if (auto status = pools_->Restore(match.snapshot, slots_); !status.ok()) {
    pools_->token_pages().Release(match.pages).IgnoreError();
    return undo(status);
  }
  cache->Lock(match.node);
  cache_ = cache;
  locked_ = match.node;
  page_table_.assign(match.pages.begin(), match.pages.end());
  length_ = match.tokens;
  mtp_length_ = match.snapshot.mtp_length;
  reserved_ = match.tokens;
  cached_prefix_ = match.tokens;
  return absl::OkStatus();
}

absl::Status PagedSequenceState::CaptureBoundary() {
  if (length_ <= 0 || length_ % page_size_ != 0) {
    return absl::FailedPreconditionError(absl::StrCat("paged state: length ", length_, " is not a page boundary (page size ",
                                                      page_size_, ")"));
  }
  if (length_ == cached_prefix_) return absl::OkStatus();  // the cache already holds this boundary
  for (const auto& snapshot : snapshots_) {
    if (snapshot.length == length_) return absl::OkStatus();
  }
  TANDEM_ASSIGN_OR_RETURN(auto snapshot, pools_->Capture(slots_, length_, mtp_length_));
  snapshots_.push_back(snapshot);
  return absl::OkStatus();
}

absl::StatusOr<int64_t> PagedSequenceState::InsertInto(cache::RadixCache* cache, std::span<const int32_t> tokens) {
  if (static_cast<int64_t>(tokens.size()) < length_) {
    return absl::InvalidArgumentError(
        absl::StrCat("paged state: ", tokens.size(), " tokens given for a state of length ", length_));
  }
  const int64_t pages = length_ / page_size_;
  std::vector<cache::BoundarySnapshot> snapshots;
  for (auto& snapshot : snapshots_) {
    if (snapshot.length <= length_) {
      snapshots.push_back(snapshot);
    } else {  // captured before the length was rolled back: no longer this request's state
      pools_->ReleaseSnapshot(snapshot).IgnoreError();
    }
  }
  snapshots_.clear();
  return cache->Insert(tokens.first(static_cast<size_t>(pages * page_size_)),
                       std::span<const cache::PageId>(page_table_).first(static_cast<size_t>(pages)), std::move(snapshots));
}

}  // namespace tandem::engine
