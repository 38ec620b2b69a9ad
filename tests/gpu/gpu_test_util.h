// Shared helpers of the GPU parity tests: a fresh seed per run (printed; TANDEM_TEST_SEED replays one),
// device buffers that fail the test on a CUDA error, and tolerance checks that say where they failed.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include "common/kernels/cuda/cuda_ops.h"
#include "common/kernels/cuda/device_buffer.h"

namespace tandem::kernels::testing {

#define TANDEM_ASSERT_OK(expr)                        \
  do {                                                \
    const ::absl::Status tandem_s_ = (expr);          \
    ASSERT_TRUE(tandem_s_.ok()) << tandem_s_.ToString(); \
  } while (0)

// Unwraps a StatusOr; a failure throws, which gtest reports as a failed test.
template <typename T>
T Must(absl::StatusOr<T> value) {
  if (!value.ok()) throw std::runtime_error(value.status().ToString());
  return std::move(value).value();
}

inline uint32_t FreshSeed() {
  if (const char* env = std::getenv("TANDEM_TEST_SEED")) return static_cast<uint32_t>(std::strtoul(env, nullptr, 10));
  return std::random_device{}();
}

inline std::vector<float> Normal(size_t n, std::mt19937& rng, float stddev = 1.0f) {
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

template <typename T>
cuda::DeviceArray<T> ToDevice(const std::vector<T>& host) {
  return Must(cuda::DeviceArray<T>::FromHost(std::span<const T>(host)));
}

template <typename T>
cuda::DeviceArray<T> Poisoned(size_t count) {
  auto array = Must(cuda::DeviceArray<T>::Create(count));
  const absl::Status status = array.Poison();
  if (!status.ok()) throw std::runtime_error(status.ToString());
  return array;
}

template <typename T>
std::vector<T> ToHost(const cuda::DeviceArray<T>& array) {
  std::vector<T> host(array.size());
  const absl::Status status = array.Download(std::span<T>(host));
  if (!status.ok()) throw std::runtime_error(status.ToString());
  return host;
}

// Compute capability 9.0 (H100/H200): where the sm_90a warpgroup-MMA kernels must be the ones that serve.
inline bool DeviceIsSm90() {
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  return major == 9 && minor == 0;
}

inline absl::Status Sync() {
  const cudaError_t err = cudaDeviceSynchronize();
  if (err != cudaSuccess) return absl::InternalError(std::string("cudaDeviceSynchronize: ") + cudaGetErrorString(err));
  return absl::OkStatus();
}

// Every element within atol + rtol * |expected|, and none NaN (a poisoned element left unwritten).
inline ::testing::AssertionResult AllClose(const std::vector<float>& got, const std::vector<float>& expected, double atol,
                                           double rtol) {
  if (got.size() != expected.size()) return ::testing::AssertionFailure() << "size " << got.size() << " vs " << expected.size();
  int64_t bad = 0;
  double worst = 0.0;
  std::string first;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - expected[i]);
    const double limit = atol + rtol * std::fabs(expected[i]);
    if (std::isnan(got[i]) || !(err <= limit)) {
      if (bad++ < 5) first += " [" + std::to_string(i) + ": gpu " + std::to_string(got[i]) + " cpu " + std::to_string(expected[i]) + "]";
    }
    if (!std::isnan(got[i])) worst = std::max(worst, err / (limit > 0 ? limit : 1.0));
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << got.size() << " elements outside atol " << atol << " rtol " << rtol
                                       << " (worst err/limit " << worst << "):" << first;
}

inline double RelativeL2(const std::vector<float>& got, const std::vector<float>& expected) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = static_cast<double>(got[i]) - expected[i];
    num += d * d;
    den += static_cast<double>(expected[i]) * expected[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const absl::Status status = cuda::DeviceAvailable();
    if (!status.ok()) GTEST_FAIL() << "no usable CUDA device: " << status.ToString();
    seed_ = FreshSeed();
    rng_.seed(seed_);
    RecordProperty("seed", std::to_string(seed_));
    std::printf("[ seed     ] %u (TANDEM_TEST_SEED=%u replays it)\n", seed_, seed_);
  }
  uint32_t seed_ = 0;
  std::mt19937 rng_;
};

}  // namespace tandem::kernels::testing
