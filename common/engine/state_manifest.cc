#include "common/engine/state_manifest.h"

#include <cstring>
#include <vector>

namespace tandem::engine {
namespace {

constexpr cache::PoolKind kTokenPools[] = {cache::PoolKind::kC4Kv, cache::PoolKind::kC4Indexer, cache::PoolKind::kC128Kv};

// A checksum of our own: 64-bit lanes mixed with a multiply-rotate, the tail byte by byte.
uint64_t Mix(uint64_t h, uint64_t v) {
  h ^= v * 0x9e3779b97f4a7c15ull;
  h = (h << 27) | (h >> 37);
  return h * 0xbf58476d1ce4e5b9ull + 0x94d049bb133111ebull;
}

}  // namespace

absl::StatusOr<StateManifest> StateManifest::Build(const cache::StatePools& pools, const PagedSequenceState& state,
                                                   int64_t length) {
  const int64_t page = pools.page_size();
  const int64_t pages = (length + page - 1) / page;
  if (static_cast<int64_t>(state.page_table().size()) < pages) {
    return absl::FailedPreconditionError(absl::StrCat("state manifest: ", length, " tokens need ", pages,
                                                      " token pages, the request holds ", state.page_table().size()));
  }
  const cache::StateSlots& slots = state.slots();
  if (slots.window == cache::kNoPage) return absl::FailedPreconditionError("state manifest: the request holds no window page");
  StateManifest m;
  m.token_pages_ = pages;
  for (cache::PoolKind pool : kTokenPools) {
    m.pool_base_.push_back(m.segments_.size());
    m.pool_layers_.push_back(pools.layers(pool));
    for (int64_t layer = 0; layer < pools.layers(pool); ++layer) {
      for (int64_t k = 0; k < pages; ++k) {
        m.segments_.push_back({pool, pools.page_offset(pool, layer, state.page_table()[static_cast<size_t>(k)]),
                               pools.layer_page_bytes(pool)});
      }
    }
  }
  m.tail_begin_ = m.segments_.size();
  const std::pair<cache::PoolKind, cache::PageId> tail[] = {{cache::PoolKind::kWindowKv, slots.window},
                                                            {cache::PoolKind::kC4State, slots.c4_state},
                                                            {cache::PoolKind::kC4IndexerState, slots.c4_indexer_state},
                                                            {cache::PoolKind::kC128State, slots.c128_state}};
  for (auto [pool, slot] : tail) {
    if (pools.layers(pool) == 0) continue;
    if (slot == cache::kNoPage) {
      return absl::FailedPreconditionError(absl::StrCat("state manifest: the request holds no ", cache::PoolName(pool), " slot"));
    }
    for (int64_t layer = 0; layer < pools.layers(pool); ++layer) {
      m.segments_.push_back({pool, pools.page_offset(pool, layer, slot), pools.layer_page_bytes(pool)});
    }
  }
  return m;
}

std::vector<size_t> StateManifest::TokenPageSegments(int64_t begin, int64_t end) const {
  std::vector<size_t> out;
  end = std::min(end, token_pages_);
  for (size_t p = 0; p < pool_base_.size(); ++p) {
    for (int64_t layer = 0; layer < pool_layers_[p]; ++layer) {
      for (int64_t k = begin; k < end; ++k) {
        out.push_back(pool_base_[p] + static_cast<size_t>(layer * token_pages_ + k));
      }
    }
  }
  return out;
}

std::vector<size_t> StateManifest::TailSegments() const {
  std::vector<size_t> out;
  for (size_t i = tail_begin_; i < segments_.size(); ++i) out.push_back(i);
  return out;
}

int64_t StateManifest::total_bytes() const {
  int64_t total = 0;
  for (const auto& s : segments_) total += s.length;
  return total;
}

absl::StatusOr<uint64_t> StateManifest::Checksum(cache::StatePools& pools) const {
  uint64_t h = 0x243f6a8885a308d3ull;
  std::vector<uint8_t> staged;  // device pools: each segment copied to the host first
  for (const auto& s : segments_) {
    const uint8_t* p = pools.region(s.pool).data() + s.offset;
    if (!pools.host_accessible()) {
      staged.resize(static_cast<size_t>(s.length));
      TANDEM_RETURN_IF_ERROR(pools.Copy(staged.data(), p, staged.size()));
      p = staged.data();
    }
    int64_t i = 0;
    for (; i + 8 <= s.length; i += 8) {
      uint64_t v;
      std::memcpy(&v, p + i, 8);
      h = Mix(h, v);
    }
    for (; i < s.length; ++i) h = Mix(h, p[i]);
    h = Mix(h, static_cast<uint64_t>(s.length));
  }
  return h;
}

absl::Status CopyState(cache::StatePools& from_pools, const StateManifest& from, cache::StatePools& to_pools,
                       const StateManifest& to) {
  if (from.segments().size() != to.segments().size()) {
    return absl::InvalidArgumentError(absl::StrCat("state copy: ", from.segments().size(), " source segments vs ",
                                                   to.segments().size(), " destination segments"));
  }
  for (size_t i = 0; i < from.segments().size(); ++i) {
    const auto& a = from.segments()[i];
    const auto& b = to.segments()[i];
    if (a.pool != b.pool || a.length != b.length) {
      return absl::InvalidArgumentError(absl::StrCat("state copy: segment ", i, " differs (", cache::PoolName(a.pool), " ",
                                                     a.length, " B vs ", cache::PoolName(b.pool), " ", b.length, " B)"));
    }
    uint8_t* dst = to_pools.region(b.pool).data() + b.offset;
    const uint8_t* src = from_pools.region(a.pool).data() + a.offset;
    if (to_pools.host_accessible() && from_pools.host_accessible()) {
      std::memcpy(dst, src, static_cast<size_t>(a.length));
    } else {
      TANDEM_RETURN_IF_ERROR((to_pools.host_accessible() ? from_pools : to_pools).Copy(dst, src, static_cast<size_t>(a.length)));
    }
  }
  return absl::OkStatus();
}

}  // namespace tandem::engine
