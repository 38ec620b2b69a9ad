// The DSV4 state pools of one pipeline stage: memory, allocators and addressing for window KV, C4 KV,
// C4 indexer keys, C128 KV and the three compressor-state rings, plus boundary snapshots for the prefix cache.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/cache/layer_index.h"
#include "common/cache/layout.h"
#include "common/cache/page_allocator.h"
#include "common/cache/sizing.h"
#include "common/core/status.h"

namespace tandem::cache {

enum class PoolKind { kWindowKv, kC4Kv, kC4Indexer, kC128Kv, kC4State, kC4IndexerState, kC128State };
inline constexpr std::array<PoolKind, 7> kAllPools = {PoolKind::kWindowKv,  PoolKind::kC4Kv,         PoolKind::kC4Indexer,
                                                      PoolKind::kC128Kv,    PoolKind::kC4State,      PoolKind::kC4IndexerState,
                                                      PoolKind::kC128State};
const char* PoolName(PoolKind kind);  // "window_kv", "c4_kv", ...

// One pool's accounting (the compressed KV pools share the token-page allocator, so they move together).
struct PoolUsage {
  PoolKind kind = PoolKind::kWindowKv;
  std::string name;
  int64_t total = 0;
  int64_t used = 0;
  int64_t free = 0;
  int64_t layers = 0;
  int64_t page_bytes = 0;  // one page or slot, all layers
};

struct KvEntryRef {
  uint8_t* data = nullptr;    // data_bytes (576)
  uint8_t* scales = nullptr;  // scale_bytes (8)
};

// What one running request holds besides its token pages: its window page and compressor rings.
// kNoPage where the stage has no layer of that kind.
struct StateSlots {
  PageId window = kNoPage;
  PageId c4_state = kNoPage;
  PageId c4_indexer_state = kNoPage;
  PageId c128_state = kNoPage;
};

// The request state at a page-aligned length, kept so a later request can resume from it: a copy of the
// window (positions [length - window, length) of every layer, MTP included) and of the C4 rings. The C128
// ring is empty at a page boundary (page_size % 128 == 0) and is not kept.
struct BoundarySnapshot {
  int64_t length = 0;
  int64_t mtp_length = 0;
  StateSlots slots;  // c128_state stays kNoPage
};

// Where a pool's memory comes from: `bytes` zero-filled bytes for the pool called `name`, owned by the
// allocator's owner, which must outlive the pools (a KV transport hands out memory its peers can map).
// Without one, the pools own zeroed heap memory.
using RegionAllocator = std::function<absl::StatusOr<uint8_t*>(std::string_view name, int64_t bytes)>;
// How the pools write their own memory (clearing compressor rings, prefix-cache snapshots) when it is not
// plain host memory: `bytes` from `src` (host memory or another pool region) to `dst` (a pool region).
// A device region passes a cudaMemcpy; without one, memcpy.
using RegionCopy = std::function<absl::Status(void* dst, const void* src, size_t bytes)>;

class StatePools {
 public:
  static absl::StatusOr<std::unique_ptr<StatePools>> Create(const CacheShapes& shapes, const StageLayout& layout,
                                                             const PoolCounts& counts, RegionAllocator allocator = {},
                                                             RegionCopy copy = {});
  StatePools(const StatePools&) = delete;
  StatePools& operator=(const StatePools&) = delete;

  const CacheShapes& shapes() const { return shapes_; }
  const StageLayout& layout() const { return layout_; }
  const CacheFootprint& footprint() const { return footprint_; }
  const PoolCounts& counts() const { return counts_; }
  int64_t page_size() const { return shapes_.page_size; }

  PageAllocator& token_pages() { return token_pages_; }
  PageAllocator& window_pages() { return window_pages_; }
  PageAllocator& c4_states() { return c4_states_; }
  PageAllocator& c4_indexer_states() { return c4_indexer_states_; }
  PageAllocator& c128_states() { return c128_states_; }
  const PageAllocator& token_pages() const { return token_pages_; }
  const PageAllocator& window_pages() const { return window_pages_; }

  // Addressing. Layers are named in the pool's own index space; slots are entries inside a page.
  KvEntryRef window_kv(StageLayerIndex layer, PageId page, int64_t slot);
  KvEntryRef c4_kv(CompressedLayerIndex<4> layer, PageId page, int64_t slot);
  uint8_t* c4_indexer_key(CompressedLayerIndex<4> layer, PageId page, int64_t slot);
  KvEntryRef c128_kv(CompressedLayerIndex<128> layer, PageId page, int64_t slot);
  // Compressor-state pools are looked up by global layer id (null outside the stage or for a layer
  // without that ring); `row` is the raw position modulo the ring size.
  float* compressor_row(GlobalLayerId layer, StateKind kind, PageId slot, int64_t row);

  const KvPageLayout& window_page_layout() const { return window_page_; }
  const KvPageLayout& c4_page_layout() const { return c4_page_; }
  const IndexerPageLayout& c4_indexer_page_layout() const { return c4_indexer_page_; }
  const KvPageLayout& c128_page_layout() const { return c128_page_; }
  const RingLayout& ring_layout(StateKind kind) const;
  // A pool's whole memory, layer-major ([layer][page][page bytes]): what transfers register.
  std::span<uint8_t> region(PoolKind kind);
  // Whether region bytes may be read and written directly (false for device regions: use Copy).
  bool host_accessible() const { return !copy_; }
  // Copies bytes into or out of the pools' memory (host or device) with the pools' RegionCopy.
  absl::Status Copy(void* dst, const void* src, size_t bytes);
  // The pool's layers, bytes of one page (or slot) of one layer, and where page `page` of `layer` starts
  // inside region(kind): how a transfer names a request's pages.
  int64_t layers(PoolKind kind) const { return regions_[static_cast<size_t>(kind)].layers; }
  int64_t layer_page_bytes(PoolKind kind) const { return regions_[static_cast<size_t>(kind)].page_bytes; }
  int64_t page_offset(PoolKind kind, int64_t layer, PageId page) const {
    const Region& r = regions_[static_cast<size_t>(kind)];
    return layer * r.layer_stride + static_cast<int64_t>(page) * r.page_bytes;
  }

  // A running request's window page and rings, all or nothing; rings start clear.
  absl::StatusOr<StateSlots> AcquireSlots();
  absl::Status ReleaseSlots(StateSlots& slots);  // resets `slots` to kNoPage

  // Copies the window and C4 rings of `from` into fresh slots (all or nothing). `length` must be page-aligned.
  absl::StatusOr<BoundarySnapshot> Capture(const StateSlots& from, int64_t length, int64_t mtp_length);
  // Overwrites the window and C4 rings of `into` with the snapshot's.
  absl::Status Restore(const BoundarySnapshot& snapshot, const StateSlots& into);
  absl::Status ReleaseSnapshot(BoundarySnapshot& snapshot);

  std::vector<PoolUsage> Usage() const;
  absl::Status CheckAccounting() const;

 private:
  StatePools(const CacheShapes& shapes, const StageLayout& layout, const PoolCounts& counts);
  struct Region {
    uint8_t* bytes = nullptr;
    std::unique_ptr<uint8_t[]> owned;  // the heap memory when no allocator was given
    int64_t size = 0;
    int64_t layers = 0;
    int64_t layer_stride = 0;  // pages × page bytes
    int64_t page_bytes = 0;    // one page of one layer
  };
  static absl::Status Allocate(Region& region, PoolKind kind, int64_t layers, int64_t pages, int64_t page_bytes,
                               const RegionAllocator& allocator);
  Region& region_of(PoolKind kind) { return regions_[static_cast<size_t>(kind)]; }
  uint8_t* page_base(PoolKind kind, int layer, PageId page, int64_t page_bytes);
  absl::Status ClearRings(const StateSlots& slots);
  absl::Status CopySlots(const StateSlots& from, const StateSlots& to, bool with_c128);

  CacheShapes shapes_;
  StageLayout layout_;
  PoolCounts counts_;
  CacheFootprint footprint_;
  KvPageLayout window_page_, c4_page_, c128_page_;
  IndexerPageLayout c4_indexer_page_;
  RingLayout c4_ring_, c4_indexer_ring_, c128_ring_;
  std::array<Region, kAllPools.size()> regions_;
  RegionCopy copy_;
  PageAllocator token_pages_, window_pages_, c4_states_, c4_indexer_states_, c128_states_;
};

}  // namespace tandem::cache
