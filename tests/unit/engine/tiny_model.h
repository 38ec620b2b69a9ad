// The tiny model fixture for the engine tests: generated once per ctest run (fixture_tiny_model) under
// $TANDEM_TEST_MODELS, loaded once per test binary.
#pragma once

#include <cstdlib>
#include <memory>
#include <string>

#include <gtest/gtest.h>

#include "common/model/weights.h"

namespace tandem::engine::testing {

inline std::string TinyDir() {
  const char* root = std::getenv("TANDEM_TEST_MODELS");
  return std::string(root ? root : "build/test-models") + "/tiny";
}

// Null (with a test failure) when the fixture is missing or does not load.
inline const std::shared_ptr<const model::ModelWeights>& Tiny() {
  static const auto weights = [] {
    model::LoadOptions options;
    options.show_progress = false;
    auto loaded = model::LoadModelWeights(TinyDir(), options);
    EXPECT_TRUE(loaded.ok()) << loaded.status();
    return loaded.ok() ? std::shared_ptr<const model::ModelWeights>(std::move(*loaded)) : nullptr;
  }();
  return weights;
}

}  // namespace tandem::engine::testing
