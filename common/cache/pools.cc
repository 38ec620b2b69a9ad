#include "common/cache/pools.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>

namespace tandem::cache {

const char* PoolName(PoolKind kind) {
  switch (kind) {
    case PoolKind::kWindowKv: return "window_kv";
    case PoolKind::kC4Kv: return "c4_kv";
    case PoolKind::kC4Indexer: return "c4_indexer";
    case PoolKind::kC128Kv: return "c128_kv";
    case PoolKind::kC4State: return "c4_state";
    case PoolKind::kC4IndexerState: return "c4_indexer_state";
    case PoolKind::kC128State: return "c128_state";
  }
  return "unknown";
}

StatePools::StatePools(const CacheShapes& shapes, const StageLayout& layout, const PoolCounts& counts)
    : shapes_(shapes),
      layout_(layout),
      counts_(counts),
      footprint_(ComputeFootprint(shapes, layout)),
      window_page_(KvPageLayout::Make(shapes.sliding_window, shapes.kv_format(), shapes.kv_page_alignment)),
      c4_page_(KvPageLayout::Make(shapes.page_size / 4, shapes.kv_format(), shapes.kv_page_alignment)),
      c128_page_(KvPageLayout::Make(shapes.page_size / 128, shapes.kv_format(), shapes.kv_page_alignment)),
      c4_indexer_page_(IndexerPageLayout::Make(shapes.page_size / 4, shapes.index_head_dim)),
      c4_ring_(RingLayout::Make(4, shapes.head_dim)),
      c4_indexer_ring_(RingLayout::Make(4, shapes.index_head_dim)),
      c128_ring_(RingLayout::Make(128, shapes.head_dim)),
      token_pages_("token pages (c4_kv, c4_indexer, c128_kv)", counts.token_pages),
      window_pages_("window_kv", counts.window_pages),
      c4_states_("c4_state", counts.c4_state_slots),
      c4_indexer_states_("c4_indexer_state", counts.c4_state_slots),
      c128_states_("c128_state", counts.c128_state_slots) {}

absl::Status StatePools::Allocate(Region& region, PoolKind kind, int64_t layers, int64_t pages, int64_t page_bytes,
                                  const RegionAllocator& allocator) {
  region.layers = layers;
  region.page_bytes = page_bytes;
  region.layer_stride = pages * page_bytes;
  region.size = layers * region.layer_stride;
  if (region.size <= 0) return absl::OkStatus();
  if (!allocator) {
    region.owned = std::make_unique<uint8_t[]>(static_cast<size_t>(region.size));  // zeroed
    region.bytes = region.owned.get();
    return absl::OkStatus();
  }
  auto bytes = allocator(PoolName(kind), region.size);
  if (!bytes.ok()) {
    return absl::Status(bytes.status().code(), absl::StrCat("state pools: allocating ", region.size, " bytes for ", PoolName(kind),
                                                            ": ", bytes.status().message()));
  }
  if (*bytes == nullptr) return absl::InternalError(absl::StrCat("state pools: the allocator gave no memory for ", PoolName(kind)));
  region.bytes = *bytes;
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<StatePools>> StatePools::Create(const CacheShapes& shapes, const StageLayout& layout,
                                                                const PoolCounts& counts, RegionAllocator allocator,
                                                                RegionCopy copy) {
  TANDEM_RETURN_IF_ERROR(shapes.Validate(layout));
  if (counts.token_pages <= 0 || counts.window_pages <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("state pools: need token pages and window pages, got ", counts.token_pages,
                                                   " and ", counts.window_pages));
  }
  const int64_t c4 = layout.num_compressed<4>(), c128 = layout.num_compressed<128>();
  if ((c4 > 0 && counts.c4_state_slots <= 0) || (c128 > 0 && counts.c128_state_slots <= 0)) {
    return absl::InvalidArgumentError(absl::StrCat("state pools: ", layout.DebugString(), " needs C4 state slots (got ",
                                                   counts.c4_state_slots, ") and C128 state slots (got ",
                                                   counts.c128_state_slots, ")"));
  }
  constexpr int64_t kMaxPages = std::numeric_limits<PageId>::max();
  if (counts.token_pages > kMaxPages || counts.window_pages > kMaxPages || counts.c4_state_slots > kMaxPages ||
      counts.c128_state_slots > kMaxPages) {
    return absl::InvalidArgumentError("state pools: page counts must fit 31 bits");
  }
  std::unique_ptr<StatePools> pools(new StatePools(shapes, layout, counts));
  auto& p = *pools;
  p.copy_ = std::move(copy);
  const auto allocate = [&](PoolKind kind, int64_t layers, int64_t pages, int64_t page_bytes) {
    return Allocate(p.region_of(kind), kind, layers, pages, page_bytes, allocator);
  };
  TANDEM_RETURN_IF_ERROR(allocate(PoolKind::kWindowKv, layout.num_stage_layers(), counts.window_pages, p.window_page_.page_bytes));
  TANDEM_RETURN_IF_ERROR(allocate(PoolKind::kC4Kv, c4, counts.token_pages, p.c4_page_.page_bytes));
  TANDEM_RETURN_IF_ERROR(allocate(PoolKind::kC4Indexer, c4, counts.token_pages, p.c4_indexer_page_.page_bytes));
  TANDEM_RETURN_IF_ERROR(allocate(PoolKind::kC128Kv, c128, counts.token_pages, p.c128_page_.page_bytes));
  TANDEM_RETURN_IF_ERROR(allocate(PoolKind::kC4State, c4, counts.c4_state_slots, p.c4_ring_.slot_bytes));
  TANDEM_RETURN_IF_ERROR(allocate(PoolKind::kC4IndexerState, c4, counts.c4_state_slots, p.c4_indexer_ring_.slot_bytes));
  TANDEM_RETURN_IF_ERROR(allocate(PoolKind::kC128State, c128, counts.c128_state_slots, p.c128_ring_.slot_bytes));
  return pools;
}

uint8_t* StatePools::page_base(PoolKind kind, int layer, PageId page, int64_t page_bytes) {
  Region& region = region_of(kind);
  return region.bytes + layer * region.layer_stride + static_cast<int64_t>(page) * page_bytes;
}

KvEntryRef StatePools::window_kv(StageLayerIndex layer, PageId page, int64_t slot) {
  uint8_t* base = page_base(PoolKind::kWindowKv, layer.value(), page, window_page_.page_bytes);
  return {base + window_page_.data_offset(slot), base + window_page_.scale_offset(slot)};
}

KvEntryRef StatePools::c4_kv(CompressedLayerIndex<4> layer, PageId page, int64_t slot) {
  uint8_t* base = page_base(PoolKind::kC4Kv, layer.value(), page, c4_page_.page_bytes);
  return {base + c4_page_.data_offset(slot), base + c4_page_.scale_offset(slot)};
}

uint8_t* StatePools::c4_indexer_key(CompressedLayerIndex<4> layer, PageId page, int64_t slot) {
  return page_base(PoolKind::kC4Indexer, layer.value(), page, c4_indexer_page_.page_bytes) + c4_indexer_page_.offset(slot);
}

KvEntryRef StatePools::c128_kv(CompressedLayerIndex<128> layer, PageId page, int64_t slot) {
  uint8_t* base = page_base(PoolKind::kC128Kv, layer.value(), page, c128_page_.page_bytes);
  return {base + c128_page_.data_offset(slot), base + c128_page_.scale_offset(slot)};
}

const RingLayout& StatePools::ring_layout(StateKind kind) const {
  switch (kind) {
    case StateKind::kC4Attention: return c4_ring_;
    case StateKind::kC4Indexer: return c4_indexer_ring_;
    case StateKind::kC128: return c128_ring_;
  }
  return c4_ring_;
}

float* StatePools::compressor_row(GlobalLayerId layer, StateKind kind, PageId slot, int64_t row) {
  int index = -1;
  PoolKind pool = PoolKind::kC4State;
  if (kind == StateKind::kC128) {
    if (auto c = layout_.ToCompressed<128>(layer)) index = c->value();
    pool = PoolKind::kC128State;
  } else {
    if (auto c = layout_.ToCompressed<4>(layer)) index = c->value();
    pool = kind == StateKind::kC4Attention ? PoolKind::kC4State : PoolKind::kC4IndexerState;
  }
  if (index < 0 || slot < 0) return nullptr;
  const RingLayout& ring = ring_layout(kind);
  uint8_t* base = page_base(pool, index, slot, ring.slot_bytes);
  return reinterpret_cast<float*>(base) + (row % ring.rows) * ring.row_floats;
}

std::span<uint8_t> StatePools::region(PoolKind kind) {
  Region& r = region_of(kind);
  return {r.bytes, static_cast<size_t>(r.size)};
}

absl::Status StatePools::Copy(void* dst, const void* src, size_t bytes) {
  if (copy_) return copy_(dst, src, bytes);
  std::memcpy(dst, src, bytes);
  return absl::OkStatus();
}

absl::Status StatePools::ClearRings(const StateSlots& slots) {
  // An empty ring row is kv 0 and score -inf; one slot's pattern is written to every layer's slot.
  auto clear = [&](PoolKind pool, const RingLayout& ring, PageId slot) -> absl::Status {
    if (slot == kNoPage) return absl::OkStatus();
    Region& region = region_of(pool);
    const int64_t half = ring.row_floats / 2;
    std::vector<float> pattern(static_cast<size_t>((ring.slot_bytes + 3) / 4), 0.0f);
    for (int64_t r = 0; r < ring.rows; ++r) {
      std::fill_n(pattern.begin() + r * ring.row_floats + half, half, -std::numeric_limits<float>::infinity());
    }
    for (int64_t layer = 0; layer < region.layers; ++layer) {
      TANDEM_RETURN_IF_ERROR(Copy(page_base(pool, static_cast<int>(layer), slot, ring.slot_bytes), pattern.data(),
                                  static_cast<size_t>(ring.slot_bytes)));
    }
    return absl::OkStatus();
  };
  TANDEM_RETURN_IF_ERROR(clear(PoolKind::kC4State, c4_ring_, slots.c4_state));
  TANDEM_RETURN_IF_ERROR(clear(PoolKind::kC4IndexerState, c4_indexer_ring_, slots.c4_indexer_state));
  return clear(PoolKind::kC128State, c128_ring_, slots.c128_state);
}

absl::StatusOr<StateSlots> StatePools::AcquireSlots() {
  const bool c4 = layout_.num_compressed<4>() > 0, c128 = layout_.num_compressed<128>() > 0;
  StateSlots slots;
  absl::Status status;
  auto take = [&](PageAllocator& allocator, PageId* slot) {
    if (!status.ok()) return;
    auto page = allocator.AllocateOne();
    if (page.ok()) {
      *slot = *page;
    } else {
      status = page.status();
    }
  };
  take(window_pages_, &slots.window);
  if (c4) take(c4_states_, &slots.c4_state);
  if (c4) take(c4_indexer_states_, &slots.c4_indexer_state);
  if (c128) take(c128_states_, &slots.c128_state);
  if (!status.ok()) {
    ReleaseSlots(slots).IgnoreError();  // only what this call took
    return status;
  }
  if (auto cleared = ClearRings(slots); !cleared.ok()) {
    ReleaseSlots(slots).IgnoreError();
    return cleared;
  }
  return slots;
}

absl::Status StatePools::ReleaseSlots(StateSlots& slots) {
  absl::Status status;
  auto drop = [&](PageAllocator& allocator, PageId& slot) {
    if (slot == kNoPage) return;
    status.Update(allocator.Release(slot));
    slot = kNoPage;
  };
  drop(window_pages_, slots.window);
  drop(c4_states_, slots.c4_state);
  drop(c4_indexer_states_, slots.c4_indexer_state);
  drop(c128_states_, slots.c128_state);
  return status;
}

absl::Status StatePools::CopySlots(const StateSlots& from, const StateSlots& to, bool with_c128) {
  auto copy = [&](PoolKind pool, int64_t page_bytes, PageId src, PageId dst) -> absl::Status {
    if (src == dst) return absl::OkStatus();
    if (src == kNoPage || dst == kNoPage) {
      return absl::FailedPreconditionError(absl::StrCat("state pools: ", PoolName(pool), " slot missing on one side of a copy"));
    }
    const Region& region = region_of(pool);
    for (int64_t layer = 0; layer < region.layers; ++layer) {
      TANDEM_RETURN_IF_ERROR(Copy(page_base(pool, static_cast<int>(layer), dst, page_bytes),
                                  page_base(pool, static_cast<int>(layer), src, page_bytes), static_cast<size_t>(page_bytes)));
    }
    return absl::OkStatus();
  };
  TANDEM_RETURN_IF_ERROR(copy(PoolKind::kWindowKv, window_page_.page_bytes, from.window, to.window));
  if (layout_.num_compressed<4>() > 0) {
    TANDEM_RETURN_IF_ERROR(copy(PoolKind::kC4State, c4_ring_.slot_bytes, from.c4_state, to.c4_state));
    TANDEM_RETURN_IF_ERROR(copy(PoolKind::kC4IndexerState, c4_indexer_ring_.slot_bytes, from.c4_indexer_state, to.c4_indexer_state));
  }
  if (with_c128 && layout_.num_compressed<128>() > 0) {
    TANDEM_RETURN_IF_ERROR(copy(PoolKind::kC128State, c128_ring_.slot_bytes, from.c128_state, to.c128_state));
  }
  return absl::OkStatus();
}

absl::StatusOr<BoundarySnapshot> StatePools::Capture(const StateSlots& from, int64_t length, int64_t mtp_length) {
  if (length <= 0 || length % shapes_.page_size != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("state pools: a snapshot needs a page-aligned length, got ", length, " (page size ", shapes_.page_size, ")"));
  }
  if (window_pages_.refcount(from.window) == 0) {
    return absl::FailedPreconditionError("state pools: snapshot source holds no window page");
  }
  BoundarySnapshot snapshot;
  snapshot.length = length;
  snapshot.mtp_length = mtp_length;
  absl::Status status;
  auto take = [&](PageAllocator& allocator, PageId* slot) {
    if (!status.ok()) return;
    auto page = allocator.AllocateOne();
    if (page.ok()) {
      *slot = *page;
    } else {
      status = page.status();
    }
  };
  take(window_pages_, &snapshot.slots.window);
  if (layout_.num_compressed<4>() > 0) {
    take(c4_states_, &snapshot.slots.c4_state);
    take(c4_indexer_states_, &snapshot.slots.c4_indexer_state);
  }
  if (status.ok()) status = CopySlots(from, snapshot.slots, /*with_c128=*/false);
  if (!status.ok()) {
    ReleaseSlots(snapshot.slots).IgnoreError();
    return status;
  }
  return snapshot;
}

absl::Status StatePools::Restore(const BoundarySnapshot& snapshot, const StateSlots& into) {
  if (window_pages_.refcount(snapshot.slots.window) == 0 || window_pages_.refcount(into.window) == 0) {
    return absl::FailedPreconditionError("state pools: restore needs a live snapshot and a live target window");
  }
  return CopySlots(snapshot.slots, into, /*with_c128=*/false);
}

absl::Status StatePools::ReleaseSnapshot(BoundarySnapshot& snapshot) {
  auto status = ReleaseSlots(snapshot.slots);
  snapshot = BoundarySnapshot{};
  return status;
}

std::vector<PoolUsage> StatePools::Usage() const {
  std::vector<PoolUsage> out;
  for (PoolKind kind : kAllPools) {
    const PageAllocator* allocator = nullptr;
    int64_t page_bytes = 0;
    switch (kind) {
      case PoolKind::kWindowKv: allocator = &window_pages_; page_bytes = footprint_.window_page_bytes; break;
      case PoolKind::kC4Kv: allocator = &token_pages_; page_bytes = footprint_.c4_kv_page_bytes; break;
      case PoolKind::kC4Indexer: allocator = &token_pages_; page_bytes = footprint_.c4_indexer_page_bytes; break;
      case PoolKind::kC128Kv: allocator = &token_pages_; page_bytes = footprint_.c128_kv_page_bytes; break;
      case PoolKind::kC4State: allocator = &c4_states_; page_bytes = footprint_.c4_state_slot_bytes; break;
      case PoolKind::kC4IndexerState: allocator = &c4_indexer_states_; page_bytes = footprint_.c4_indexer_state_slot_bytes; break;
      case PoolKind::kC128State: allocator = &c128_states_; page_bytes = footprint_.c128_state_slot_bytes; break;
    }
    const Region& region = regions_[static_cast<size_t>(kind)];
    out.push_back({kind, PoolName(kind), allocator->total(), allocator->used(), allocator->free(), region.layers, page_bytes});
  }
  return out;
}

absl::Status StatePools::CheckAccounting() const {
  TANDEM_RETURN_IF_ERROR(token_pages_.CheckAccounting());
  TANDEM_RETURN_IF_ERROR(window_pages_.CheckAccounting());
  TANDEM_RETURN_IF_ERROR(c4_states_.CheckAccounting());
  TANDEM_RETURN_IF_ERROR(c4_indexer_states_.CheckAccounting());
  return c128_states_.CheckAccounting();
}

}  // namespace tandem::cache
