// The engine servers' PD flags: --pd-transfer's three modes parse into ServeOptions (auto by default) and
// anything else is a CLI error naming the allowed values; --pd-late-write-grace takes seconds (10 by default);
// the GPU's precision and graph flags parse into the engine options.
#include <gtest/gtest.h>

#include <filesystem>

#include "common/engine/server/serve.h"

namespace tandem::engine {
namespace {

// Parses `extra` after a valid --model; returns the error text, empty on success.
std::string Parse(std::vector<std::string> extra, ServeOptions& options) {
  CLI::App app("test");
  AddServeFlags(app, options);
  std::vector<std::string> args = {"--model", std::filesystem::temp_directory_path().string()};
  args.insert(args.end(), extra.begin(), extra.end());
  std::reverse(args.begin(), args.end());  // CLI11 takes the vector reversed
  try {
    app.parse(args);
  } catch (const CLI::ParseError& e) {
    return e.what();
  }
  return "";
}

TEST(ServeFlags, PdTransferDefaultsToAutoAndParsesEachMode) {
  ServeOptions defaults;
  EXPECT_EQ(Parse({}, defaults), "");
  EXPECT_EQ(defaults.pd_transfer, transfer::PdTransfer::kAuto);
  for (auto [name, mode] : {std::pair{"auto", transfer::PdTransfer::kAuto}, std::pair{"staged", transfer::PdTransfer::kStaged},
                            std::pair{"ipc", transfer::PdTransfer::kIpc}}) {
    ServeOptions options;
    EXPECT_EQ(Parse({"--pd-transfer", name}, options), "") << name;
    EXPECT_EQ(options.pd_transfer, mode) << name;
  }
}

TEST(ServeFlags, PdTransferRefusesOtherValues) {
  ServeOptions options;
  const std::string error = Parse({"--pd-transfer", "nccl"}, options);
  EXPECT_NE(error.find("nccl"), std::string::npos) << error;
  EXPECT_NE(error.find("ipc"), std::string::npos) << error;
}

TEST(ServeFlags, LateWriteGraceDefaultsAboveThePeerLeaseAndRefusesNegatives) {
  ServeOptions defaults;
  EXPECT_EQ(Parse({}, defaults), "");
  EXPECT_EQ(defaults.late_write_grace_seconds, 10.0);
  EXPECT_GT(defaults.late_write_grace_seconds, defaults.lease_seconds);
  ServeOptions options;
  EXPECT_EQ(Parse({"--pd-late-write-grace", "2.5"}, options), "");
  EXPECT_EQ(options.late_write_grace_seconds, 2.5);
  ServeOptions negative;
  EXPECT_NE(Parse({"--pd-late-write-grace", "-1"}, negative), "");
}

TEST(ServeFlags, CudaAttentionDefaultsToF32AndParsesBf16) {
  ServeOptions defaults;
  EXPECT_EQ(Parse({}, defaults), "");
  EXPECT_FALSE(defaults.engine.cuda_attention_bf16);
  EXPECT_TRUE(defaults.engine.cuda_graphs);
  ServeOptions bf16;
  EXPECT_EQ(Parse({"--cuda-attention", "bf16", "--cuda-graphs", "off"}, bf16), "");
  EXPECT_TRUE(bf16.engine.cuda_attention_bf16);
  EXPECT_FALSE(bf16.engine.cuda_graphs);
  ServeOptions f32;
  EXPECT_EQ(Parse({"--cuda-attention", "f32"}, f32), "");
  EXPECT_FALSE(f32.engine.cuda_attention_bf16);
  ServeOptions bad;
  const std::string error = Parse({"--cuda-attention", "fp8"}, bad);
  EXPECT_NE(error.find("fp8"), std::string::npos) << error;
  EXPECT_FALSE(bad.engine.cuda_attention_bf16);
}

TEST(ServeFlags, CudaGemmTuningDefaultsToOnAndTurnsOff) {
  ServeOptions defaults;
  EXPECT_EQ(Parse({}, defaults), "");
  EXPECT_TRUE(defaults.engine.cuda_gemm_tuning);
  ServeOptions off;
  EXPECT_EQ(Parse({"--cuda-gemm-tuning", "off"}, off), "");
  EXPECT_FALSE(off.engine.cuda_gemm_tuning);
  ServeOptions on;
  EXPECT_EQ(Parse({"--cuda-gemm-tuning", "on"}, on), "");
  EXPECT_TRUE(on.engine.cuda_gemm_tuning);
  ServeOptions bad;
  const std::string error = Parse({"--cuda-gemm-tuning", "fastest"}, bad);
  EXPECT_NE(error.find("fastest"), std::string::npos) << error;
  EXPECT_TRUE(bad.engine.cuda_gemm_tuning);
  EXPECT_TRUE(ParseCudaGemmTuning("off").ok());
  EXPECT_EQ(ParseCudaGemmTuning("yes").status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tandem::engine
