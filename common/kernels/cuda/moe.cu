// MoE on the GPU (NUMERICS.md "MoE"): routing, grouping (token, slot) pairs by expert, grouped expert GEMMs
// that dequantize MXFP4 / block-FP8 weights on the fly, the clamped SwiGLU and the weighted combine.
// Routing scores are double like the CPU; GEMMs are f32 with f32 accumulation (only the summation order
// differs from the CPU), except the MXFP4 experts with at most 8 rows, which run on tensor cores with x as a
// bf16 hi + lo pair (|x - hi - lo| <= 2^-16 |x|). e2m1 / e4m3 codes become f32 by placing their bits at the bottom of an f32
// exponent (a subnormal for the codes' own subnormals) and one exact multiply by 2^126 / 2^120: this needs
// f32 denormals, so this file must not be built with -ftz=true or --use_fast_math.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <climits>
#include <utility>

#include "common/kernels/cuda/attention_device.cuh"
#include "common/kernels/cuda/check.h"
#include "common/kernels/cuda/cuda_moe.h"

namespace tandem::kernels::cuda {
namespace {

// ---- Routing: one warp per token ----
constexpr int kRouteWarps = 4;
constexpr int kMaxK = 32;

__device__ double SqrtSoftplus(double v) { return sqrt(v > 20.0 ? v : log1p(exp(v))); }

__global__ void MoeRouteKernel(MoeRouteArgs args) {
  extern __shared__ double route_keys[];  // [kRouteWarps][E]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kRouteWarps + warp;
  if (token >= args.tokens) return;  // no block-wide barrier below
  const int64_t E = args.experts, k = args.k;
  const float* logits = args.logits + token * E;
  int32_t* chosen = args.chosen + token * k;
  float* weights = args.weights + token * k;
  int32_t ids[kMaxK];
  if (args.tid2eid) {
    if (lane != 0) return;
    const int32_t* row = args.tid2eid + static_cast<int64_t>(args.token_ids[token]) * k;
    for (int64_t i = 0; i < k; ++i) ids[i] = row[i];
  } else {
    double* keys = route_keys + warp * E;
    // NaN scores rank below every number but above the experts already taken (-inf).
    for (int64_t e = lane; e < E; e += 32) {
      const double key = SqrtSoftplus(logits[e]) + static_cast<double>(args.bias[e]);
      keys[e] = isnan(key) ? -DBL_MAX : key;
    }
    __syncwarp();
    for (int64_t i = 0; i < k; ++i) {
      // Each lane scans its experts in increasing id (strict > keeps the smaller id), then a butterfly
      // merge with ties to the smaller id: every lane ends with the same winner.
      double best = -INFINITY;
      int best_id = INT_MAX;
      for (int64_t e = lane; e < E; e += 32) {
        const double v = keys[e];
        if (v > best) {
          best = v;
          best_id = static_cast<int>(e);
        }
      }
      for (int offset = 16; offset > 0; offset /= 2) {
        const double other = __shfl_xor_sync(0xffffffffu, best, offset);
        const int other_id = __shfl_xor_sync(0xffffffffu, best_id, offset);
        if (other > best || (other == best && other_id < best_id)) {
          best = other;
          best_id = other_id;
        }
      }
      ids[i] = best_id;
      __syncwarp();
      if (lane == 0) keys[best_id] = -INFINITY;
      __syncwarp();
    }
    if (lane != 0) return;
  }
  // Same operations and order as the CPU: s in double, sum over the slots in order, one rounding at the end.
  double sum = 0.0;
  for (int64_t i = 0; i < k; ++i) sum += SqrtSoftplus(logits[ids[i]]);
  for (int64_t i = 0; i < k; ++i) {
    chosen[i] = ids[i];
    weights[i] = static_cast<float>(SqrtSoftplus(logits[ids[i]]) / sum * static_cast<double>(args.routed_scaling));
  }
}

// ---- Grouping: each warp owns a unit of kGroupUnit consecutive pairs ----
constexpr int kGroupWarps = 4;
constexpr int64_t kGroupUnit = 512;
constexpr int64_t kMaxGroupExperts = 2048;

__host__ __device__ inline int64_t GroupUnits(int64_t pairs) { return (pairs + kGroupUnit - 1) / kGroupUnit; }

// kScatter = false: unit_counts[unit][e] = pairs of the unit routed to e. kScatter = true: unit_counts holds
// the exclusive prefix over units; each pair gets offsets[e] + prefix + its rank among the unit's earlier
// pairs of e (warp steps of 32 in pair order, ranks inside a step by lane): stable.
template <bool kScatter>
__global__ void MoeGroupUnitKernel(const int32_t* chosen, int64_t pairs, int64_t k, int64_t experts,
                                   int32_t* unit_counts, const int64_t* offsets, int32_t* rows, int32_t* position) {
  extern __shared__ int32_t group_running[];  // [kGroupWarps][E]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * kGroupWarps + warp;
  const int64_t units = GroupUnits(pairs);
  if (unit >= units) return;  // no block-wide barrier below
  int32_t* running = group_running + warp * experts;
  for (int64_t e = lane; e < experts; e += 32) {
    running[e] = kScatter ? static_cast<int32_t>(offsets[e]) + unit_counts[unit * experts + e] : 0;
  }
  __syncwarp();
  const int64_t begin = unit * kGroupUnit, end = min(pairs, begin + kGroupUnit);
  for (int64_t base = begin; base < end; base += 32) {
    const int64_t p = base + lane;
    const bool valid = p < end;
    const int e = valid ? chosen[p] : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int leader = __ffs(peers) - 1;
    if (kScatter && valid) {
      const int pos = running[e] + __popc(peers & ((1u << lane) - 1u));
      rows[pos] = static_cast<int32_t>(p / k);
      position[p] = pos;
    }
    __syncwarp();
    if (valid && lane == leader) running[e] += __popc(peers);
    __syncwarp();
  }
  if (!kScatter) {
    for (int64_t e = lane; e < experts; e += 32) unit_counts[unit * experts + e] = running[e];
  }
}

constexpr int kScanThreads = 1024;
constexpr int kScanPerThread = kMaxGroupExperts / kScanThreads;  // 2

// One block: per expert an exclusive scan over units (in place), then offsets = exclusive scan of the totals.
__global__ void __launch_bounds__(kScanThreads) MoeGroupScanKernel(int32_t* unit_counts, int64_t units, int64_t experts,
                                                                   int64_t pairs, int64_t* offsets) {
  __shared__ int64_t warp_sums[kScanThreads / 32];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  int64_t totals[kScanPerThread];
  int64_t mine = 0;
#pragma unroll
  for (int j = 0; j < kScanPerThread; ++j) {
    const int64_t e = static_cast<int64_t>(tid) * kScanPerThread + j;
    totals[j] = 0;
    if (e < experts) {
      int32_t run = 0;
      for (int64_t u = 0; u < units; ++u) {
        const int32_t c = unit_counts[u * experts + e];
        unit_counts[u * experts + e] = run;
        run += c;
      }
      totals[j] = run;
    }
    mine += totals[j];
  }
  int64_t inclusive = mine;
  for (int offset = 1; offset < 32; offset *= 2) {
    const int64_t v = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += v;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  int64_t base = inclusive - mine;
  for (int w = 0; w < warp; ++w) base += warp_sums[w];
#pragma unroll
  for (int j = 0; j < kScanPerThread; ++j) {
    const int64_t e = static_cast<int64_t>(tid) * kScanPerThread + j;
    if (e < experts) offsets[e] = base;
    base += totals[j];
  }
  if (tid == 0) offsets[experts] = pairs;
}

// ---- Elementwise ----
__device__ __forceinline__ float SwiGluOne(float a, float b, float limit) {
  // std::min / std::clamp semantics (a NaN input stays NaN), then silu(g) * u as the CPU writes it.
  const float g = limit < a ? limit : a;
  const float u = b < -limit ? -limit : (limit < b ? limit : b);
  return g / (1.0f + expf(-g)) * u;
}

__global__ void SwiGluKernel(const float* a, const float* b, int64_t count, float limit, bool vector, float* h) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vector) {
    const int64_t vectors = count / 4;
    for (int64_t i = first; i < vectors; i += stride) {
      const float4 va = reinterpret_cast<const float4*>(a)[i], vb = reinterpret_cast<const float4*>(b)[i];
      reinterpret_cast<float4*>(h)[i] = make_float4(SwiGluOne(va.x, vb.x, limit), SwiGluOne(va.y, vb.y, limit),
                                                    SwiGluOne(va.z, vb.z, limit), SwiGluOne(va.w, vb.w, limit));
    }
    done = 4 * vectors;
  }
  for (int64_t i = done + first; i < count; i += stride) h[i] = SwiGluOne(a[i], b[i], limit);
}

// ---- Grouped linear ----
// A persistent grid (one wave): every block reads the expert offsets, cuts the work of the experts that have
// rows into equal contiguous shares (one per block) and walks its share in order, so no block waits on an
// empty expert and the x rows a block stages in shared memory serve all its consecutive units of that group.
// Units: GEMV (an expert with at most kGemvMaxRows rows): one group of <= 4 rows against 128 weight rows
// (64 outputs of each of W1 and W3 when fused), all of K, x of the group staged whole in shared memory;
// tiled (more rows): 64 rows x 64 outputs, all of K.
constexpr int kLinearThreads = 256;
constexpr int kLinearWarps = kLinearThreads / 32;
constexpr int kGroupRows = 4;         // x rows per GEMV unit
constexpr int64_t kGemvMaxRows = 32;  // experts with more rows take the tiled path
constexpr int kLaneRows = 4;          // weight rows per lane
constexpr int kRowLanes = 8;          // lanes splitting one weight row's K (16-byte loads, 128 B per row and step)
constexpr int kUnitRows = kLinearWarps * (32 / kRowLanes) * kLaneRows;  // 128 weight rows per GEMV unit
constexpr int64_t kTiledUnitWeight = 8;  // a tiled unit's cost in GEMV units, for the shares
constexpr int kTileRows = 64, kTileOut = 64, kTileK = 64, kTileLd = kTileK + 4;
constexpr size_t kTiledSmemBytes = 2 * kTileRows * kTileLd * sizeof(float);
constexpr size_t kGemvSmemLimit = 96 * 1024;  // x of a group (16 * in bytes) up to this: two blocks per SM

using Format = QuantizedWeight::Format;

struct MatrixArgs {
  const uint8_t* const* codes;
  const uint8_t* const* scales;
};

// M = 1: y = x . W^T. M = 2: h = SwiGlu(x . W1^T, x . W3^T).
template <int M>
struct LinearArgs {
  MatrixArgs m[M];
  int64_t experts, out, in;
  const float* x;
  const int32_t* gather;
  const int64_t* offsets;
  float* y;
  float limit;
  bool gemv;  // a group's x fits the shared memory (else every unit is tiled)
  bool mma;   // MXFP4 experts with up to kMmaMaxRows rows take the tensor-core unit
  int64_t smem_bytes;  // the dynamic shared memory of the launch
};

// 2^(bits - 127) as an f32 (bits 0 is the subnormal 2^-127, 255 is NaN), as the CPU's Ue8m0ToFloat.
__device__ __forceinline__ float Ue8m0(uint32_t bits) {
  if (bits == 0) return __uint_as_float(0x00400000u);
  if (bits == 255) return __uint_as_float(0x7fc00000u);
  return __uint_as_float(bits << 23);
}

__device__ __forceinline__ uint32_t Prmt(uint32_t a, uint32_t b, uint32_t selector) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(selector));
  return d;
}

// The 4 e2m1 codes in bits [16h, 16h + 16) of w as exact f32 values (unscaled), without a multiply: byte
// lookups (prmt) give the two bytes of each value's bf16 (0, .5, 1, 1.5, 2, 3, 4, 6 are 0x0000 0x3F00 0x3F80
// 0x3FC0 0x4000 0x4040 0x4080 0x40C0); a prmt in sign mode on 0x80 bytes gives 0xFF for negative codes, whose
// bit 6 becomes the sign. About 2.6 integer ops per value. Checked against all codes on the CPU.
// E2m1Bf16Quad: the same four values as two bf16x2 words (values 0, 1 and 2, 3; the lower value in the low
// half), as the tensor-core units feed them to mma.
template <int h>
__device__ __forceinline__ uint2 E2m1Bf16Quad(uint32_t w) {
  const uint32_t codes = h == 0 ? w : w >> 16;
  const uint32_t magnitude = codes & 0x7777u;
  uint32_t top = Prmt(0x3F3F3F00u, 0x40404040u, magnitude);
  const uint32_t second = Prmt(0xC0800000u, 0xC0804000u, magnitude);
  top |= (Prmt(0x80808080u, 0x80808080u, codes) << 1) & 0x80808080u;  // prmt reads selector bits 0..15
  return make_uint2(Prmt(top, second, 0x1504u), Prmt(top, second, 0x3726u));
}
template <int h>
__device__ __forceinline__ float4 E2m1Quad(uint32_t w) {
  const uint2 v = E2m1Bf16Quad<h>(w);
  return make_float4(__uint_as_float(v.x << 16), __uint_as_float(v.x & 0xFFFF0000u), __uint_as_float(v.y << 16),
                     __uint_as_float(v.y & 0xFFFF0000u));
}

// e4m3 byte `n` (0..3) of word w times 2^-120 (sign to bit 31, e3..e0 m2..m0 to bits 26..20): a subnormal
// for the code's own subnormals, so f32 denormals must be on. NaN codes read as +-480 (checkpoints hold none).
template <int n>
__device__ __forceinline__ float E4m3Raw(uint32_t w) {
  const uint32_t sign = (w << (24 - 8 * n)) & 0x80000000u;
  const uint32_t magnitude = (8 * n <= 20 ? (w << (20 - 8 * n)) : (w >> (8 * n - 20))) & 0x07f00000u;
  return __uint_as_float(sign | magnitude);
}

__device__ __forceinline__ uint32_t Word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// The 4 values of float4 piece `j` of a 16-byte code load, exact e2m1/e4m3 values (not yet scaled).
template <Format F, int j>
__device__ __forceinline__ float4 Piece(const uint4& codes) {
  if constexpr (F == Format::kMxfp4) {
    return E2m1Quad<j % 2>(Word(codes, j / 2));
  } else {
    const uint32_t w = Word(codes, j);
    return make_float4(E4m3Raw<0>(w) * 0x1p120f, E4m3Raw<1>(w) * 0x1p120f, E4m3Raw<2>(w) * 0x1p120f,
                       E4m3Raw<3>(w) * 0x1p120f);
  }
}

// Values per 16-byte code load: one MXFP4 scale group, or 16 FP8 codes inside one 128-wide scale block.
template <Format F>
constexpr int kValuesPerLoad = F == Format::kMxfp4 ? 32 : 16;

// Weight codes are read once: no L1 allocation. kL2Hint adds .L2::256B (L2 fetches the 256 bytes around the
// address): the GEMV's 128-byte row steps keep it (not measured without); the tensor-core unit's 64-byte steps
// along each row read ~1.6x the bytes from DRAM with it (ncu, flash w1/w3 at 64 tokens: 2.97 GB instead of
// 1.85 GB) and go without.
template <bool kL2Hint>
__device__ __forceinline__ uint4 LoadOnce(const uint8_t* p) {
  uint4 v;
  if constexpr (kL2Hint) {
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  } else {
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  }
  return v;
}

// Code bytes and scale of the 16-byte load covering inputs [k, k + kValuesPerLoad) of weight row o.
template <Format F>
__device__ __forceinline__ void LoadCodes(const uint8_t* codes, const uint8_t* scales, int64_t in, int64_t o,
                                          int64_t k, uint4* v, float* scale) {
  if constexpr (F == Format::kMxfp4) {
    *v = LoadOnce<true>(codes + o * (in / 2) + k / 2);
    *scale = Ue8m0(__ldg(scales + o * (in / 32) + k / 32));
  } else {
    const int64_t block_cols = (in + 127) / 128;
    *v = LoadOnce<true>(codes + o * in + k);
    *scale = Ue8m0(__ldg(scales + (o / 128) * block_cols + k / 128));
  }
}

// fn(std::integral_constant<int, j>{}) for j = 0 .. N-1, unrolled (the code pieces need j at compile time).
template <typename Fn, int... js>
__device__ __forceinline__ void StaticForImpl(Fn& fn, std::integer_sequence<int, js...>) {
  (fn(std::integral_constant<int, js>{}), ...);
}
template <int N, typename Fn>
__device__ __forceinline__ void StaticFor(Fn&& fn) {
  StaticForImpl(fn, std::make_integer_sequence<int, N>{});
}

__device__ __forceinline__ float Dot4(const float4& a, const float4& b, float acc) {
  acc = fmaf(a.x, b.x, acc);
  acc = fmaf(a.y, b.y, acc);
  acc = fmaf(a.z, b.z, acc);
  return fmaf(a.w, b.w, acc);
}

// Staged x is an array of float4 per row; index q is stored at q ^ ((q / 8) % (pieces per load)) so the 8
// distinct addresses a warp reads at once (its 8 K positions; the 4 row slots read the same ones) hit
// distinct banks.
template <Format F>
__device__ __forceinline__ int64_t Swizzle(int64_t q) {
  return q ^ ((q >> 3) & (kValuesPerLoad<F> / 4 - 1));
}

// x rows [row0, row0 + rows) of the grouped order (through gather), all of K, into shared memory.
template <Format F, int M>
__device__ void StageRows(const LinearArgs<M>& a, int64_t row0, int rows, float4* xs) {
  const int64_t in4 = a.in / 4;
  for (int r = 0; r < rows; ++r) {
    const int64_t grouped = row0 + r;
    const float4* src = reinterpret_cast<const float4*>(a.x + (a.gather ? a.gather[grouped] : grouped) * a.in);
    for (int64_t q = threadIdx.x; q < in4; q += kLinearThreads) xs[r * in4 + Swizzle<F>(q)] = __ldg(src + q);
  }
}

// One GEMV unit: R staged rows (grouped rows y_row0..) against the 128 weight rows from o_unit. Lane
// (warp, slot = lane / 8, sub = lane % 8) owns 4 weight rows (4 consecutive outputs; fused: 2 outputs of W1
// and the same 2 of W3) and inputs sub * V + 8V * step: each step one 16-byte load per row (the next step's
// in flight while this one is multiplied), dequantized in registers and multiplied into every x row; each
// load's values share one scale, applied once to their partial sums. The 8 lanes of a row are summed last.
template <Format F, int M, int R>
__device__ void GemvUnit(const LinearArgs<M>& a, int64_t expert, int64_t o_unit, const float4* xs, int64_t y_row0) {
  constexpr int V = kValuesPerLoad<F>;
  constexpr int P = V / 4;
  constexpr int kStep = kRowLanes * V;
  constexpr int kOutputs = kLaneRows / M;  // outputs per lane (per matrix)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, slot = lane / kRowLanes, sub = lane % kRowLanes;
  const int64_t o_first = o_unit + (warp * (32 / kRowLanes) + slot) * kOutputs;
  const int64_t in = a.in, in4 = in / 4;
  const uint8_t* codes[M];
  const uint8_t* scales[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    codes[m] = a.m[m].codes[expert];
    scales[m] = a.m[m].scales[expert];
  }
  uint4 w_next[kLaneRows];
  float scale_next[kLaneRows];
  auto load = [&](int64_t k) {
#pragma unroll
    for (int i = 0; i < kLaneRows; ++i) {
      const int64_t o = o_first + i % kOutputs;
      w_next[i] = make_uint4(0u, 0u, 0u, 0u);
      scale_next[i] = 0.0f;
      if (k < in && o < a.out) {
        LoadCodes<F>(codes[i / kOutputs], scales[i / kOutputs], in, o, k, &w_next[i], &scale_next[i]);
      }
    }
  };
  float acc[kLaneRows][R];
#pragma unroll
  for (int i = 0; i < kLaneRows; ++i)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[i][r] = 0.0f;
  load(sub * V);
  for (int64_t k0 = 0; k0 < in; k0 += kStep) {
    const int64_t k = k0 + sub * V;
    uint4 w[kLaneRows];
    float scale[kLaneRows];
#pragma unroll
    for (int i = 0; i < kLaneRows; ++i) {
      w[i] = w_next[i];
      scale[i] = scale_next[i];
    }
    if (k0 + kStep < in) load(k + kStep);
    if (k < in) {
      float part[kLaneRows][R];
#pragma unroll
      for (int i = 0; i < kLaneRows; ++i)
#pragma unroll
        for (int r = 0; r < R; ++r) part[i][r] = 0.0f;
      const int64_t q0 = k / 4;
      auto piece = [&](auto j_constant) {
        constexpr int j = decltype(j_constant)::value;
        float4 wv[kLaneRows];
#pragma unroll
        for (int i = 0; i < kLaneRows; ++i) wv[i] = Piece<F, j>(w[i]);
        const int64_t q = Swizzle<F>(q0 + j);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float4 xv = xs[r * in4 + q];
#pragma unroll
          for (int i = 0; i < kLaneRows; ++i) part[i][r] = Dot4(xv, wv[i], part[i][r]);
        }
      };
      StaticFor<P>(piece);
#pragma unroll
      for (int i = 0; i < kLaneRows; ++i)
#pragma unroll
        for (int r = 0; r < R; ++r) acc[i][r] = fmaf(part[i][r], scale[i], acc[i][r]);
    }
  }
#pragma unroll
  for (int i = 0; i < kLaneRows; ++i)
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int offset = 1; offset < kRowLanes; offset *= 2) acc[i][r] += __shfl_xor_sync(0xffffffffu, acc[i][r], offset);
  // Every lane of the 8 holds the sums; the writes are spread over them.
#pragma unroll
  for (int i = 0; i < kOutputs; ++i) {
    const int64_t o = o_first + i;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (sub != (i * R + r) % kRowLanes || o >= a.out) continue;
      float* dst = a.y + (y_row0 + r) * a.out + o;
      if constexpr (M == 1) {
        *dst = acc[i][r];
      } else {
        *dst = SwiGluOne(acc[i][r], acc[kOutputs + i][r], a.limit);
      }
    }
  }
}

__host__ __device__ constexpr int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
__device__ __forceinline__ int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ---- Tensor-core unit: MXFP4 experts with up to 8 rows ----
// x rows go to mma.sync m16n8k16 (bf16, f32 accumulation) as a hi + lo pair: A rows 0-7 are the hi parts of
// the expert's rows, rows 8-15 their lo parts, and y = C[r] + C[r + 8]. Weight rows are B (n = 8 outputs per
// tile). The K order inside a step of 128 is permuted (the sum does not care): lane t of a quad owns the 32
// inputs [32t, 32t + 32) of the step, one 16-byte code load and one scale. Its code word q (inputs 8q..8q+7
// of the 32, values v0..v7) becomes the bf16 pairs (v0, v4), (v1, v5), (v2, v6), (v3, v7), each value times
// 2^-126 (ShiftMxfp4Word: two shifts and two masks a pair), and mma 2q + h takes pairs 2h and 2h + 1 as its
// fragment slots (2t, 2t + 1) and (2t + 8, 2t + 9). x is staged with the same pairs of its inputs, hi and lo
// interleaved, so one 16-byte shared load is a whole A fragment. One exact bf16x2 multiply by 2^(s - 1)
// scales a pair; a step where some lane's scale is over 2^1 (s > 128, or 255 for NaN) multiplies by 2^126
// first and then by 2^(s - 127) (warp-uniform). Each warp owns kMmaTiles tiles (M = 2: two of W1 and the
// same two of W3), so a unit is 256 weight rows.
constexpr int kMmaMaxRows = 8;
constexpr int kMmaTiles = 4;
constexpr int kMmaUnitRows = kLinearWarps * kMmaTiles * 8;
constexpr int kMmaStep = 128;
// Below this host bound on rows per expert (about 4 tokens x 6 experts) the batch touches so few experts that
// the tensor-core unit's 256-row units leave most SMs idle: the f32 GEMV's 128-row units spread better
// (H200, flash w1/w3 at 1 token: 77 us on tensor cores vs 48 us in f32).
constexpr int64_t kMmaMinRowsBound = 24;
std::atomic<bool> g_grouped_mma{true};

// 2^(bits - 127) in both bf16 halves (bits 0: the subnormal 2^-127; 255: NaN), as Ue8m0.
__device__ __forceinline__ uint32_t Ue8m0Bf16x2(uint32_t bits) {
  const uint32_t v = bits == 0 ? 0x0040u : bits == 255 ? 0x7FC0u : bits << 7;
  return v | (v << 16);
}

// x rows [row0, row0 + count) (through gather), inputs [k_begin, k_begin + k_len), as the unit's A fragments:
// uint4 (step * 8 + 2q + h) * lanes + 4 * row + t holds, of the row's inputs 32t + 8q .. + 7 of the step (v0..v7),
// {hi, lo} of the pair (v_2h, v_2h+4) and then of (v_2h+1, v_2h+5) (lanes = 4 * rows_staged; rows count.. are
// zero).
template <int M>
__device__ void StageMmaRows(const LinearArgs<M>& a, int64_t row0, int count, int rows_staged, int64_t k_begin,
                             int64_t k_len, uint4* smem) {
  const int lanes = 4 * rows_staged;
  const int64_t groups = k_len / 8;  // 8 inputs per item
  for (int64_t item = threadIdx.x; item < rows_staged * groups; item += kLinearThreads) {
    const int r = static_cast<int>(item / groups);
    const int64_t k = (item % groups) * 8;  // within the phase
    float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (r < count) {
      const int64_t grouped = row0 + r;
      const float* src = a.x + (a.gather ? a.gather[grouped] : grouped) * a.in + k_begin + k;
      const float4 v0 = __ldg(reinterpret_cast<const float4*>(src));
      const float4 v1 = __ldg(reinterpret_cast<const float4*>(src) + 1);
      v[0] = v0.x, v[1] = v0.y, v[2] = v0.z, v[3] = v0.w, v[4] = v1.x, v[5] = v1.y, v[6] = v1.z, v[7] = v1.w;
    }
    const int64_t step = k / kMmaStep;
    const int within = static_cast<int>(k % kMmaStep);
    const int t = within / 32, q = (within % 32) / 8;
    uint4* dst = smem + (step * 8 + 2 * q) * lanes + 4 * r + t;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint4 f;
      internal::SplitBf16x2(v[2 * h], v[2 * h + 4], f.x, f.y);
      internal::SplitBf16x2(v[2 * h + 1], v[2 * h + 5], f.z, f.w);
      dst[h * lanes] = f;
    }
  }
}

template <int M>
__device__ void MmaUnit(const LinearArgs<M>& a, int64_t expert, int64_t o_unit, int64_t row0, int count, uint4* smem) {
  constexpr int kPerMatrix = kMmaTiles / M;  // tiles of each matrix per warp
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int rows_staged = count <= 4 ? 4 : 8;
  const int lanes = 4 * rows_staged;
  const int a_lane = lane % lanes;  // rows past the staged ones repeat rows g - 4 (those C rows are not stored)
  const int64_t in = a.in;
  const int64_t fits = a.smem_bytes / (4 * rows_staged) / kMmaStep * kMmaStep;
  const int64_t phase = fits < in ? fits : in;
  const int64_t o_warp = o_unit + warp * (kPerMatrix * 8);
  // Tile i reads weight row o_warp + 8 * (i % kPerMatrix) + g of matrix i / kPerMatrix; a row past out reads
  // row out - 1 instead (computed, never stored), so no load needs a predicate.
  const uint8_t* code_row[kMmaTiles];
  const uint8_t* scale_row[kMmaTiles];
#pragma unroll
  for (int i = 0; i < kMmaTiles; ++i) {
    const int m = i / kPerMatrix;
    const int64_t row = Min64(o_warp + 8 * (i % kPerMatrix) + g, a.out - 1);
    code_row[i] = a.m[m].codes[expert] + row * (in / 2) + 16 * t;
    scale_row[i] = a.m[m].scales[expert] + row * (in / 32) + t;
  }
  float c[kMmaTiles][4];
#pragma unroll
  for (int i = 0; i < kMmaTiles; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.0f;
  uint4 w_next[kMmaTiles];
  uint32_t s_next[kMmaTiles];
  auto load = [&](int64_t k0) {
#pragma unroll
    for (int i = 0; i < kMmaTiles; ++i) {
      w_next[i] = LoadOnce<false>(code_row[i] + k0 / 2);
      s_next[i] = __ldg(scale_row[i] + k0 / 32);
    }
  };
  // One step's 8 MMAs a tile; kFast: every scale of the warp is at most 2^1.
  auto multiply = [&](auto fast_constant, const uint4* frag, const uint4 (&w)[kMmaTiles],
                      const uint32_t (&factor)[kMmaTiles]) {
    constexpr bool kFast = decltype(fast_constant)::value;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      uint32_t v[kMmaTiles][4];
#pragma unroll
      for (int i = 0; i < kMmaTiles; ++i) {
        internal::ShiftMxfp4Word(Word(w[i], q), v[i]);
        if constexpr (!kFast) {
#pragma unroll
          for (int j = 0; j < 4; ++j) v[i][j] = internal::MulBf16x2(v[i][j], 0x7e807e80u);  // 2^126
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint4 f = frag[(2 * q + h) * lanes + a_lane];
        const uint32_t fragment[4] = {f.x, f.y, f.z, f.w};
#pragma unroll
        for (int i = 0; i < kMmaTiles; ++i) {
          internal::MmaBf16(c[i], fragment, internal::MulBf16x2(v[i][2 * h], factor[i]),
                            internal::MulBf16x2(v[i][2 * h + 1], factor[i]));
        }
      }
    }
  };
  load(0);
  for (int64_t p0 = 0; p0 < in; p0 += phase) {
    const int64_t len = phase < in - p0 ? phase : in - p0;
    __syncthreads();  // the previous phase's (or unit's) readers are done
    StageMmaRows<M>(a, row0, count, rows_staged, p0, len, smem);
    __syncthreads();
#pragma unroll 2
    for (int64_t k0 = p0; k0 < p0 + len; k0 += kMmaStep) {
      uint4 w[kMmaTiles];
      uint32_t factor[kMmaTiles];
      bool slow = false;
#pragma unroll
      for (int i = 0; i < kMmaTiles; ++i) {
        w[i] = w_next[i];
        slow |= s_next[i] > 128u;
      }
      slow = __any_sync(internal::kFullMask, slow);
#pragma unroll
      for (int i = 0; i < kMmaTiles; ++i) {
        const uint32_t fast = (s_next[i] + 126u) << 7;  // 2^(s - 1)
        factor[i] = slow ? Ue8m0Bf16x2(s_next[i]) : fast | fast << 16;
      }
      if (k0 + kMmaStep < in) load(k0 + kMmaStep);
      const uint4* frag = smem + (k0 - p0) / kMmaStep * 8 * lanes;
      if (slow) {
        multiply(std::false_type{}, frag, w, factor);
      } else {
        multiply(std::true_type{}, frag, w, factor);
      }
    }
  }
  // C: c[i][0..1] row g (hi), c[i][2..3] row g + 8 (lo), outputs 2t, 2t + 1 of the tile.
  if (g >= count) return;
  float* dst = a.y + (row0 + g) * a.out;
#pragma unroll
  for (int i = 0; i < kPerMatrix; ++i) {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int64_t o = o_warp + 8 * i + 2 * t + u;
      if (o >= a.out) continue;
      const float v = c[i][u] + c[i][2 + u];
      if constexpr (M == 1) {
        dst[o] = v;
      } else {
        dst[o] = SwiGluOne(v, c[kPerMatrix + i][u] + c[kPerMatrix + i][2 + u], a.limit);
      }
    }
  }
}

// Many rows: one 64 x 64 tile (rows r0.., outputs o0..) over K steps of 64; x and the dequantized weights
// staged in shared memory (rows padded to 68 floats), the next step's global loads held in registers while
// this one is multiplied. Thread (ty, tx) computes rows 4ty..4ty+3 and outputs tx + 16j into acc.
template <Format F, int M>
__device__ void TiledAccumulate(const LinearArgs<M>& a, const uint8_t* codes, const uint8_t* scales, int64_t row0,
                                int rows_here, int64_t o0, float* smem, float (&acc)[4][4]) {
  float* xs = smem;
  float* ws = smem + kTileRows * kTileLd;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  // Loader roles. x: rows tid/16 + 16i, float4 column tid%16. Weights: MXFP4 128 threads (row tid/2, group
  // tid%2 of the step), FP8 256 threads (row tid/4, 16 codes at (tid%4)*16).
  constexpr int kLoaders = F == Format::kMxfp4 ? 128 : 256;
  constexpr int kPerRow = F == Format::kMxfp4 ? 2 : 4;
  const int w_row = tid / kPerRow, w_col = (tid % kPerRow) * kValuesPerLoad<F>;
  const int64_t w_o = o0 + w_row;
  const bool w_loader = tid < kLoaders && w_o < a.out;
  const float* x_rows[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = tid / 16 + 16 * i;
    x_rows[i] = nullptr;
    if (m < rows_here) {
      const int64_t grouped = row0 + m;
      x_rows[i] = a.x + (a.gather ? a.gather[grouped] : grouped) * a.in;
    }
  }
  float4 x_next[4];
  uint4 w_next = make_uint4(0u, 0u, 0u, 0u);
  float scale_next = 0.0f;
  auto load = [&](int64_t k0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      x_next[i] = x_rows[i] ? __ldg(reinterpret_cast<const float4*>(x_rows[i] + k0 + 4 * tx))
                            : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    if (w_loader) LoadCodes<F>(codes, scales, a.in, w_o, k0 + w_col, &w_next, &scale_next);
  };
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  load(0);
  for (int64_t k0 = 0; k0 < a.in; k0 += kTileK) {
    __syncthreads();  // the previous step's (or unit's) readers are done
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      *reinterpret_cast<float4*>(&xs[(tid / 16 + 16 * i) * kTileLd + 4 * tx]) = x_next[i];
    }
    if (tid < kLoaders) {
      float4* dst = reinterpret_cast<float4*>(&ws[w_row * kTileLd + w_col]);
      auto store = [&](auto j_constant) {
        constexpr int j = decltype(j_constant)::value;
        const float4 v = Piece<F, j>(w_next);
        dst[j] = make_float4(v.x * scale_next, v.y * scale_next, v.z * scale_next, v.w * scale_next);
      };
      StaticFor<kValuesPerLoad<F> / 4>(store);
    }
    __syncthreads();
    if (k0 + kTileK < a.in) load(k0 + kTileK);
    if (4 * ty < rows_here) {
#pragma unroll 4
      for (int kk = 0; kk < kTileK; kk += 4) {
        float4 xv[4], wv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) xv[i] = *reinterpret_cast<const float4*>(&xs[(4 * ty + i) * kTileLd + kk]);
#pragma unroll
        for (int j = 0; j < 4; ++j) wv[j] = *reinterpret_cast<const float4*>(&ws[(tx + 16 * j) * kTileLd + kk]);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = Dot4(xv[i], wv[j], acc[i][j]);
      }
    }
  }
}

template <Format F, int M>
__device__ void TiledUnit(const LinearArgs<M>& a, int64_t expert, int64_t row0, int rows_here, int64_t o0,
                          float* smem) {
  float acc[M][4][4];
#pragma unroll
  for (int m = 0; m < M; ++m) TiledAccumulate<F, M>(a, a.m[m].codes[expert], a.m[m].scales[expert], row0, rows_here, o0, smem, acc[m]);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = 4 * ty + i;
    if (r >= rows_here) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t o = o0 + tx + 16 * j;
      if (o >= a.out) continue;
      if constexpr (M == 1) {
        a.y[(row0 + r) * a.out + o] = acc[0][i][j];
      } else {
        a.y[(row0 + r) * a.out + o] = SwiGluOne(acc[0][i][j], acc[M - 1][i][j], a.limit);
      }
    }
  }
}

template <int M>
__device__ __forceinline__ bool MmaExpert(const LinearArgs<M>& a, int64_t count) {
  return a.mma && count <= kMmaMaxRows;
}
template <int M>
__device__ __forceinline__ bool GemvExpert(const LinearArgs<M>& a, int64_t count) {
  return a.gemv && count <= kGemvMaxRows;
}

// Units and weight of one unit for an expert with `count` rows (0 units when it has none). The tensor-core
// experts run in a launch of their own (kMma: only they have units; otherwise they have none), so that
// each kernel gets the registers of its own units.
template <int M, bool kMma>
__device__ __forceinline__ void ExpertUnits(const LinearArgs<M>& a, int64_t count, int64_t* units, int64_t* weight) {
  *weight = 1;
  if (count <= 0 || MmaExpert(a, count) != kMma) {
    *units = 0;
  } else if (kMma) {
    *units = CeilDiv(a.out, kMmaUnitRows / M);
  } else if (GemvExpert(a, count)) {
    *units = CeilDiv(count, kGroupRows) * CeilDiv(a.out, kUnitRows / M);
    *weight = 1;
  } else {
    *units = CeilDiv(count, kTileRows) * CeilDiv(a.out, kTileOut);
    *weight = kTiledUnitWeight;
  }
}

// Inclusive block-wide prefix sum of v (all threads call it).
__device__ int64_t BlockInclusiveSum(int64_t v, int64_t* warp_sums) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int offset = 1; offset < 32; offset *= 2) {
    const int64_t other = __shfl_up_sync(0xffffffffu, v, offset);
    if (lane >= offset) v += other;
  }
  __syncthreads();  // warp_sums free
  if (lane == 31) warp_sums[warp] = v;
  __syncthreads();
  for (int w = 0; w < warp; ++w) v += warp_sums[w];
  return v;
}

template <Format F, int M, bool kMma>
__global__ void __launch_bounds__(kLinearThreads, 2) GroupedLinearKernel(LinearArgs<M> a) {
  extern __shared__ float4 linear_smem[];
  __shared__ int64_t chunk_end[kLinearThreads];  // inclusive prefix of the chunk's expert weights
  __shared__ int64_t warp_sums[kLinearWarps];
  const int tid = threadIdx.x;
  // The total weight, then this block's share [lo, hi): the units whose weight prefix starts inside it.
  int64_t total = 0;
  for (int64_t e0 = 0; e0 < a.experts; e0 += kLinearThreads) {
    int64_t units = 0, weight = 0;
    if (e0 + tid < a.experts) ExpertUnits<M, kMma>(a, a.offsets[e0 + tid + 1] - a.offsets[e0 + tid], &units, &weight);
    const int64_t sum = BlockInclusiveSum(units * weight, warp_sums);
    if (tid == kLinearThreads - 1) chunk_end[0] = sum;
    __syncthreads();
    total += chunk_end[0];
    __syncthreads();
  }
  const int64_t lo = total * blockIdx.x / gridDim.x, hi = total * (blockIdx.x + 1) / gridDim.x;
  if (lo == hi) return;  // the same for the whole block
  int64_t staged_expert = -1, staged_group = -1;
  int64_t base = 0;  // weight of the experts before this chunk
  for (int64_t e0 = 0; e0 < a.experts && base < hi; e0 += kLinearThreads) {
    const int n = static_cast<int>(Min64(kLinearThreads, a.experts - e0));
    int64_t units = 0, weight = 0;
    if (tid < n) ExpertUnits<M, kMma>(a, a.offsets[e0 + tid + 1] - a.offsets[e0 + tid], &units, &weight);
    const int64_t end = BlockInclusiveSum(units * weight, warp_sums);
    chunk_end[tid] = end;
    __syncthreads();
    // First expert of the chunk whose weight ends after lo (the ends are non-decreasing).
    int first = 0, last = n;
    while (first < last) {
      const int mid = (first + last) / 2;
      if (base + chunk_end[mid] <= lo) {
        first = mid + 1;
      } else {
        last = mid;
      }
    }
    for (int i = first; i < n; ++i) {
      const int64_t e = e0 + i;
      const int64_t start = base + (i > 0 ? chunk_end[i - 1] : 0);
      if (start >= hi) break;
      const int64_t begin = a.offsets[e], count = a.offsets[e + 1] - begin;
      int64_t e_units, e_weight;
      ExpertUnits<M, kMma>(a, count, &e_units, &e_weight);
      const int64_t j_begin = lo > start ? CeilDiv(lo - start, e_weight) : 0;
      const int64_t j_end = Min64(e_units, CeilDiv(hi - start, e_weight));
      if constexpr (kMma) {
        for (int64_t j = j_begin; j < j_end; ++j) {
          MmaUnit<M>(a, e, j * (kMmaUnitRows / M), begin, static_cast<int>(count), reinterpret_cast<uint4*>(linear_smem));
        }
      } else if (GemvExpert(a, count)) {
        const int64_t groups = CeilDiv(count, kGroupRows);
        for (int64_t j = j_begin; j < j_end; ++j) {
          const int64_t group = j % groups, o_unit = (j / groups) * (kUnitRows / M);
          const int64_t row0 = begin + group * kGroupRows;
          const int rows = static_cast<int>(Min64(kGroupRows, count - group * kGroupRows));
          if (staged_expert != e || staged_group != group) {
            __syncthreads();  // the previous unit's readers are done
            StageRows<F, M>(a, row0, rows, linear_smem);
            __syncthreads();
            staged_expert = e;
            staged_group = group;
          }
          if (rows == 1) {
            GemvUnit<F, M, 1>(a, e, o_unit, linear_smem, row0);
          } else if (rows == 2) {
            GemvUnit<F, M, 2>(a, e, o_unit, linear_smem, row0);
          } else if (rows == 3) {
            GemvUnit<F, M, 3>(a, e, o_unit, linear_smem, row0);
          } else {
            GemvUnit<F, M, 4>(a, e, o_unit, linear_smem, row0);
          }
        }
      } else {
        const int64_t row_tiles = CeilDiv(count, kTileRows);
        for (int64_t j = j_begin; j < j_end; ++j) {
          const int64_t r0 = (j % row_tiles) * kTileRows, o0 = (j / row_tiles) * kTileOut;
          const int rows_here = static_cast<int>(Min64(kTileRows, count - r0));
          TiledUnit<F, M>(a, e, begin + r0, rows_here, o0, reinterpret_cast<float*>(linear_smem));
          staged_expert = -1;
        }
      }
    }
    base += chunk_end[n - 1];
    __syncthreads();  // chunk_end is rewritten next
  }
}

// One block per token. The slots are added in grouped-row order, which is the CPU's order (experts
// ascending, rows of an expert in pair order), each product and sum rounded separately as on the CPU.
__global__ void MoeCombineKernel(const float* shared, const float* routed, const int32_t* position, const float* weights,
                                 int64_t k, int64_t dim, float* out) {
  __shared__ int32_t slot_position[kMaxK];
  __shared__ float slot_weight[kMaxK];
  const int64_t token = blockIdx.x;
  if (threadIdx.x == 0) {
    for (int64_t i = 0; i < k; ++i) {
      const int32_t p = position[token * k + i];
      const float w = weights[token * k + i];
      int64_t j = i;
      for (; j > 0 && slot_position[j - 1] > p; --j) {
        slot_position[j] = slot_position[j - 1];
        slot_weight[j] = slot_weight[j - 1];
      }
      slot_position[j] = p;
      slot_weight[j] = w;
    }
  }
  __syncthreads();
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    float acc = shared ? shared[token * dim + d] : 0.0f;
    for (int64_t i = 0; i < k; ++i) {
      acc = __fadd_rn(acc, __fmul_rn(slot_weight[i], routed[static_cast<int64_t>(slot_position[i]) * dim + d]));
    }
    out[token * dim + d] = acc;
  }
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

unsigned GridFor(int64_t work, int threads) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, 132 * 16)));
}

template <Format F, int M, bool kMma>
absl::Status LaunchGroupedLinear(const LinearArgs<M>& args, size_t smem, const char* name, cudaStream_t stream) {
  const auto kernel = GroupedLinearKernel<F, M, kMma>;
  int device = 0, sms = 0, smem_per_sm = 0;
  TANDEM_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  TANDEM_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  TANDEM_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  if (smem > 48 * 1024) {
    TANDEM_CUDA_RETURN_IF_ERROR(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  // One wave: the blocks that fit at once (2 by the launch bounds, fewer if the shared memory says so; the
  // static arrays and the 1 KB the runtime reserves per block counted generously).
  const size_t per_block = smem + 4096;
  const int per_sm = static_cast<int>(std::max<size_t>(1, std::min<size_t>(2, static_cast<size_t>(smem_per_sm) / per_block)));
  kernel<<<static_cast<unsigned>(std::max(1, sms) * per_sm), kLinearThreads, smem, stream>>>(args);
  return CudaStatus(cudaGetLastError(), name, __FILE__, __LINE__);
}

// max_rows: the caller's bound on the rows of one expert. With the tensor cores on, two launches: the
// tensor-core experts, then the others (a launch whose blocks find no units returns at once).
template <int M>
absl::Status GroupedLinear(const LinearArgs<M>& args, Format format, int64_t max_rows, cudaStream_t stream) {
  const size_t gemv_smem = static_cast<size_t>(kGroupRows) * static_cast<size_t>(args.in) * sizeof(float);
  LinearArgs<M> a = args;
  a.gemv = gemv_smem <= kGemvSmemLimit;
  const size_t smem = std::max(kTiledSmemBytes, a.gemv ? gemv_smem : size_t{0});
  a.smem_bytes = static_cast<int64_t>(smem);
  a.mma = format == Format::kMxfp4 && a.gemv && args.in % kMmaStep == 0 && max_rows >= kMmaMinRowsBound &&
          g_grouped_mma.load(std::memory_order_relaxed);
  if (format == Format::kFp8Block) {
    return LaunchGroupedLinear<Format::kFp8Block, M, false>(a, smem, "GroupedLinearKernel<FP8>", stream);
  }
  if (a.mma) {
    const absl::Status mma = LaunchGroupedLinear<Format::kMxfp4, M, true>(a, smem, "GroupedLinearKernel<MXFP4, mma>", stream);
    if (!mma.ok()) return mma;
  }
  return LaunchGroupedLinear<Format::kMxfp4, M, false>(a, smem, "GroupedLinearKernel<MXFP4>", stream);
}

absl::Status CheckGroupedWeights(const GroupedWeights& weights, const char* what) {
  if (weights.experts < 1 || weights.experts > 65535 || weights.out < 1 || weights.in < kTileK ||
      weights.in % kTileK != 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": need 1 <= experts <= 65535, out >= 1 and in a positive "
                                                   "multiple of ", kTileK, "; got experts ", weights.experts, ", out ",
                                                   weights.out, ", in ", weights.in));
  }
  if (weights.out > (int64_t{1} << 30) || weights.in > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": out and in must be at most 2^30"));
  }
  if (!weights.codes || !weights.scales) return absl::InvalidArgumentError(absl::StrCat(what, ": null weights"));
  return absl::OkStatus();
}

}  // namespace

absl::Status MoeRoute(const MoeRouteArgs& args, cudaStream_t stream) {
  if (args.tokens < 0 || args.experts < 1 || args.k < 1 || args.k > std::min<int64_t>(args.experts, kMaxK)) {
    return absl::InvalidArgumentError(absl::StrCat("MoeRoute: need tokens >= 0, experts >= 1, 1 <= k <= min(experts, ",
                                                   kMaxK, "); got tokens ", args.tokens, ", experts ", args.experts,
                                                   ", k ", args.k));
  }
  if ((args.bias == nullptr) == (args.tid2eid == nullptr)) {
    return absl::InvalidArgumentError("MoeRoute: exactly one of bias (learned gate) and tid2eid (hash layer) must be set");
  }
  if (args.tid2eid && !args.token_ids) return absl::InvalidArgumentError("MoeRoute: hash routing needs token_ids");
  if (args.tokens == 0) return absl::OkStatus();
  if (!args.logits || !args.chosen || !args.weights) return absl::InvalidArgumentError("MoeRoute: null logits or outputs");
  const size_t smem = args.bias ? kRouteWarps * static_cast<size_t>(args.experts) * sizeof(double) : 0;
  if (smem > 48 * 1024) {
    return absl::UnimplementedError(absl::StrCat("MoeRoute: ", args.experts, " experts exceed the kernel's 1536"));
  }
  const int64_t blocks = (args.tokens + kRouteWarps - 1) / kRouteWarps;
  if (blocks > 0x7fffffff) return absl::InvalidArgumentError("MoeRoute: too many tokens");
  MoeRouteKernel<<<static_cast<unsigned>(blocks), 32 * kRouteWarps, smem, stream>>>(args);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("MoeRouteKernel");
  return absl::OkStatus();
}

size_t MoeGroupWorkspaceBytes(int64_t tokens, int64_t k, int64_t experts) {
  if (tokens <= 0 || k <= 0 || experts <= 0) return 0;
  return static_cast<size_t>(GroupUnits(tokens * k)) * static_cast<size_t>(experts) * sizeof(int32_t);
}

absl::Status MoeGroup(const int32_t* chosen, int64_t tokens, int64_t k, int64_t experts, int64_t* offsets, int32_t* rows,
                      int32_t* position, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (tokens < 0 || k < 1 || experts < 1 || experts > kMaxGroupExperts) {
    return absl::InvalidArgumentError(absl::StrCat("MoeGroup: need tokens >= 0, k >= 1, 1 <= experts <= ",
                                                   kMaxGroupExperts, "; got ", tokens, ", ", k, ", ", experts));
  }
  const int64_t pairs = tokens * k;
  if (pairs > 0x7fffffff) return absl::InvalidArgumentError("MoeGroup: tokens * k exceeds int32 rows");
  if (!offsets) return absl::InvalidArgumentError("MoeGroup: null offsets");
  if (pairs == 0) {
    TANDEM_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(offsets, 0, (experts + 1) * sizeof(int64_t), stream));
    return absl::OkStatus();
  }
  if (!chosen || !rows || !position) return absl::InvalidArgumentError("MoeGroup: null chosen, rows or position");
  const size_t needed = MoeGroupWorkspaceBytes(tokens, k, experts);
  if (!workspace || workspace_bytes < needed) {
    return absl::InvalidArgumentError(absl::StrCat("MoeGroup: workspace of ", workspace_bytes, " bytes, needs ", needed));
  }
  auto* unit_counts = static_cast<int32_t*>(workspace);
  const int64_t units = GroupUnits(pairs);
  const unsigned blocks = static_cast<unsigned>((units + kGroupWarps - 1) / kGroupWarps);
  const size_t smem = kGroupWarps * static_cast<size_t>(experts) * sizeof(int32_t);
  MoeGroupUnitKernel<false><<<blocks, 32 * kGroupWarps, smem, stream>>>(chosen, pairs, k, experts, unit_counts, offsets,
                                                                        rows, position);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("MoeGroupUnitKernel<count>");
  MoeGroupScanKernel<<<1, kScanThreads, 0, stream>>>(unit_counts, units, experts, pairs, offsets);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("MoeGroupScanKernel");
  MoeGroupUnitKernel<true><<<blocks, 32 * kGroupWarps, smem, stream>>>(chosen, pairs, k, experts, unit_counts, offsets,
                                                                       rows, position);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("MoeGroupUnitKernel<scatter>");
  return absl::OkStatus();
}

void SetGroupedLinearTensorCores(bool on) { g_grouped_mma.store(on, std::memory_order_relaxed); }
bool GroupedLinearTensorCores() { return g_grouped_mma.load(std::memory_order_relaxed); }

absl::Status GroupedQuantizedLinear(const GroupedWeights& weights, const float* x, const int32_t* gather,
                                    const int64_t* offsets, int64_t max_rows_per_expert, float* y, cudaStream_t stream) {
  TANDEM_RETURN_IF_ERROR(CheckGroupedWeights(weights, "GroupedQuantizedLinear"));
  if (max_rows_per_expert < 0) return absl::InvalidArgumentError("GroupedQuantizedLinear: negative max_rows_per_expert");
  if (max_rows_per_expert == 0) return absl::OkStatus();
  if (!x || !offsets || !y) return absl::InvalidArgumentError("GroupedQuantizedLinear: null x, offsets or y");
  if (!Aligned16(x)) return absl::InvalidArgumentError("GroupedQuantizedLinear: x must be 16-byte aligned");
  LinearArgs<1> args{};
  args.m[0] = {weights.codes, weights.scales};
  args.experts = weights.experts;
  args.out = weights.out;
  args.in = weights.in;
  args.x = x;
  args.gather = gather;
  args.offsets = offsets;
  args.y = y;
  return GroupedLinear(args, weights.format, max_rows_per_expert, stream);
}

absl::Status GroupedSwiGluLinear(const GroupedWeights& w1, const GroupedWeights& w3, const float* x,
                                 const int32_t* gather, const int64_t* offsets, int64_t max_rows_per_expert,
                                 float limit, float* h, cudaStream_t stream) {
  TANDEM_RETURN_IF_ERROR(CheckGroupedWeights(w1, "GroupedSwiGluLinear (w1)"));
  TANDEM_RETURN_IF_ERROR(CheckGroupedWeights(w3, "GroupedSwiGluLinear (w3)"));
  if (w1.format != w3.format || w1.experts != w3.experts || w1.out != w3.out || w1.in != w3.in) {
    return absl::InvalidArgumentError(absl::StrCat("GroupedSwiGluLinear: w1 and w3 differ in format or shape (",
                                                   w1.experts, " x ", w1.out, " x ", w1.in, " vs ", w3.experts, " x ",
                                                   w3.out, " x ", w3.in, ")"));
  }
  if (max_rows_per_expert < 0) return absl::InvalidArgumentError("GroupedSwiGluLinear: negative max_rows_per_expert");
  if (max_rows_per_expert == 0) return absl::OkStatus();
  if (!x || !offsets || !h) return absl::InvalidArgumentError("GroupedSwiGluLinear: null x, offsets or h");
  if (!Aligned16(x)) return absl::InvalidArgumentError("GroupedSwiGluLinear: x must be 16-byte aligned");
  LinearArgs<2> args{};
  args.m[0] = {w1.codes, w1.scales};
  args.m[1] = {w3.codes, w3.scales};
  args.experts = w1.experts;
  args.out = w1.out;
  args.in = w1.in;
  args.x = x;
  args.gather = gather;
  args.offsets = offsets;
  args.y = h;
  args.limit = limit;
  return GroupedLinear(args, w1.format, max_rows_per_expert, stream);
}

absl::Status SwiGlu(const float* a, const float* b, int64_t count, float limit, float* h, cudaStream_t stream) {
  if (count < 0) return absl::InvalidArgumentError("SwiGlu: negative count");
  if (count == 0) return absl::OkStatus();
  if (!a || !b || !h) return absl::InvalidArgumentError("SwiGlu: null pointer");
  const bool vector = Aligned16(a) && Aligned16(b) && Aligned16(h);
  SwiGluKernel<<<GridFor(vector ? count / 4 + 1 : count, 256), 256, 0, stream>>>(a, b, count, limit, vector, h);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("SwiGluKernel");
  return absl::OkStatus();
}

absl::Status MoeCombine(const float* shared, const float* routed, const int32_t* position, const float* weights,
                        int64_t tokens, int64_t k, int64_t dim, float* out, cudaStream_t stream) {
  if (tokens < 0 || k < 1 || k > kMaxK || dim < 1) {
    return absl::InvalidArgumentError(absl::StrCat("MoeCombine: need tokens >= 0, 1 <= k <= ", kMaxK, ", dim >= 1"));
  }
  if (tokens == 0) return absl::OkStatus();
  if (tokens > 0x7fffffff) return absl::InvalidArgumentError("MoeCombine: too many tokens");
  if (!routed || !position || !weights || !out) return absl::InvalidArgumentError("MoeCombine: null pointer");
  MoeCombineKernel<<<static_cast<unsigned>(tokens), 256, 0, stream>>>(shared, routed, position, weights, k, dim, out);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("MoeCombineKernel");
  return absl::OkStatus();
}

}  // namespace tandem::kernels::cuda
