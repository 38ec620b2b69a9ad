// Per-request DSV4 state in device memory with a fixed capacity: the GPU forward's counterpart of
// HostSequenceState (same addressing, device pointers). The engine's paged pools serve the GPU the
// same way once their regions are device allocations; this one is for tests, tools and benchmarks.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "common/core/status.h"
#include "common/model/state.h"

namespace tandem::model::cuda {

class DeviceSequenceState final : public SequenceState {
 public:
  // All layers of `config` (+ MTP when with_mtp), room for positions < capacity; zero-filled.
  static absl::StatusOr<std::unique_ptr<DeviceSequenceState>> Create(const ModelConfig& config, int64_t capacity,
                                                                     bool with_mtp);
  ~DeviceSequenceState() override;
  DeviceSequenceState(const DeviceSequenceState&) = delete;
  DeviceSequenceState& operator=(const DeviceSequenceState&) = delete;

  int64_t length() const override { return length_; }
  int64_t mtp_length() const override { return mtp_length_; }
  void set_length(int64_t length) override { length_ = length; }
  void set_mtp_length(int64_t length) override { mtp_length_ = length; }
  // RESOURCE_EXHAUSTED past the capacity given at creation.
  absl::Status Reserve(int64_t new_length) override;
  KvSlot window_kv(int layer, int64_t pos) override;
  KvSlot compressed_kv(int layer, int64_t index) override;
  uint8_t* indexer_key(int layer, int64_t index) override;
  float* compressor_row(int layer, CompressorKind kind, int64_t pos) override;
  void CompressedKvRuns(int layer, int64_t n, std::vector<EntryRun>* runs) override;
  void IndexerKeyRuns(int layer, int64_t n, std::vector<EntryRun>* runs) override;

  size_t bytes() const { return bytes_; }

 private:
  struct Layer {
    int ratio = 0;
    size_t window = 0, compressed = 0, indexer = 0, rows = 0, indexer_rows = 0;  // byte offsets
  };
  DeviceSequenceState(const ModelConfig& config, int64_t capacity) : config_(config), capacity_(capacity) {}
  Layer& layer(int id);

  const ModelConfig& config_;
  kernels::KvFormat format_;
  int64_t capacity_;
  std::vector<Layer> layers_;  // main layers, then MTP
  uint8_t* base_ = nullptr;
  size_t bytes_ = 0;
  int64_t length_ = 0;
  int64_t mtp_length_ = 0;
};

}  // namespace tandem::model::cuda
