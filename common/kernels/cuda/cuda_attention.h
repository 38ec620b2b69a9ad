// CUDA kernels of DSV4 attention (NUMERICS.md "Attention", "Compressor", "Indexer"): the cache-entry
// moves, the C4/C128 compressors, the C4 indexer's scores and top-k, and sparse MQA over window plus
// compressed entries with the attention sink. Cache entries are addressed through device arrays of
// KvRef (or raw key pointers), built by the caller from its page tables, so the kernels serve paged
// pools and plain per-request buffers alike. Every call launches asynchronously on `stream`.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "common/core/status.h"
#include "common/kernels/kernels.h"

namespace tandem::kernels::cuda {

// One attention KV entry in device memory: KvFormat::data_bytes() at `data`, scale_bytes() at `scales`.
struct KvRef {
  uint8_t* data = nullptr;
  uint8_t* scales = nullptr;
};

// y = H x / sqrt(n) in place on `rows` vectors of n floats (Sylvester order; n a power of two <= 1024).
absl::Status Hadamard(float* x, int64_t rows, int64_t n, cudaStream_t stream = nullptr);

// Entry i <- kernels::QuantizeKvEntry(x[i]) for x [count, format.dim()] f32 (byte-identical to the CPU).
absl::Status StoreKvEntries(const KvFormat& format, const float* x, int64_t count, const KvRef* dst,
                            cudaStream_t stream = nullptr);
// x[i] <- kernels::DequantizeKvEntry(src[i]) into x [count, format.dim()].
absl::Status LoadKvEntries(const KvFormat& format, const KvRef* src, int64_t count, float* x,
                           cudaStream_t stream = nullptr);
// dst[i] <- src[i] (data and scales bytes).
absl::Status CopyKvEntries(const KvFormat& format, const KvRef* src, const KvRef* dst, int64_t count,
                           cudaStream_t stream = nullptr);

// ---- Compressors (attention C4/C128 and the indexer's C4) ----
struct CompressorShape {
  int ratio = 4;         // 4 (overlapping, c = 2) or 128 (c = 1)
  int64_t dim = 0;       // d: head_dim for attention, index_head_dim for the indexer
  int64_t rope_dim = 0;  // rd: the last rd dims get RoPE at position ratio * index
  float eps = 1e-6f;     // rms_norm_eps
  int64_t width() const { return (ratio == 4 ? 2 : 1) * dim; }  // c * d
  int64_t rows_per_emit() const { return ratio == 4 ? 8 : ratio; }
};

// Ring rows of `tokens` new tokens: rows[t] (2 * width floats) <- [kv[t] | score[t] + ape[positions[t] % ratio]]
// with kv, score [tokens, width] (the wkv / wgate outputs) and ape [ratio, width].
absl::Status CompressorWriteRows(const CompressorShape& shape, const float* kv, const float* score, const float* ape,
                                 const int64_t* positions, float* const* rows, int64_t tokens,
                                 cudaStream_t stream = nullptr);

// Emits `emits` compressed entries. Emit e pools rows[e * R .. e * R + R) (R = rows_per_emit()):
// ratio 4: rows 0..3 are the previous chunk's tokens (read on channels [0, d); null for index 0),
// rows 4..7 the current chunk's (channels [d, 2d)); ratio 128: the chunk's 128 rows (channels [0, d)).
// Per channel: softmax over the rows' scores, weighted sum of their kv; then RMSNorm with `norm` [d],
// RoPE (inv_freq [rope_dim/2], double angles) on the last rope_dim dims at position ratio * index[e].
// Exactly one output: kv_out[e] (attention: QuantizeKvEntry with KvFormat{d - rope_dim, rope_dim}) or
// key_out[e] (indexer: Hadamard, then QuantizeIndexerKey, IndexerKeyBytes(d) bytes).
absl::Status CompressorEmit(const CompressorShape& shape, const float* const* rows, const int64_t* index, int64_t emits,
                            const float* norm, const double* inv_freq, const KvRef* kv_out, uint8_t* const* key_out,
                            cudaStream_t stream = nullptr);

// ---- C4 indexer: scores and top-k ----
struct IndexerArgs {
  int64_t tokens = 0;
  int64_t heads = 0;           // index_n_heads
  int64_t dim = 0;             // index_head_dim
  int64_t topk = 0;            // index_topk
  const float* q = nullptr;    // [tokens, heads, dim] after RoPE and Hadamard
  const float* weights = nullptr;  // [tokens, heads], already scaled by dim^-0.5 * heads^-0.5
  // Token t sees keys[key_begin[t] .. key_begin[t] + visible[t]) (IndexerKeyBytes(dim) bytes each).
  const uint8_t* const* keys = nullptr;
  const int64_t* key_begin = nullptr;  // [tokens]
  const int32_t* visible = nullptr;    // [tokens]
  int32_t max_visible = 0;             // max over tokens (host-known bound, sizes the workspace)
  int32_t* selected = nullptr;         // [tokens, topk] out
};
// selected[t] <- indices (relative to key_begin[t]) of the top-k of score[j] = sum_h w[t,h] * relu(q[t,h] . K_j),
// ties to the smaller j, in descending score order; at most topk visible: 0..visible-1 in order (as the CPU
// forward, which takes every entry then); the rest of the row is -1. The workspace holds the f32 scores.
size_t IndexerWorkspaceBytes(int64_t tokens, int64_t max_visible);
absl::Status IndexerTopK(const IndexerArgs& args, void* workspace, size_t workspace_bytes, cudaStream_t stream = nullptr);

// ---- Sparse MQA over window + compressed entries with the sink ----
// How the DSV4 entry's products run on the tensor cores (other formats always run f32):
enum class AttentionMath {
  // f32-exact: q and the softmax probabilities enter the MMAs as three and two bf16 pieces (~1e-6 relative
  // to an f32 reference; five MMA passes).
  kF32,
  // q and the probabilities rounded to bf16 once (the reference model's q is bf16; FlashMLA feeds bf16 P),
  // f32 scores, softmax and accumulation: up to 2^-8 relative per weight (2^-9 typical), two MMA passes, and 64
  // heads a block from 8 tokens (SetWideAttentionMinTokens).
  kBf16,
};

struct SparseAttentionArgs {
  KvFormat format;
  int64_t tokens = 0;
  int64_t heads = 0;
  const float* q = nullptr;     // [tokens, heads, format.dim()]
  const float* sink = nullptr;  // [heads]: joins the softmax denominator only
  float scale = 1.0f;           // 1 / sqrt(head_dim)
  AttentionMath math = AttentionMath::kF32;
  // Window candidates of token t: window[window_begin[t] .. + window_count[t]).
  const KvRef* window = nullptr;
  const int64_t* window_begin = nullptr;
  const int32_t* window_count = nullptr;
  // Compressed candidates: when `selected` is null, compressed[compressed_begin[t] .. + compressed_count[t]);
  // else compressed[compressed_begin[t] + selected[t * topk + n]] for the entries >= 0 of that row.
  const KvRef* compressed = nullptr;  // may be null (ratio-0 layers)
  const int64_t* compressed_begin = nullptr;
  const int32_t* compressed_count = nullptr;
  const int32_t* selected = nullptr;
  int64_t topk = 0;
  float* o = nullptr;  // [tokens, heads, format.dim()]; values are the dequantized entries (keys = values)
  // Optional split-KV scratch (16-byte aligned, SparseAttentionWorkspaceBytes(args) bytes): when
  // tokens x head groups leave SMs idle, each token's candidates are spread over several blocks whose
  // partial softmax states a second kernel merges. Null (or too small for any split) runs unsplit.
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};
// o[t,h] = sum_k softmax_k(s) * v_k with s_k = (q[t,h] . v_k) * scale and exp(sink[h]) added to the
// denominator; no candidates gives 0.
absl::Status SparseAttention(const SparseAttentionArgs& args, cudaStream_t stream = nullptr);
// bf16 math with heads in 64s runs the 64-head kernel from this many tokens on (default 8), the 16-head one
// below: a decode batch of a few tokens has too few candidate tiles to spread 64-head blocks over the SMs.
// 0: always the 64-head kernel; INT64_MAX: never (process-wide; for A/B comparisons in tests and benchmarks;
// part of a decode step's CUDA graph signature).
void SetWideAttentionMinTokens(int64_t tokens);
int64_t WideAttentionMinTokens();
// The 64-head kernel on Hopper's warpgroup MMA (default on; it runs on compute capability 9.0 when its shared
// memory fits the selection, else the mma.sync form runs). Off: always the mma.sync form (process-wide; for
// A/B comparisons in tests and benchmarks; part of a decode step's CUDA graph signature).
void SetWgmmaAttention(bool on);
bool WgmmaAttention();
// The kernel SparseAttention runs for these args on the current device ("launch of <kernel>"; reads what
// SparseAttentionWorkspaceBytes reads): for tests that must know which path they measured.
const char* SparseAttentionKernelName(const SparseAttentionArgs& args);
// Workspace for the split that SparseAttention would choose for these args on the current device
// (0: no split pays). Reads only format, tokens, heads, math, compressed, selected and topk; the pointers may
// still be null. Grows with tokens x heads until the batch fills the device: at most ~9 MB on an H200.
size_t SparseAttentionWorkspaceBytes(const SparseAttentionArgs& args);

}  // namespace tandem::kernels::cuda
