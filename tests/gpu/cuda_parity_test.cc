// CUDA kernels against the CPU kernels: the same bytes for the KV cache format, the same norms.
#include <cmath>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "common/kernels/cuda/cuda_ops.h"
#include "common/kernels/kernels.h"

namespace tandem::kernels {
namespace {

class CudaParity : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (!cuda::DeviceAvailable(&why)) GTEST_FAIL() << "no usable CUDA device: " << why;
  }
};

std::vector<float> Random(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 2.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

TEST_F(CudaParity, KvEntriesAreByteIdentical) {
  const KvFormat format;
  const int64_t count = 4096;
  auto x = Random(static_cast<size_t>(count * format.dim()), 1);
  for (int64_t i = 0; i < count; i += 7) x[i * format.dim() + 5] *= 1000.0f;  // spread the tile scales
  for (int64_t i = 0; i < count; i += 11) std::fill_n(x.begin() + i * format.dim(), 64, 0.0f);  // 1e-4 floor
  std::vector<uint8_t> gpu(static_cast<size_t>(count * format.entry_bytes()));
  std::vector<uint8_t> cpu(gpu.size());
  ASSERT_TRUE(cuda::QuantizeKvEntries(format, x.data(), count, gpu.data()));
  for (int64_t i = 0; i < count; ++i) {
    uint8_t* e = cpu.data() + i * format.entry_bytes();
    QuantizeKvEntry(format, x.data() + i * format.dim(), e, e + format.data_bytes());
  }
  int64_t mismatches = 0;
  for (size_t i = 0; i < cpu.size(); ++i) mismatches += cpu[i] != gpu[i];
  EXPECT_EQ(mismatches, 0) << "of " << cpu.size() << " bytes";
}

TEST_F(CudaParity, RmsNormMatchesCpu) {
  const int64_t rows = 257, dim = 4096;
  const auto x = Random(static_cast<size_t>(rows * dim), 2), w = Random(static_cast<size_t>(dim), 3);
  std::vector<float> gpu(x.size()), cpu(x.size());
  ASSERT_TRUE(cuda::RmsNorm(x.data(), rows, dim, w.data(), 1e-6f, gpu.data()));
  RmsNorm(x.data(), rows, dim, w.data(), 1e-6f, cpu.data());
  for (size_t i = 0; i < cpu.size(); ++i) ASSERT_NEAR(gpu[i], cpu[i], 1e-5f * (1.0f + std::fabs(cpu[i]))) << i;
}

}  // namespace
}  // namespace tandem::kernels
