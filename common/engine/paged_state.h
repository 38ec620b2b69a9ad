// model::SequenceState backed by the cache pools: a request's token page table, window page and compressor
// rings, with prefix-cache reuse (adopt a cached prefix, capture boundary snapshots, insert when done).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "common/cache/layer_index.h"
#include "common/cache/pools.h"
#include "common/cache/radix_cache.h"
#include "common/core/status.h"
#include "common/model/config.h"
#include "common/model/state.h"

namespace tandem::engine {

// The cache's view of a model: shapes, schedule and a stage's layout.
cache::CacheShapes CacheShapesFor(const model::ModelConfig& config, int64_t page_size = 256, int64_t kv_page_alignment = 0);
absl::StatusOr<cache::LayerSchedule> LayerScheduleFor(const model::ModelConfig& config);
absl::StatusOr<cache::StageLayout> StageLayoutFor(const model::ModelConfig& config, int begin_layer, int end_layer,
                                                  bool with_mtp);

// Not thread-safe; one request, driven by the scheduler thread. The pools (and a prefix cache it adopted
// from) must outlive it.
class PagedSequenceState final : public model::SequenceState {
 public:
  explicit PagedSequenceState(cache::StatePools* pools);
  ~PagedSequenceState() override;
  PagedSequenceState(const PagedSequenceState&) = delete;
  PagedSequenceState& operator=(const PagedSequenceState&) = delete;

  int64_t length() const override { return length_; }
  int64_t mtp_length() const override { return mtp_length_; }
  void set_length(int64_t length) override { length_ = length; }
  void set_mtp_length(int64_t length) override { mtp_length_ = length; }

  // Takes the window page and rings on first use and token pages for positions < new_length. When a pool
  // runs short: RESOURCE_EXHAUSTED naming the pool, and nothing this call took stays allocated.
  absl::Status Reserve(int64_t new_length) override;

  model::KvSlot window_kv(int layer, int64_t pos) override;
  model::KvSlot compressed_kv(int layer, int64_t index) override;
  uint8_t* indexer_key(int layer, int64_t index) override;
  float* compressor_row(int layer, model::CompressorKind kind, int64_t pos) override;
  // One run per token page (the entries of a page are evenly spaced inside it).
  void CompressedKvRuns(int layer, int64_t n, std::vector<model::EntryRun>* runs) override;
  void IndexerKeyRuns(int layer, int64_t n, std::vector<model::EntryRun>* runs) override;

  // Returns every page, slot, snapshot and prefix-cache lock; the state is empty (length 0) and reusable.
  void Release();

  // Resumes from a cached prefix on a fresh state: shares its token pages, copies its boundary snapshot into
  // this request's own window and rings, and locks the node until Release. All or nothing.
  absl::Status AdoptPrefix(cache::RadixCache* cache, const cache::RadixCache::Match& match);
  // Keeps the state at the current length (page-aligned, after a step that ended there) for the prefix
  // cache. A no-op where one is already kept. RESOURCE_EXHAUSTED when the window or C4 state pools are full.
  absl::Status CaptureBoundary();
  // Hands the whole pages below length() and the captured snapshots to the cache. `tokens` are the tokens
  // folded into the state so far (at least length()). Returns the tokens newly cached.
  absl::StatusOr<int64_t> InsertInto(cache::RadixCache* cache, std::span<const int32_t> tokens);

  std::span<const cache::PageId> page_table() const { return page_table_; }
  const cache::StateSlots& slots() const { return slots_; }
  int64_t reserved() const { return reserved_; }
  int64_t cached_prefix() const { return cached_prefix_; }  // tokens taken from the prefix cache
  int64_t captured_snapshots() const { return static_cast<int64_t>(snapshots_.size()); }

 private:
  cache::PageId page_of(int64_t position) const { return page_table_[static_cast<size_t>(position / page_size_)]; }

  cache::StatePools* pools_;
  const cache::StageLayout& layout_;
  int64_t page_size_;
  int64_t window_;
  std::vector<cache::PageId> page_table_;
  cache::StateSlots slots_;
  std::vector<cache::BoundarySnapshot> snapshots_;
  cache::RadixCache* cache_ = nullptr;
  cache::RadixCache::NodeRef locked_;
  int64_t length_ = 0;
  int64_t mtp_length_ = 0;
  int64_t reserved_ = 0;
  int64_t cached_prefix_ = 0;
};

}  // namespace tandem::engine
