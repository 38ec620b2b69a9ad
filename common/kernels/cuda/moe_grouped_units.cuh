// The work units of the grouped expert GEMMs and the launch arguments they share: the f32 GEMV, the MXFP4
// tensor-core unit and the tiled unit. Internal: moe_grouped.cu, which schedules them, is the one includer.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "common/kernels/cuda/attention_device.cuh"
#include "common/kernels/cuda/cuda_moe.h"

namespace tandem::kernels::cuda {
namespace {  // one includer: its own copy, internal linkage as before the split

using internal::SwiGluOne;
using internal::Ue8m0ToFloat;

// Units (moe_grouped.cu cuts the experts' work into them): GEMV (an expert with at most kGemvMaxRows rows): one
// group of <= 4 rows against 128 weight rows (64 outputs of each of W1 and W3 when fused), all of K, x of the
// group staged whole in shared memory; tensor-core (MXFP4, at most kMmaMaxRows rows): below; tiled (more
// rows): 64 rows x 64 outputs, all of K.
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
// address): the GEMV's 128-byte row steps keep it (not measured without); the tensor-core unit's loads (then in
// 64-byte steps along each row) read ~1.6x the bytes from DRAM with it (ncu, flash w1/w3 at 64 tokens: 2.97 GB instead of
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
    *scale = Ue8m0ToFloat(__ldg(scales + o * (in / 32) + k / 32));
  } else {
    const int64_t block_cols = (in + 127) / 128;
    *v = LoadOnce<true>(codes + o * in + k);
    *scale = Ue8m0ToFloat(__ldg(scales + (o / 128) * block_cols + k / 128));
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
// 2^-126 (ShiftMxfp4Word: a mask, a multiply and a mask a pair), and mma 2q + h takes pairs 2h and 2h + 1 as its
// fragment slots (2t, 2t + 1) and (2t + 8, 2t + 9). x is staged with the same pairs of its inputs, hi and lo
// interleaved, so one 16-byte shared load is a whole A fragment. One exact bf16x2 multiply by 2^(s - 1)
// scales a pair; a step where some lane's scale is over 2^1 (s > 128, or 255 for NaN) multiplies by 2^126
// first and then by 2^(s - 127) (warp-uniform).
//
// Each warp owns kMmaTiles tiles: 2 row tiles (M = 2: one of W1 and the same one of W3) x 2 K slices, so a
// unit is 128 weight rows and a warp step covers 256 inputs, slice i of the row tile taking the step's
// inputs [128i, 128i + 128) into its own accumulators (summed at the end). That makes a quad's two 16-byte
// loads 128 contiguous bytes of its row, requested together. (A scratch load-only probe had read 64 bytes a
// row, rows 2 KB apart, at ~65% of the copy rate and 128 bytes at 95%; StreamRead, the same pattern in the
// bench, reads them at 93-95% and 95-99% (H200, three runs), so the pattern was not the limit it seemed: 16
// tokens got faster with the slices, 64 did not.)
constexpr int kMmaMaxRows = 8;
constexpr int kMmaTiles = 4;
constexpr int kMmaSlices = 2;                             // K slices of 128 a step: tile i is slice i % kMmaSlices
constexpr int kMmaRowTiles = kMmaTiles / kMmaSlices;      // of row tile i / kMmaSlices
constexpr int kMmaUnitRows = kLinearWarps * kMmaRowTiles * 8;
constexpr int kMmaStep = 128;
constexpr int64_t kMmaStepInputs = int64_t{kMmaStep} * kMmaSlices;  // a warp step's inputs; a power of two
// Below this host bound on rows per expert (about 4 tokens x 6 experts) the batch touches so few experts that
// the tensor-core unit leaves most SMs idle: the f32 GEMV spreads better (H200, flash w1/w3 at 1 token: 77 us
// on tensor cores vs 48 us in f32, measured with the 256-row units of 4 row tiles a warp).
constexpr int64_t kMmaMinRowsBound = 24;


// x rows [row0, row0 + count) (through gather), inputs [k_begin, k_begin + k_len), as the unit's A fragments:
// uint4 (step * 8 + 2q + h) * lanes + 4 * row + t holds, of the row's inputs 32t + 8q .. + 7 of the step (v0..v7),
// {hi, lo} of the pair (v_2h, v_2h+4) and then of (v_2h+1, v_2h+5) (lanes = 4 * rows_staged; rows count.. are
// zero). Item i is (step, q, row, t) with 4 * row + t fastest, so consecutive threads store consecutive uint4s
// (no bank conflicts: in the (row, k) order before, each 8-thread store phase hit 2 bank groups, 4-way; ncu
// counted 74% of the shared-store wavefronts as excess).
template <int M>
__device__ void StageMmaRows(const LinearArgs<M>& a, int64_t row0, int count, int rows_staged, int64_t k_begin,
                             int64_t k_len, uint4* smem) {
  const int lanes = 4 * rows_staged, lanes_log2 = rows_staged == 4 ? 4 : 5;
  // k_len is whole steps of a phase (at most the shared memory's 16-byte units: int is enough); 8 inputs an item.
  const int items = static_cast<int>(k_len / 8) * rows_staged;
  for (int item = static_cast<int>(threadIdx.x); item < items; item += kLinearThreads) {
    const int lane = item & (lanes - 1), r = lane / 4, t = lane % 4;
    const int sq = item >> lanes_log2;  // step * 4 + q
    const int64_t k = k_begin + (sq / 4 * kMmaStep + 32 * t + 8 * (sq % 4));
    float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (r < count && k < a.in) {
      const int64_t grouped = row0 + r;
      const float* src = a.x + (a.gather ? a.gather[grouped] : grouped) * a.in + k;
      const float4 v0 = __ldg(reinterpret_cast<const float4*>(src));
      const float4 v1 = __ldg(reinterpret_cast<const float4*>(src) + 1);
      v[0] = v0.x, v[1] = v0.y, v[2] = v0.z, v[3] = v0.w, v[4] = v1.x, v[5] = v1.y, v[6] = v1.z, v[7] = v1.w;
    }
    uint4* dst = smem + (sq / 4 * 8 + 2 * (sq % 4)) * lanes + lane;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint4 f;
      internal::SplitBf16x2(v[2 * h], v[2 * h + 4], f.x, f.y);
      internal::SplitBf16x2(v[2 * h + 1], v[2 * h + 5], f.z, f.w);
      dst[h * lanes] = f;
    }
  }
}

// The x rows a tensor-core unit stages (4 or 8: A's 8 rows by whole quads of lanes) and the inputs of one
// staging phase (whole steps; all of in when it fits the launch's shared memory).
__host__ __device__ constexpr int MmaRowsStaged(int count) { return count <= 4 ? 4 : 8; }
template <int M>
__host__ __device__ constexpr int64_t MmaPhase(const LinearArgs<M>& a, int count) {
  // 4 B a staged input and row: the shift divides by 4 x rows staged.
  const int64_t fits = (a.smem_bytes >> (MmaRowsStaged(count) == 4 ? 4 : 5)) & ~(kMmaStepInputs - 1);
  return fits < ((a.in + kMmaStepInputs - 1) & ~(kMmaStepInputs - 1)) ? fits : a.in;
}

// MmaPhase's shifts and masks give what the divisions they replace gave (checked at compile time over
// shared-memory sizes, lengths and row counts; the divisions stay out of the kernel, where 64-bit ones cost a
// call).
constexpr bool MmaPhaseIsTheDivision() {
  constexpr int64_t kStep = kMmaStepInputs;
  for (const int64_t smem : {int64_t{48} << 10, int64_t{64} << 10, int64_t{100} << 10, int64_t{116} << 10,
                             int64_t{160} << 10, int64_t{227} << 10, int64_t{70001}}) {
    for (int64_t in = kMmaStep; in <= 16384; in += kMmaStep) {
      for (int count = 1; count <= kMmaMaxRows; ++count) {
        LinearArgs<1> a{};
        a.smem_bytes = smem;
        a.in = in;
        const int64_t fits = smem / (4 * MmaRowsStaged(count)) / kStep * kStep;
        if (MmaPhase(a, count) != (fits < (in + kStep - 1) / kStep * kStep ? fits : in)) return false;
      }
    }
  }
  return true;
}
static_assert(MmaPhaseIsTheDivision());

template <int M>
__device__ void MmaUnit(const LinearArgs<M>& a, int64_t expert, int64_t o_unit, int64_t row0, int count, uint4* smem,
                        int64_t* staged_expert) {
  constexpr int kPerMatrix = kMmaRowTiles / M;  // row tiles of each matrix per warp
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int rows_staged = MmaRowsStaged(count);
  const int lanes = 4 * rows_staged;
  const int a_lane = lane % lanes;  // rows past the staged ones repeat rows g - 4 (those C rows are not stored)
  const int64_t in = a.in;
  // Staged lengths round up to whole steps (inputs past in are zero).
  const int64_t phase = MmaPhase(a, count);
  const int64_t o_warp = o_unit + warp * (kPerMatrix * 8);
  // Tile i (row tile ri = i / kMmaSlices, slice i % kMmaSlices) reads weight row o_warp + 8 * (ri % kPerMatrix) + g
  // of matrix ri / kPerMatrix; a row past out reads row out - 1 instead (computed, never stored), so no load
  // needs a predicate.
  const uint8_t* code_row[kMmaTiles];
  const uint8_t* scale_row[kMmaTiles];
#pragma unroll
  for (int i = 0; i < kMmaTiles; ++i) {
    const int ri = i / kMmaSlices, ki = i % kMmaSlices;
    const int m = ri / kPerMatrix;
    const int64_t row = Min64(o_warp + 8 * (ri % kPerMatrix) + g, a.out - 1);
    code_row[i] = a.m[m].codes[expert] + row * (in / 2) + 16 * t + 64 * ki;
    scale_row[i] = a.m[m].scales[expert] + row * (in / 32) + t + 4 * ki;
  }
  float c[kMmaTiles][4];
#pragma unroll
  for (int i = 0; i < kMmaTiles; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.0f;
  uint4 w_next[kMmaTiles];
  uint32_t s_next[kMmaTiles];
  // A slice past in (the last step when in is an odd number of 128s) re-reads the slice before it (the same
  // groups, counted there): its x is staged as zeros and its factor is 0, so it adds exact zeros, also where a
  // weight overflows to Inf (a scale of 254 or 255: Inf or NaN times the zero x would be NaN).
  auto load = [&](auto tail_constant, int64_t k0) {
    constexpr bool kTail = decltype(tail_constant)::value;
#pragma unroll
    for (int i = 0; i < kMmaTiles; ++i) {
      const int64_t slice = kMmaStep * (i % kMmaSlices);
      const int64_t k = kTail ? Min64(k0 + slice, in - kMmaStep) - slice : k0;
      w_next[i] = LoadOnce<false>(code_row[i] + k / 2);
      s_next[i] = __ldg(scale_row[i] + k / 32);
    }
  };
  auto load_step = [&](int64_t k0) {
    if (k0 + kMmaStepInputs <= in) {
      load(std::false_type{}, k0);
    } else {
      load(std::true_type{}, k0);
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
          for (int j = 0; j < 4; ++j) v[i][j] = internal::MulBf16x2(v[i][j], internal::kBf16x2TwoTo126);
        }
      }
#pragma unroll
      for (int ki = 0; ki < kMmaSlices; ++ki) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint4 f = frag[(ki * 8 + 2 * q + h) * lanes + a_lane];
          const uint32_t fragment[4] = {f.x, f.y, f.z, f.w};
#pragma unroll
          for (int ri = 0; ri < kMmaRowTiles; ++ri) {
            const int i = ri * kMmaSlices + ki;
            internal::MmaBf16(c[i], fragment, internal::MulBf16x2(v[i][2 * h], factor[i]),
                              internal::MulBf16x2(v[i][2 * h + 1], factor[i]));
          }
        }
      }
    }
  };
  load_step(0);
  for (int64_t p0 = 0; p0 < in; p0 += phase) {
    const int64_t len = phase < in - p0 ? phase : in - p0;
    // With one phase, x stays staged for the block's next unit if that is of the same expert (a block's units
    // are consecutive): at 16 tokens most experts have one row and 16 units.
    if (phase < in || *staged_expert != expert) {
      __syncthreads();  // the previous phase's (or unit's) readers are done
      StageMmaRows<M>(a, row0, count, rows_staged, p0, CeilDiv(len, kMmaStepInputs) * kMmaStepInputs, smem);
      __syncthreads();
    }
#pragma unroll 2
    for (int64_t k0 = p0; k0 < p0 + len; k0 += kMmaStepInputs) {
      uint4 w[kMmaTiles];
      uint32_t factor[kMmaTiles];
      bool slow = false, past[kMmaTiles];
#pragma unroll
      for (int i = 0; i < kMmaTiles; ++i) {
        w[i] = w_next[i];
        past[i] = i % kMmaSlices != 0 && k0 + kMmaStep * (i % kMmaSlices) >= in;  // (slice 0 starts below in)
        slow |= !past[i] && s_next[i] > 128u;
      }
      slow = __any_sync(internal::kFullMask, slow);
#pragma unroll
      for (int i = 0; i < kMmaTiles; ++i) {
        factor[i] = past[i] ? 0u : slow ? internal::Ue8m0Bf16x2(s_next[i]) : internal::Mxfp4PairFactor(s_next[i]);
      }
      if (k0 + kMmaStepInputs < in) load_step(k0 + kMmaStepInputs);
      const uint4* frag = smem + (k0 - p0) / kMmaStep * 8 * lanes;
      if (slow) {
        multiply(std::false_type{}, frag, w, factor);
      } else {
        multiply(std::true_type{}, frag, w, factor);
      }
    }
  }
  *staged_expert = phase < in ? -1 : expert;
  // C: c[i][0..1] row g (hi), c[i][2..3] row g + 8 (lo), outputs 2t, 2t + 1 of the tile; its slices summed.
#pragma unroll
  for (int i = 0; i < kMmaTiles; ++i) {
    if (i % kMmaSlices == 0) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) c[i - i % kMmaSlices][j] += c[i][j];
  }
  if (g >= count) return;
  float* dst = a.y + (row0 + g) * a.out;
#pragma unroll
  for (int i = 0; i < kPerMatrix; ++i) {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int64_t o = o_warp + 8 * i + 2 * t + u;
      if (o >= a.out) continue;
      const float v = c[kMmaSlices * i][u] + c[kMmaSlices * i][2 + u];
      if constexpr (M == 1) {
        dst[o] = v;
      } else {
        const int i3 = kMmaSlices * (kPerMatrix + i);
        dst[o] = SwiGluOne(v, c[i3][u] + c[i3][2 + u], a.limit);
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

}  // namespace
}  // namespace tandem::kernels::cuda
