#include "services/router/policy.h"

#include <atomic>
#include <limits>

namespace tandem::router {

int64_t LoadOf(const Worker& worker) { return worker.in_flight(); }

namespace {

size_t LeastLoaded(const std::vector<Worker*>& candidates, size_t start) {
  // Ties rotate from `start` so equal workers share the work.
  size_t best = start % candidates.size();
  for (size_t i = 0; i < candidates.size(); ++i) {
    const size_t k = (start + i) % candidates.size();
    const Worker& a = *candidates[k];
    const Worker& b = *candidates[best];
    if (LoadOf(a) < LoadOf(b) || (LoadOf(a) == LoadOf(b) && a.engine_load() < b.engine_load())) best = k;
  }
  return best;
}

class RoundRobin final : public Policy {
 public:
  const char* name() const override { return "round_robin"; }
  size_t Select(const std::vector<Worker*>& candidates, const std::vector<int32_t>&) override {
    return next_.fetch_add(1) % candidates.size();
  }

 private:
  std::atomic<uint64_t> next_{0};
};

class LeastLoad final : public Policy {
 public:
  const char* name() const override { return "least_load"; }
  size_t Select(const std::vector<Worker*>& candidates, const std::vector<int32_t>&) override {
    return LeastLoaded(candidates, next_.fetch_add(1));
  }

 private:
  std::atomic<uint64_t> next_{0};
};

// An approximate prefix tree: per worker, the set of block-prefix hashes it was sent. The longest
// run of leading blocks a worker holds is its match. Affinity yields to balance whenever loads
// diverge by more than the threshold, so a popular prefix cannot pile work on one worker.
class CacheAware final : public Policy {
 public:
  explicit CacheAware(CacheAwareOptions options) : options_(options) {}
  const char* name() const override { return "cache_aware"; }

  size_t Select(const std::vector<Worker*>& candidates, const std::vector<int32_t>& prompt) override {
    const std::vector<uint64_t> hashes = PrefixBlockHashes(prompt, options_.block_tokens);
    std::lock_guard lock(mutex_);
    int64_t lowest = std::numeric_limits<int64_t>::max(), highest = 0;
    for (const Worker* w : candidates) {
      lowest = std::min(lowest, LoadOf(*w));
      highest = std::max(highest, LoadOf(*w));
    }
    size_t chosen = LeastLoaded(candidates, next_++);
    if (highest - lowest <= options_.balance_threshold && !hashes.empty()) {
      size_t best_match = 0;
      for (size_t i = 0; i < candidates.size(); ++i) {
        const auto& held = tree_[candidates[i]->name()];
        size_t match = 0;
        while (match < hashes.size() && held.contains(hashes[match])) ++match;
        // Among equal matches keep the least loaded one (chosen starts there).
        if (match > best_match && LoadOf(*candidates[i]) - lowest < options_.balance_threshold + 1) {
          best_match = match;
          chosen = i;
        }
      }
      if (static_cast<double>(best_match) < options_.min_match_ratio * static_cast<double>(hashes.size())) {
        chosen = LeastLoaded(candidates, next_);
      }
    }
    auto& held = tree_[candidates[chosen]->name()];
    if (held.size() + hashes.size() > options_.max_blocks_per_worker) held.clear();  // crude eviction
    held.insert(hashes.begin(), hashes.end());
    return chosen;
  }

 private:
  CacheAwareOptions options_;
  std::mutex mutex_;
  uint64_t next_ = 0;
  absl::flat_hash_map<std::string, absl::flat_hash_set<uint64_t>> tree_;
};

}  // namespace

std::vector<uint64_t> PrefixBlockHashes(const std::vector<int32_t>& prompt, size_t block_tokens) {
  std::vector<uint64_t> out;
  uint64_t hash = 1469598103934665603ull;  // FNV-1a over the ids, snapshotted at each block end
  for (size_t i = 0; i < prompt.size(); ++i) {
    hash = (hash ^ static_cast<uint32_t>(prompt[i])) * 1099511628211ull;
    if ((i + 1) % block_tokens == 0) out.push_back(hash);
  }
  return out;
}

absl::StatusOr<std::unique_ptr<Policy>> MakePolicy(const std::string& name, CacheAwareOptions cache) {
  if (name == "round_robin") return std::make_unique<RoundRobin>();
  if (name == "least_load") return std::make_unique<LeastLoad>();
  if (name == "cache_aware") return std::make_unique<CacheAware>(cache);
  return absl::InvalidArgumentError(
      absl::StrCat("unknown policy \"", name, "\": expected round_robin, least_load or cache_aware"));
}

}  // namespace tandem::router
