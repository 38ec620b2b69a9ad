// Device helpers shared by the attention and MoE kernels (internal to this folder): cache-format and weight
// decoding bit-compatible with common/core/dtype.cc, block reductions, and the shared-memory opt-in.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/kernels/cuda/check.h"
#include "common/kernels/cuda/device_info.h"

namespace tandem::kernels::cuda::internal {

constexpr unsigned kFullMask = 0xffffffffu;

// e4m3fn code -> float, exactly (integer mantissa times a power of two). 0x7f / 0xff are NaN.
__device__ __forceinline__ float Fp8ToFloat(uint32_t code) {
  const uint32_t exponent = (code >> 3) & 15u, mantissa = code & 7u;
  if (exponent == 15u && mantissa == 7u) return __uint_as_float(0x7fc00000u);
  const float integer = static_cast<float>(exponent ? 8u + mantissa : mantissa);
  const float power = __uint_as_float((127u - 10u + (exponent ? exponent : 1u)) << 23);  // 2^(max(e,1) - 10)
  const float magnitude = __fmul_rn(integer, power);
  return (code & 0x80u) ? -magnitude : magnitude;
}

// ue8m0 byte -> 2^(b - 127) (b = 0 is the subnormal 2^-127; 255 is NaN), as Ue8m0ToFloat.
__device__ __forceinline__ float Ue8m0ToFloat(uint32_t bits) {
  if (bits == 255u) return __uint_as_float(0x7fc00000u);
  return bits == 0u ? __uint_as_float(0x00400000u) : __uint_as_float(bits << 23);
}

__device__ __forceinline__ float Bf16BitsToFloat(uint32_t bits) { return __uint_as_float(bits << 16); }

// Round to nearest even, NaN kept quiet: the CPU's FloatToBf16.
__device__ __forceinline__ uint32_t FloatToBf16Bits(float value) {
  const uint32_t f = __float_as_uint(value);
  if (isnan(value)) return ((f >> 16) | 0x40u) & 0xffffu;
  return ((f + 0x7fffu + ((f >> 16) & 1u)) >> 16) & 0xffffu;
}

// Round to nearest even, saturating at +-448, NaN -> 0x7f: the CPU's FloatToFp8E4M3.
__device__ __forceinline__ uint8_t FloatToFp8(float value) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(value, __NV_SATFINITE, __NV_E4M3));
}

__device__ __forceinline__ float WarpMax(float value) {
  for (int offset = 16; offset > 0; offset /= 2) value = fmaxf(value, __shfl_xor_sync(kFullMask, value, offset));
  return value;
}

__device__ __forceinline__ float WarpSum(float value) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
}

// Block-wide sum in double / max in float (blockDim a multiple of 32, scratch >= 33 elements). Every
// thread gets the total; the leading barrier lets a caller reuse `scratch` for consecutive reductions.
__device__ __forceinline__ double BlockSum(double value, double* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(kFullMask, value, offset);
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = value;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += scratch[w];
    scratch[32] = total;
  }
  __syncthreads();
  return scratch[32];
}

__device__ __forceinline__ float BlockMax(float value, float* scratch) {
  value = WarpMax(value);
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = value;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = scratch[0];
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) total = fmaxf(total, scratch[w]);
    scratch[32] = total;
  }
  __syncthreads();
  return scratch[32];
}

// kernels::QuantizeKvEntry of one vector `v` (global or shared memory) by the whole block: one warp per
// 64-wide tile (amax by shuffle, scale 2^ceil(log2(max(amax/448, 1e-4))) from the exponent bits), the
// rope dims as bf16, the scale padding zeroed. blockDim a multiple of 32.
__device__ __forceinline__ void QuantizeKvEntryBlock(const float* v, int64_t nope, int64_t rope, int64_t scale_bytes,
                                                     uint8_t* data, uint8_t* scales) {
  const int warp = static_cast<int>(threadIdx.x / 32), lane = static_cast<int>(threadIdx.x % 32);
  const int tiles = static_cast<int>(nope / 64);
  for (int t = warp; t < tiles; t += static_cast<int>(blockDim.x / 32)) {
    const float a = v[t * 64 + lane], b = v[t * 64 + 32 + lane];
    const float amax = WarpMax(fmaxf(fabsf(a), fabsf(b)));
    int exponent;
    const float mantissa = frexpf(fmaxf(amax / 448.0f, 1e-4f), &exponent);
    const int power = mantissa == 0.5f ? exponent - 1 : exponent;
    const float inverse = ldexpf(1.0f, -power);
    data[t * 64 + lane] = FloatToFp8(__fmul_rn(a, inverse));
    data[t * 64 + 32 + lane] = FloatToFp8(__fmul_rn(b, inverse));
    if (lane == 0) scales[t] = static_cast<uint8_t>(power + 127);
  }
  for (int64_t i = threadIdx.x; i < rope; i += blockDim.x) {
    const uint32_t bits = FloatToBf16Bits(v[nope + i]);
    data[nope + 2 * i] = static_cast<uint8_t>(bits & 0xffu);
    data[nope + 2 * i + 1] = static_cast<uint8_t>(bits >> 8);
  }
  for (int64_t i = tiles + threadIdx.x; i < scale_bytes; i += blockDim.x) scales[i] = 0;
}

// 8 bytes from any address (one 8-byte load when aligned).
__device__ __forceinline__ uint2 Load8(const uint8_t* p) {
  if ((reinterpret_cast<uintptr_t>(p) & 7u) == 0) return __ldg(reinterpret_cast<const uint2*>(p));
  uint2 out;
  out.x = static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 | static_cast<uint32_t>(p[2]) << 16 |
          static_cast<uint32_t>(p[3]) << 24;
  out.y = static_cast<uint32_t>(p[4]) | static_cast<uint32_t>(p[5]) << 8 | static_cast<uint32_t>(p[6]) << 16 |
          static_cast<uint32_t>(p[7]) << 24;
  return out;
}

// 4 bytes from any address.
__device__ __forceinline__ uint32_t Load4(const uint8_t* p) {
  if ((reinterpret_cast<uintptr_t>(p) & 3u) == 0) return __ldg(reinterpret_cast<const uint32_t*>(p));
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 | static_cast<uint32_t>(p[2]) << 16 |
         static_cast<uint32_t>(p[3]) << 24;
}

// ---- Tensor-core and async-copy building blocks (sm_80+ PTX; the SparseAttention MMA path) ----

__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 4 bytes global -> shared without passing through registers (both 4-byte aligned).
__device__ __forceinline__ void CopyAsync4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
}
// 8 bytes global -> shared without passing through registers (both 8-byte aligned).
__device__ __forceinline__ void CopyAsync8(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(src) : "memory");
}
// 16 bytes global -> shared (both 16-byte aligned), bypassing L1.
__device__ __forceinline__ void CopyAsync16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void CopyAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void CopyAsyncWaitAll() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Four 8x8 b16 matrices; lane l names row l % 8 of matrix l / 8 (16-byte aligned rows).
__device__ __forceinline__ void LoadMatrixX4(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address)
               : "memory");
}
__device__ __forceinline__ void LoadMatrixX4Trans(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address)
               : "memory");
}

// d += a (16x16 bf16, row-major fragment) * b (16x8 bf16, column fragment b0, b1), f32 accumulate.
__device__ __forceinline__ void MmaBf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// d += a * b as MmaBf16, f16 operands.
__device__ __forceinline__ void MmaF16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as one bf16 pair (round to nearest even), element 0 in the low half.
__device__ __forceinline__ uint32_t PackBf16x2(float x, float y) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Two floats as bf16 pairs hi + lo with x ~ hi + lo to ~2^-17 relative (x - hi is exact in f32): two
// bf16 products then carry an f32 operand to nearly f32 accuracy. Element 0 in the low half.
__device__ __forceinline__ void SplitBf16x2(float x, float y, uint32_t& hi, uint32_t& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  const float2 back = __bfloat1622float2(h);
  const __nv_bfloat162 l = __floats2bfloat162_rn(x - back.x, y - back.y);
  hi = *reinterpret_cast<const uint32_t*>(&h);
  lo = *reinterpret_cast<const uint32_t*>(&l);
}

// Two floats as an f16 pair hi + lo (x - hi is exact in f32); element 0 in the low half.
__device__ __forceinline__ void SplitF16x2(float x, float y, uint32_t& hi, uint32_t& lo) {
  const __half2 h = __floats2half2_rn(x, y);
  const float2 back = __half22float2(h);
  const __half2 l = __floats2half2_rn(x - back.x, y - back.y);
  hi = *reinterpret_cast<const uint32_t*>(&h);
  lo = *reinterpret_cast<const uint32_t*>(&l);
}

// Two floats as three bf16 pairs hi + mid + lo (each residual exact in f32): x ~ hi + mid + lo to ~2^-25
// relative, i.e. f32 accuracy. hi + mid alone keeps only ~16 bits: a q . K score of |q| ~ 3 over 512 dims
// then carries ~1e-5 absolute error, which exp turns into output errors past the parity tolerance.
__device__ __forceinline__ void SplitBf16x2x3(float x, float y, uint32_t& hi, uint32_t& mid, uint32_t& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  const float2 hb = __bfloat1622float2(h);
  const float rx = x - hb.x, ry = y - hb.y;
  const __nv_bfloat162 m = __floats2bfloat162_rn(rx, ry);
  const float2 mb = __bfloat1622float2(m);
  const __nv_bfloat162 l = __floats2bfloat162_rn(rx - mb.x, ry - mb.y);
  hi = *reinterpret_cast<const uint32_t*>(&h);
  mid = *reinterpret_cast<const uint32_t*>(&m);
  lo = *reinterpret_cast<const uint32_t*>(&l);
}

// Two e4m3 codes (low byte first) times a ue8m0 scale as a bf16 pair: the same bits as
// FloatToBf16Bits(__fmul_rn(Fp8ToFloat(code), scale)) (e4m3 -> f16 is exact; one f32 product; RNE).
__device__ __forceinline__ uint32_t DequantFp8Pair(uint32_t codes, float scale) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(codes & 0xffffu), __NV_E4M3);
  const float2 f = __half22float2(__half2(h));
  const __nv_bfloat162 b = __floats2bfloat162_rn(__fmul_rn(f.x, scale), __fmul_rn(f.y, scale));
  return *reinterpret_cast<const uint32_t*>(&b);
}

// 16 e4m3 codes (one 16-byte load) times a ue8m0 scale as 16 bf16: codes 0..7 in lo, 8..15 in hi, each pair
// as DequantFp8Pair.
__device__ __forceinline__ void DequantFp8Chunk(const uint4& codes, float scale, uint4* lo, uint4* hi) {
  *lo = make_uint4(DequantFp8Pair(codes.x, scale), DequantFp8Pair(codes.x >> 16, scale), DequantFp8Pair(codes.y, scale),
                   DequantFp8Pair(codes.y >> 16, scale));
  *hi = make_uint4(DequantFp8Pair(codes.z, scale), DequantFp8Pair(codes.z >> 16, scale), DequantFp8Pair(codes.w, scale),
                   DequantFp8Pair(codes.w >> 16, scale));
}

// a * b per bf16 half (fma with -0 so that +0 * s stays +0).
__device__ __forceinline__ uint32_t MulBf16x2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
  return d;
}

// 8 e2m1 codes (value i in nibble i) -> 4 bf16 pairs, word j holding values j (low half) and j + 4 (high
// half), each the code's value times 2^-126: nibbles j and j + 4 sit 16 bits apart, so one mask keeps both and
// one multiply by 2^a + 2^(a + 6) puts two copies of each, one with the magnitude under bits 6-8 / 22-24 and
// one with the sign at 15 / 31 (the copies are disjoint: no carries); a last mask keeps those bits. The x
// operand is laid out in the same order (ToBf16Permuted; the decode tensor-core unit's staging), so the dot
// products are the same.
__device__ __forceinline__ void ShiftMxfp4Word(uint32_t w, uint32_t (&out)[4]) {
  constexpr uint32_t kKeep = 0x81c081c0u;  // magnitude bits 6-8 and sign bit 15 of both halves
  const uint32_t u = w >> 8;               // nibbles 2, 3 and 6, 7 where 0, 1 and 4, 5 were
  out[0] = ((w & 0x000f000fu) * 0x1040u) & kKeep;
  out[1] = ((w & 0x00f000f0u) * 0x0104u) & kKeep;
  out[2] = ((u & 0x000f000fu) * 0x1040u) & kKeep;
  out[3] = ((u & 0x00f000f0u) * 0x0104u) & kKeep;
}

// Scaling ShiftMxfp4Word's pairs (code value x 2^-126) by a group's ue8m0 scale s, exactly: while s <= 128 one
// bf16 multiply by Mxfp4PairFactor(s) = 2^(s - 1); above (or 255, NaN), by kBf16x2TwoTo126 and then by
// Ue8m0Bf16x2(s) = 2^(s - 127), as Ue8m0ToFloat (0: the subnormal 2^-127).
constexpr uint32_t kBf16x2TwoTo126 = 0x7e807e80u;
__device__ __forceinline__ uint32_t Mxfp4PairFactor(uint32_t s) {
  const uint32_t bits = (s + 126u) << 7;
  return bits | bits << 16;
}
__device__ __forceinline__ uint32_t Ue8m0Bf16x2(uint32_t s) {
  const uint32_t v = s == 0 ? 0x0040u : s == 255 ? 0x7FC0u : s << 7;
  return v | (v << 16);
}

// The MoE's clamped SwiGLU of one (gate a, up b) pair, as the CPU computes it.
__device__ __forceinline__ float SwiGluOne(float a, float b, float limit) {
  // std::min / std::clamp semantics (a NaN input stays NaN), then silu(g) * u as the CPU writes it.
  const float g = limit < a ? limit : a;
  const float u = b < -limit ? -limit : (limit < b ? limit : b);
  return g / (1.0f + expf(-g)) * u;
}

// Two e4m3 codes (low byte first) as an f16 pair: exact (every e4m3 value is an f16).
__device__ __forceinline__ uint32_t Fp8PairToF16(uint32_t codes) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(codes & 0xffffu), __NV_E4M3);
  return static_cast<uint32_t>(h.x) | static_cast<uint32_t>(h.y) << 16;
}

// Lets `kernel` use up to the device's opt-in maximum of dynamic shared memory and checks that `bytes` fits
// (device_info.h: set and measured once per device and kernel).
template <typename Kernel>
absl::Status AllowSharedMemory(Kernel kernel, size_t bytes, const char* name) {
  return AllowSharedMemoryFor(reinterpret_cast<const void*>(kernel), bytes, name);
}

}  // namespace tandem::kernels::cuda::internal
