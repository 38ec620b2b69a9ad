// Room outcomes reported by the transfer agents' RoomDone callbacks, read by the scheduler's polls.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <utility>

#include "absl/status/status.h"
#include "common/transfer/room.h"

namespace tandem::engine {

// An outcome is read by the scheduler's next poll of its room (milliseconds after it arrives) and then
// forgotten. A room the scheduler stopped polling before its agent reported (an abort, an ack sent while the
// room ends on the agent's thread) still gets one late report: such entries are dropped once they are
// older than `keep`, checked every `prune_every` reports, so a long-running engine does not accumulate one
// per aborted room.
class RoomOutcomes {
 public:
  using Clock = std::chrono::steady_clock;
  explicit RoomOutcomes(std::function<void()> wake, std::chrono::seconds keep = std::chrono::minutes(15),
                        std::function<Clock::time_point()> now = Clock::now, int prune_every = 256)
      : wake_(std::move(wake)), keep_(keep), now_(std::move(now)), prune_every_(prune_every) {}

  transfer::RoomDone Callback() {
    return [this](transfer::RoomId room, const absl::Status& status) {
      {
        std::lock_guard lock(mutex_);
        const Clock::time_point now = now_();
        done_[room] = Entry{status, now};
        if (++reports_ % prune_every_ == 0) {
          for (auto it = done_.begin(); it != done_.end();) it = now - it->second.at > keep_ ? done_.erase(it) : std::next(it);
        }
      }
      if (wake_) wake_();
    };
  }
  std::optional<absl::Status> Find(uint64_t room) {
    std::lock_guard lock(mutex_);
    auto it = done_.find(room);
    if (it == done_.end()) return std::nullopt;
    return it->second.status;
  }
  void Forget(uint64_t room) {
    std::lock_guard lock(mutex_);
    done_.erase(room);
  }
  void Wake() {
    if (wake_) wake_();
  }
  size_t size() {
    std::lock_guard lock(mutex_);
    return done_.size();
  }

 private:
  struct Entry {
    absl::Status status;
    Clock::time_point at;
  };
  std::function<void()> wake_;
  const std::chrono::seconds keep_;
  std::function<Clock::time_point()> now_;
  const int prune_every_;
  std::mutex mutex_;
  std::map<uint64_t, Entry> done_;
  uint64_t reports_ = 0;
};

}  // namespace tandem::engine
