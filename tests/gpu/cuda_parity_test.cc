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
  // Mismatches by region of the entry, and the first few, so a failure says where to look.
  int64_t mismatches = 0, by_region[4] = {};
  std::string first;
  for (size_t i = 0; i < cpu.size(); ++i) {
    if (cpu[i] == gpu[i]) continue;
    ++mismatches;
    const int64_t offset = static_cast<int64_t>(i) % format.entry_bytes();
    const int region = offset < format.nope_dim ? 0 : offset < format.data_bytes() ? 1 : offset < format.data_bytes() + 7 ? 2 : 3;
    ++by_region[region];
    if (mismatches <= 5) {
      const int64_t entry = static_cast<int64_t>(i) / format.entry_bytes();
      const int64_t dim = offset < format.nope_dim ? offset
                          : offset < format.data_bytes() ? format.nope_dim + (offset - format.nope_dim) / 2 : 0;
      first += " [entry " + std::to_string(entry) + " byte " + std::to_string(offset) + " cpu " + std::to_string(cpu[i]) +
               " gpu " + std::to_string(gpu[i]) + " x " + std::to_string(x[entry * format.dim() + dim]) + "]";
    }
  }
  EXPECT_EQ(mismatches, 0) << "of " << cpu.size() << " bytes; fp8 " << by_region[0] << " rope " << by_region[1]
                           << " scales " << by_region[2] << " pad " << by_region[3] << ";" << first;
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
