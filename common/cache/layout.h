// Byte layouts of the DSV4 state pools (dsv4-model.md §3.2): paged FP8 KV blocks, indexer-key pages and
// fp32 compressor rings, plus the model shapes they need, taken as plain values (cache does not see model/).
#pragma once

#include <cstdint>

#include "common/cache/layer_index.h"
#include "common/core/status.h"
#include "common/kernels/kernels.h"

namespace tandem::cache {

// What the pools need to know about the model and the serving setup.
struct CacheShapes {
  int64_t page_size = 256;       // raw tokens per token page (--page-size)
  int64_t sliding_window = 128;  // window entries per layer and request
  int64_t nope_dim = 448;        // KV entry: FP8 part
  int64_t rope_dim = 64;         // KV entry: bf16 part
  int64_t head_dim = 512;        // attention compressor width d
  int64_t index_head_dim = 128;  // indexer compressor width and key dim
  int64_t kv_page_alignment = 0;  // pad each KV page to a multiple of this many bytes (sglang: 576); 0: none

  kernels::KvFormat kv_format() const { return {nope_dim, rope_dim}; }
  // Pages must hold whole compressed chunks of every ratio the stage uses (C4 page = page_size/4 entries,
  // C128 page = page_size/128 entries).
  absl::Status Validate(const StageLayout& layout) const;
};

// A paged block of `entries` FP8 KV entries: first entries × data_bytes (per entry [nope fp8 | rope bf16]),
// then entries × scale_bytes (per entry [nope/64 ue8m0 | pad]), then padding. The CUDA kernels and the
// transfer engine address the same bytes.
struct KvPageLayout {
  int64_t entries = 0;
  int64_t data_bytes = 0;   // 576 for DSV4
  int64_t scale_bytes = 0;  // 8 for DSV4
  int64_t page_bytes = 0;   // entries × (data + scale), rounded up to the alignment

  static KvPageLayout Make(int64_t entries, const kernels::KvFormat& format, int64_t alignment);
  int64_t data_offset(int64_t slot) const { return slot * data_bytes; }
  int64_t scale_offset(int64_t slot) const { return entries * data_bytes + slot * scale_bytes; }
};

// A page of indexer keys: `entries` keys of IndexerKeyBytes(dim) bytes each ([dim e4m3 | fp32 scale]),
// contiguous per key because model::SequenceState hands the forward one pointer per key.
struct IndexerPageLayout {
  int64_t entries = 0;
  int64_t entry_bytes = 0;  // 132 for DSV4
  int64_t page_bytes = 0;

  static IndexerPageLayout Make(int64_t entries, int64_t dim);
  int64_t offset(int64_t slot) const { return slot * entry_bytes; }
};

// One request's compressor ring for one layer: `rows` fp32 rows of [kv (c·d) | score (c·d)], row of raw
// position p at p mod rows. Clear value: kv 0, score -inf.
struct RingLayout {
  int64_t rows = 0;
  int64_t row_floats = 0;
  int64_t slot_bytes = 0;

  // ratio 4: 8 rows of 2·2·d (overlapping halves); ratio 128: 128 rows of 2·d.
  static RingLayout Make(int ratio, int64_t dim);
};

// The compressor-state pools.
enum class StateKind { kC4Attention, kC4Indexer, kC128 };

}  // namespace tandem::cache
