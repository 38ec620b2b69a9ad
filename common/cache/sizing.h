// Pool sizing: bytes per token and per request of a stage (dsv4-model.md §3.5), and pool counts from a
// byte budget or --mem-fraction-static, with --swa-full-tokens-ratio and --max-running-requests.
#pragma once

#include <cstdint>
#include <string>

#include "common/cache/layer_index.h"
#include "common/cache/layout.h"
#include "common/core/status.h"

namespace tandem::cache {

// Bytes of one page or slot of each pool, over all of the stage's layers of that kind.
struct CacheFootprint {
  int64_t page_size = 0;
  int64_t sliding_window = 0;
  int64_t c4_kv_page_bytes = 0;       // per token page
  int64_t c4_indexer_page_bytes = 0;  // per token page
  int64_t c128_kv_page_bytes = 0;     // per token page
  int64_t window_page_bytes = 0;      // one request's window, every layer (MTP included when held)
  int64_t c4_state_slot_bytes = 0;
  int64_t c4_indexer_state_slot_bytes = 0;
  int64_t c128_state_slot_bytes = 0;

  int64_t token_page_bytes() const { return c4_kv_page_bytes + c4_indexer_page_bytes + c128_kv_page_bytes; }
  // Bytes that grow with the sequence: compressed KV, indexer keys (Flash: 3850.25, 3899.25 with sglang padding).
  double bytes_per_token() const { return static_cast<double>(token_page_bytes()) / static_cast<double>(page_size); }
  // Fixed per running request: window + every compressor ring (Flash, fp32 state: 15420416 B).
  int64_t bytes_per_request() const {
    return window_page_bytes + c4_state_slot_bytes + c4_indexer_state_slot_bytes + c128_state_slot_bytes;
  }
  // A prefix-cache boundary snapshot: window + C4 rings (the C128 ring is empty at a page boundary).
  int64_t snapshot_bytes() const { return window_page_bytes + c4_state_slot_bytes + c4_indexer_state_slot_bytes; }
};
CacheFootprint ComputeFootprint(const CacheShapes& shapes, const StageLayout& layout);

// How many pages and slots each pool holds.
struct PoolCounts {
  int64_t token_pages = 0;     // C4 KV, C4 indexer and C128 KV pages (lock-step, one id)
  int64_t window_pages = 0;    // running requests' windows and prefix-cache snapshots
  int64_t c4_state_slots = 0;  // C4 attention and C4 indexer rings (one per window page)
  int64_t c128_state_slots = 0;  // one per running request
};

struct SizingOptions {
  int64_t budget_bytes = 0;  // explicit budget for every pool; when 0, the next three apply
  double mem_fraction_static = 0;
  int64_t memory_total_bytes = 0;
  int64_t static_bytes = 0;  // already taken inside the fraction (weights, activations)
  // Window-resident tokens relative to cacheable tokens, as sglang's --swa-full-tokens-ratio; window pages hold
  // sliding_window tokens each and serve running requests and prefix-cache snapshots.
  double swa_full_tokens_ratio = 0.8;
  int64_t max_running_requests = 64;
};

struct PoolPlan {
  PoolCounts counts;
  CacheFootprint footprint;
  int64_t budget_bytes = 0;
  int64_t total_bytes = 0;  // what the counts cost (<= budget)
  int64_t max_tokens() const { return counts.token_pages * footprint.page_size; }
  std::string Summary() const;
};

// Bytes of the given counts.
int64_t PoolBytes(const CacheFootprint& footprint, const PoolCounts& counts);
// Fits the pools into the budget: every running request gets its window and rings, the rest is split between
// token pages and window pages by swa_full_tokens_ratio. Errors say which budget is short and by how much.
absl::StatusOr<PoolPlan> PlanPools(const CacheShapes& shapes, const StageLayout& layout, const SizingOptions& options);

}  // namespace tandem::cache
