// The CUDA implementations of the kernels.h ops (device code lives only in this folder). Every entry point
// takes device pointers and a stream, launches asynchronously and returns the launch's status; the
// parity tests in tests/gpu compare each with its CPU op.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include "common/core/status.h"
#include "common/kernels/kernels.h"

struct cublasLtContext;

namespace tandem::kernels::cuda {

// OK when this build has CUDA and a device is visible; otherwise says why.
absl::Status DeviceAvailable();

// ---- Cache formats ----
// Quantizes `count` KV vectors x [count, format.dim()] f32 into entries laid out as the CPU's
// QuantizeKvEntry writes them ([data | scales] per entry, format.entry_bytes() apart).
absl::Status QuantizeKvEntries(const KvFormat& format, const float* x, int64_t count, uint8_t* entries,
                               cudaStream_t stream = nullptr);

// ---- Norms and rotary embedding (f32 activations, as the CPU forward) ----
// y = x / sqrt(mean(x^2) + eps) * weight over `rows` rows of `dim`; weight may be null. In place is allowed.
absl::Status RmsNorm(const float* x, int64_t rows, int64_t dim, const float* weight, float eps, float* y,
                     cudaStream_t stream = nullptr);

// kernels::ApplyRope on the device: positions [rows] int64, inv_freq [rope_dim/2] double (the CPU's
// table, e.g. model::RopeInverseFrequencies), angles in double.
absl::Status ApplyRope(float* x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_stride, int64_t offset,
                       int64_t rope_dim, const int64_t* positions, const double* inv_freq, bool inverse,
                       cudaStream_t stream = nullptr);

// ---- mHC (dsv4-model.md §2.2, NUMERICS.md) ----
struct MhcShape {
  int64_t streams = 4;  // hc_mult; the kernels support 4
  int64_t hidden = 0;   // D; streams * hidden must be a multiple of 64
  int64_t sinkhorn_iters = 20;
  double hc_eps = 1e-6;
  double rms_norm_eps = 1e-6;
};
// Device pointers to one sublayer's parameters: fn [(2+M)*M, M*D], base [(2+M)*M], scale [3].
struct MhcParams {
  const float* fn = nullptr;
  const float* base = nullptr;
  const float* scale = nullptr;
};
// Scratch HcPre needs for `tokens` tokens (partial projections of the split reduction).
size_t HcPreWorkspaceBytes(const MhcShape& shape, int64_t tokens);
// x [T, M*D] -> y [T, D] (the weighted stream sum), post [T, M], comb [T, M, M] (Sinkhorn-projected).
absl::Status HcPre(const MhcShape& shape, const MhcParams& params, const float* x, int64_t tokens, float* y,
                   float* post, float* comb, void* workspace, size_t workspace_bytes, cudaStream_t stream = nullptr);
// x [T, M*D] <- post * out + comb^T x, in place (out [T, D]).
absl::Status HcPost(const MhcShape& shape, const float* out, const float* post, const float* comb, int64_t tokens,
                    float* x, cudaStream_t stream = nullptr);

// ---- Linear layers: block-FP8 weights dequantized to bf16, GEMMs through cuBLASLt ----
// y[i] = bf16(x[i]), round to nearest even.
absl::Status FloatToBf16(const float* x, int64_t count, __nv_bfloat16* y, cudaStream_t stream = nullptr);
// x [count] = hi + lo with hi = bf16(x) and lo = bf16(x - hi) (together ~16 significant bits).
absl::Status FloatToBf16Split(const float* x, int64_t count, __nv_bfloat16* hi, __nv_bfloat16* lo,
                              cudaStream_t stream = nullptr);
// y [rows, out] = halves[:rows] + halves[rows:] (halves [2 * rows, out]).
absl::Status AddRowHalves(const float* halves, int64_t rows, int64_t out, float* y, cudaStream_t stream = nullptr);
// Device view of a block-FP8 weight: codes [out, in] e4m3, scales [ceil(out/128), ceil(in/128)] ue8m0.
struct Fp8BlockWeight {
  const uint8_t* codes = nullptr;
  const uint8_t* scales = nullptr;
  int64_t out = 0;
  int64_t in = 0;
};
// dst [out, in] = code * 2^(scale - 127) in bf16 (exact: e4m3 times a power of two fits bf16).
absl::Status DequantizeFp8Block(const Fp8BlockWeight& weight, __nv_bfloat16* dst, cudaStream_t stream = nullptr);

// A cuBLASLt handle, its workspace and one cached plan per GEMM shape (the first call of a shape tunes it:
// call it once outside graph capture). Not thread-safe: one per stream.
// tune = false at Create: no shape is ever timed; each takes cuBLASLt's first heuristic candidate for its
// (shape, alignment), so two Gemm objects (two models, two processes) run the same algorithm and round the
// same way. Timed picks can differ between objects (a split-K or a different tile: another summation order).
class Gemm {
 public:
  enum class Output { kF32, kBf16 };
  static constexpr size_t kDefaultWorkspaceBytes = size_t{32} << 20;
  static absl::StatusOr<std::unique_ptr<Gemm>> Create(size_t workspace_bytes = kDefaultWorkspaceBytes,
                                                      bool tune = true);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  // y[rows, out] = x[rows, in] · w[out, in]^T with bf16 x and w, f32 accumulation, y in `output` type.
  // tune = false plans a new shape from cuBLASLt's heuristic alone (no timing, no sync): for shapes that
  // change call to call (grouped expert row blocks), where timing each new row count costs more than it gains.
  // Plans are also keyed by the pointers' alignment (up to 256 bytes), so offset pointers get a valid algorithm.
  // accumulate: y += x · w^T (f32 output only; never tunes, since timing candidates overwrites y).
  absl::Status Linear(const __nv_bfloat16* x, int64_t rows, int64_t in, const __nv_bfloat16* weight, int64_t out,
                      void* y, Output output, cudaStream_t stream = nullptr, bool tune = true, bool accumulate = false);
  // f32 x through bf16 tensor cores at ~16-bit activation precision: x = hi + lo (FloatToBf16Split) and
  // y = hi · w^T + lo · w^T in f32. Up to kSplitStackRows rows, hi and lo go through one GEMM of 2 * rows
  // (the weight is read once: as fast as one bf16 GEMM while the weight read dominates) and AddRowHalves;
  // above, the lo GEMM accumulates into y. Scratch: xb [SplitScratchElements(rows, in)] bf16; yb
  // [2 * rows * out] f32 when rows <= kSplitStackRows (may be null above).
  static int64_t SplitScratchElements(int64_t rows, int64_t in) { return 2 * rows * in + 128; }
  static constexpr int64_t kSplitStackRows = 96;
  absl::Status LinearSplit(const float* x, int64_t rows, int64_t in, const __nv_bfloat16* weight, int64_t out, float* y,
                           __nv_bfloat16* xb, float* yb, cudaStream_t stream = nullptr);
  // `batch` GEMMs in one call (bf16 in, f32 out): for b < batch, y_b[rows, out] = x_b[rows, in] . w_b[out, in]^T
  // with x_b = x + b * x_stride (rows ldx elements apart), w_b = weight + b * w_stride (dense rows of in),
  // y_b = y + b * y_stride (rows ldy apart). E.g. a grouped projection over column blocks of one activation.
  absl::Status LinearBatched(const __nv_bfloat16* x, int64_t rows, int64_t in, int64_t ldx, int64_t x_stride,
                             const __nv_bfloat16* weight, int64_t out, int64_t w_stride, float* y, int64_t ldy,
                             int64_t y_stride, int64_t batch, cudaStream_t stream = nullptr);
  // The same with f32 x, w and y and f32 arithmetic (no TF32): for the small, precision-sensitive
  // projections (router gates, indexer weights) and for exact-parity runs.
  absl::Status LinearF32(const float* x, int64_t rows, int64_t in, const float* weight, int64_t out, float* y,
                         cudaStream_t stream = nullptr);

 private:
  struct Plan;
  Gemm() = default;
  // Builds (on first use of a shape) the plan; picks the fastest of cuBLASLt's candidates by timing them
  // on these buffers when `tune` and `stream` is not being captured into a graph. An untuned plan is
  // replaced by a tuned one the first time a caller asks for tuning.
  absl::StatusOr<const Plan*> PlanFor(bool f32_inputs, const void* x, int64_t rows, int64_t in, const void* weight,
                                      int64_t out, void* y, Output output, cudaStream_t stream, bool tune);
  // The descriptor every plan shares (f32 compute, A transposed).
  static absl::Status Describe(Plan* plan);
  // Picks the plan's algorithm for its layouts: cuBLASLt's candidates, timed on these buffers when `tune`.
  absl::Status Select(Plan* plan, uint32_t alignment, const void* x, const void* weight, void* y, cudaStream_t stream,
                      bool tune, const std::string& what);

  cublasLtContext* handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  bool tune_ = true;  // Create's tune: false overrides every call's
  // (rows, in, out, output, f32 inputs, pointer alignment in bytes)
  std::map<std::tuple<int64_t, int64_t, int64_t, int, bool, uint32_t>, std::unique_ptr<Plan>> plans_;
  // (rows, in, out, ldx, x_stride, w_stride, ldy, y_stride, batch, alignment)
  std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, uint32_t>,
           std::unique_ptr<Plan>>
      batched_plans_;
};

// ---- Random inputs for tests and benchmarks (reproducible per seed) ----
// x[i] uniform in [lo, hi).
absl::Status FillUniform(float* x, int64_t count, uint64_t seed, float lo, float hi, cudaStream_t stream = nullptr);
// Uniform finite e4m3 codes (never the NaN codes 0x7f / 0xff).
absl::Status FillFp8Codes(uint8_t* codes, int64_t count, uint64_t seed, cudaStream_t stream = nullptr);

// ---- A benchmark probe: how fast DRAM serves a weight-streaming access pattern ----
// Reads all of `buffer` (`bytes` a multiple of kStreamUnitBytes: units of 256 rows of 2 KB, one MXFP4 expert
// row of 4096 inputs each) with 2 blocks of 8 warps a SM, each warp 32 rows of a unit, every lane's next
// loads issued one step before it folds the current ones. *sink (a word the caller owns) is XORed with the
// XOR over all 16-byte pieces (words x, y, z, w) of x + 3y + 5z + 7w, the same for every pattern when each
// piece is read once. The patterns differ only in which 16-byte pieces a warp asks for together:
//   kQuad64:   a quad of lanes reads 64 contiguous bytes of one row a step, 8 rows an instruction, 32 rows a
//              step (the decode expert unit's loads with 4 row tiles a warp);
//   kQuad64x2: the same loads, the quad's two of a step 128 contiguous bytes of its row (2 row tiles x 2 K
//              slices: the unit's loads since then);
//   kHalf256:  16 lanes a row, 256 contiguous bytes a row an instruction;
//   kSequential: each warp reads its 64 KB in address order.
enum class StreamPattern { kQuad64, kQuad64x2, kHalf256, kSequential };
constexpr StreamPattern kStreamPatterns[] = {StreamPattern::kQuad64, StreamPattern::kQuad64x2, StreamPattern::kHalf256,
                                             StreamPattern::kSequential};
constexpr size_t kStreamUnitBytes = size_t{256} * 2048;
absl::Status StreamRead(StreamPattern pattern, const uint8_t* buffer, size_t bytes, uint32_t* sink,
                        cudaStream_t stream = nullptr);
const char* StreamPatternName(StreamPattern pattern);

}  // namespace tandem::kernels::cuda
