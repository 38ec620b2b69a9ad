// Worker selection policies (round_robin, least_load, cache_aware), one instance per role so the
// prefill and decode sides can differ. Interfaces here, the three implementations in policy.cc.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "common/core/status.h"
#include "services/router/worker.h"

namespace tandem::router {

class Policy {
 public:
  virtual ~Policy() = default;
  virtual const char* name() const = 0;
  // Picks one of `candidates` (non-empty, all usable) for a prompt; returns its index.
  virtual size_t Select(const std::vector<Worker*>& candidates, const std::vector<int32_t>& prompt) = 0;
};

struct CacheAwareOptions {
  size_t block_tokens = 16;          // prefix granularity of the approximate tree
  int64_t balance_threshold = 2;     // prefix affinity only while max - min load stays within this
  double min_match_ratio = 0.25;     // below this share of the prompt, fall back to least load
  size_t max_blocks_per_worker = 1 << 18;
};

// round_robin | least_load | cache_aware
absl::StatusOr<std::unique_ptr<Policy>> MakePolicy(const std::string& name, CacheAwareOptions cache = {});

// The load a policy compares: requests the router has in flight there (always current), then the
// engine's own running + waiting count from the last GetLoads (may lag).
int64_t LoadOf(const Worker& worker);

// Hashes of every block-aligned prefix of `prompt`: entry k stands for prompt[0 .. (k+1)*block).
std::vector<uint64_t> PrefixBlockHashes(const std::vector<int32_t>& prompt, size_t block_tokens);

}  // namespace tandem::router
