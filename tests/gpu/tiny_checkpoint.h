// The tiny checkpoint for the GPU tests: the test build's fixture when present (TANDEM_TEST_MODELS), else
// generated once into the temp directory (seed 1), so the tests run on a GPU machine with nothing but
// the binaries.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <string>

#include "common/model/generator.h"
#include "common/model/weights.h"

namespace tandem::testing {

inline std::string TinyCheckpointDir() {
  if (const char* root = std::getenv("TANDEM_TEST_MODELS")) {
    const std::string dir = std::string(root) + "/tiny";
    if (std::filesystem::exists(dir + "/config.json")) return dir;
  }
  const std::string dir = (std::filesystem::temp_directory_path() / "tandem-gpu-test-tiny").string();
  if (!std::filesystem::exists(dir + "/config.json")) {
    auto config = model::PresetConfig("tiny");
    if (!config.ok()) throw std::runtime_error(config.status().ToString());
    model::GenerateOptions options;
    options.quiet = true;
    const absl::Status status = model::GenerateCheckpoint(*config, dir, options);
    if (!status.ok()) throw std::runtime_error(status.ToString());
  }
  return dir;
}

// The tiny checkpoint loaded whole, with or without its MTP layer; loaded once per process for each.
inline std::shared_ptr<const model::ModelWeights> TinyCheckpointWeights(bool load_mtp = true) {
  auto load = [](bool mtp) {
    model::LoadOptions options;
    options.show_progress = false;
    options.load_mtp = mtp;
    auto loaded = model::LoadModelWeights(TinyCheckpointDir(), options);
    if (!loaded.ok()) throw std::runtime_error(loaded.status().ToString());
    return std::shared_ptr<const model::ModelWeights>(std::move(*loaded));
  };
  if (load_mtp) {
    static const std::shared_ptr<const model::ModelWeights> with_mtp = load(true);
    return with_mtp;
  }
  static const std::shared_ptr<const model::ModelWeights> without_mtp = load(false);
  return without_mtp;
}

}  // namespace tandem::testing
