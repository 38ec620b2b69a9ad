// Random-weight DSV4 checkpoints in the real release format (config.json, sharded safetensors with
// FP8 block scales and MXFP4 experts, index.json): the fixtures for tests, benchmarks and `make run`.
#pragma once

#include <cstdint>
#include <string>

#include "common/core/status.h"
#include "common/model/config.h"

namespace tandem::model {

// "tiny" (reference/dsv4-model.md §6.1 with the real vocabulary), "small" (§6.2), "flash-layer"
// (one layer with exact V4-Flash shapes).
absl::StatusOr<ModelConfig> PresetConfig(const std::string& preset);

struct GenerateOptions {
  uint64_t seed = 1;
  uint64_t shard_bytes = 48ull << 20;
  std::string tokenizer_dir;  // copies tokenizer.json + tokenizer_config.json from here when set
  bool quiet = false;
};

absl::Status GenerateCheckpoint(const ModelConfig& config, const std::string& out_dir, const GenerateOptions& options);

}  // namespace tandem::model
