// Reference-counted page allocator: one per pool, every page either on the free list or referenced.
// Misuse (double free, a foreign id) is an error value that changes nothing, never a crash.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "common/core/status.h"

namespace tandem::cache {

// A page of a pool (token pages, window pages, compressor-state slots). Plain int32 so page lists travel
// unchanged to kernels and transfers.
using PageId = int32_t;
inline constexpr PageId kNoPage = -1;

// Not internally synchronised: the scheduler thread owns the pools and everything that allocates from them.
class PageAllocator {
 public:
  PageAllocator(std::string name, int64_t num_pages);

  const std::string& name() const { return name_; }
  int64_t total() const { return static_cast<int64_t>(refcount_.size()); }
  int64_t free() const { return static_cast<int64_t>(free_list_.size()); }
  int64_t used() const { return total() - free(); }

  // Appends `count` fresh pages (reference count 1) to `out`, all or nothing. RESOURCE_EXHAUSTED names
  // the pool and the shortfall.
  absl::Status Allocate(int64_t count, std::vector<PageId>* out);
  absl::StatusOr<PageId> AllocateOne();

  // One more holder of an allocated page (a second request or the prefix cache sharing it).
  absl::Status AddRef(PageId page);
  absl::Status AddRef(std::span<const PageId> pages);
  // Drops one reference; the page returns to the free list at zero. The span form checks every page
  // (duplicates included) before touching any, so a bad list changes nothing.
  absl::Status Release(PageId page);
  absl::Status Release(std::span<const PageId> pages);

  // 0 for a free page or an id outside the pool.
  int32_t refcount(PageId page) const;
  bool Owns(PageId page) const { return page >= 0 && page < total(); }

  // Every page is exactly once either free (count 0, on the free list) or referenced.
  absl::Status CheckAccounting() const;

 private:
  absl::Status CheckLive(PageId page, int32_t needed) const;

  std::string name_;
  std::vector<int32_t> refcount_;
  std::vector<PageId> free_list_;  // a stack; the lowest ids come out first on a fresh pool
};

}  // namespace tandem::cache
