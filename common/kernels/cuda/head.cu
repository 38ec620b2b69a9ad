// The output head on the GPU: hc_head (NUMERICS.md "Output and MTP", the same double-precision gates as the
// CPU's model::internal::HcHead), greedy argmax, the sampler's logit edits (penalties, logit_bias, masks) and
// the sampling rule of engine::RequestSampler::Sample.
// Sampling walks the logits in rank order (logit descending, ties to the smaller id) one chunk of
// kChunk ids at a time: a radix select over a 64-bit rank key finds each chunk, which is sorted in shared
// memory and consumed by one thread running the CPU's loops in the CPU's order (probabilities in double).
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>

#include "common/kernels/cuda/check.h"
#include "common/kernels/cuda/cuda_moe.h"

namespace tandem::kernels::cuda {
namespace {

// ---- hc_head: one block per token ----
constexpr int kHeadThreads = 256;
constexpr int kMaxStreams = 8;

__global__ void __launch_bounds__(kHeadThreads) HcHeadKernel(const float* fn, const float* base, const float* scale,
                                                             int streams, int64_t hidden, double hc_eps, double rms_eps,
                                                             const float* x, float* y) {
  __shared__ double warp_squares[kHeadThreads / 32];
  __shared__ float warp_mix[kHeadThreads / 32][kMaxStreams];
  __shared__ float pre[kMaxStreams];
  const int64_t token = blockIdx.x;
  const int64_t md = streams * hidden;
  const float* xt = x + token * md;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  double squares = 0.0;
  float mix[kMaxStreams] = {};
  for (int64_t i = threadIdx.x; i < md; i += kHeadThreads) {
    const float v = xt[i];
    squares += static_cast<double>(v) * v;
#pragma unroll
    for (int j = 0; j < kMaxStreams; ++j) {
      if (j < streams) mix[j] = fmaf(fn[j * md + i], v, mix[j]);
    }
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    squares += __shfl_xor_sync(0xffffffffu, squares, offset);
#pragma unroll
    for (int j = 0; j < kMaxStreams; ++j) mix[j] += __shfl_xor_sync(0xffffffffu, mix[j], offset);
  }
  if (lane == 0) {
    warp_squares[warp] = squares;
#pragma unroll
    for (int j = 0; j < kMaxStreams; ++j) warp_mix[warp][j] = mix[j];
  }
  __syncthreads();
  if (threadIdx.x < streams) {
    const int j = threadIdx.x;
    double sum = 0.0;
    float m = 0.0f;
    for (int w = 0; w < kHeadThreads / 32; ++w) {
      sum += warp_squares[w];
      m += warp_mix[w][j];
    }
    // As the CPU: r and the gate in double from the f32 mix, rounded to f32 once.
    const double r = 1.0 / sqrt(sum / static_cast<double>(md) + rms_eps);
    const double z = static_cast<double>(m) * r * static_cast<double>(scale[0]) + static_cast<double>(base[j]);
    pre[j] = static_cast<float>(1.0 / (1.0 + exp(-z)) + hc_eps);
  }
  __syncthreads();
  float* yt = y + token * hidden;
  for (int64_t d = threadIdx.x; d < hidden; d += kHeadThreads) {
    float acc = 0.0f;
    for (int j = 0; j < streams; ++j) acc = __fadd_rn(acc, __fmul_rn(pre[j], xt[j * hidden + d]));
    yt[d] = acc;
  }
}

// ---- Argmax: one block per row ----
constexpr int kArgmaxThreads = 512;

// (v, id) beats (best, best_id): NaN and the empty candidate (id < 0) never win; ties to the smaller id.
__device__ __forceinline__ bool Beats(float v, int id, float best, int best_id) {
  return id >= 0 && !isnan(v) && (best_id < 0 || v > best || (v == best && id < best_id));
}

// Block-wide argmax of logits[0, vocab); every thread gets the result (0 when every value is NaN).
__device__ int BlockArgmax(const float* logits, int64_t vocab, float* best_value) {
  __shared__ float warp_value[32];
  __shared__ int warp_id[32];
  float best = 0.0f;
  int best_id = -1;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = logits[i];
    if (Beats(v, static_cast<int>(i), best, best_id)) {
      best = v;
      best_id = static_cast<int>(i);
    }
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    const float v = __shfl_xor_sync(0xffffffffu, best, offset);
    const int id = __shfl_xor_sync(0xffffffffu, best_id, offset);
    if (Beats(v, id, best, best_id)) {
      best = v;
      best_id = id;
    }
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  __syncthreads();  // warp_value may still be read by a previous call
  if (lane == 0) {
    warp_value[warp] = best;
    warp_id[warp] = best_id;
  }
  __syncthreads();
  best = 0.0f;
  best_id = -1;
  for (int w = 0; w < warps; ++w) {
    if (Beats(warp_value[w], warp_id[w], best, best_id)) {
      best = warp_value[w];
      best_id = warp_id[w];
    }
  }
  if (best_value) *best_value = best;
  return best_id < 0 ? 0 : best_id;
}

__global__ void __launch_bounds__(kArgmaxThreads) ArgmaxKernel(const float* logits, int64_t vocab, int32_t* ids) {
  const int64_t row = blockIdx.x;
  const int id = BlockArgmax(logits + row * vocab, vocab, nullptr);
  if (threadIdx.x == 0) ids[row] = id;
}

// ---- Sampling: one block per row ----
__device__ __forceinline__ int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }
constexpr int kSampleThreads = 1024;
constexpr int kChunk = kSampleThreads;

// Rank key: larger = earlier. High word: the logit's order-preserving bits (-0 folded into +0, as the CPU's
// comparison sees them equal); low word: ~id (the smaller id first on ties). Distinct for distinct ids.
__device__ __forceinline__ uint64_t RankKey(float logit, int64_t id) {
  const uint32_t bits = __float_as_uint(logit + 0.0f);
  const uint32_t ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(ordered) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(id));
}
__device__ __forceinline__ int RankId(uint64_t key) { return static_cast<int>(~static_cast<uint32_t>(key)); }

struct SampleShared {
  uint64_t keys[kChunk];
  double probs[kChunk];
  int hist[256];
  int warp_counts[32];
  uint64_t prefix;
  int want;
  int filled;
};

// Fills s.keys[0, n) with the n = min(kChunk, limit) highest-ranked ids whose key is below `bound` (all
// ids when !bounded), sorted by rank; s.keys[n, kChunk) = 0. The caller guarantees >= n such ids.
__device__ void NextChunk(const float* logits, int64_t vocab, bool bounded, uint64_t bound, int n, SampleShared& s) {
  const int tid = threadIdx.x, lane = tid % 32;
  // MSB-first radix select of the n-th largest key below the bound, 8 bits at a time.
  if (tid == 0) {
    s.prefix = 0;
    s.want = n;
  }
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int b = tid; b < 256; b += kSampleThreads) s.hist[b] = 0;
    __syncthreads();
    const uint64_t prefix = s.prefix;
    const uint64_t high_mask = shift == 56 ? 0 : ~((uint64_t{1} << (shift + 8)) - 1);
    for (int64_t base = 0; base < vocab; base += kSampleThreads) {
      const int64_t i = base + tid;
      int bin = 256;
      if (i < vocab) {
        const uint64_t key = RankKey(logits[i], i);
        if ((!bounded || key < bound) && (key & high_mask) == prefix) bin = static_cast<int>((key >> shift) & 255);
      }
      // Lanes with the same bin add once (the top bins of float keys are crowded).
      const unsigned peers = __match_any_sync(0xffffffffu, bin);
      if (bin < 256 && lane == __ffs(peers) - 1) atomicAdd(&s.hist[bin], __popc(peers));
    }
    __syncthreads();
    if (tid < 32) {
      // Lane l owns bins 255-8l down to 248-8l; find the bin holding the want-th largest key.
      int counts[8], total = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        counts[j] = s.hist[255 - 8 * lane - j];
        total += counts[j];
      }
      int inclusive = total;
      for (int offset = 1; offset < 32; offset *= 2) {
        const int v = __shfl_up_sync(0xffffffffu, inclusive, offset);
        if (lane >= offset) inclusive += v;
      }
      const int want = s.want;
      const unsigned reached = __ballot_sync(0xffffffffu, inclusive >= want);
      const int owner = __ffs(reached) - 1;  // reached is never empty: the caller guarantees n ids
      __syncwarp();  // every lane has read s.want before the owner rewrites it
      if (lane == owner) {
        int before = inclusive - total;
        int bin = 0;
        for (int j = 0; j < 8; ++j) {
          if (before + counts[j] >= want) {
            bin = 255 - 8 * lane - j;
            break;
          }
          before += counts[j];
        }
        s.prefix = prefix | (static_cast<uint64_t>(bin) << shift);
        s.want = want - before;
      }
    }
    __syncthreads();
  }
  // s.prefix is now the n-th largest key: collect the keys in [prefix, bound), exactly n of them.
  const uint64_t threshold = s.prefix;
  if (tid == 0) s.filled = 0;
  s.keys[tid] = 0;
  __syncthreads();
  for (int64_t base = 0; base < vocab; base += kSampleThreads) {
    const int64_t i = base + tid;
    if (i < vocab) {
      const uint64_t key = RankKey(logits[i], i);
      if ((!bounded || key < bound) && key >= threshold) s.keys[atomicAdd(&s.filled, 1)] = key;
    }
  }
  // Bitonic sort, descending.
  for (int size = 2; size <= kChunk; size *= 2) {
    for (int stride = size / 2; stride > 0; stride /= 2) {
      __syncthreads();
      const int j = tid ^ stride;
      if (j > tid) {
        const uint64_t a = s.keys[tid], b = s.keys[j];
        const bool descending = (tid & size) == 0;
        if (descending ? a < b : a > b) {
          s.keys[tid] = b;
          s.keys[j] = a;
        }
      }
    }
  }
  __syncthreads();
}

__global__ void __launch_bounds__(kSampleThreads) SampleKernel(const float* logits_all, int64_t vocab,
                                                               const SampleRow* params, int32_t* ids) {
  __shared__ SampleShared s;
  __shared__ double shared_total[32];
  __shared__ double loop_state[2];  // cumulative mass, the walk's u
  __shared__ int64_t loop_kept;
  __shared__ int loop_done, loop_answer, last_kept_id;
  const int64_t row = blockIdx.x;
  const float* logits = logits_all + row * vocab;
  const SampleRow p = params[row];
  const int tid = threadIdx.x;
  float max_logit = 0.0f;
  const int top_id = BlockArgmax(logits, vocab, &max_logit);
  // RequestSampler's greedy rule (temperature ~0 or top_k 1).
  if (p.temperature < 1e-6 || p.top_k == 1) {
    if (tid == 0) ids[row] = top_id;
    return;
  }
  const double temperature = p.temperature;
  const double top = static_cast<double>(logits[top_id]) / temperature;
  double total = 0.0;
  for (int64_t i = tid; i < vocab; i += kSampleThreads) total += exp(static_cast<double>(logits[i]) / temperature - top);
  for (int offset = 16; offset > 0; offset /= 2) total += __shfl_xor_sync(0xffffffffu, total, offset);
  if (tid % 32 == 0) shared_total[tid / 32] = total;
  __syncthreads();
  total = 0.0;
  for (int w = 0; w < kSampleThreads / 32; ++w) total += shared_total[w];
  const int64_t keep_k = p.top_k > 0 ? Min64(p.top_k, vocab) : vocab;
  const double p0 = exp(static_cast<double>(logits[top_id]) / temperature - top) / total;

  // Pass 1: the CPU's keep loop (top_p on the mass before each id, min_p against the first) over the ranks.
  if (tid == 0) {
    loop_state[0] = 0.0;
    loop_kept = 0;
    loop_done = 0;
    last_kept_id = top_id;
  }
  __syncthreads();
  int64_t start = 0;
  uint64_t bound = 0;
  bool single_chunk = true;
  while (true) {
    const int n = static_cast<int>(Min64(kChunk, keep_k - start));
    NextChunk(logits, vocab, start > 0, bound, n, s);
    if (tid < n) {
      s.probs[tid] = exp(static_cast<double>(logits[RankId(s.keys[tid])]) / temperature - top) / total;
    }
    __syncthreads();
    if (tid == 0) {
      double cumulative = loop_state[0];
      int64_t kept = loop_kept;
      int done = 0;
      for (int i = 0; i < n; ++i) {
        const int64_t rank = start + i;
        const double prob = s.probs[i];
        if (rank > 0 && cumulative > static_cast<double>(p.top_p)) {
          done = 1;
          break;
        }
        if (prob < static_cast<double>(p.min_p) * p0) {
          done = 1;
          break;
        }
        cumulative += prob;
        kept = rank + 1;
        last_kept_id = RankId(s.keys[i]);
      }
      if (kept == 0) {  // min_p > 1 (the CPU rejects it): keep the first id
        kept = 1;
        cumulative = p0;
        last_kept_id = top_id;
      }
      loop_state[0] = cumulative;
      loop_kept = kept;
      loop_done = done || start + n >= keep_k;
    }
    __syncthreads();
    if (loop_done) break;
    single_chunk = false;
    bound = s.keys[n - 1];
    start += n;
    __syncthreads();
  }
  const int64_t kept = loop_kept;
  // Pass 2: the draw, u * mass minus each kept probability in rank order until it goes negative.
  if (tid == 0) {
    loop_state[1] = p.u * loop_state[0];
    loop_answer = -1;
  }
  __syncthreads();
  start = 0;
  while (true) {
    // Every thread reads loop_answer before thread 0 may write it below (racecheck caught the read of the
    // loop condition racing that write, which could also split the block at the next barrier).
    const bool stop = loop_answer >= 0 || start >= kept;
    __syncthreads();
    if (stop) break;
    const int n = static_cast<int>(Min64(kChunk, kept - start));
    if (!single_chunk) {
      NextChunk(logits, vocab, start > 0, bound, n, s);
      if (tid < n) {
        s.probs[tid] = exp(static_cast<double>(logits[RankId(s.keys[tid])]) / temperature - top) / total;
      }
      __syncthreads();
    }
    if (tid == 0) {
      double u = loop_state[1];
      for (int i = 0; i < n; ++i) {
        u -= s.probs[i];
        if (u < 0) {
          loop_answer = RankId(s.keys[i]);
          break;
        }
      }
      loop_state[1] = u;
    }
    __syncthreads();
    bound = s.keys[n - 1];  // read before the next chunk's keys land: the barrier at the loop's top
    start += n;
  }
  if (tid == 0) ids[row] = loop_answer >= 0 ? loop_answer : last_kept_id;
}

// ---- Logit edits: one thread per edit (explicit rounding: no contraction can change the CPU's result) ----
constexpr int kEditThreads = 256;

__global__ void __launch_bounds__(kEditThreads) LogitEditKernel(float* logits, int64_t rows, int64_t vocab,
                                                                const LogitEdit* edits, int64_t count) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kEditThreads + threadIdx.x;
  if (i >= count) return;
  const LogitEdit e = edits[i];
  if (e.row < 0 || e.row >= rows || e.token < 0 || e.token >= vocab) return;
  float& logit = logits[static_cast<int64_t>(e.row) * vocab + e.token];
  float l = logit;
  if (e.flags & kEditPenalize) {
    l = __fsub_rn(l, e.subtract);
    if (e.repetition != 1.0) {
      l = l < 0.0f ? __double2float_rn(__dmul_rn(static_cast<double>(l), e.repetition))
                   : __double2float_rn(__ddiv_rn(static_cast<double>(l), e.repetition));
    }
  }
  if (e.flags & kEditBias) l = __fadd_rn(l, e.bias);
  if (e.flags & kEditMask) l = -INFINITY;
  logit = l;
}

}  // namespace

absl::Status HcHead(const float* fn, const float* base, const float* scale, int64_t streams, int64_t hidden,
                    double hc_eps, double rms_eps, const float* x, int64_t tokens, float* y, cudaStream_t stream) {
  if (streams < 1 || streams > kMaxStreams || hidden < 1 || tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("HcHead: need 1 <= streams <= ", kMaxStreams,
                                                   ", hidden >= 1, tokens >= 0; got ", streams, ", ", hidden, ", ",
                                                   tokens));
  }
  if (tokens == 0) return absl::OkStatus();
  if (tokens > 0x7fffffff) return absl::InvalidArgumentError("HcHead: too many tokens");
  if (!fn || !base || !scale || !x || !y) return absl::InvalidArgumentError("HcHead: null pointer");
  HcHeadKernel<<<static_cast<unsigned>(tokens), kHeadThreads, 0, stream>>>(fn, base, scale, static_cast<int>(streams),
                                                                          hidden, hc_eps, rms_eps, x, y);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("HcHeadKernel");
  return absl::OkStatus();
}

absl::Status ArgmaxRows(const float* logits, int64_t rows, int64_t vocab, int32_t* ids, cudaStream_t stream) {
  if (rows < 0 || vocab < 1 || vocab > INT_MAX) return absl::InvalidArgumentError("ArgmaxRows: bad rows or vocab");
  if (rows == 0) return absl::OkStatus();
  if (rows > 0x7fffffff) return absl::InvalidArgumentError("ArgmaxRows: too many rows");
  if (!logits || !ids) return absl::InvalidArgumentError("ArgmaxRows: null pointer");
  ArgmaxKernel<<<static_cast<unsigned>(rows), kArgmaxThreads, 0, stream>>>(logits, vocab, ids);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("ArgmaxKernel");
  return absl::OkStatus();
}

size_t SampleWorkspaceBytes(int64_t, int64_t) { return 0; }

absl::Status SampleRows(const float* logits, int64_t rows, int64_t vocab, const SampleRow* params, int32_t* ids,
                        void*, size_t, cudaStream_t stream) {
  if (rows < 0 || vocab < 1 || vocab > INT_MAX) return absl::InvalidArgumentError("SampleRows: bad rows or vocab");
  if (rows == 0) return absl::OkStatus();
  if (rows > 0x7fffffff) return absl::InvalidArgumentError("SampleRows: too many rows");
  if (!logits || !params || !ids) return absl::InvalidArgumentError("SampleRows: null pointer");
  SampleKernel<<<static_cast<unsigned>(rows), kSampleThreads, 0, stream>>>(logits, vocab, params, ids);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("SampleKernel");
  return absl::OkStatus();
}

absl::Status ApplyLogitEdits(float* logits, int64_t rows, int64_t vocab, const LogitEdit* edits, int64_t count,
                             cudaStream_t stream) {
  if (rows < 0 || vocab < 1 || vocab > INT_MAX || count < 0) {
    return absl::InvalidArgumentError("ApplyLogitEdits: bad rows, vocab or count");
  }
  if (count == 0 || rows == 0) return absl::OkStatus();
  if (!logits || !edits) return absl::InvalidArgumentError("ApplyLogitEdits: null pointer");
  const int64_t blocks = (count + kEditThreads - 1) / kEditThreads;
  if (blocks > 0x7fffffff) return absl::InvalidArgumentError("ApplyLogitEdits: too many edits");
  LogitEditKernel<<<static_cast<unsigned>(blocks), kEditThreads, 0, stream>>>(logits, rows, vocab, edits, count);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("LogitEditKernel");
  return absl::OkStatus();
}

}  // namespace tandem::kernels::cuda
