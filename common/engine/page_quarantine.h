// The pages of decode requests that failed while prefill may still have been writing them (a copy it started
// before the room ended can land after it), held out of the pool until the transfer link says none can.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "common/engine/disaggregation.h"
#include "common/engine/paged_state.h"

namespace tandem::engine {

// Not thread-safe: the scheduler's thread. Admission never waits on it; it only sees fewer free pages until
// the held ones come back (a request that fits the empty engine waits in the queue meanwhile).
class PageQuarantine {
 public:
  PageQuarantine() = default;
  ~PageQuarantine() { Clear(); }
  PageQuarantine(const PageQuarantine&) = delete;
  PageQuarantine& operator=(const PageQuarantine&) = delete;

  // Keeps `state` (its pages and slots) until `room` is reusable.
  void Hold(uint64_t room, std::unique_ptr<PagedSequenceState> state);
  // Gives back the states of the rooms `link` now calls reusable; returns the token pages freed.
  int64_t ReleaseReusable(DecodeLink& link);
  // Gives back everything (shutdown: no request will take the pages again).
  void Clear();

  bool empty() const { return held_.empty(); }
  int64_t requests() const { return static_cast<int64_t>(held_.size()); }
  // Token pages held; each request's window page and state slots are held with them.
  int64_t pages() const { return pages_; }

 private:
  struct Held {
    uint64_t room = 0;
    std::unique_ptr<PagedSequenceState> state;
  };
  std::vector<Held> held_;
  int64_t pages_ = 0;
};

}  // namespace tandem::engine
