#include "common/engine/staging.h"

#include <cstring>
#include <deque>
#include <mutex>

namespace tandem::engine {
namespace {

class DeferredHostCopier final : public StagingCopier {
 public:
  absl::Status Enqueue(void* dst, const void* src, size_t bytes) override {
    std::lock_guard lock(mutex_);
    pending_.push_back({dst, src, bytes});
    ++queued_;
    return absl::OkStatus();
  }
  absl::StatusOr<StagingFence> Fence() override {
    std::lock_guard lock(mutex_);
    return StagingFence([this, mark = queued_] { return RunUntil(mark); });
  }

 private:
  struct Copy {
    void* dst;
    const void* src;
    size_t bytes;
  };
  absl::Status RunUntil(uint64_t mark) {
    std::lock_guard lock(mutex_);
    while (done_ < mark) {
      const Copy& c = pending_.front();
      std::memcpy(c.dst, c.src, c.bytes);
      pending_.pop_front();
      ++done_;
    }
    return absl::OkStatus();
  }

  std::mutex mutex_;
  std::deque<Copy> pending_;
  uint64_t queued_ = 0, done_ = 0;
};

}  // namespace

std::unique_ptr<StagingCopier> MakeDeferredHostCopier() { return std::make_unique<DeferredHostCopier>(); }

}  // namespace tandem::engine
