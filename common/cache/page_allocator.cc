#include "common/cache/page_allocator.h"

#include <algorithm>

#include "absl/container/flat_hash_map.h"

namespace tandem::cache {

PageAllocator::PageAllocator(std::string name, int64_t num_pages) : name_(std::move(name)) {
  num_pages = std::max<int64_t>(num_pages, 0);
  refcount_.assign(static_cast<size_t>(num_pages), 0);
  free_list_.reserve(static_cast<size_t>(num_pages));
  for (int64_t page = num_pages - 1; page >= 0; --page) free_list_.push_back(static_cast<PageId>(page));
}

absl::Status PageAllocator::Allocate(int64_t count, std::vector<PageId>* out) {
  if (count < 0) return absl::InvalidArgumentError(absl::StrCat(name_, ": cannot allocate ", count, " pages"));
  if (count > free()) {
    return absl::ResourceExhaustedError(
        absl::StrCat(name_, ": need ", count, " pages, ", free(), " of ", total(), " free"));
  }
  for (int64_t i = 0; i < count; ++i) {
    const PageId page = free_list_.back();
    free_list_.pop_back();
    refcount_[static_cast<size_t>(page)] = 1;
    out->push_back(page);
  }
  return absl::OkStatus();
}

absl::StatusOr<PageId> PageAllocator::AllocateOne() {
  std::vector<PageId> one;
  TANDEM_RETURN_IF_ERROR(Allocate(1, &one));
  return one.front();
}

absl::Status PageAllocator::CheckLive(PageId page, int32_t needed) const {
  if (!Owns(page)) {
    return absl::OutOfRangeError(absl::StrCat(name_, ": page ", page, " is not a page of this pool (", total(), " pages)"));
  }
  const int32_t count = refcount_[static_cast<size_t>(page)];
  if (count < needed) {
    return absl::FailedPreconditionError(count == 0 ? absl::StrCat(name_, ": page ", page, " is free (double free?)")
                                                    : absl::StrCat(name_, ": page ", page, " released ", needed,
                                                                   " times but holds ", count, " references"));
  }
  return absl::OkStatus();
}

absl::Status PageAllocator::AddRef(PageId page) {
  TANDEM_RETURN_IF_ERROR(CheckLive(page, 1));
  ++refcount_[static_cast<size_t>(page)];
  return absl::OkStatus();
}

absl::Status PageAllocator::AddRef(std::span<const PageId> pages) {
  for (PageId page : pages) TANDEM_RETURN_IF_ERROR(CheckLive(page, 1));
  for (PageId page : pages) ++refcount_[static_cast<size_t>(page)];
  return absl::OkStatus();
}

absl::Status PageAllocator::Release(PageId page) {
  TANDEM_RETURN_IF_ERROR(CheckLive(page, 1));
  if (--refcount_[static_cast<size_t>(page)] == 0) free_list_.push_back(page);
  return absl::OkStatus();
}

absl::Status PageAllocator::Release(std::span<const PageId> pages) {
  absl::flat_hash_map<PageId, int32_t> drops;
  for (PageId page : pages) TANDEM_RETURN_IF_ERROR(CheckLive(page, ++drops[page]));
  for (PageId page : pages) {
    if (--refcount_[static_cast<size_t>(page)] == 0) free_list_.push_back(page);
  }
  return absl::OkStatus();
}

int32_t PageAllocator::refcount(PageId page) const { return Owns(page) ? refcount_[static_cast<size_t>(page)] : 0; }

absl::Status PageAllocator::CheckAccounting() const {
  std::vector<bool> on_free_list(refcount_.size(), false);
  for (PageId page : free_list_) {
    if (!Owns(page)) return absl::InternalError(absl::StrCat(name_, ": free list holds foreign page ", page));
    if (on_free_list[static_cast<size_t>(page)]) return absl::InternalError(absl::StrCat(name_, ": page ", page, " is twice on the free list"));
    if (refcount_[static_cast<size_t>(page)] != 0) {
      return absl::InternalError(absl::StrCat(name_, ": page ", page, " is on the free list with ", refcount_[static_cast<size_t>(page)], " references"));
    }
    on_free_list[static_cast<size_t>(page)] = true;
  }
  for (size_t page = 0; page < refcount_.size(); ++page) {
    if (refcount_[page] < 0) return absl::InternalError(absl::StrCat(name_, ": page ", page, " has a negative count"));
    if (refcount_[page] == 0 && !on_free_list[page]) return absl::InternalError(absl::StrCat(name_, ": page ", page, " is lost (neither free nor held)"));
  }
  return absl::OkStatus();
}

}  // namespace tandem::cache
