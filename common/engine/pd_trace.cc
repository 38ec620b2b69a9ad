#include "common/engine/pd_trace.h"

#include <chrono>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include <spdlog/spdlog.h>

namespace tandem::engine::pd_trace {
namespace {

using Clock = std::chrono::steady_clock;

constexpr const char* kPrefillChain[] = {"generate",  "prompt_done",   "checksummed", "shipped",
                                         "puts_done", "complete_sent", "acked"};
constexpr const char* kDecodeChain[] = {"generate", "registered", "completion_arrived", "polled",
                                        "verified", "staged",     "checked",            "first_token"};
constexpr size_t kMaxOpen = 4096;  // a room whose Finish never came is dropped past this

struct Timeline {
  EngineRole role = EngineRole::kMixed;
  std::vector<std::pair<const char*, Clock::time_point>> events;  // first mark's order
};

struct Registry {
  std::mutex mutex;
  std::unordered_map<uint64_t, Timeline> open;
  std::deque<uint64_t> order;
  Observer observer;
};

Registry& registry() {
  static Registry* r = new Registry();  // never destroyed: marks may come from threads that outlive main's statics
  return *r;
}

const Clock::time_point* Find(const Timeline& t, const char* event) {
  for (const auto& [name, when] : t.events) {
    if (std::strcmp(name, event) == 0) return &when;
  }
  return nullptr;
}

}  // namespace

void Begin(uint64_t room, EngineRole role) {
  Registry& r = registry();
  const auto now = Clock::now();
  std::lock_guard lock(r.mutex);
  auto [it, inserted] = r.open.try_emplace(room);
  it->second.role = role;
  it->second.events.assign({{"generate", now}});
  if (inserted) r.order.push_back(room);
  while (r.open.size() > kMaxOpen && !r.order.empty()) {
    r.open.erase(r.order.front());
    r.order.pop_front();
  }
}

void Mark(uint64_t room, const char* event) {
  Registry& r = registry();
  const auto now = Clock::now();
  std::lock_guard lock(r.mutex);
  auto it = r.open.find(room);
  if (it == r.open.end()) return;
  for (auto& [name, when] : it->second.events) {
    if (std::strcmp(name, event) == 0) {
      when = now;
      return;
    }
  }
  it->second.events.emplace_back(event, now);
}

void Finish(uint64_t room) {
  Registry& r = registry();
  Timeline t;
  Observer observer;
  {
    std::lock_guard lock(r.mutex);
    auto it = r.open.find(room);
    if (it == r.open.end()) return;
    t = std::move(it->second);
    r.open.erase(it);
    std::erase(r.order, room);
    observer = r.observer;
  }
  const auto t0 = t.events.front().second;
  if (spdlog::should_log(spdlog::level::debug)) {
    std::string line = absl::StrCat("pd-trace ", EngineRoleName(t.role), " room=", room, " t0_ns=",
                                     std::chrono::duration_cast<std::chrono::nanoseconds>(t0.time_since_epoch()).count());
    for (const auto& [name, when] : t.events) {
      absl::StrAppend(&line, " ", name, "=", std::chrono::duration_cast<std::chrono::microseconds>(when - t0).count());
    }
    spdlog::debug("{}", line);
  }
  if (!observer) return;
  const std::span<const char* const> chain =
      t.role == EngineRole::kPrefill ? std::span<const char* const>(kPrefillChain) : std::span<const char* const>(kDecodeChain);
  std::vector<Stage> stages;
  const Clock::time_point* previous = nullptr;
  for (const char* event : chain) {
    const Clock::time_point* when = Find(t, event);
    if (when == nullptr) continue;  // e.g. "staged" without staging: the next stage spans it
    if (previous != nullptr) stages.push_back({event, std::chrono::duration<double>(*when - *previous).count()});
    previous = when;
  }
  observer(t.role, stages);
}

void SetObserver(Observer observer) {
  Registry& r = registry();
  std::lock_guard lock(r.mutex);
  r.observer = std::move(observer);
}

}  // namespace tandem::engine::pd_trace
