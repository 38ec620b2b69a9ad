// MoE on the GPU (NUMERICS.md "MoE"): routing, grouping (token, slot) pairs by expert, grouped expert GEMMs
// that dequantize MXFP4 / block-FP8 weights on the fly, the clamped SwiGLU and the weighted combine.
// Routing scores are double like the CPU; GEMMs are f32 with f32 accumulation (only the summation order
// differs from the CPU). e2m1 / e4m3 codes become f32 by placing their bits at the bottom of an f32
// exponent (a subnormal for the codes' own subnormals) and one exact multiply by 2^126 / 2^120: this needs
// f32 denormals, so this file must not be built with -ftz=true or --use_fast_math.
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <utility>

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

// ---- Grouped linear ----
constexpr int kLinearThreads = 256;
constexpr int kOutTile = 64;     // outputs per block (both paths)
constexpr int kGemvMaxRows = 4;  // experts with at most this many rows take the GEMV path
constexpr int kTileRows = 64, kTileK = 64, kTileLd = kTileK + 4;
constexpr int kGemvSmemFloats = kGemvMaxRows * 1024;
constexpr int kTiledSmemFloats = 2 * kTileRows * kTileLd;
constexpr int kLinearSmemFloats = kGemvSmemFloats > kTiledSmemFloats ? kGemvSmemFloats : kTiledSmemFloats;

using Format = QuantizedWeight::Format;

struct LinearArgs {
  const uint8_t* const* codes;
  const uint8_t* const* scales;
  int64_t out, in;
  const float* x;
  const int32_t* gather;
  const int64_t* offsets;
  float* y;
};

// 2^(bits - 127) as an f32 (bits 0 is the subnormal 2^-127, 255 is NaN), as the CPU's Ue8m0ToFloat.
__device__ __forceinline__ float Ue8m0(uint32_t bits) {
  if (bits == 0) return __uint_as_float(0x00400000u);
  if (bits == 255) return __uint_as_float(0x7fc00000u);
  return __uint_as_float(bits << 23);
}

// e2m1 code `n` (0..7) of word w times 2^-126, exactly (sign to bit 31, e1 e0 m to bits 24..22).
template <int n>
__device__ __forceinline__ float E2m1Raw(uint32_t w) {
  const uint32_t sign = (w << (28 - 4 * n)) & 0x80000000u;
  const uint32_t magnitude = (4 * n <= 22 ? (w << (22 - 4 * n)) : (w >> (4 * n - 22))) & 0x01c00000u;
  return __uint_as_float(sign | magnitude);
}
// e4m3 byte `n` (0..3) of word w times 2^-120 (sign to bit 31, e3..e0 m2..m0 to bits 26..20). NaN codes
// read as +-480 (checkpoints hold none).
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
    const uint32_t w = Word(codes, j / 2);
    constexpr int n = (j % 2) * 4;
    return make_float4(E2m1Raw<n>(w) * 0x1p126f, E2m1Raw<n + 1>(w) * 0x1p126f, E2m1Raw<n + 2>(w) * 0x1p126f,
                       E2m1Raw<n + 3>(w) * 0x1p126f);
  } else {
    const uint32_t w = Word(codes, j);
    return make_float4(E4m3Raw<0>(w) * 0x1p120f, E4m3Raw<1>(w) * 0x1p120f, E4m3Raw<2>(w) * 0x1p120f,
                       E4m3Raw<3>(w) * 0x1p120f);
  }
}

// Values per 16-byte code load: one MXFP4 scale group, or 16 FP8 codes inside one 128-wide scale block.
template <Format F>
constexpr int kValuesPerLoad = F == Format::kMxfp4 ? 32 : 16;

// Code bytes and scale of the 16-byte load covering inputs [k, k + kValuesPerLoad) of weight row o.
template <Format F>
__device__ __forceinline__ void LoadCodes(const LinearArgs& a, const uint8_t* codes, const uint8_t* scales, int64_t o,
                                          int64_t k, uint4* v, float* scale) {
  if constexpr (F == Format::kMxfp4) {
    *v = __ldg(reinterpret_cast<const uint4*>(codes + o * (a.in / 2) + k / 2));
    *scale = Ue8m0(__ldg(scales + o * (a.in / 32) + k / 32));
  } else {
    const int64_t block_cols = (a.in + 127) / 128;
    *v = __ldg(reinterpret_cast<const uint4*>(codes + o * a.in + k));
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

// Few rows: a bandwidth-bound GEMV. Warp w owns outputs o0 + 8w .. +7 in two passes of 4; each lane reads
// one 16-byte code load per output row per K chunk (32 lanes x kValuesPerLoad inputs), dequantizes in
// registers and multiplies it into every row. x of the chunk is staged in shared memory with float4
// index q stored at q ^ ((q / 8) % P) so the lanes of a quarter warp (P pieces apart) hit distinct banks.
// A load's values share one scale, applied once to its partial sums.
template <Format F, int R>
__device__ void GemvTile(const LinearArgs& a, int64_t expert, int64_t row_begin, int count, int64_t o0, float* smem) {
  constexpr int V = kValuesPerLoad<F>;
  constexpr int P = V / 4;         // float4 pieces per lane and chunk
  constexpr int kChunk = 32 * V;   // inputs per chunk
  constexpr int kChunk4 = kChunk / 4;
  const uint8_t* codes = a.codes[expert];
  const uint8_t* scales = a.scales[expert];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float4* xs = reinterpret_cast<float4*>(smem);
  for (int pass = 0; pass < 2; ++pass) {
    const int64_t o_first = o0 + warp * 8 + pass * 4;
    float acc[4][R];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int r = 0; r < R; ++r) acc[i][r] = 0.0f;
    for (int64_t k0 = 0; k0 < a.in; k0 += kChunk) {
      const int64_t k = k0 + static_cast<int64_t>(lane) * V;
      uint4 w[4];
      float scale[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        w[i] = make_uint4(0u, 0u, 0u, 0u);
        scale[i] = 0.0f;
        if (k < a.in && o_first + i < a.out) LoadCodes<F>(a, codes, scales, o_first + i, k, &w[i], &scale[i]);
      }
      __syncthreads();  // the previous chunk's readers are done
      for (int u = threadIdx.x; u < R * kChunk4; u += kLinearThreads) {
        const int r = u / kChunk4, q = u % kChunk4;
        const int64_t grouped = row_begin + min(r, count - 1);
        const int64_t src = a.gather ? a.gather[grouped] : grouped;
        const int64_t kx = k0 + 4 * q;
        const float4 v = kx < a.in ? __ldg(reinterpret_cast<const float4*>(a.x + src * a.in + kx))
                                   : make_float4(0.f, 0.f, 0.f, 0.f);
        xs[r * kChunk4 + (q ^ ((q / 8) % P))] = v;
      }
      __syncthreads();
      float part[4][R];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int r = 0; r < R; ++r) part[i][r] = 0.0f;
      auto piece = [&](auto j_constant) {
        constexpr int j = decltype(j_constant)::value;
        const int q = lane * P + j;
        float4 xv[R];
#pragma unroll
        for (int r = 0; r < R; ++r) xv[r] = xs[r * kChunk4 + (q ^ ((q / 8) % P))];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float4 wv = Piece<F, j>(w[i]);
#pragma unroll
          for (int r = 0; r < R; ++r) part[i][r] = Dot4(xv[r], wv, part[i][r]);
        }
      };
      StaticFor<P>(piece);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int r = 0; r < R; ++r) acc[i][r] = fmaf(part[i][r], scale[i], acc[i][r]);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float v = acc[i][r];
        for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
        const int64_t o = o_first + i;
        if (lane == ((i * R + r) & 31) && r < count && o < a.out) a.y[(row_begin + r) * a.out + o] = v;
      }
    }
  }
}

// Many rows: 64 x 64 output tiles over K steps of 64; x and the dequantized weights staged in shared memory
// (rows padded to 68 floats), the next step's global loads held in registers while this one is multiplied.
// Thread (ty, tx) computes rows 4ty..4ty+3 and outputs tx + 16j. Row tiles are strided by gridDim.x, so a
// too-small max_rows_per_expert costs parallelism, never rows.
template <Format F>
__device__ void TiledTile(const LinearArgs& a, int64_t expert, int64_t row_begin, int64_t count, int64_t o0, float* smem) {
  const uint8_t* codes = a.codes[expert];
  const uint8_t* scales = a.scales[expert];
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
  for (int64_t tile = blockIdx.x; tile * kTileRows < count; tile += gridDim.x) {
    const int64_t r0 = tile * kTileRows;
    const int rows_here = static_cast<int>(count - r0 < kTileRows ? count - r0 : kTileRows);
    const float* x_rows[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = tid / 16 + 16 * i;
      x_rows[i] = nullptr;
      if (m < rows_here) {
        const int64_t grouped = row_begin + r0 + m;
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
      if (w_loader) LoadCodes<F>(a, codes, scales, w_o, k0 + w_col, &w_next, &scale_next);
    };
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    load(0);
    for (int64_t k0 = 0; k0 < a.in; k0 += kTileK) {
      __syncthreads();  // the previous step's readers are done
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
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = 4 * ty + i;
      if (m >= rows_here) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t o = o0 + tx + 16 * j;
        if (o < a.out) a.y[(row_begin + r0 + m) * a.out + o] = acc[i][j];
      }
    }
  }
}

// grid (row tiles, output tiles, experts): a block owns (expert, 64 outputs). Experts with at most
// kGemvMaxRows rows run the GEMV in the blocks of row tile 0; the others the tiled GEMM.
template <Format F>
__global__ void __launch_bounds__(kLinearThreads, 2) GroupedLinearKernel(LinearArgs a) {
  __shared__ __align__(16) float smem[kLinearSmemFloats];
  const int64_t expert = blockIdx.z;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kOutTile;
  const int64_t begin = a.offsets[expert], count = a.offsets[expert + 1] - begin;
  if (count <= 0) return;
  if (count <= kGemvMaxRows) {
    if (blockIdx.x != 0) return;
    const int rows = static_cast<int>(count);
    if (rows == 1) {
      GemvTile<F, 1>(a, expert, begin, rows, o0, smem);
    } else if (rows == 2) {
      GemvTile<F, 2>(a, expert, begin, rows, o0, smem);
    } else {
      GemvTile<F, 4>(a, expert, begin, rows, o0, smem);
    }
    return;
  }
  TiledTile<F>(a, expert, begin, count, o0, smem);
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

absl::Status GroupedQuantizedLinear(const GroupedWeights& weights, const float* x, const int32_t* gather,
                                    const int64_t* offsets, int64_t max_rows_per_expert, float* y, cudaStream_t stream) {
  if (weights.experts < 1 || weights.experts > 65535 || weights.out < 1 || weights.in < kTileK ||
      weights.in % kTileK != 0) {
    return absl::InvalidArgumentError(absl::StrCat("GroupedQuantizedLinear: need 1 <= experts <= 65535, out >= 1 and in a "
                                                   "positive multiple of ", kTileK, "; got experts ", weights.experts,
                                                   ", out ", weights.out, ", in ", weights.in));
  }
  const int64_t out_tiles = (weights.out + kOutTile - 1) / kOutTile;
  if (out_tiles > 65535) return absl::InvalidArgumentError("GroupedQuantizedLinear: out exceeds 65535 * 64");
  if (max_rows_per_expert < 0) return absl::InvalidArgumentError("GroupedQuantizedLinear: negative max_rows_per_expert");
  if (max_rows_per_expert == 0) return absl::OkStatus();
  if (!weights.codes || !weights.scales || !x || !offsets || !y) {
    return absl::InvalidArgumentError("GroupedQuantizedLinear: null weights, x, offsets or y");
  }
  if (!Aligned16(x)) return absl::InvalidArgumentError("GroupedQuantizedLinear: x must be 16-byte aligned");
  const LinearArgs args{weights.codes, weights.scales, weights.out, weights.in, x, gather, offsets, y};
  const int64_t row_tiles = std::min<int64_t>((max_rows_per_expert + kTileRows - 1) / kTileRows, 4096);
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(out_tiles),
                  static_cast<unsigned>(weights.experts));
  if (weights.format == Format::kMxfp4) {
    GroupedLinearKernel<Format::kMxfp4><<<grid, kLinearThreads, 0, stream>>>(args);
    TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("GroupedLinearKernel<MXFP4>");
  } else {
    GroupedLinearKernel<Format::kFp8Block><<<grid, kLinearThreads, 0, stream>>>(args);
    TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("GroupedLinearKernel<FP8>");
  }
  return absl::OkStatus();
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
