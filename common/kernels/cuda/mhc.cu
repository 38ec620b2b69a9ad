// mHC pre and post on the GPU (dsv4-model.md §2.2 and NUMERICS.md), for M = 4 streams.
// HcPre is two launches: a tiled f32 projection of x [T, M*D] onto the 24 mixes plus each token's sum of
// squares, split over K so that decode batches still fill the GPU; then one block per token reduces the
// splits in a fixed order, runs the sigmoids (double) and the 4x4 Sinkhorn (f32, 16 lanes, one entry each)
// and writes the weighted stream sum.
#include <cuda_runtime.h>

#include <algorithm>

#include "common/kernels/cuda/check.h"
#include "common/kernels/cuda/cuda_ops.h"

namespace tandem::kernels::cuda {
namespace {

constexpr int kStreams = 4;
constexpr int kMixes = (2 + kStreams) * kStreams;  // 24
constexpr int kSlots = 32;                          // per token and split: 24 mixes, the sum of squares, padding
constexpr int kTokenTile = 64;
constexpr int kChunk = 64;  // K elements per shared-memory stage
constexpr int kMixThreads = 256;

// grid (token tiles, splits). Thread t owns tokens t/8 and t/8 + 32 of the tile and mixes t%8 + 8q (q < 3).
__global__ void __launch_bounds__(kMixThreads) HcMixKernel(const float* x, int64_t tokens, int64_t k_total,
                                                           const float* fn, int64_t chunks_per_split, float* partial) {
  // Rows padded by 4 floats: 16-byte aligned for float4 reads, and the 8 mix rows a warp reads at one k
  // land in 8 different bank quads.
  __shared__ __align__(16) float xs[kTokenTile][kChunk + 4];
  __shared__ __align__(16) float fs[kMixes][kChunk + 4];
  const int tid = threadIdx.x;
  const int token_local = tid / 8, lane8 = tid % 8;
  const int64_t token0 = static_cast<int64_t>(blockIdx.x) * kTokenTile;
  const int64_t chunks = k_total / kChunk;
  const int64_t chunk_begin = blockIdx.y * chunks_per_split;
  const int64_t chunk_end = chunk_begin + chunks_per_split < chunks ? chunk_begin + chunks_per_split : chunks;
  float acc[2][3] = {};
  float squares[2] = {0.f, 0.f};
  // Registers hold the next chunk's global loads while the current one is multiplied (one stage ahead).
  float4 xa[2], xb[2], wv[2] = {};
  auto load = [&](int64_t chunk) {
    const int64_t k0 = chunk * kChunk;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t token = token0 + token_local + 32 * half;
      xa[half] = xb[half] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (token < tokens) {
        const float4* src = reinterpret_cast<const float4*>(x + token * k_total + k0 + lane8 * 8);
        xa[half] = src[0];
        xb[half] = src[1];
      }
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int v = tid + u * kMixThreads;
      if (v < kMixes * (kChunk / 4)) {
        wv[u] = *reinterpret_cast<const float4*>(fn + (v / (kChunk / 4)) * k_total + k0 + (v % (kChunk / 4)) * 4);
      }
    }
  };
  if (chunk_begin < chunk_end) load(chunk_begin);
  for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float4 a = xa[half], b = xb[half];
      float4* xrow = reinterpret_cast<float4*>(&xs[token_local + 32 * half][lane8 * 8]);
      xrow[0] = a;
      xrow[1] = b;
      squares[half] += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w + b.x * b.x + b.y * b.y + b.z * b.z + b.w * b.w;
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int v = tid + u * kMixThreads;
      if (v < kMixes * (kChunk / 4)) *reinterpret_cast<float4*>(&fs[v / (kChunk / 4)][(v % (kChunk / 4)) * 4]) = wv[u];
    }
    __syncthreads();
    if (chunk + 1 < chunk_end) load(chunk + 1);
    // float4 shared-memory reads: 5 loads per 24 FMAs (scalar reads made this loop load-issue bound).
#pragma unroll 4
    for (int k = 0; k < kChunk; k += 4) {
      const float4 x0 = *reinterpret_cast<const float4*>(&xs[token_local][k]);
      const float4 x1 = *reinterpret_cast<const float4*>(&xs[token_local + 32][k]);
#pragma unroll
      for (int q = 0; q < 3; ++q) {
        const float4 w = *reinterpret_cast<const float4*>(&fs[lane8 + 8 * q][k]);
        acc[0][q] = fmaf(x0.x, w.x, acc[0][q]);
        acc[0][q] = fmaf(x0.y, w.y, acc[0][q]);
        acc[0][q] = fmaf(x0.z, w.z, acc[0][q]);
        acc[0][q] = fmaf(x0.w, w.w, acc[0][q]);
        acc[1][q] = fmaf(x1.x, w.x, acc[1][q]);
        acc[1][q] = fmaf(x1.y, w.y, acc[1][q]);
        acc[1][q] = fmaf(x1.z, w.z, acc[1][q]);
        acc[1][q] = fmaf(x1.w, w.w, acc[1][q]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float sq = squares[half];
    for (int offset = 1; offset < 8; offset *= 2) sq += __shfl_xor_sync(0xffffffffu, sq, offset);
    const int64_t token = token0 + token_local + 32 * half;
    if (token < tokens) {
      float* out = partial + (static_cast<int64_t>(blockIdx.y) * tokens + token) * kSlots;
#pragma unroll
      for (int q = 0; q < 3; ++q) out[lane8 + 8 * q] = acc[half][q];
      if (lane8 == 0) out[kMixes] = sq;
    }
  }
}

__device__ double Sigmoid(double v) { return 1.0 / (1.0 + exp(-v)); }

// One block per token.
__global__ void HcCombineKernel(const float* x, int64_t hidden, const float* partial, int64_t tokens, int splits,
                                const float* base, const float* scale, int iters, double hc_eps, double rms_eps,
                                float* y, float* post, float* comb) {
  __shared__ float pre_shared[kStreams];
  const int64_t token = blockIdx.x;
  const int64_t k_total = kStreams * hidden;
  __shared__ double slot_sums[8][kSlots];
  // The 8 warps each sum every 8th split of each slot, then warp 0 adds the 8 partial sums in order:
  // a fixed order for a given split count, and 8x fewer dependent loads on the decode path.
  {
    const int slot = threadIdx.x % 32, group = threadIdx.x / 32;
    double sum = 0.0;
    if (slot <= kMixes && group < 8) {
      for (int s = group; s < splits; s += 8) sum += partial[(static_cast<int64_t>(s) * tokens + token) * kSlots + slot];
    }
    if (group < 8) slot_sums[group][slot] = sum;
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    double value = 0.0;
    for (int g = 0; g < 8; ++g) value += slot_sums[g][lane];
    const double squares = __shfl_sync(0xffffffffu, value, kMixes);
    const double r = 1.0 / sqrt(squares / static_cast<double>(k_total) + rms_eps);
    // Lanes 0..3: pre; lanes 4..7: post.
    if (lane < kStreams) {
      pre_shared[lane] = static_cast<float>(Sigmoid(value * r * scale[0] + base[lane]) + hc_eps);
    } else if (lane < 2 * kStreams) {
      post[token * kStreams + lane - kStreams] = static_cast<float>(2.0 * Sigmoid(value * r * scale[1] + base[lane]));
    }
    // Sinkhorn in f32 (the spec's precision; the CPU's double differs by ~1e-7): lane e (mod 16) holds
    // C[j][k], e = 4j + k; rows are groups of 4 lanes, columns stride 4. f32 keeps the 20 dependent
    // iterations off the slow double divide and double shuffles.
    const int e = lane % 16;
    const float eps = static_cast<float>(hc_eps);
    const double raw = __shfl_sync(0xffffffffu, value, 2 * kStreams + e);
    float c = static_cast<float>(raw * r * scale[2] + base[2 * kStreams + e]);
    float row_max = c;
    for (int offset = 1; offset < 4; offset *= 2) row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, offset));
    c = expf(c - row_max);
    float sum = c;
    for (int offset = 1; offset < 4; offset *= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    c = c / sum + eps;
    auto column_sum = [](float v) {
      for (int offset = 4; offset < 16; offset *= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
      return v;
    };
    c /= column_sum(c) + eps;
    for (int it = 1; it < iters; ++it) {
      float row = c;
      for (int offset = 1; offset < 4; offset *= 2) row += __shfl_xor_sync(0xffffffffu, row, offset);
      c /= row + eps;
      c /= column_sum(c) + eps;
    }
    if (lane < 16) comb[token * kStreams * kStreams + e] = c;
  }
  __syncthreads();
  const float p0 = pre_shared[0], p1 = pre_shared[1], p2 = pre_shared[2], p3 = pre_shared[3];
  const float* xt = x + token * k_total;
  float* yt = y + token * hidden;
  // Same order as the CPU: y = 0 + p0 x0 + p1 x1 + p2 x2 + p3 x3, each product rounded.
  for (int64_t d = threadIdx.x; d < hidden / 4; d += blockDim.x) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    const float ps[kStreams] = {p0, p1, p2, p3};
#pragma unroll
    for (int j = 0; j < kStreams; ++j) {
      const float4 v = reinterpret_cast<const float4*>(xt + j * hidden)[d];
      acc.x = __fadd_rn(acc.x, __fmul_rn(ps[j], v.x));
      acc.y = __fadd_rn(acc.y, __fmul_rn(ps[j], v.y));
      acc.z = __fadd_rn(acc.z, __fmul_rn(ps[j], v.z));
      acc.w = __fadd_rn(acc.w, __fmul_rn(ps[j], v.w));
    }
    reinterpret_cast<float4*>(yt)[d] = acc;
  }
}

// grid (ceil(D/4 / 256), T): each thread one float4 column of all 4 streams, in place.
__global__ void HcPostKernel(const float* out, const float* post, const float* comb, int64_t hidden, float* x) {
  const int64_t token = blockIdx.y;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (d >= hidden / 4) return;
  float* xt = x + token * kStreams * hidden;
  float4 residual[kStreams];
#pragma unroll
  for (int j = 0; j < kStreams; ++j) residual[j] = reinterpret_cast<const float4*>(xt + j * hidden)[d];
  const float4 o = reinterpret_cast<const float4*>(out + token * hidden)[d];
  const float* c = comb + token * kStreams * kStreams;
#pragma unroll
  for (int k = 0; k < kStreams; ++k) {
    const float p = post[token * kStreams + k];
    float4 v = make_float4(__fmul_rn(p, o.x), __fmul_rn(p, o.y), __fmul_rn(p, o.z), __fmul_rn(p, o.w));
#pragma unroll
    for (int j = 0; j < kStreams; ++j) {
      const float w = c[j * kStreams + k];
      v.x = __fadd_rn(v.x, __fmul_rn(w, residual[j].x));
      v.y = __fadd_rn(v.y, __fmul_rn(w, residual[j].y));
      v.z = __fadd_rn(v.z, __fmul_rn(w, residual[j].z));
      v.w = __fadd_rn(v.w, __fmul_rn(w, residual[j].w));
    }
    reinterpret_cast<float4*>(xt + k * hidden)[d] = v;
  }
}

int SplitsFor(const MhcShape& shape, int64_t tokens) {
  // Enough blocks for ~4 waves of 132 SMs, but every split keeps at least 2 chunks.
  const int64_t tiles = (tokens + kTokenTile - 1) / kTokenTile;
  const int64_t chunks = shape.streams * shape.hidden / kChunk;
  const int64_t wanted = std::max<int64_t>(1, 528 / std::max<int64_t>(1, tiles));
  return static_cast<int>(std::clamp<int64_t>(std::min(wanted, chunks / 2), 1, 256));
}

absl::Status CheckShape(const MhcShape& shape) {
  if (shape.streams != kStreams) {
    return absl::UnimplementedError(absl::StrCat("mHC kernels support hc_mult 4, not ", shape.streams));
  }
  if (shape.hidden <= 0 || (shape.streams * shape.hidden) % kChunk != 0) {
    return absl::InvalidArgumentError(absl::StrCat("mHC: hc_mult * hidden_size (", shape.streams * shape.hidden,
                                                   ") must be a positive multiple of ", kChunk));
  }
  if (shape.sinkhorn_iters < 1) return absl::InvalidArgumentError("mHC: hc_sinkhorn_iters must be >= 1");
  return absl::OkStatus();
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

size_t HcPreWorkspaceBytes(const MhcShape& shape, int64_t tokens) {
  if (!CheckShape(shape).ok() || tokens <= 0) return 0;
  return static_cast<size_t>(SplitsFor(shape, tokens)) * static_cast<size_t>(tokens) * kSlots * sizeof(float);
}

absl::Status HcPre(const MhcShape& shape, const MhcParams& params, const float* x, int64_t tokens, float* y,
                   float* post, float* comb, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  TANDEM_RETURN_IF_ERROR(CheckShape(shape));
  if (tokens < 0 || tokens > 0x7fffffff) return absl::InvalidArgumentError("HcPre: tokens out of range");
  if (tokens == 0) return absl::OkStatus();
  if (workspace_bytes < HcPreWorkspaceBytes(shape, tokens)) {
    return absl::InvalidArgumentError(absl::StrCat("HcPre: workspace of ", workspace_bytes, " bytes, needs ",
                                                   HcPreWorkspaceBytes(shape, tokens)));
  }
  if (!Aligned16(x) || !Aligned16(y) || !Aligned16(params.fn) || !Aligned16(workspace)) {
    return absl::InvalidArgumentError("HcPre: x, y, fn and workspace must be 16-byte aligned");
  }
  const int splits = SplitsFor(shape, tokens);
  const int64_t k_total = shape.streams * shape.hidden;
  const int64_t chunks_per_split = (k_total / kChunk + splits - 1) / splits;
  auto* partial = static_cast<float*>(workspace);
  const dim3 grid(static_cast<unsigned>((tokens + kTokenTile - 1) / kTokenTile), static_cast<unsigned>(splits));
  HcMixKernel<<<grid, kMixThreads, 0, stream>>>(x, tokens, k_total, params.fn, chunks_per_split, partial);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("HcMixKernel");
  HcCombineKernel<<<static_cast<unsigned>(tokens), 256, 0, stream>>>(
      x, shape.hidden, partial, tokens, splits, params.base, params.scale, static_cast<int>(shape.sinkhorn_iters),
      shape.hc_eps, shape.rms_norm_eps, y, post, comb);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("HcCombineKernel");
  return absl::OkStatus();
}

absl::Status HcPost(const MhcShape& shape, const float* out, const float* post, const float* comb, int64_t tokens,
                    float* x, cudaStream_t stream) {
  TANDEM_RETURN_IF_ERROR(CheckShape(shape));
  if (tokens < 0 || tokens > 65535) return absl::InvalidArgumentError("HcPost: tokens must be in [0, 65535]");
  if (tokens == 0) return absl::OkStatus();
  if (!Aligned16(out) || !Aligned16(x)) return absl::InvalidArgumentError("HcPost: out and x must be 16-byte aligned");
  const int64_t vectors = shape.hidden / 4;
  const dim3 grid(static_cast<unsigned>((vectors + 255) / 256), static_cast<unsigned>(tokens));
  HcPostKernel<<<grid, 256, 0, stream>>>(out, post, comb, shape.hidden, x);
  TANDEM_CUDA_RETURN_IF_LAUNCH_FAILED("HcPostKernel");
  return absl::OkStatus();
}

}  // namespace tandem::kernels::cuda
