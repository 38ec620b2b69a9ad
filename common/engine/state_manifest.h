// The byte ranges that carry one request's DSV4 state at a prompt length, in a canonical order both
// sides of a prefill -> decode hand-over compute independently from their own page tables: token pages
// (C4 KV, C4 indexer keys, C128 KV; pool, then layer, then page), then the window page and the
// compressor rings of every layer. Segment i of the prefill side lands in segment i of the decode side.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "common/cache/pools.h"
#include "common/core/status.h"
#include "common/engine/paged_state.h"

namespace tandem::engine {

struct StateSegment {
  cache::PoolKind pool = cache::PoolKind::kWindowKv;
  int64_t offset = 0;  // into StatePools::region(pool)
  int64_t length = 0;
};

class StateManifest {
 public:
  // The state of `state` for positions [0, length): the token pages covering them and the request's
  // window page and rings. FAILED_PRECONDITION when the state holds fewer pages or no slots.
  static absl::StatusOr<StateManifest> Build(const cache::StatePools& pools, const PagedSequenceState& state, int64_t length);

  std::span<const StateSegment> segments() const { return segments_; }
  int64_t token_pages() const { return token_pages_; }
  // Indices of the segments of token pages [begin, end) (final once the prompt passed page `end`).
  std::vector<size_t> TokenPageSegments(int64_t begin, int64_t end) const;
  // Indices of everything else: the window, the rings (final only at the end of the prompt).
  std::vector<size_t> TailSegments() const;
  int64_t total_bytes() const;
  // 64-bit checksum of the bytes of every segment, in order.
  // Reads device pools through their copy; an error only when that copy fails.
  absl::StatusOr<uint64_t> Checksum(cache::StatePools& pools) const;

 private:
  std::vector<StateSegment> segments_;
  std::vector<size_t> pool_base_;  // per token pool: index of its first segment
  std::vector<int64_t> pool_layers_;
  int64_t token_pages_ = 0;
  size_t tail_begin_ = 0;
};

// Copies `from`'s bytes into `to` segment by segment (the in-process transfer, for tests and mixed use).
absl::Status CopyState(cache::StatePools& from_pools, const StateManifest& from, cache::StatePools& to_pools,
                       const StateManifest& to);

}  // namespace tandem::engine
