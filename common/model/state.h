// Per-request DSV4 state as the forward sees it: window KV, compressed KV, indexer keys and compressor
// rows, addressed by global layer id and absolute position. The cache library backs this interface
// with pages; HostSequenceState is the simple per-request implementation.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "common/core/status.h"
#include "common/kernels/kernels.h"
#include "common/model/config.h"

namespace tandem::model {

struct KvSlot {
  uint8_t* data = nullptr;    // KvFormat::data_bytes()
  uint8_t* scales = nullptr;  // KvFormat::scale_bytes()
};

enum class CompressorKind { kAttention, kIndexer };

// Consecutive cache entries, for address tables built per run instead of per entry: entry `first + i`
// (i < count) is at data + i * data_stride, its scales at scales + i * scale_stride (scales null for
// indexer keys). For the window ring, `first` is the ring slot of position 0 and slots wrap at `count`.
struct EntryRun {
  int64_t first = 0;
  int64_t count = 0;
  uint8_t* data = nullptr;
  int64_t data_stride = 0;
  uint8_t* scales = nullptr;
  int64_t scale_stride = 0;
};

class SequenceState {
 public:
  virtual ~SequenceState() = default;

  // Tokens already folded into the state of the main layers / of the MTP layer.
  virtual int64_t length() const = 0;
  virtual int64_t mtp_length() const = 0;
  virtual void set_length(int64_t length) = 0;
  virtual void set_mtp_length(int64_t length) = 0;

  // Makes room for positions < new_length (compressed entries, rings). May fail when memory is short.
  virtual absl::Status Reserve(int64_t new_length) = 0;

  // Window KV of `layer` (global id; num_hidden_layers is the MTP layer) at absolute position `pos`.
  // Valid for the last sliding_window positions written.
  virtual KvSlot window_kv(int layer, int64_t pos) = 0;
  // Compressed KV entry `index` of a ratio-4/128 layer.
  virtual KvSlot compressed_kv(int layer, int64_t index) = 0;
  // Indexer key `index` of a ratio-4 layer (IndexerKeyBytes(index_head_dim) bytes).
  virtual uint8_t* indexer_key(int layer, int64_t index) = 0;
  // Compressor row for raw position `pos`: fp32 [kv (c*d) | score (c*d)]; a ring of 2*ratio rows for
  // ratio 4 and ratio rows for ratio 128.
  virtual float* compressor_row(int layer, CompressorKind kind, int64_t pos) = 0;

  // The same addresses as runs (a paged state gives one per page; a contiguous one a single run).
  // Compressed KV entries [0, n) of a ratio-4/128 layer, appended to `runs` in index order.
  virtual void CompressedKvRuns(int layer, int64_t n, std::vector<EntryRun>* runs);
  // Indexer keys [0, n) of a ratio-4 layer.
  virtual void IndexerKeyRuns(int layer, int64_t n, std::vector<EntryRun>* runs);
  // The window ring of `layer`: slots 0..sliding_window-1, position p at slot p % sliding_window.
  virtual EntryRun WindowRing(int layer, int64_t sliding_window);
};

// Plain heap-backed state for one request over layers [begin_layer, end_layer) (+ the MTP layer).
class HostSequenceState final : public SequenceState {
 public:
  HostSequenceState(const ModelConfig& config, int begin_layer, int end_layer, bool with_mtp);

  int64_t length() const override { return length_; }
  int64_t mtp_length() const override { return mtp_length_; }
  void set_length(int64_t length) override { length_ = length; }
  void set_mtp_length(int64_t length) override { mtp_length_ = length; }
  absl::Status Reserve(int64_t new_length) override;
  KvSlot window_kv(int layer, int64_t pos) override;
  KvSlot compressed_kv(int layer, int64_t index) override;
  uint8_t* indexer_key(int layer, int64_t index) override;
  float* compressor_row(int layer, CompressorKind kind, int64_t pos) override;
  void CompressedKvRuns(int layer, int64_t n, std::vector<EntryRun>* runs) override;
  void IndexerKeyRuns(int layer, int64_t n, std::vector<EntryRun>* runs) override;

  // Bytes held (for tests and logs).
  size_t bytes() const;

 private:
  struct Layer {
    int ratio = 0;
    std::vector<uint8_t> window;       // sliding_window entries
    std::vector<uint8_t> compressed;   // grows with the sequence
    std::vector<uint8_t> indexer;      // grows with the sequence
    std::vector<float> rows;           // compressor ring
    std::vector<float> indexer_rows;   // indexer compressor ring
  };
  Layer& layer(int id);

  const ModelConfig& config_;
  kernels::KvFormat format_;
  int begin_layer_;
  std::vector<Layer> layers_;  // begin..end, then MTP
  int64_t length_ = 0;
  int64_t mtp_length_ = 0;
  int64_t reserved_ = 0;
};

// Compressor geometry shared by the forward, the state and the cache pools.
inline int64_t CompressorWidth(int ratio) { return ratio == 4 ? 2 : 1; }  // c
inline int64_t CompressorRing(int ratio) { return ratio == 4 ? 8 : ratio; }

}  // namespace tandem::model
