// Helpers of the attention GPU tests: device pools of KV entries laid out as DeviceSequenceState lays them
// out, and comparisons of cache bytes that say which region of an entry differs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common/kernels/cuda/cuda_attention.h"
#include "common/kernels/kernels.h"
#include "tests/gpu/gpu_test_util.h"

namespace tandem::kernels::testing {

// `count` entries [data | scales] entry_bytes() apart in one allocation (odd entries are 8- but not
// 16-byte aligned, as in DeviceSequenceState), starting `offset` bytes in (1 misaligns them); poisoned.
struct KvPool {
  KvFormat format;
  int64_t count = 0;
  size_t offset = 0;
  cuda::DeviceArray<uint8_t> bytes;

  static KvPool Create(const KvFormat& format, int64_t count, size_t offset = 0) {
    KvPool pool;
    pool.format = format;
    pool.count = count;
    pool.offset = offset;
    pool.bytes = Poisoned<uint8_t>(offset + static_cast<size_t>(count * format.entry_bytes()));
    return pool;
  }
  cuda::KvRef Ref(int64_t slot) const {
    uint8_t* entry = bytes.get() + offset + slot * format.entry_bytes();
    return {entry, entry + format.data_bytes()};
  }
  // Host entries [count, entry_bytes] in slot order.
  void Upload(const std::vector<uint8_t>& entries) {
    std::vector<uint8_t> host(bytes.size(), 0xff);
    std::copy(entries.begin(), entries.end(), host.begin() + static_cast<int64_t>(offset));
    const absl::Status status = bytes.Upload(std::span<const uint8_t>(host));
    if (!status.ok()) throw std::runtime_error(status.ToString());
  }
  std::vector<uint8_t> Download() const {
    const auto host = ToHost(bytes);
    return std::vector<uint8_t>(host.begin() + static_cast<int64_t>(offset), host.end());
  }
};

// CPU QuantizeKvEntry of x [count, dim] into [count, entry_bytes].
inline std::vector<uint8_t> QuantizeEntries(const KvFormat& format, const std::vector<float>& x) {
  const int64_t count = static_cast<int64_t>(x.size()) / format.dim();
  std::vector<uint8_t> entries(static_cast<size_t>(count * format.entry_bytes()));
  for (int64_t i = 0; i < count; ++i) {
    uint8_t* e = entries.data() + i * format.entry_bytes();
    QuantizeKvEntry(format, x.data() + i * format.dim(), e, e + format.data_bytes());
  }
  return entries;
}

inline std::vector<float> DequantizeEntries(const KvFormat& format, const std::vector<uint8_t>& entries) {
  const int64_t count = static_cast<int64_t>(entries.size()) / format.entry_bytes();
  std::vector<float> x(static_cast<size_t>(count * format.dim()));
  for (int64_t i = 0; i < count; ++i) {
    const uint8_t* e = entries.data() + i * format.entry_bytes();
    DequantizeKvEntry(format, e, e + format.data_bytes(), x.data() + i * format.dim());
  }
  return x;
}

// Differing bytes of two runs of entries, by region (fp8 codes, bf16 rope, scales, scale padding).
struct ByteDiff {
  int64_t total = 0;
  int64_t by_region[4] = {};
  std::string first;
};
inline ByteDiff CompareEntries(const KvFormat& format, const std::vector<uint8_t>& got, const std::vector<uint8_t>& expected) {
  ByteDiff diff;
  const int64_t tiles = format.nope_dim / 64;
  for (size_t i = 0; i < std::min(got.size(), expected.size()); ++i) {
    if (got[i] == expected[i]) continue;
    const int64_t offset = static_cast<int64_t>(i) % format.entry_bytes();
    const int region = offset < format.nope_dim           ? 0
                       : offset < format.data_bytes()     ? 1
                       : offset < format.data_bytes() + tiles ? 2
                                                           : 3;
    ++diff.by_region[region];
    if (diff.total++ < 5) {
      diff.first += " [entry " + std::to_string(static_cast<int64_t>(i) / format.entry_bytes()) + " byte " +
                    std::to_string(offset) + " gpu " + std::to_string(got[i]) + " cpu " + std::to_string(expected[i]) + "]";
    }
  }
  return diff;
}
inline std::string Describe(const ByteDiff& d) {
  return std::to_string(d.total) + " bytes differ (fp8 " + std::to_string(d.by_region[0]) + " rope " +
         std::to_string(d.by_region[1]) + " scales " + std::to_string(d.by_region[2]) + " pad " +
         std::to_string(d.by_region[3]) + "):" + d.first;
}

}  // namespace tandem::kernels::testing
