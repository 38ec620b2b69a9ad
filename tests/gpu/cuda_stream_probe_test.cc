// StreamRead, the benchmark's DRAM-pattern probe: every pattern reads each 16-byte piece of the buffer
// exactly once (its checksum equals the host's, which does not depend on the order), and bad calls are
// refused before any launch.
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/kernels/cuda/cuda_ops.h"
#include "tests/gpu/gpu_test_util.h"

namespace tandem::kernels {
namespace {

using testing::CudaTest;
using testing::Sync;
using testing::ToDevice;
using testing::ToHost;

TEST_F(CudaTest, StreamReadCoversEveryPieceOnce) {
  // 300 units (157 MB): more than the 2 blocks a SM of any current GPU, so blocks loop over several units.
  std::vector<uint8_t> bytes(300 * cuda::kStreamUnitBytes);
  for (size_t i = 0; i < bytes.size(); i += 4) {
    const uint32_t r = rng_();
    std::memcpy(&bytes[i], &r, 4);
  }
  uint32_t want = 0;
  for (size_t i = 0; i < bytes.size(); i += 16) {
    uint32_t w[4];
    std::memcpy(w, &bytes[i], 16);
    want ^= w[0] + 3u * w[1] + 5u * w[2] + 7u * w[3];
  }
  auto buffer = ToDevice(bytes);
  for (const auto pattern : cuda::kStreamPatterns) {
    SCOPED_TRACE(cuda::StreamPatternName(pattern));
    auto sink = ToDevice(std::vector<uint32_t>{0u});
    TANDEM_ASSERT_OK(cuda::StreamRead(pattern, buffer.get(), bytes.size(), sink.get()));
    TANDEM_ASSERT_OK(Sync());
    EXPECT_EQ(ToHost(sink)[0], want);
  }
}

TEST_F(CudaTest, StreamReadRefusesBadArguments) {
  auto buffer = ToDevice(std::vector<uint8_t>(cuda::kStreamUnitBytes + 16));
  auto sink = ToDevice(std::vector<uint32_t>{7u});
  const auto q = cuda::StreamPattern::kQuad64;
  EXPECT_EQ(cuda::StreamRead(q, nullptr, cuda::kStreamUnitBytes, sink.get()).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::StreamRead(q, buffer.get(), cuda::kStreamUnitBytes, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::StreamRead(q, buffer.get(), 0, sink.get()).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::StreamRead(q, buffer.get(), cuda::kStreamUnitBytes + 16, sink.get()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::StreamRead(q, buffer.get() + 8, cuda::kStreamUnitBytes, sink.get()).code(),
            absl::StatusCode::kInvalidArgument);
  TANDEM_ASSERT_OK(Sync());
  EXPECT_EQ(ToHost(sink)[0], 7u);  // nothing ran
}

}  // namespace
}  // namespace tandem::kernels
