#include "common/engine/page_quarantine.h"

#include <spdlog/spdlog.h>

namespace tandem::engine {

void PageQuarantine::Hold(uint64_t room, std::unique_ptr<PagedSequenceState> state) {
  if (!state) return;
  const auto pages = static_cast<int64_t>(state->page_table().size());
  spdlog::debug("room {}: {} token pages held back until no late write from prefill can land in them", room, pages);
  pages_ += pages;
  held_.push_back({room, std::move(state)});
}

int64_t PageQuarantine::ReleaseReusable(DecodeLink& link) {
  int64_t freed = 0;
  for (auto it = held_.begin(); it != held_.end();) {
    if (!link.PagesReusable(it->room)) {
      ++it;
      continue;
    }
    const auto pages = static_cast<int64_t>(it->state->page_table().size());
    it->state->Release();
    freed += pages;
    it = held_.erase(it);
  }
  pages_ -= freed;
  return freed;
}

void PageQuarantine::Clear() {
  for (Held& held : held_) held.state->Release();
  held_.clear();
  pages_ = 0;
}

}  // namespace tandem::engine
