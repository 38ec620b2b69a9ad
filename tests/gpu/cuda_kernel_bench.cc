// Per-kernel benchmark of the CUDA backend on the V4-Flash layer shapes (dsv4-model.md §6.3): each op at
// decode batches 1/16/64/256 and an 8192-token prefill, timed as CUDA-graph replays with CUDA events
// (median), inputs rotated across copies and L2 flushed between replays. Reports bytes, FLOPs and the
// fraction of two ceilings measured in the same run: device-to-device copy bandwidth and the cuBLASLt
// bf16 GEMM rate at 8192^3. Usage: cuda_kernel_bench [out_dir] (writes kernels.csv and ceilings.csv).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "common/kernels/cuda/cuda_ops.h"
#include "common/kernels/cuda/device_buffer.h"

namespace tandem::kernels::cuda {
namespace {

void Check(const absl::Status& status, const char* what) {
  if (status.ok()) return;
  std::fprintf(stderr, "cuda_kernel_bench: %s: %s\n", what, status.ToString().c_str());
  std::exit(1);
}
void Check(cudaError_t err, const char* what) { Check(CudaStatus(err, what, __FILE__, __LINE__), what); }

template <typename T>
DeviceArray<T> Alloc(size_t count) {
  auto array = DeviceArray<T>::Create(count);
  Check(array.status(), "cudaMalloc");
  return std::move(array).value();
}

DeviceArray<float> RandomFloats(size_t count, uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
  auto array = Alloc<float>(count);
  Check(FillUniform(array.get(), static_cast<int64_t>(count), seed, lo, hi), "FillUniform");
  return array;
}

DeviceArray<__nv_bfloat16> RandomBf16(size_t count, uint64_t seed) {
  auto values = RandomFloats(count, seed);
  auto array = Alloc<__nv_bfloat16>(count);
  Check(FloatToBf16(values.get(), static_cast<int64_t>(count), array.get()), "FloatToBf16");
  return array;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

constexpr int kInner = 20;    // launches per graph (each on its own copy of the inputs where they fit)
constexpr int kReplays = 15;  // timed graph replays; the median is reported
constexpr size_t kCopyBudget = size_t{4} << 30;

int CopiesFor(size_t set_bytes) {
  return static_cast<int>(std::clamp<size_t>(kCopyBudget / std::max<size_t>(set_bytes, 1), 1, kInner));
}

class Bench {
 public:
  Bench() {
    Check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    Check(cudaEventCreate(&start_), "cudaEventCreate");
    Check(cudaEventCreate(&stop_), "cudaEventCreate");
    flush_ = Alloc<uint8_t>(size_t{256} << 20);  // > 4x the 60 MB L2
  }
  cudaStream_t stream() const { return stream_; }

  // Microseconds per launch of `launch(i)` (i = launch index within the graph).
  double TimeUs(const std::function<absl::Status(int)>& launch) {
    for (int i = 0; i < kInner; ++i) Check(launch(i), "warm-up launch");
    Check(cudaStreamSynchronize(stream_), "warm-up sync");
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    Check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
    for (int i = 0; i < kInner; ++i) Check(launch(i), "captured launch");
    Check(cudaStreamEndCapture(stream_, &graph), "cudaStreamEndCapture");
    Check(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
    std::vector<double> times;
    for (int r = 0; r < kReplays; ++r) {
      Check(cudaMemsetAsync(flush_.get(), r & 0xff, flush_.bytes(), stream_), "L2 flush");
      Check(cudaEventRecord(start_, stream_), "cudaEventRecord");
      Check(cudaGraphLaunch(exec, stream_), "cudaGraphLaunch");
      Check(cudaEventRecord(stop_, stream_), "cudaEventRecord");
      Check(cudaEventSynchronize(stop_), "cudaEventSynchronize");
      float ms = 0.0f;
      Check(cudaEventElapsedTime(&ms, start_, stop_), "cudaEventElapsedTime");
      times.push_back(1e3 * ms / kInner);
    }
    Check(cudaGraphExecDestroy(exec), "cudaGraphExecDestroy");
    Check(cudaGraphDestroy(graph), "cudaGraphDestroy");
    return Median(times);
  }

  // Plain event timing for the ceilings (one long operation each).
  double TimeOnceUs(const std::function<absl::Status()>& op, int reps) {
    for (int i = 0; i < 3; ++i) Check(op(), "warm-up");
    std::vector<double> times;
    for (int r = 0; r < reps; ++r) {
      Check(cudaEventRecord(start_, stream_), "cudaEventRecord");
      Check(op(), "timed op");
      Check(cudaEventRecord(stop_, stream_), "cudaEventRecord");
      Check(cudaEventSynchronize(stop_), "cudaEventSynchronize");
      float ms = 0.0f;
      Check(cudaEventElapsedTime(&ms, start_, stop_), "cudaEventElapsedTime");
      times.push_back(1e3 * ms);
    }
    return Median(times);
  }

 private:
  cudaStream_t stream_ = nullptr;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
  DeviceArray<uint8_t> flush_;
};

struct Row {
  std::string op;
  int64_t tokens;
  double us, bytes, flops;
};

constexpr int64_t kHidden = 4096, kStreams = 4, kHeads = 64, kHeadDim = 512, kRope = 64, kQLora = 1024;

struct GemmShape {
  const char* name;
  int64_t in, out;
};
// FP8 128x128 weights of a flash layer, dequantized once to bf16 (dsv4-model.md §4, §6.3).
constexpr GemmShape kGemms[] = {{"gemm_wq_a", 4096, 1024},        {"gemm_wkv", 4096, 512},
                                {"gemm_wq_b", 1024, 32768},       {"gemm_wo_b", 8192, 4096},
                                {"gemm_shared_w13", 4096, 4096},  {"gemm_shared_w2", 2048, 4096}};

void RunOps(Bench& bench, Gemm& gemm, int64_t T, std::vector<Row>& rows) {
  const cudaStream_t s = bench.stream();
  uint64_t seed = 1000 * static_cast<uint64_t>(T);
  auto add = [&](const std::string& op, double us, double bytes, double flops) {
    rows.push_back({op, T, us, bytes, flops});
    std::fprintf(stderr, "  %-18s T=%-5lld %10.2f us\n", op.c_str(), static_cast<long long>(T), us);
  };
  // RMSNorm: attn_norm [T, 4096], q_norm [T, 1024] (weighted), per-head q norm [T*64, 512] (no weight).
  struct NormCase {
    const char* name;
    int64_t rows, dim;
    bool weighted;
  };
  for (const NormCase c : {NormCase{"rmsnorm_attn", T, kHidden, true}, NormCase{"rmsnorm_q_lora", T, kQLora, true},
                           NormCase{"rmsnorm_q_heads", T * kHeads, kHeadDim, false}}) {
    const size_t n = static_cast<size_t>(c.rows * c.dim);
    const int copies = CopiesFor(2 * n * sizeof(float));
    std::vector<DeviceArray<float>> x, y;
    for (int i = 0; i < copies; ++i) {
      x.push_back(RandomFloats(n, ++seed));
      y.push_back(Alloc<float>(n));
    }
    auto w = RandomFloats(static_cast<size_t>(c.dim), ++seed);
    const double us = bench.TimeUs([&](int i) {
      return RmsNorm(x[i % copies].get(), c.rows, c.dim, c.weighted ? w.get() : nullptr, 1e-6f, y[i % copies].get(), s);
    });
    add(c.name, us, 8.0 * n + (c.weighted ? 4.0 * c.dim : 0.0), (c.weighted ? 4.0 : 3.0) * n);
  }
  // RoPE on q [T, 64, 512] (last 64 dims, forward) and on the attention output (inverse), in place.
  {
    const size_t n = static_cast<size_t>(T * kHeads * kHeadDim);
    const int copies = CopiesFor(n * sizeof(float));
    std::vector<DeviceArray<float>> q;
    for (int i = 0; i < copies; ++i) q.push_back(RandomFloats(n, ++seed));
    std::vector<int64_t> host_positions(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) host_positions[t] = 4096 + 7 * t;
    auto positions = DeviceArray<int64_t>::FromHost(host_positions);
    Check(positions.status(), "positions");
    std::vector<double> host_freqs(kRope / 2);
    for (int64_t i = 0; i < kRope / 2; ++i) host_freqs[i] = std::pow(160000.0, -2.0 * i / kRope);
    auto freqs = DeviceArray<double>::FromHost(host_freqs);
    Check(freqs.status(), "freqs");
    for (const bool inverse : {false, true}) {
      const double us = bench.TimeUs([&](int i) {
        return ApplyRope(q[i % copies].get(), T, kHeads * kHeadDim, kHeads, kHeadDim, kHeadDim - kRope, kRope,
                         positions->get(), freqs->get(), inverse, s);
      });
      // Reads and writes the rotary slices only (a 256-byte run per head).
      add(inverse ? "rope_inverse_o" : "rope_q", us, 2.0 * 4 * T * kHeads * kRope + 8.0 * T, 6.0 * T * kHeads * kRope / 2);
    }
  }
  // mHC pre and post on x [T, 4*4096].
  {
    MhcShape shape;
    shape.hidden = kHidden;
    const int64_t MD = kStreams * kHidden;
    const size_t n = static_cast<size_t>(T * MD);
    const int copies = CopiesFor(n * sizeof(float) + static_cast<size_t>(T * kHidden) * 4);
    std::vector<DeviceArray<float>> x, y, out;
    for (int i = 0; i < copies; ++i) {
      x.push_back(RandomFloats(n, ++seed));
      y.push_back(Alloc<float>(static_cast<size_t>(T * kHidden)));
      out.push_back(RandomFloats(static_cast<size_t>(T * kHidden), ++seed));
    }
    auto fn = RandomFloats(static_cast<size_t>(24 * MD), ++seed, -0.01f, 0.01f);
    auto base = RandomFloats(24, ++seed);
    auto scale = RandomFloats(3, ++seed, 0.5f, 1.5f);
    auto post = Alloc<float>(static_cast<size_t>(T * kStreams));
    auto comb = Alloc<float>(static_cast<size_t>(T * kStreams * kStreams));
    const size_t workspace_bytes = HcPreWorkspaceBytes(shape, T);
    auto workspace = Alloc<uint8_t>(workspace_bytes);
    const double pre_us = bench.TimeUs([&](int i) {
      return HcPre(shape, {fn.get(), base.get(), scale.get()}, x[i % copies].get(), T, y[i % copies].get(), post.get(),
                   comb.get(), workspace.get(), workspace_bytes, s);
    });
    // Fewest bytes: x once, fn once, y, post and comb out.
    add("mhc_pre", pre_us, 4.0 * (n + 24.0 * MD + T * kHidden + 20.0 * T), 2.0 * T * MD * 25 + 2.0 * T * MD);
    const double post_us = bench.TimeUs([&](int i) {
      return HcPost(shape, out[i % copies].get(), post.get(), comb.get(), T, x[i % copies].get(), s);
    });
    add("mhc_post", post_us, 4.0 * (2.0 * n + T * kHidden + 20.0 * T), 2.0 * T * kHidden * kStreams * 5);
  }
  // FP8 KV-entry quantization of the layer's kv vectors [T, 512] -> 584-byte entries.
  {
    const KvFormat format;
    const int copies = CopiesFor(static_cast<size_t>(T * (format.dim() * 4 + format.entry_bytes())));
    std::vector<DeviceArray<float>> kv;
    std::vector<DeviceArray<uint8_t>> entries;
    for (int i = 0; i < copies; ++i) {
      kv.push_back(RandomFloats(static_cast<size_t>(T * format.dim()), ++seed));
      entries.push_back(Alloc<uint8_t>(static_cast<size_t>(T * format.entry_bytes())));
    }
    const double us = bench.TimeUs(
        [&](int i) { return QuantizeKvEntries(format, kv[i % copies].get(), T, entries[i % copies].get(), s); });
    add("kv_quantize", us, static_cast<double>(T) * (format.dim() * 4 + format.entry_bytes()), 3.0 * T * format.dim());
  }
  // Activation cast feeding the GEMMs, then the GEMMs with bf16 weights and f32 output.
  {
    const size_t n = static_cast<size_t>(T * kHidden);
    const int copies = CopiesFor(6 * n);
    std::vector<DeviceArray<float>> x;
    std::vector<DeviceArray<__nv_bfloat16>> xb;
    for (int i = 0; i < copies; ++i) {
      x.push_back(RandomFloats(n, ++seed));
      xb.push_back(Alloc<__nv_bfloat16>(n));
    }
    const double us = bench.TimeUs(
        [&](int i) { return FloatToBf16(x[i % copies].get(), static_cast<int64_t>(n), xb[i % copies].get(), s); });
    add("cast_x_bf16", us, 6.0 * n, static_cast<double>(n));
  }
  for (const GemmShape g : kGemms) {
    const size_t set = static_cast<size_t>(g.out * g.in * 2 + T * g.in * 2 + T * g.out * 4);
    const int copies = CopiesFor(set);
    std::vector<DeviceArray<__nv_bfloat16>> w, x;
    std::vector<DeviceArray<float>> y;
    for (int i = 0; i < copies; ++i) {
      w.push_back(RandomBf16(static_cast<size_t>(g.out * g.in), ++seed));
      x.push_back(RandomBf16(static_cast<size_t>(T * g.in), ++seed));
      y.push_back(Alloc<float>(static_cast<size_t>(T * g.out)));
    }
    const double us = bench.TimeUs([&](int i) {
      return gemm.Linear(x[i % copies].get(), T, g.in, w[i % copies].get(), g.out, y[i % copies].get(),
                         Gemm::Output::kF32, s);
    });
    add(g.name, us, static_cast<double>(set), 2.0 * T * g.in * g.out);
  }
}

}  // namespace
}  // namespace tandem::kernels::cuda

int main(int argc, char** argv) {
  using namespace tandem::kernels::cuda;
  const std::string out_dir = argc > 1 ? argv[1] : ".";
  Check(DeviceAvailable(), "device");
  cudaDeviceProp prop{};
  Check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  std::fprintf(stderr, "device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
  Bench bench;
  auto gemm_or = Gemm::Create();
  Check(gemm_or.status(), "Gemm::Create");
  Gemm& gemm = **gemm_or;

  // Ceiling 1: device-to-device copy of 2 GiB (bytes read + bytes written).
  const size_t copy_bytes = size_t{2} << 30;
  auto a = RandomFloats(copy_bytes / 4, 1), b = Alloc<float>(copy_bytes / 4);
  const double copy_us = bench.TimeOnceUs(
      [&] { return CudaStatus(cudaMemcpyAsync(b.get(), a.get(), copy_bytes, cudaMemcpyDeviceToDevice, bench.stream()),
                              "cudaMemcpyAsync", __FILE__, __LINE__); }, 10);
  const double copy_gbps = 2.0 * copy_bytes / copy_us * 1e-3;
  // Ceiling 2: cuBLASLt bf16 GEMM at 8192^3 on random data, bf16 out.
  const int64_t n = 8192;
  auto ga = RandomBf16(static_cast<size_t>(n * n), 2), gb = RandomBf16(static_cast<size_t>(n * n), 3);
  auto gc = Alloc<__nv_bfloat16>(static_cast<size_t>(n * n));
  const double gemm_us = bench.TimeOnceUs(
      [&] { return gemm.Linear(ga.get(), n, n, gb.get(), n, gc.get(), Gemm::Output::kBf16, bench.stream()); }, 10);
  const double gemm_tflops = 2.0 * n * n * n / gemm_us * 1e-6;
  std::fprintf(stderr, "ceilings: copy %.0f GB/s, bf16 GEMM %.0f TFLOP/s\n", copy_gbps, gemm_tflops);

  std::vector<Row> rows;
  // One-time: dequantize wq_b (32768 x 1024 FP8) to bf16.
  {
    const int64_t out = 32768, in = 1024;
    auto codes = Alloc<uint8_t>(static_cast<size_t>(out * in));
    auto scales = Alloc<uint8_t>(static_cast<size_t>((out / 128) * (in / 128)));
    Check(FillFp8Codes(codes.get(), out * in, 9), "FillFp8Codes");
    Check(cudaMemset(scales.get(), 127, scales.bytes()), "cudaMemset");
    auto dst = Alloc<__nv_bfloat16>(static_cast<size_t>(out * in));
    const double us = bench.TimeUs(
        [&](int) { return DequantizeFp8Block({codes.get(), scales.get(), out, in}, dst.get(), bench.stream()); });
    rows.push_back({"dequant_fp8_wq_b", 0, us, 3.0 * out * in + static_cast<double>(scales.bytes()), 1.0 * out * in});
  }
  for (const int64_t T : {1, 16, 64, 256, 8192}) RunOps(bench, gemm, T, rows);

  const std::string kernels_path = out_dir + "/kernels.csv", ceilings_path = out_dir + "/ceilings.csv";
  FILE* csv = std::fopen(kernels_path.c_str(), "w");
  FILE* ceil = std::fopen(ceilings_path.c_str(), "w");
  if (!csv || !ceil) {
    std::fprintf(stderr, "cannot write %s\n", out_dir.c_str());
    return 1;
  }
  std::fprintf(ceil, "device,copy_gbps,gemm_bf16_tflops\n\"%s\",%.1f,%.1f\n", prop.name, copy_gbps, gemm_tflops);
  std::fclose(ceil);
  std::fprintf(csv, "op,tokens,time_us,bytes,flops,gbps,tflops,frac_copy_bw,frac_gemm_rate,floor_us,frac_of_floor\n");
  std::printf("ceilings on %s: copy %.0f GB/s, cuBLASLt bf16 GEMM %.0f TFLOP/s\n", prop.name, copy_gbps, gemm_tflops);
  std::printf("%-18s %6s %10s %10s %9s %9s %7s %7s %9s\n", "op", "tokens", "time_us", "MB", "GB/s", "TFLOP/s", "%bw",
              "%gemm", "%floor");
  for (const Row& r : rows) {
    const double gbps = r.bytes / r.us * 1e-3, tflops = r.flops / r.us * 1e-6;
    const double floor_us = std::max(r.bytes / (copy_gbps * 1e3), r.flops / (gemm_tflops * 1e6));
    std::fprintf(csv, "%s,%lld,%.3f,%.0f,%.0f,%.2f,%.4f,%.4f,%.4f,%.3f,%.4f\n", r.op.c_str(),
                 static_cast<long long>(r.tokens), r.us, r.bytes, r.flops, gbps, tflops, gbps / copy_gbps,
                 tflops / gemm_tflops, floor_us, floor_us / r.us);
    std::printf("%-18s %6lld %10.2f %10.2f %9.0f %9.2f %6.1f%% %6.1f%% %8.1f%%\n", r.op.c_str(),
                static_cast<long long>(r.tokens), r.us, r.bytes * 1e-6, gbps, tflops, 100 * gbps / copy_gbps,
                100 * tflops / gemm_tflops, 100 * floor_us / r.us);
  }
  std::fclose(csv);
  return 0;
}
