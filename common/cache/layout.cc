#include "common/cache/layout.h"

#include <cmath>

#include "common/cache/sizing.h"

namespace tandem::cache {

absl::Status CacheShapes::Validate(const StageLayout& layout) const {
  if (page_size <= 0 || sliding_window <= 0 || head_dim <= 0 || index_head_dim <= 0 || nope_dim <= 0 || rope_dim <= 0) {
    return absl::InvalidArgumentError("cache shapes: page size, window and dims must be positive");
  }
  if (nope_dim + rope_dim != head_dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("cache shapes: nope_dim ", nope_dim, " + rope_dim ", rope_dim, " != head_dim ", head_dim));
  }
  if (kv_page_alignment < 0) return absl::InvalidArgumentError("cache shapes: negative KV page alignment");
  if (layout.num_compressed<4>() > 0 && page_size % 4 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("cache shapes: page size ", page_size, " must be a multiple of 4 for C4 layers"));
  }
  if (layout.num_compressed<128>() > 0 && page_size % 128 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cache shapes: page size ", page_size, " must be a multiple of 128 for C128 layers"));
  }
  return absl::OkStatus();
}

KvPageLayout KvPageLayout::Make(int64_t entries, const kernels::KvFormat& format, int64_t alignment) {
  KvPageLayout page;
  page.entries = entries;
  page.data_bytes = format.data_bytes();
  page.scale_bytes = format.scale_bytes();
  page.page_bytes = entries * (page.data_bytes + page.scale_bytes);
  if (alignment > 0) page.page_bytes = (page.page_bytes + alignment - 1) / alignment * alignment;
  return page;
}

IndexerPageLayout IndexerPageLayout::Make(int64_t entries, int64_t dim) {
  IndexerPageLayout page;
  page.entries = entries;
  page.entry_bytes = kernels::IndexerKeyBytes(dim);
  page.page_bytes = entries * page.entry_bytes;
  return page;
}

RingLayout RingLayout::Make(int ratio, int64_t dim) {
  RingLayout ring;
  const int64_t width = ratio == 4 ? 2 : 1;  // C4 keeps two overlapping halves
  ring.rows = ratio == 4 ? 8 : ratio;
  ring.row_floats = 2 * width * dim;
  ring.slot_bytes = ring.rows * ring.row_floats * static_cast<int64_t>(sizeof(float));
  return ring;
}

CacheFootprint ComputeFootprint(const CacheShapes& shapes, const StageLayout& layout) {
  const auto format = shapes.kv_format();
  const int64_t c4 = layout.num_compressed<4>(), c128 = layout.num_compressed<128>();
  CacheFootprint f;
  f.page_size = shapes.page_size;
  f.sliding_window = shapes.sliding_window;
  f.c4_kv_page_bytes = c4 * KvPageLayout::Make(shapes.page_size / 4, format, shapes.kv_page_alignment).page_bytes;
  f.c4_indexer_page_bytes = c4 * IndexerPageLayout::Make(shapes.page_size / 4, shapes.index_head_dim).page_bytes;
  f.c128_kv_page_bytes = c128 * KvPageLayout::Make(shapes.page_size / 128, format, shapes.kv_page_alignment).page_bytes;
  f.window_page_bytes =
      layout.num_stage_layers() * KvPageLayout::Make(shapes.sliding_window, format, shapes.kv_page_alignment).page_bytes;
  f.c4_state_slot_bytes = c4 * RingLayout::Make(4, shapes.head_dim).slot_bytes;
  f.c4_indexer_state_slot_bytes = c4 * RingLayout::Make(4, shapes.index_head_dim).slot_bytes;
  f.c128_state_slot_bytes = c128 * RingLayout::Make(128, shapes.head_dim).slot_bytes;
  return f;
}

int64_t PoolBytes(const CacheFootprint& f, const PoolCounts& counts) {
  return counts.token_pages * f.token_page_bytes() +
         counts.window_pages * f.window_page_bytes +
         counts.c4_state_slots * (f.c4_state_slot_bytes + f.c4_indexer_state_slot_bytes) +
         counts.c128_state_slots * f.c128_state_slot_bytes;
}

absl::StatusOr<PoolPlan> PlanPools(const CacheShapes& shapes, const StageLayout& layout, const SizingOptions& options) {
  TANDEM_RETURN_IF_ERROR(shapes.Validate(layout));
  PoolPlan plan;
  plan.footprint = ComputeFootprint(shapes, layout);
  const CacheFootprint& f = plan.footprint;
  if (options.budget_bytes > 0) {
    plan.budget_bytes = options.budget_bytes;
  } else {
    if (options.mem_fraction_static <= 0 || options.mem_fraction_static > 1 || options.memory_total_bytes <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("pool sizing: give a byte budget, or mem_fraction_static in (0, 1] (got ",
                                                     options.mem_fraction_static, ") and a memory total (got ",
                                                     options.memory_total_bytes, ")"));
    }
    plan.budget_bytes = static_cast<int64_t>(std::floor(options.mem_fraction_static * static_cast<double>(options.memory_total_bytes))) -
                        options.static_bytes;
    if (plan.budget_bytes <= 0) {
      return absl::ResourceExhaustedError(absl::StrCat("pool sizing: mem_fraction_static ", options.mem_fraction_static, " of ",
                                                       options.memory_total_bytes, " B leaves nothing after ",
                                                       options.static_bytes, " B of weights and activations"));
    }
  }
  if (options.max_running_requests <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("pool sizing: max_running_requests must be positive, got ", options.max_running_requests));
  }
  if (options.swa_full_tokens_ratio <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("pool sizing: swa_full_tokens_ratio must be positive, got ", options.swa_full_tokens_ratio));
  }
  const int64_t requests = options.max_running_requests;
  const int64_t c4_slot = f.c4_state_slot_bytes + f.c4_indexer_state_slot_bytes;
  const int64_t per_request = f.bytes_per_request();
  // At least one token page and a full window + rings for every running request.
  const int64_t floor_bytes = requests * per_request + f.token_page_bytes();
  if (plan.budget_bytes < floor_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "pool sizing: budget ", plan.budget_bytes, " B is short of the ", floor_bytes, " B that ", requests,
        " running requests need (", per_request, " B each for window and compressor state, plus one token page of ",
        f.token_page_bytes(), " B); lower --max-running-requests or raise the memory fraction"));
  }
  // Each token page brings ratio · page_size / window window pages (with their C4 rings) along with it.
  const double windows_per_page = options.swa_full_tokens_ratio * static_cast<double>(f.page_size) / static_cast<double>(f.sliding_window);
  const double per_page = static_cast<double>(f.token_page_bytes()) + windows_per_page * static_cast<double>(f.window_page_bytes + c4_slot);
  const double spare = static_cast<double>(plan.budget_bytes - requests * f.c128_state_slot_bytes);
  PoolCounts counts;
  counts.c128_state_slots = f.c128_state_slot_bytes > 0 ? requests : 0;
  counts.token_pages = static_cast<int64_t>(std::floor(spare / per_page));
  counts.window_pages = static_cast<int64_t>(std::floor(windows_per_page * static_cast<double>(counts.token_pages)));
  if (counts.window_pages < requests) {
    // Too few windows for the running requests at this ratio: give them theirs, the rest goes to tokens.
    counts.window_pages = requests;
    const int64_t rest = plan.budget_bytes - requests * per_request;
    counts.token_pages = f.token_page_bytes() > 0
                             ? rest / f.token_page_bytes()
                             : static_cast<int64_t>(std::floor(static_cast<double>(requests) / windows_per_page));
  }
  counts.token_pages = std::max<int64_t>(counts.token_pages, 1);
  counts.c4_state_slots = c4_slot > 0 ? counts.window_pages : 0;
  plan.counts = counts;
  plan.total_bytes = PoolBytes(f, counts);
  return plan;
}

std::string PoolPlan::Summary() const {
  const auto mib = [](int64_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024.0); };
  return absl::StrCat("cache pools: ", counts.token_pages, " token pages (", max_tokens(), " tokens, ", footprint.bytes_per_token(),
                      " B/token), ", counts.window_pages, " window pages, ", counts.c4_state_slots, " C4 state slots, ",
                      counts.c128_state_slots, " C128 state slots; ", footprint.bytes_per_request(), " B fixed per request; ",
                      mib(total_bytes), " MiB of a ", mib(budget_bytes), " MiB budget");
}

}  // namespace tandem::cache
