// The attention's cache-side CUDA kernels against the CPU ops they mirror: Hadamard, KV entry store /
// load / copy (byte-identical to QuantizeKvEntry) and the C4/C128 compressors (loops copied from
// RunCompressor in common/model/attention.cc). Fresh inputs every run.
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "common/kernels/cuda/cuda_attention.h"
#include "common/kernels/kernels.h"
#include "common/model/forward.h"
#include "tests/gpu/attention_test_util.h"
#include "tests/gpu/gpu_test_util.h"

namespace tandem::kernels {
namespace {

using testing::AllClose;
using testing::CompareEntries;
using testing::CudaTest;
using testing::DequantizeEntries;
using testing::Describe;
using testing::KvPool;
using testing::Normal;
using testing::Poisoned;
using testing::QuantizeEntries;
using testing::Sync;
using testing::ToDevice;
using testing::ToHost;

// The same butterflies in the same order and the same final multiply: equal to the last bit in practice
// (the tolerance only forgives a compiler's different but legal rounding of the scale multiply).
TEST_F(CudaTest, HadamardMatchesCpu) {
  struct Case {
    int64_t rows, n;
  };
  // 128: the indexer (T x 64 heads of q, or one compressed key); 1024: the largest; 1 and 2: the edges.
  for (const Case c : {Case{4 * 64 + 3, 128}, Case{7, 512}, Case{5, 1024}, Case{9, 1}, Case{11, 2}}) {
    SCOPED_TRACE(::testing::Message() << "rows " << c.rows << " n " << c.n);
    const auto x = Normal(static_cast<size_t>(c.rows * c.n), rng_, 2.0f);
    auto device_x = ToDevice(x);
    TANDEM_ASSERT_OK(cuda::Hadamard(device_x.get(), c.rows, c.n));
    TANDEM_ASSERT_OK(Sync());
    std::vector<float> cpu = x;
    for (int64_t r = 0; r < c.rows; ++r) Hadamard(cpu.data() + r * c.n, c.n);
    EXPECT_TRUE(AllClose(ToHost(device_x), cpu, 1e-7, 1e-6));
  }
}

// Store into DeviceSequenceState-like slots (half of them only 8-byte aligned) in a shuffled order, load
// back, copy into a paged layout (separate data and scale regions) and into a misaligned pool.
TEST_F(CudaTest, KvEntriesStoreLoadCopyMatchCpu) {
  const KvFormat format;
  const int64_t count = 700;
  auto x = Normal(static_cast<size_t>(count * format.dim()), rng_, 2.0f);
  for (int64_t i = 0; i < count; i += 7) x[i * format.dim() + 5] *= 1000.0f;  // spread the tile scales
  for (int64_t i = 0; i < count; i += 11) std::fill_n(x.begin() + i * format.dim() + 64, 64, 0.0f);  // 1e-4 floor
  std::vector<int64_t> slot(static_cast<size_t>(count));
  std::iota(slot.begin(), slot.end(), 0);
  std::shuffle(slot.begin(), slot.end(), rng_);

  KvPool pool = KvPool::Create(format, count);
  std::vector<cuda::KvRef> refs(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) refs[i] = pool.Ref(slot[i]);
  auto device_refs = ToDevice(refs);
  auto device_x = ToDevice(x);
  TANDEM_ASSERT_OK(cuda::StoreKvEntries(format, device_x.get(), count, device_refs.get()));
  TANDEM_ASSERT_OK(Sync());
  const auto cpu = QuantizeEntries(format, x);
  const auto stored = pool.Download();
  std::vector<uint8_t> gpu(cpu.size());  // back in entry order
  for (int64_t i = 0; i < count; ++i) {
    std::copy_n(stored.begin() + slot[i] * format.entry_bytes(), format.entry_bytes(), gpu.begin() + i * format.entry_bytes());
  }
  const auto store_diff = CompareEntries(format, gpu, cpu);
  EXPECT_EQ(store_diff.total, 0) << "StoreKvEntries: " << Describe(store_diff);

  auto loaded = Poisoned<float>(x.size());
  TANDEM_ASSERT_OK(cuda::LoadKvEntries(format, device_refs.get(), count, loaded.get()));
  TANDEM_ASSERT_OK(Sync());
  EXPECT_TRUE(AllClose(ToHost(loaded), DequantizeEntries(format, cpu), 0.0, 0.0)) << "LoadKvEntries";

  // Paged layout: data slot * 576 (16-byte aligned), scales after all data.
  auto paged = Poisoned<uint8_t>(static_cast<size_t>(count * format.entry_bytes()));
  std::vector<cuda::KvRef> paged_refs(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    paged_refs[i] = {paged.get() + i * format.data_bytes(),
                     paged.get() + count * format.data_bytes() + i * format.scale_bytes()};
  }
  auto device_paged_refs = ToDevice(paged_refs);
  TANDEM_ASSERT_OK(cuda::CopyKvEntries(format, device_refs.get(), device_paged_refs.get(), count));
  KvPool misaligned = KvPool::Create(format, count, 1);
  std::vector<cuda::KvRef> misaligned_refs(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) misaligned_refs[i] = misaligned.Ref(i);
  auto device_misaligned_refs = ToDevice(misaligned_refs);
  TANDEM_ASSERT_OK(cuda::CopyKvEntries(format, device_paged_refs.get(), device_misaligned_refs.get(), count));
  TANDEM_ASSERT_OK(Sync());
  const auto paged_host = ToHost(paged);
  std::vector<uint8_t> paged_entries(cpu.size());
  for (int64_t i = 0; i < count; ++i) {
    std::copy_n(paged_host.begin() + i * format.data_bytes(), format.data_bytes(), paged_entries.begin() + i * format.entry_bytes());
    std::copy_n(paged_host.begin() + count * format.data_bytes() + i * format.scale_bytes(), format.scale_bytes(),
                paged_entries.begin() + i * format.entry_bytes() + format.data_bytes());
  }
  const auto copy_diff = CompareEntries(format, paged_entries, cpu);
  EXPECT_EQ(copy_diff.total, 0) << "CopyKvEntries (8-byte path): " << Describe(copy_diff);
  const auto misaligned_diff = CompareEntries(format, misaligned.Download(), cpu);
  EXPECT_EQ(misaligned_diff.total, 0) << "CopyKvEntries (byte path): " << Describe(misaligned_diff);
}

// ---- Compressors ----

enum class Output { kAttention, kIndexer };

std::vector<double> CompressRopeFrequencies() {
  model::RopeScaling yarn;
  yarn.factor = 16.0;
  yarn.original_max_position_embeddings = 65536;
  return model::RopeInverseFrequencies(64, 160000.0, &yarn);
}

// Emits entries first_index .. first_index + emits - 1 of one compressor from rows the GPU wrote, and
// compares rows and outputs with RunCompressor's loops.
void CheckCompressor(std::mt19937& rng, int ratio, int64_t dim, Output output, int64_t first_index, int64_t emits) {
  SCOPED_TRACE(::testing::Message() << "ratio " << ratio << " dim " << dim << (output == Output::kIndexer ? " indexer" : " attention")
                                    << " entries " << first_index << ".." << first_index + emits - 1);
  cuda::CompressorShape shape;
  shape.ratio = ratio;
  shape.dim = dim;
  shape.rope_dim = 64;
  const int64_t d = dim, rd = shape.rope_dim, width = shape.width(), R = shape.rows_per_emit();
  // Positions from the previous chunk's first token (C4 overlaps it) to the last emitted chunk's end.
  const int64_t start = (ratio == 4 && first_index > 0 ? first_index - 1 : first_index) * ratio;
  const int64_t tokens = (first_index + emits) * ratio - start;
  const auto kv = Normal(static_cast<size_t>(tokens * width), rng);
  const auto score = Normal(static_cast<size_t>(tokens * width), rng, 2.0f);
  const auto ape = Normal(static_cast<size_t>(ratio * width), rng, 0.5f);
  std::vector<int64_t> positions(static_cast<size_t>(tokens));
  std::iota(positions.begin(), positions.end(), start);

  auto device_rows = Poisoned<float>(static_cast<size_t>(tokens * 2 * width));
  std::vector<float*> row_pointers(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t) row_pointers[t] = device_rows.get() + t * 2 * width;
  auto device_row_pointers = ToDevice(row_pointers);
  auto device_kv = ToDevice(kv);
  auto device_score = ToDevice(score);
  auto device_ape = ToDevice(ape);
  auto device_positions = ToDevice(positions);
  TANDEM_ASSERT_OK(cuda::CompressorWriteRows(shape, device_kv.get(), device_score.get(), device_ape.get(),
                                             device_positions.get(), device_row_pointers.get(), tokens));
  std::vector<float> rows(static_cast<size_t>(tokens * 2 * width));
  for (int64_t t = 0; t < tokens; ++t) {
    const float* a = ape.data() + (positions[t] % ratio) * width;
    for (int64_t ch = 0; ch < width; ++ch) {
      rows[t * 2 * width + ch] = kv[t * width + ch];
      rows[t * 2 * width + width + ch] = score[t * width + ch] + a[ch];
    }
  }

  // The emits' rows (C4 entry 0: no previous chunk, null rows).
  std::vector<const float*> emit_rows(static_cast<size_t>(emits * R), nullptr);
  std::vector<int64_t> index(static_cast<size_t>(emits));
  for (int64_t e = 0; e < emits; ++e) {
    index[e] = first_index + e;
    const int64_t p = (index[e] + 1) * ratio - 1;
    if (ratio == 4) {
      for (int64_t r = 0; r < 4; ++r) {
        if (index[e] > 0) emit_rows[e * R + r] = device_rows.get() + (p - 7 + r - start) * 2 * width;
        emit_rows[e * R + 4 + r] = device_rows.get() + (p - 3 + r - start) * 2 * width;
      }
    } else {
      for (int64_t r = 0; r < R; ++r) emit_rows[e * R + r] = device_rows.get() + (p - R + 1 + r - start) * 2 * width;
    }
  }
  auto norm = Normal(static_cast<size_t>(d), rng, 0.2f);
  for (auto& w : norm) w += 1.0f;
  const auto inv_freq = CompressRopeFrequencies();
  auto device_emit_rows = ToDevice(emit_rows);
  auto device_index = ToDevice(index);
  auto device_norm = ToDevice(norm);
  auto device_inv_freq = ToDevice(inv_freq);

  const KvFormat format{d - rd, rd};
  const int64_t key_bytes = IndexerKeyBytes(d);
  KvPool pool = KvPool::Create(format, output == Output::kAttention ? emits : 0);
  auto keys = Poisoned<uint8_t>(static_cast<size_t>(output == Output::kIndexer ? emits * key_bytes : 0));
  std::vector<cuda::KvRef> kv_refs;
  std::vector<uint8_t*> key_pointers;
  for (int64_t e = 0; e < emits; ++e) {
    if (output == Output::kAttention) kv_refs.push_back(pool.Ref(e));
    else key_pointers.push_back(keys.get() + e * key_bytes);
  }
  auto device_kv_refs = ToDevice(kv_refs);
  auto device_key_pointers = ToDevice(key_pointers);
  TANDEM_ASSERT_OK(cuda::CompressorEmit(shape, device_emit_rows.get(), device_index.get(), emits, device_norm.get(),
                                        device_inv_freq.get(), output == Output::kAttention ? device_kv_refs.get() : nullptr,
                                        output == Output::kIndexer ? device_key_pointers.get() : nullptr));
  TANDEM_ASSERT_OK(Sync());
  EXPECT_TRUE(AllClose(ToHost(device_rows), rows, 0.0, 0.0)) << "CompressorWriteRows";

  // RunCompressor, emit by emit.
  std::vector<float> pooled_all(static_cast<size_t>(emits * d));
  std::vector<uint8_t> cpu_out(static_cast<size_t>(emits * (output == Output::kAttention ? format.entry_bytes() : key_bytes)));
  for (int64_t e = 0; e < emits; ++e) {
    const int64_t p = (index[e] + 1) * ratio - 1;
    std::vector<std::pair<const float*, int64_t>> taking;
    auto row = [&](int64_t q) { return rows.data() + (q - start) * 2 * width; };
    if (ratio == 4) {
      if (index[e] > 0) {
        for (int64_t q = p - 7; q <= p - 4; ++q) taking.emplace_back(row(q), 0);
      }
      for (int64_t q = p - 3; q <= p; ++q) taking.emplace_back(row(q), d);
    } else {
      for (int64_t q = p - ratio + 1; q <= p; ++q) taking.emplace_back(row(q), 0);
    }
    float* pooled = pooled_all.data() + e * d;
    for (int64_t ch = 0; ch < d; ++ch) {
      float best = -INFINITY;
      for (const auto& [r, off] : taking) best = std::max(best, r[width + off + ch]);
      double num = 0.0, den = 0.0;
      for (const auto& [r, off] : taking) {
        const double w = std::exp(static_cast<double>(r[width + off + ch]) - best);
        den += w;
        num += w * r[off + ch];
      }
      pooled[ch] = static_cast<float>(num / den);
    }
    RmsNorm(pooled, 1, d, norm.data(), shape.eps, pooled);
    ApplyRopeOne(pooled + d - rd, rd, ratio * index[e], inv_freq.data(), false);
    if (output == Output::kIndexer) {
      Hadamard(pooled, d);
      QuantizeIndexerKey(pooled, d, cpu_out.data() + e * key_bytes);
    } else {
      uint8_t* entry = cpu_out.data() + e * format.entry_bytes();
      QuantizeKvEntry(format, pooled, entry, entry + format.data_bytes());
    }
  }

  // Both sides pool and normalize in double, so the pre-quantization vectors agree to an f32 ulp or so: a
  // byte differs only where a value sits on a rounding boundary (a few per million). Dequantized values
  // may then differ by one e4m3 step (12.5%) there; every value is also checked against the CPU's
  // unquantized vector within e4m3's half step.
  float amax = 0.0f;
  for (const float v : pooled_all) amax = std::max(amax, std::fabs(v));
  const double atol = amax * 1e-4;
  if (output == Output::kAttention) {
    const auto gpu = pool.Download();
    const auto diff = CompareEntries(format, gpu, cpu_out);
    EXPECT_LE(diff.total, std::max<int64_t>(2, static_cast<int64_t>(gpu.size()) / 1000)) << Describe(diff);
    const auto gpu_values = DequantizeEntries(format, gpu);
    EXPECT_TRUE(AllClose(gpu_values, DequantizeEntries(format, cpu_out), atol, 0.13)) << "dequantized entries";
    EXPECT_TRUE(AllClose(gpu_values, pooled_all, atol, 0.07)) << "against the unquantized CPU vector";
  } else {
    const auto gpu = ToHost(keys);
    int64_t differ = 0;
    for (size_t i = 0; i < gpu.size(); ++i) differ += gpu[i] != cpu_out[i];
    EXPECT_LE(differ, std::max<int64_t>(2, static_cast<int64_t>(gpu.size()) / 1000)) << "indexer key bytes differ";
    std::vector<float> gpu_values(static_cast<size_t>(emits * d)), cpu_values(gpu_values.size());
    for (int64_t e = 0; e < emits; ++e) {
      DequantizeIndexerKey(gpu.data() + e * key_bytes, d, gpu_values.data() + e * d);
      DequantizeIndexerKey(cpu_out.data() + e * key_bytes, d, cpu_values.data() + e * d);
    }
    EXPECT_TRUE(AllClose(gpu_values, cpu_values, atol, 0.13)) << "dequantized keys";
    EXPECT_TRUE(AllClose(gpu_values, pooled_all, atol, 0.07)) << "against the unquantized CPU vector (after Hadamard)";
  }
}

// head_dim 512 / rope 64 (every preset), index_head_dim 128; entry 0 of C4 has no previous chunk, and the
// later ones sit at positions in the hundreds of thousands (large RoPE angles).
TEST_F(CudaTest, CompressorC4AttentionMatchesCpu) {
  CheckCompressor(rng_, 4, 512, Output::kAttention, 0, 6);
  CheckCompressor(rng_, 4, 512, Output::kAttention, 1 + static_cast<int64_t>(rng_() % 200000), 5);
}

TEST_F(CudaTest, CompressorC4IndexerMatchesCpu) {
  CheckCompressor(rng_, 4, 128, Output::kIndexer, 0, 6);
  CheckCompressor(rng_, 4, 128, Output::kIndexer, 1 + static_cast<int64_t>(rng_() % 200000), 5);
}

TEST_F(CudaTest, CompressorC128MatchesCpu) {
  CheckCompressor(rng_, 128, 512, Output::kAttention, 0, 2);
  CheckCompressor(rng_, 128, 512, Output::kAttention, 1 + static_cast<int64_t>(rng_() % 8000), 3);
  CheckCompressor(rng_, 128, 128, Output::kIndexer, static_cast<int64_t>(rng_() % 8000), 2);
}

TEST_F(CudaTest, AttentionBadArgumentsAreStatuses) {
  EXPECT_EQ(cuda::Hadamard(nullptr, 4, 96).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::Hadamard(nullptr, 4, 2048).code(), absl::StatusCode::kInvalidArgument);
  cuda::CompressorShape shape;
  shape.dim = 512;
  shape.rope_dim = 64;
  cuda::KvRef ref;
  uint8_t* key = nullptr;
  EXPECT_EQ(cuda::CompressorEmit(shape, nullptr, nullptr, 1, nullptr, nullptr, &ref, &key).code(),
            absl::StatusCode::kInvalidArgument);  // both outputs
  shape.ratio = 16;
  EXPECT_EQ(cuda::CompressorWriteRows(shape, nullptr, nullptr, nullptr, nullptr, nullptr, 1).code(),
            absl::StatusCode::kInvalidArgument);
  cuda::SparseAttentionArgs attention;
  attention.format = KvFormat{192, 64};
  attention.tokens = 1;
  attention.heads = 1;
  EXPECT_EQ(cuda::SparseAttention(attention).code(), absl::StatusCode::kInvalidArgument);
  cuda::IndexerArgs indexer;
  indexer.tokens = 1;
  indexer.heads = 4;
  indexer.dim = 128;
  indexer.topk = 0;
  EXPECT_EQ(cuda::IndexerTopK(indexer, nullptr, 0).code(), absl::StatusCode::kInvalidArgument);
  indexer.topk = 16;
  indexer.max_visible = 100;
  int32_t unused = 0;  // never dereferenced: the workspace check comes first
  indexer.visible = &unused;
  indexer.selected = &unused;
  EXPECT_EQ(cuda::IndexerTopK(indexer, nullptr, 0).code(), absl::StatusCode::kInvalidArgument);  // no workspace
}

}  // namespace
}  // namespace tandem::kernels
