// The backend-neutral kernel API of the DSV4 forward: linear layers (dense f32, MXFP4, block FP8),
// norms, rotary embedding, Hadamard, and the byte formats of the KV and indexer caches.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace tandem::kernels {

// Threads for our pool and for OpenBLAS (n <= 0: all cores).
void SetThreads(int num_threads);

// Batch-invariant mode: every linear layer sums each output in one fixed order, so a row's result never
// depends on which other rows share the call (OpenBLAS picks kernels by matrix shape). Process-wide.
void SetDeterministic(bool deterministic);
bool Deterministic();

// y[rows, out] = x[rows, in] · W[out, in]^T with W dense f32 (OpenBLAS sgemm, or the fixed-order
// kernel in deterministic mode).
void Linear(const float* x, int64_t rows, int64_t in, const float* weight, int64_t out, float* y);
// The fixed-order kernel behind deterministic mode (ldw: distance between weight rows).
void LinearFixedOrder(const float* x, int64_t rows, int64_t in, const float* weight, int64_t out, float* y);
// Plain loops, the reference the fast paths are tested against.
void LinearReference(const float* x, int64_t rows, int64_t in, const float* weight, int64_t out, float* y);

// A weight kept in its checkpoint format and dequantized on the fly.
struct QuantizedWeight {
  enum class Format { kMxfp4, kFp8Block };
  Format format = Format::kMxfp4;
  const uint8_t* codes = nullptr;   // MXFP4: [out, in/2] packed; FP8: [out, in] e4m3
  const uint8_t* scales = nullptr;  // MXFP4: [out, in/32] ue8m0; FP8: [ceil(out/128), ceil(in/128)] ue8m0
  int64_t out = 0;
  int64_t in = 0;
};
// Dequantizes `rows_count` weight rows starting at `row_begin` into dst [rows_count, in].
void DequantizeRows(const QuantizedWeight& weight, int64_t row_begin, int64_t rows_count, float* dst);
// y[rows, out] = x[rows, in] · dequant(W)^T, tiling the dequantization so memory stays bounded.
void QuantizedLinear(const float* x, int64_t rows, const QuantizedWeight& weight, float* y);

// y = x / sqrt(mean(x^2) + eps) * weight (weight may be null: no scaling). In place is allowed.
void RmsNorm(const float* x, int64_t rows, int64_t dim, const float* weight, float eps, float* y);

// Rotary embedding on `rope_dim` interleaved dims starting at `offset` inside each of `heads` vectors
// of `head_stride` floats per row; row r uses positions[r]. inv_freq has rope_dim/2 entries.
void ApplyRope(float* x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_stride, int64_t offset,
               int64_t rope_dim, const int64_t* positions, const double* inv_freq, bool inverse);
// Rotary on a single vector at one position.
void ApplyRopeOne(float* x, int64_t rope_dim, int64_t position, const double* inv_freq, bool inverse);

// y = H x / sqrt(n) in place, Sylvester-ordered Hadamard, n a power of two.
void Hadamard(float* x, int64_t n);

// ---- Attention KV entry (FlashMLA "MODEL1" FP8 layout) ----
// data: nope_dim e4m3 codes then rope_dim bf16 values; scales: nope_dim/64 ue8m0 bytes, padded to 8.
struct KvFormat {
  int64_t nope_dim = 448;
  int64_t rope_dim = 64;
  int64_t data_bytes() const { return nope_dim + 2 * rope_dim; }
  int64_t scale_bytes() const { return ((nope_dim / 64) + 7) / 8 * 8; }
  int64_t entry_bytes() const { return data_bytes() + scale_bytes(); }
  int64_t dim() const { return nope_dim + rope_dim; }
};
void QuantizeKvEntry(const KvFormat& format, const float* x, uint8_t* data, uint8_t* scales);
void DequantizeKvEntry(const KvFormat& format, const uint8_t* data, const uint8_t* scales, float* x);

// ---- Indexer key: dim e4m3 codes + one fp32 scale (amax/448) ----
inline int64_t IndexerKeyBytes(int64_t dim) { return dim + 4; }
void QuantizeIndexerKey(const float* x, int64_t dim, uint8_t* entry);
void DequantizeIndexerKey(const uint8_t* entry, int64_t dim, float* x);

}  // namespace tandem::kernels
