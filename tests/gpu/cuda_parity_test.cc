// CUDA kernels against the CPU kernels: the same bytes for the KV cache format, the same norms and rotary
// embedding (f32 on both sides, so the tolerances are a few f32 ulps). Fresh inputs every run.
#include <cmath>
#include <random>
#include <vector>

#include "common/kernels/kernels.h"
#include "common/model/forward.h"
#include "tests/gpu/gpu_test_util.h"

namespace tandem::kernels {
namespace {

using testing::AllClose;
using testing::CudaTest;
using testing::Normal;
using testing::Poisoned;
using testing::Sync;
using testing::ToDevice;
using testing::ToHost;

TEST_F(CudaTest, KvEntriesAreByteIdentical) {
  const KvFormat format;
  const int64_t count = 4096;
  auto x = Normal(static_cast<size_t>(count * format.dim()), rng_, 2.0f);
  for (int64_t i = 0; i < count; i += 7) x[i * format.dim() + 5] *= 1000.0f;  // spread the tile scales
  for (int64_t i = 0; i < count; i += 11) std::fill_n(x.begin() + i * format.dim(), 64, 0.0f);  // 1e-4 floor
  auto device_x = ToDevice(x);
  auto device_entries = Poisoned<uint8_t>(static_cast<size_t>(count * format.entry_bytes()));
  TANDEM_ASSERT_OK(cuda::QuantizeKvEntries(format, device_x.get(), count, device_entries.get()));
  TANDEM_ASSERT_OK(Sync());
  const auto gpu = ToHost(device_entries);
  std::vector<uint8_t> cpu(gpu.size());
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
      first += " [entry " + std::to_string(static_cast<int64_t>(i) / format.entry_bytes()) + " byte " +
               std::to_string(offset) + " cpu " + std::to_string(cpu[i]) + " gpu " + std::to_string(gpu[i]) + "]";
    }
  }
  EXPECT_EQ(mismatches, 0) << "of " << cpu.size() << " bytes; fp8 " << by_region[0] << " rope " << by_region[1]
                           << " scales " << by_region[2] << " pad " << by_region[3] << ";" << first;
}

// Both sides sum squares in double and do the same float multiplies: equal up to a rare 1-ulp inv.
TEST_F(CudaTest, RmsNormMatchesCpu) {
  struct Case {
    int64_t rows, dim;
    bool weighted;
  };
  // 4096: attn_norm (vector path); 1024: q_norm; 512 unweighted: the per-head q norm; 4097: scalar path.
  for (const Case c : {Case{257, 4096, true}, Case{33, 1024, true}, Case{300, 512, false}, Case{5, 4097, true}}) {
    SCOPED_TRACE(::testing::Message() << "rows " << c.rows << " dim " << c.dim << " weighted " << c.weighted);
    const auto x = Normal(static_cast<size_t>(c.rows * c.dim), rng_, 2.0f);
    const auto w = Normal(static_cast<size_t>(c.dim), rng_);
    auto device_x = ToDevice(x);
    auto device_w = ToDevice(w);
    auto device_y = Poisoned<float>(x.size());
    TANDEM_ASSERT_OK(cuda::RmsNorm(device_x.get(), c.rows, c.dim, c.weighted ? device_w.get() : nullptr, 1e-6f,
                                   device_y.get()));
    TANDEM_ASSERT_OK(Sync());
    std::vector<float> cpu(x.size());
    RmsNorm(x.data(), c.rows, c.dim, c.weighted ? w.data() : nullptr, 1e-6f, cpu.data());
    EXPECT_TRUE(AllClose(ToHost(device_y), cpu, 1e-6, 1e-6));
  }
}

TEST_F(CudaTest, RmsNormInPlace) {
  const int64_t rows = 16, dim = 4096;
  const auto x = Normal(static_cast<size_t>(rows * dim), rng_);
  auto device_x = ToDevice(x);
  TANDEM_ASSERT_OK(cuda::RmsNorm(device_x.get(), rows, dim, nullptr, 1e-6f, device_x.get()));
  TANDEM_ASSERT_OK(Sync());
  std::vector<float> cpu(x.size());
  RmsNorm(x.data(), rows, dim, nullptr, 1e-6f, cpu.data());
  EXPECT_TRUE(AllClose(ToHost(device_x), cpu, 1e-6, 1e-6));
}

// Angles in double on both sides; the float rotation is the same four products and two sums.
TEST_F(CudaTest, RopeMatchesCpu) {
  model::RopeScaling yarn;
  yarn.factor = 16.0;
  yarn.original_max_position_embeddings = 65536;
  const auto compressed = model::RopeInverseFrequencies(64, 160000.0, &yarn);
  const auto plain = model::RopeInverseFrequencies(64, 10000.0, nullptr);
  struct Case {
    int64_t rows, heads;
    const std::vector<double>* freqs;
  };
  // 64 heads: the q of a flash layer; 1 head: the kv vector.
  for (const Case c : {Case{37, 64, &compressed}, Case{129, 1, &plain}}) {
    for (const bool inverse : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "rows " << c.rows << " heads " << c.heads << " inverse " << inverse);
      const int64_t head_dim = 512, offset = 448, rope_dim = 64;
      const auto x = Normal(static_cast<size_t>(c.rows * c.heads * head_dim), rng_, 2.0f);
      std::uniform_int_distribution<int64_t> pos_dist(0, (int64_t{1} << 20) - 1);
      std::vector<int64_t> positions(static_cast<size_t>(c.rows));
      for (auto& p : positions) p = pos_dist(rng_);
      positions[0] = 0;
      auto device_x = ToDevice(x);
      auto device_positions = ToDevice(positions);
      auto device_freqs = ToDevice(*c.freqs);
      TANDEM_ASSERT_OK(cuda::ApplyRope(device_x.get(), c.rows, c.heads * head_dim, c.heads, head_dim, offset, rope_dim,
                                       device_positions.get(), device_freqs.get(), inverse));
      TANDEM_ASSERT_OK(Sync());
      std::vector<float> cpu = x;
      ApplyRope(cpu.data(), c.rows, c.heads * head_dim, c.heads, head_dim, offset, rope_dim, positions.data(),
                c.freqs->data(), inverse);
      // The nope dims are compared too: the kernel must leave them alone.
      EXPECT_TRUE(AllClose(ToHost(device_x), cpu, 1e-6, 1e-6));
    }
  }
}

TEST_F(CudaTest, BadArgumentsAreStatusesNotCrashes) {
  EXPECT_EQ(cuda::RmsNorm(nullptr, 4, 0, nullptr, 1e-6f, nullptr).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::ApplyRope(nullptr, 4, 64, 1, 64, 0, 63, nullptr, nullptr, false).code(),
            absl::StatusCode::kInvalidArgument);
  cuda::MhcShape three_streams;
  three_streams.streams = 3;
  three_streams.hidden = 64;
  EXPECT_EQ(cuda::HcPost(three_streams, nullptr, nullptr, nullptr, 1, nullptr).code(), absl::StatusCode::kUnimplemented);
  cuda::MhcShape odd;
  odd.hidden = 10;
  EXPECT_EQ(cuda::HcPre(odd, {}, nullptr, 1, nullptr, nullptr, nullptr, nullptr, 0).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tandem::kernels
