// Per-kernel benchmark of the CUDA backend on the V4-Flash layer shapes (dsv4-model.md §6.3): each op at
// decode batches 1/16/64/256 (contexts 4096 and 32768 where the op depends on the context) and an
// 8192-token prefill, timed as CUDA-graph replays with CUDA events (median), inputs rotated across copies
// and L2 flushed between replays. Reports bytes, FLOPs and the fraction of two ceilings measured in the
// same run: device-to-device copy bandwidth and the cuBLASLt bf16 GEMM rate at 8192^3. Usage:
// cuda_kernel_bench [out_dir] (writes kernels.csv and ceilings.csv; `timing` says graph or plain launches).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <cuda_runtime_api.h>

#include "common/kernels/cuda/cuda_attention.h"
#include "common/kernels/cuda/cuda_model_ops.h"
#include "common/kernels/cuda/cuda_moe.h"
#include "common/kernels/cuda/cuda_moe_prefill.h"
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
[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "cuda_kernel_bench: %s\n", what.c_str());
  std::exit(1);
}

template <typename T>
DeviceArray<T> Alloc(size_t count) {
  auto array = DeviceArray<T>::Create(count);
  Check(array.status(), "cudaMalloc");
  return std::move(array).value();
}

template <typename T>
DeviceArray<T> ToDevice(const std::vector<T>& host) {
  auto array = DeviceArray<T>::FromHost(host);
  Check(array.status(), "upload");
  return std::move(array).value();
}

template <typename T>
std::vector<T> ToHost(const DeviceArray<T>& array) {
  std::vector<T> host(array.size());
  Check(array.Download(host), "download");
  return host;
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

// Fails on a NaN or infinity among the first 4M values of an op's output (an unwritten or broken output).
void CheckFinite(const float* device, size_t count, const std::string& what) {
  std::vector<float> host(std::min<size_t>(count, size_t{1} << 22));
  Check(cudaMemcpy(host.data(), device, host.size() * sizeof(float), cudaMemcpyDeviceToHost), "cudaMemcpy");
  for (size_t i = 0; i < host.size(); ++i) {
    if (!std::isfinite(host[i])) Fail(what + ": output " + std::to_string(i) + " is not finite");
  }
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

constexpr int kInner = 20;    // launches per graph (each on its own copy of the inputs where they fit)
constexpr int kReplays = 15;  // timed graph replays; the median is reported
constexpr size_t kCopyBudget = size_t{4} << 30;
constexpr size_t kPoolBudget = size_t{4} << 30;  // cache pools (KV entries, indexer keys) over all copies

int CopiesFor(size_t set_bytes) {
  return static_cast<int>(std::clamp<size_t>(kCopyBudget / std::max<size_t>(set_bytes, 1), 1, kInner));
}
// Copies of a case whose inputs include a cache pool: CopiesFor(what one launch touches), and the pools
// of all copies within kPoolBudget.
int CopiesWithPool(size_t touched_bytes, size_t pool_bytes_per_copy) {
  const size_t by_pool = kPoolBudget / std::max<size_t>(pool_bytes_per_copy, 1);
  return static_cast<int>(std::clamp<size_t>(by_pool, 1, static_cast<size_t>(CopiesFor(touched_bytes))));
}

struct Timing {
  double us = 0.0;
  bool graph = true;  // false: plain launches between events (graph capture failed)
};

class Bench {
 public:
  Bench() {
    Check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    Check(cudaEventCreate(&start_), "cudaEventCreate");
    Check(cudaEventCreate(&stop_), "cudaEventCreate");
    flush_ = Alloc<uint8_t>(size_t{256} << 20);  // > 4x the 60 MB L2
  }
  cudaStream_t stream() const { return stream_; }

  // Microseconds per launch of `launch(i)` (i = launch index within the graph). Ops over 1 ms per launch
  // (prefill attention, expert GEMMs) take 2 launches per graph and 7 replays, to keep the run short. When
  // capture fails, the same launches are timed without a graph (launch gaps included).
  Timing Time(const std::function<absl::Status(int)>& launch) {
    Check(cudaDeviceSynchronize(), "setup sync");  // the fills ran on the default stream
    Check(launch(0), "warm-up launch");
    Check(cudaStreamSynchronize(stream_), "warm-up sync");
    Check(cudaEventRecord(start_, stream_), "cudaEventRecord");
    Check(launch(1), "warm-up launch");
    Check(cudaEventRecord(stop_, stream_), "cudaEventRecord");
    const double probe_us = ElapsedUs();
    const bool long_op = probe_us > 1000.0;
    const int inner = long_op ? 2 : kInner, replays = long_op ? 7 : kReplays;
    for (int i = 0; i < inner; ++i) Check(launch(i), "warm-up launch");
    Check(cudaStreamSynchronize(stream_), "warm-up sync");
    cudaGraphExec_t exec = Capture(launch, inner);
    std::vector<double> times;
    for (int r = 0; r < replays; ++r) {
      Check(cudaMemsetAsync(flush_.get(), r & 0xff, flush_.bytes(), stream_), "L2 flush");
      Check(cudaEventRecord(start_, stream_), "cudaEventRecord");
      if (exec) {
        Check(cudaGraphLaunch(exec, stream_), "cudaGraphLaunch");
      } else {
        for (int i = 0; i < inner; ++i) Check(launch(i), "timed launch");
      }
      Check(cudaEventRecord(stop_, stream_), "cudaEventRecord");
      times.push_back(ElapsedUs() / inner);
    }
    if (exec) Check(cudaGraphExecDestroy(exec), "cudaGraphExecDestroy");
    return {Median(times), exec != nullptr};
  }

  // Plain event timing for the ceilings (one long operation each).
  double TimeOnceUs(const std::function<absl::Status()>& op, int reps) {
    for (int i = 0; i < 3; ++i) Check(op(), "warm-up");
    std::vector<double> times;
    for (int r = 0; r < reps; ++r) {
      Check(cudaEventRecord(start_, stream_), "cudaEventRecord");
      Check(op(), "timed op");
      Check(cudaEventRecord(stop_, stream_), "cudaEventRecord");
      times.push_back(ElapsedUs());
    }
    return Median(times);
  }

 private:
  double ElapsedUs() {
    Check(cudaEventSynchronize(stop_), "cudaEventSynchronize");
    float ms = 0.0f;
    Check(cudaEventElapsedTime(&ms, start_, stop_), "cudaEventElapsedTime");
    return 1e3 * ms;
  }

  // The graph of `inner` launches, or null (with the reason on stderr) when capturing them fails.
  cudaGraphExec_t Capture(const std::function<absl::Status(int)>& launch, int inner) {
    cudaGraph_t graph = nullptr;
    Check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
    absl::Status status = absl::OkStatus();
    for (int i = 0; i < inner && status.ok(); ++i) status = launch(i);
    const cudaError_t end = cudaStreamEndCapture(stream_, &graph);
    cudaGraphExec_t exec = nullptr;
    cudaError_t instantiate = cudaSuccess;
    if (status.ok() && end == cudaSuccess && graph) instantiate = cudaGraphInstantiate(&exec, graph, 0);
    if (graph) Check(cudaGraphDestroy(graph), "cudaGraphDestroy");
    if (!status.ok() || end != cudaSuccess || instantiate != cudaSuccess || !exec) {
      std::fprintf(stderr, "  graph capture failed (%s; end capture: %s; instantiate: %s): timing plain launches\n",
                   status.ToString().c_str(), cudaGetErrorString(end), cudaGetErrorString(instantiate));
      (void)cudaGetLastError();  // capture errors are not sticky; clear the last one
      exec = nullptr;
    }
    return exec;
  }

  cudaStream_t stream_ = nullptr;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
  DeviceArray<uint8_t> flush_;
};

struct Row {
  std::string op;
  int64_t tokens, context;  // context 0: the op does not depend on it
  double us, bytes, flops;
  bool graph;
};

void Add(std::vector<Row>& rows, const std::string& op, int64_t tokens, int64_t context, const Timing& timing,
         double bytes, double flops) {
  rows.push_back({op, tokens, context, timing.us, bytes, flops, timing.graph});
  std::fprintf(stderr, "  %-28s T=%-5lld ctx=%-6lld %10.2f us%s\n", op.c_str(), static_cast<long long>(tokens),
               static_cast<long long>(context), timing.us, timing.graph ? "" : " (plain launches)");
}

constexpr int64_t kHidden = 4096, kStreams = 4, kHeads = 64, kHeadDim = 512, kRope = 64, kQLora = 1024;
constexpr int64_t kPrefill = 8192;
struct GemmShape {
  const char* name;
  int64_t in, out;
};
// FP8 128x128 weights of a flash layer, dequantized once to bf16 (dsv4-model.md §4, §6.3).
constexpr GemmShape kGemms[] = {{"gemm_wq_a", 4096, 1024},        {"gemm_wkv", 4096, 512},
                                {"gemm_wq_b", 1024, 32768},       {"gemm_wo_b", 8192, 4096},
                                {"gemm_shared_w13", 4096, 4096},  {"gemm_shared_w2", 2048, 4096}};

void RunLayerOps(Bench& bench, Gemm& gemm, int64_t T, std::vector<Row>& rows) {
  const cudaStream_t s = bench.stream();
  uint64_t seed = 1000 * static_cast<uint64_t>(T);
  auto add = [&](const std::string& op, const Timing& timing, double bytes, double flops) {
    Add(rows, op, T, 0, timing, bytes, flops);
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
    const Timing us = bench.Time([&](int i) {
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
      const Timing us = bench.Time([&](int i) {
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
    const Timing pre_us = bench.Time([&](int i) {
      return HcPre(shape, {fn.get(), base.get(), scale.get()}, x[i % copies].get(), T, y[i % copies].get(), post.get(),
                   comb.get(), workspace.get(), workspace_bytes, s);
    });
    // Fewest bytes: x once, fn once, y, post and comb out.
    add("mhc_pre", pre_us, 4.0 * (n + 24.0 * MD + T * kHidden + 20.0 * T), 2.0 * T * MD * 25 + 2.0 * T * MD);
    const Timing post_us = bench.Time([&](int i) {
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
    const Timing us = bench.Time(
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
    const Timing us = bench.Time(
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
    const Timing us = bench.Time([&](int i) {
      return gemm.Linear(x[i % copies].get(), T, g.in, w[i % copies].get(), g.out, y[i % copies].get(),
                         Gemm::Output::kF32, s);
    });
    add(g.name, us, static_cast<double>(set), 2.0 * T * g.in * g.out);
  }
}


// ---- Attention: sparse MQA, the C4 indexer, the compressors (dsv4-model.md §2.4-2.6) ----
constexpr int64_t kWindow = 128, kRatio = 4, kIndexHeads = 64, kIndexDim = 128, kIndexTopK = 512;
constexpr int64_t kSwaPage = 128;        // swa_page_size: one page holds a request's window ring
constexpr int64_t kCompressedPage = 64;  // page_size 256 raw tokens / ratio 4 compressed entries (and keys)

// Pages of fixed-size entries in one allocation, handed out in a shuffled order, so that a request's
// entries are spread over the pool as in a paged cache and its reads are not one contiguous stream.
class PagedPool {
 public:
  PagedPool(int64_t entry_bytes, int64_t per_page, int64_t pages, uint64_t seed)
      : entry_bytes_(entry_bytes), per_page_(per_page), bytes_(Alloc<uint8_t>(static_cast<size_t>(pages * per_page * entry_bytes))),
        order_(static_cast<size_t>(pages)) {
    std::iota(order_.begin(), order_.end(), int64_t{0});
    std::mt19937_64 rng(seed);
    std::shuffle(order_.begin(), order_.end(), rng);
  }
  // The entries of `count` consecutive slots of one request (whole pages; count a multiple of per_page).
  std::vector<uint8_t*> Take(int64_t count) {
    if (count % per_page_ != 0) Fail("PagedPool::Take: count not a whole number of pages");
    std::vector<uint8_t*> entries;
    entries.reserve(static_cast<size_t>(count));
    for (int64_t page = 0; page < count / per_page_; ++page) {
      if (next_ >= order_.size()) Fail("PagedPool::Take: pool exhausted");
      uint8_t* base = bytes_.get() + order_[next_++] * per_page_ * entry_bytes_;
      for (int64_t j = 0; j < per_page_; ++j) entries.push_back(base + j * entry_bytes_);
    }
    return entries;
  }
  // `count` consecutive entries as attention KV refs in the DSV4 page layout: a page's entries' data
  // (data_bytes each, so 16-byte aligned rows), then their scale bytes (entry_bytes - data_bytes each).
  std::vector<KvRef> TakeKv(int64_t count, int64_t data_bytes) {
    const std::vector<uint8_t*> slots = Take(count);
    std::vector<KvRef> refs;
    refs.reserve(slots.size());
    for (size_t i = 0; i < slots.size(); ++i) {
      const int64_t j = static_cast<int64_t>(i) % per_page_;
      uint8_t* page = slots[i] - j * entry_bytes_;
      refs.push_back({page + j * data_bytes, page + per_page_ * data_bytes + j * (entry_bytes_ - data_bytes)});
    }
    return refs;
  }
  uint8_t* data() const { return bytes_.get(); }
  size_t bytes() const { return bytes_.bytes(); }

 private:
  int64_t entry_bytes_, per_page_;
  DeviceArray<uint8_t> bytes_;
  std::vector<int64_t> order_;
  size_t next_ = 0;
};

// k distinct values of [0, n) in random order (partial Fisher-Yates).
void SampleDistinct(std::mt19937_64& rng, int64_t n, int64_t k, int32_t* out) {
  std::vector<int32_t> values(static_cast<size_t>(n));
  std::iota(values.begin(), values.end(), 0);
  for (int64_t i = 0; i < k; ++i) {
    const int64_t j = i + static_cast<int64_t>(rng() % static_cast<uint64_t>(n - i));
    std::swap(values[static_cast<size_t>(i)], values[static_cast<size_t>(j)]);
    out[i] = values[static_cast<size_t>(i)];
  }
}

// Quantizes random entries of x in [-1, 1] into every entry of `refs` on the device (StoreKvEntries).
void StoreRandomEntries(const KvFormat& format, const DeviceArray<KvRef>& refs, uint64_t seed) {
  constexpr int64_t kChunk = int64_t{1} << 16;
  const int64_t count = static_cast<int64_t>(refs.size());
  auto x = Alloc<float>(static_cast<size_t>(std::min(count, kChunk) * format.dim()));
  for (int64_t begin = 0; begin < count; begin += kChunk) {
    const int64_t n = std::min(kChunk, count - begin);
    Check(FillUniform(x.get(), n * format.dim(), seed + static_cast<uint64_t>(begin), -1.0f, 1.0f), "FillUniform");
    Check(StoreKvEntries(format, x.get(), n, refs.get() + begin), "StoreKvEntries");
  }
}

std::vector<double> CompressRopeFrequencies() {
  std::vector<double> freqs(kRope / 2);
  for (int64_t i = 0; i < kRope / 2; ++i) freqs[static_cast<size_t>(i)] = std::pow(160000.0, -2.0 * i / kRope);
  return freqs;
}

// SparseAttention's split-KV scratch where the API offers it (SparseAttentionArgs::workspace with
// SparseAttentionWorkspaceBytes, as the engine passes it); with an API without it the call runs unsplit.
template <typename Args>
size_t SplitWorkspaceBytes(const Args& a) {
  if constexpr (requires { a.workspace; SparseAttentionWorkspaceBytes(a); }) return SparseAttentionWorkspaceBytes(a);
  else return 0;
}
template <typename Args>
void SetSplitWorkspace(Args& a, void* workspace, size_t bytes) {
  if constexpr (requires { a.workspace; a.workspace_bytes; }) {
    a.workspace = workspace;
    a.workspace_bytes = bytes;
  }
  (void)a, (void)workspace, (void)bytes;
}

// SparseAttention. Decode: every token is its own request at position context-1 and reads its 128-entry
// window ring (one SWA page, ring order) and 512 random entries of its context/4 compressed ones (pages of
// 64, shuffled over the pool). Prefill: one request's 8192 tokens, token p reading the window
// max(0, p-127)..p and min(512, (p+1)/4) compressed entries (all of them while (p+1)/4 <= 512).
// Bytes: decode = candidate entries read (584 B each: every token reads its own) + q + o (f32); prefill =
// each distinct entry once (8192 raw + 2048 compressed; the per-token re-reads hit L2) + q + o. The KvRef
// arrays (16 B per candidate) and selected indices (4 B per slot) are not counted (~2 %).
// FLOPs: per token, candidates x 64 heads x 512 dims x 4 (q.k and p.v, 2 each).
void RunSparseAttention(Bench& bench, int64_t T, int64_t context, std::vector<Row>& rows) {
  const cudaStream_t s = bench.stream();
  const bool prefill = T == kPrefill;
  const KvFormat format;  // 448 fp8 + 64 bf16 rope + 8 scale bytes: 584 B
  const int64_t E = format.entry_bytes(), qn = T * kHeads * kHeadDim;
  const int64_t compressed = prefill ? T / kRatio : context / kRatio;  // per request
  const int64_t window_entries = prefill ? T : T * kWindow, compressed_entries = prefill ? compressed : T * compressed;
  const size_t touched = static_cast<size_t>(T * (kWindow + kIndexTopK) * E + 8 * qn);
  const int copies = prefill ? 1 : CopiesWithPool(touched, static_cast<size_t>((window_entries + compressed_entries) * E));
  PagedPool window_pool(E, kSwaPage, copies * window_entries / kSwaPage, 11 + T + context);
  PagedPool compressed_pool(E, kCompressedPage, copies * compressed_entries / kCompressedPage, 12 + T + context);
  std::mt19937_64 rng(13 + T + context);
  struct Set {
    DeviceArray<KvRef> window, compressed;
    DeviceArray<int64_t> window_begin, compressed_begin;
    DeviceArray<int32_t> window_count, compressed_count, selected;
    DeviceArray<float> q, o;
  };
  std::vector<Set> sets;
  double candidates = 0.0;  // summed over the tokens of one copy
  uint64_t seed = 100000 + static_cast<uint64_t>(T + context);
  for (int c = 0; c < copies; ++c) {
    std::vector<KvRef> window, compressed_refs;
    std::vector<int64_t> window_begin(static_cast<size_t>(T)), compressed_begin(static_cast<size_t>(T));
    std::vector<int32_t> window_count(static_cast<size_t>(T)), compressed_count(static_cast<size_t>(T));
    std::vector<int32_t> selected(static_cast<size_t>(T * kIndexTopK), -1);
    if (prefill) {
      window = window_pool.TakeKv(T, format.data_bytes());
      compressed_refs = compressed_pool.TakeKv(compressed, format.data_bytes());
      for (int64_t t = 0; t < T; ++t) {
        const int64_t visible = (t + 1) / kRatio;
        window_begin[t] = std::max<int64_t>(0, t - (kWindow - 1));
        window_count[t] = static_cast<int32_t>(std::min(kWindow, t + 1));
        compressed_begin[t] = 0;
        compressed_count[t] = static_cast<int32_t>(visible);
        int32_t* row = selected.data() + t * kIndexTopK;
        if (visible <= kIndexTopK) {
          std::iota(row, row + visible, 0);
        } else {
          SampleDistinct(rng, visible, kIndexTopK, row);
        }
        if (c == 0) candidates += static_cast<double>(window_count[t] + std::min(visible, kIndexTopK));
      }
    } else {
      const int64_t p = context - 1;
      for (int64_t t = 0; t < T; ++t) {
        const auto ring = window_pool.TakeKv(kWindow, format.data_bytes());
        for (int64_t j = 0; j < kWindow; ++j) window.push_back(ring[static_cast<size_t>((p - (kWindow - 1) + j) % kWindow)]);
        const auto own = compressed_pool.TakeKv(compressed, format.data_bytes());
        compressed_refs.insert(compressed_refs.end(), own.begin(), own.end());
        window_begin[t] = t * kWindow;
        window_count[t] = static_cast<int32_t>(kWindow);
        compressed_begin[t] = t * compressed;
        compressed_count[t] = static_cast<int32_t>(compressed);
        SampleDistinct(rng, compressed, kIndexTopK, selected.data() + t * kIndexTopK);
        if (c == 0) candidates += static_cast<double>(kWindow + kIndexTopK);
      }
    }
    Set set{ToDevice(window), ToDevice(compressed_refs), ToDevice(window_begin), ToDevice(compressed_begin),
            ToDevice(window_count), ToDevice(compressed_count), ToDevice(selected),
            RandomFloats(static_cast<size_t>(qn), ++seed), Alloc<float>(static_cast<size_t>(qn))};
    // Every pool entry belongs to exactly one request of one copy, so this writes the whole pool.
    StoreRandomEntries(format, set.window, ++seed * 1000003);
    StoreRandomEntries(format, set.compressed, ++seed * 1000003);
    sets.push_back(std::move(set));
  }
  auto sink = RandomFloats(static_cast<size_t>(kHeads), ++seed);
  auto args = [&](const Set& set) {
    SparseAttentionArgs a;
    a.format = format;
    a.tokens = T;
    a.heads = kHeads;
    a.q = set.q.get();
    a.sink = sink.get();
    a.scale = 1.0f / std::sqrt(static_cast<float>(kHeadDim));
    a.window = set.window.get();
    a.window_begin = set.window_begin.get();
    a.window_count = set.window_count.get();
    a.compressed = set.compressed.get();
    a.compressed_begin = set.compressed_begin.get();
    a.compressed_count = set.compressed_count.get();
    a.selected = set.selected.get();
    a.topk = kIndexTopK;
    a.o = set.o.get();
    return a;
  };
  const double entries = prefill ? static_cast<double>(window_entries + compressed_entries) : candidates;
  // Both maths of the API (f32-exact, and bf16 q and probabilities where the API has them), same inputs.
  // unsplit: no workspace even where a split would be planned (what the split's partial traffic costs).
  const auto run = [&](const char* name, bool bf16, bool unsplit = false) {
    const auto with_math = [&](const Set& set) {
      SparseAttentionArgs a = args(set);
      a.math = bf16 ? AttentionMath::kBf16 : AttentionMath::kF32;
      return a;
    };
    const size_t workspace_bytes = unsplit ? 0 : SplitWorkspaceBytes(with_math(sets[0]));
    auto workspace = Alloc<uint8_t>(workspace_bytes);
    std::fprintf(stderr, "  %s T=%lld ctx=%lld: split-KV workspace %zu bytes, %s\n", name, static_cast<long long>(T),
                 static_cast<long long>(context), workspace_bytes, SparseAttentionKernelName(with_math(sets[0])));
    const Timing timing = bench.Time([&](int i) {
      SparseAttentionArgs a = with_math(sets[static_cast<size_t>(i % copies)]);
      SetSplitWorkspace(a, workspace_bytes > 0 ? workspace.get() : nullptr, workspace_bytes);
      return SparseAttention(a, s);
    });
    Check(cudaDeviceSynchronize(), name);
    CheckFinite(sets[0].o.get(), sets[0].o.size(), name);
    Add(rows, name, T, context, timing, entries * E + 8.0 * qn, candidates * kHeads * kHeadDim * 4.0);
  };
  run("sparse_attention", false);
  {
    // bf16 on the 64-head kernels (the warpgroup-MMA one where the device runs it, then the mma.sync one) and
    // on the 16-head one, all forced at every token count.
    const int64_t saved = WideAttentionMinTokens();
    const bool saved_wgmma = WgmmaAttention();
    SetWideAttentionMinTokens(0);
    run("sparse_attention_bf16", true);
    SparseAttentionArgs probe = args(sets[0]);
    probe.math = AttentionMath::kBf16;
    if (!prefill && SplitWorkspaceBytes(probe) > 0) run("sparse_attention_bf16_unsplit", true, true);
    SetWgmmaAttention(false);
    run("sparse_attention_bf16_mma", true);
    SetWgmmaAttention(saved_wgmma);
    SetWideAttentionMinTokens(std::numeric_limits<int64_t>::max());
    run("sparse_attention_bf16_16heads", true);
    SetWideAttentionMinTokens(saved);
  }
}

// 65536 indexer keys quantized on the host (128 e4m3 codes + f32 scale each, from N(0, 1) values), repeated
// to fill the key pools.
std::vector<uint8_t> IndexerKeyTemplate() {
  constexpr int64_t kKeys = 65536;
  const int64_t K = IndexerKeyBytes(kIndexDim);
  std::mt19937_64 rng(77);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(kIndexDim));
  std::vector<uint8_t> keys(static_cast<size_t>(kKeys * K));
  for (int64_t k = 0; k < kKeys; ++k) {
    for (float& v : x) v = normal(rng);
    QuantizeIndexerKey(x.data(), kIndexDim, keys.data() + k * K);
  }
  return keys;
}

// dst[0, bytes) <- the template repeated (whole keys: bytes and the template are multiples of the key size).
void FillRepeating(uint8_t* dst, size_t bytes, const std::vector<uint8_t>& pattern) {
  const size_t first = std::min(bytes, pattern.size());
  Check(cudaMemcpy(dst, pattern.data(), first, cudaMemcpyHostToDevice), "cudaMemcpy");
  for (size_t filled = first; filled < bytes;) {
    const size_t n = std::min(filled, bytes - filled);
    Check(cudaMemcpy(dst + filled, dst, n, cudaMemcpyDeviceToDevice), "cudaMemcpy");
    filled += n;
  }
}

// IndexerTopK (64 heads x 128, top 512). Decode: every token its own request with context/4 visible keys
// in pages of 64 keys (132 B each) shuffled over the pool. Prefill: one request's 8192 tokens, token p seeing
// (p+1)/4 keys (tokens seeing <= 512 take every entry and skip the scores).
// Bytes: the distinct keys (decode: tokens x visible x 132 B; prefill: 2048 x 132 B) + q (f32 [T, 64, 128])
// + weights (f32 [T, 64]) + selected (i32 [T, 512]); the key pointers (8 B per key, +6 %) and the f32 score
// round trip through the workspace (8 B per scored key) are not counted.
// FLOPs: sum over scored tokens of visible x 64 heads x 128 dims x 2 (q.k; the relu-weighted sum is ~1 %).
void RunIndexer(Bench& bench, int64_t T, int64_t context, const std::vector<uint8_t>& key_template,
                std::vector<Row>& rows) {
  const cudaStream_t s = bench.stream();
  const bool prefill = T == kPrefill;
  const int64_t K = IndexerKeyBytes(kIndexDim), qn = T * kIndexHeads * kIndexDim;
  const int64_t visible = prefill ? T / kRatio : context / kRatio;  // per request (prefill: the last token's)
  const int64_t keys = prefill ? visible : T * visible;            // per copy
  const int copies = prefill ? 1 : CopiesWithPool(static_cast<size_t>(keys * K + 4 * qn), static_cast<size_t>(keys * K));
  PagedPool pool(K, kCompressedPage, copies * keys / kCompressedPage, 21 + T + context);
  FillRepeating(pool.data(), pool.bytes(), key_template);
  struct Set {
    DeviceArray<const uint8_t*> keys;
    DeviceArray<int64_t> key_begin;
    DeviceArray<int32_t> visible, selected;
    DeviceArray<float> q, weights;
  };
  std::vector<Set> sets;
  std::vector<int32_t> host_visible(static_cast<size_t>(T));
  uint64_t seed = 200000 + static_cast<uint64_t>(T + context);
  for (int c = 0; c < copies; ++c) {
    std::vector<const uint8_t*> key_pointers;
    std::vector<int64_t> key_begin(static_cast<size_t>(T));
    for (int64_t r = 0; r < (prefill ? 1 : T); ++r) {
      const auto own = pool.Take(visible);
      key_pointers.insert(key_pointers.end(), own.begin(), own.end());
    }
    for (int64_t t = 0; t < T; ++t) {
      key_begin[t] = prefill ? 0 : t * visible;
      host_visible[t] = static_cast<int32_t>(prefill ? (t + 1) / kRatio : visible);
    }
    sets.push_back({ToDevice(key_pointers), ToDevice(key_begin), ToDevice(host_visible),
                    Alloc<int32_t>(static_cast<size_t>(T * kIndexTopK)), RandomFloats(static_cast<size_t>(qn), ++seed),
                    RandomFloats(static_cast<size_t>(T * kIndexHeads), ++seed, -0.02f, 0.02f)});
  }
  const size_t workspace_bytes = IndexerWorkspaceBytes(T, visible);
  auto workspace = Alloc<uint8_t>(workspace_bytes);
  const Timing timing = bench.Time([&](int i) {
    const Set& set = sets[static_cast<size_t>(i % copies)];
    IndexerArgs a;
    a.tokens = T;
    a.heads = kIndexHeads;
    a.dim = kIndexDim;
    a.topk = kIndexTopK;
    a.q = set.q.get();
    a.weights = set.weights.get();
    a.keys = set.keys.get();
    a.key_begin = set.key_begin.get();
    a.visible = set.visible.get();
    a.max_visible = static_cast<int32_t>(visible);
    a.selected = set.selected.get();
    return IndexerTopK(a, workspace.get(), workspace_bytes, s);
  });
  Check(cudaDeviceSynchronize(), "indexer");
  const auto selected = ToHost(sets[0].selected);
  double scored = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    const int32_t n = host_visible[t];
    if (n > kIndexTopK) scored += n;
    for (int64_t j = 0; j < kIndexTopK; ++j) {
      const int32_t v = selected[static_cast<size_t>(t * kIndexTopK + j)];
      const bool ok = j < std::min<int64_t>(n, kIndexTopK) ? (v >= 0 && v < n) : v == -1;
      if (!ok) Fail("indexer_topk: selected[" + std::to_string(t) + "][" + std::to_string(j) + "] = " + std::to_string(v));
    }
  }
  Add(rows, "indexer_topk", T, context, timing, static_cast<double>(keys * K) + 4.0 * qn + 4.0 * T * kIndexHeads + 4.0 * T * kIndexTopK,
      scored * kIndexHeads * kIndexDim * 2.0);
}

// The C4 compressors of attention (d 512, KV entry out) and of the indexer (d 128, Hadamard + 132 B key out).
// WriteRows: T tokens each write one ring row [kv | score + ape] of 2 x width f32 (width = 2d).
//   Bytes: kv + score read (2 x T x width x 4) + the rows written (T x 2 x width x 4) + ape; FLOPs: T x width adds.
// Emit: decode = one emit per token (every request closes a 4-token chunk this step: the costliest step);
//   prefill = 2048 emits of one request. Each emit reads 8 rows x (kv + score) on d channels (64 d bytes)
//   and writes one entry (584 B) or key (132 B); consecutive prefill emits read the two halves of their shared
//   rows, so the count is also the distinct bytes. FLOPs (approximate, negligible): d x (8 rows x 5 + 10).
void RunCompressor(Bench& bench, int64_t T, bool indexer, std::vector<Row>& rows) {
  const cudaStream_t s = bench.stream();
  const bool prefill = T == kPrefill;
  CompressorShape shape;
  shape.ratio = static_cast<int>(kRatio);
  shape.dim = indexer ? kIndexDim : kHeadDim;
  shape.rope_dim = kRope;
  const int64_t d = shape.dim, W = shape.width(), R = shape.rows_per_emit(), row_floats = 2 * W;
  const KvFormat format{d - kRope, kRope};
  const int64_t out_bytes = indexer ? IndexerKeyBytes(d) : format.entry_bytes();
  const int64_t emits = prefill ? T / kRatio : T;
  const int64_t ring_rows = prefill ? T : T * R;  // decode: each request's ring of 8 rows
  const int copies = CopiesFor(static_cast<size_t>((ring_rows * row_floats + 2 * T * W) * 4 + emits * out_bytes));
  struct Set {
    DeviceArray<float> kv, score, ring;
    DeviceArray<int64_t> positions, index;
    DeviceArray<float*> write_rows;
    DeviceArray<const float*> emit_rows;
    DeviceArray<uint8_t> out;
    DeviceArray<KvRef> kv_out;
    DeviceArray<uint8_t*> key_out;
  };
  std::vector<Set> sets;
  uint64_t seed = 300000 + static_cast<uint64_t>(T) + (indexer ? 7 : 0);
  for (int c = 0; c < copies; ++c) {
    Set set;
    set.kv = RandomFloats(static_cast<size_t>(T * W), ++seed);
    set.score = RandomFloats(static_cast<size_t>(T * W), ++seed, -2.0f, 2.0f);
    set.ring = RandomFloats(static_cast<size_t>(ring_rows * row_floats), ++seed);
    set.out = Alloc<uint8_t>(static_cast<size_t>(emits * out_bytes));
    float* ring = set.ring.get();
    std::vector<int64_t> positions(static_cast<size_t>(T)), index(static_cast<size_t>(emits));
    std::vector<float*> write_rows(static_cast<size_t>(T));
    std::vector<const float*> emit_rows(static_cast<size_t>(emits * R), nullptr);
    for (int64_t t = 0; t < T; ++t) {
      if (prefill) {
        positions[t] = t;
        write_rows[t] = ring + t * row_floats;
      } else {
        positions[t] = kRatio * (1024 + t) + kRatio - 1;  // a chunk's last token
        write_rows[t] = ring + (t * R + positions[t] % R) * row_floats;
      }
    }
    for (int64_t e = 0; e < emits; ++e) {
      const float** er = emit_rows.data() + e * R;
      if (prefill) {
        index[e] = e;
        for (int64_t r = 0; r < kRatio; ++r) {
          if (e > 0) er[r] = ring + ((e - 1) * kRatio + r) * row_floats;
          er[kRatio + r] = ring + (e * kRatio + r) * row_floats;
        }
      } else {
        const int64_t p = positions[e];
        index[e] = (p + 1) / kRatio - 1;
        for (int64_t r = 0; r < kRatio; ++r) {
          er[r] = ring + (e * R + (p - 7 + r) % R) * row_floats;
          er[kRatio + r] = ring + (e * R + (p - 3 + r) % R) * row_floats;
        }
      }
    }
    std::vector<KvRef> kv_out;
    std::vector<uint8_t*> key_out;
    for (int64_t e = 0; e < emits; ++e) {
      uint8_t* o = set.out.get() + e * out_bytes;
      if (indexer) key_out.push_back(o);
      else kv_out.push_back({o, o + format.data_bytes()});
    }
    set.positions = ToDevice(positions);
    set.index = ToDevice(index);
    set.write_rows = ToDevice(write_rows);
    set.emit_rows = ToDevice(emit_rows);
    set.kv_out = ToDevice(kv_out);
    set.key_out = ToDevice(key_out);
    sets.push_back(std::move(set));
  }
  auto ape = RandomFloats(static_cast<size_t>(kRatio * W), ++seed, -0.5f, 0.5f);
  auto norm = RandomFloats(static_cast<size_t>(d), ++seed, 0.8f, 1.2f);
  auto inv_freq = ToDevice(CompressRopeFrequencies());
  const std::string suffix = indexer ? "_index" : "_attn";
  const Timing write = bench.Time([&](int i) {
    const Set& set = sets[static_cast<size_t>(i % copies)];
    return CompressorWriteRows(shape, set.kv.get(), set.score.get(), ape.get(), set.positions.get(),
                               set.write_rows.get(), T, s);
  });
  Add(rows, "compressor_write_rows" + suffix, T, 0, write, 4.0 * (2.0 * T * W + T * row_floats + kRatio * W),
      static_cast<double>(T * W));
  const Timing emit = bench.Time([&](int i) {
    const Set& set = sets[static_cast<size_t>(i % copies)];
    return CompressorEmit(shape, set.emit_rows.get(), set.index.get(), emits, norm.get(), inv_freq.get(),
                          indexer ? nullptr : set.kv_out.get(), indexer ? set.key_out.get() : nullptr, s);
  });
  Check(cudaDeviceSynchronize(), "compressor");
  Add(rows, "compressor_emit" + suffix, T, 0, emit, static_cast<double>(emits) * (64.0 * d + out_bytes) + 4.0 * d,
      static_cast<double>(emits) * d * 50.0);
}

// ---- MoE (256 routed MXFP4 experts, top 6, width 2048; one FP8 shared expert) ----
constexpr int64_t kExperts = 256, kTopExperts = 6, kMoeInter = 2048;

// One projection of the layer's experts in one allocation: random codes (MXFP4: any byte is two e2m1 codes;
// FP8: FillFp8Codes avoids the NaN codes) and ue8m0 scales of 2^-7.
struct ExpertWeights {
  DeviceArray<uint8_t> codes, scales;
  DeviceArray<const uint8_t*> code_pointers, scale_pointers;
  GroupedWeights view;
  double expert_bytes = 0.0;  // codes + scales of one expert
};

ExpertWeights MakeExperts(QuantizedWeight::Format format, int64_t experts, int64_t out, int64_t in, uint64_t seed) {
  const bool fp4 = format == QuantizedWeight::Format::kMxfp4;
  const int64_t code_bytes = fp4 ? out * in / 2 : out * in;
  const int64_t scale_bytes = fp4 ? out * in / 32 : ((out + 127) / 128) * ((in + 127) / 128);
  ExpertWeights w;
  w.codes = Alloc<uint8_t>(static_cast<size_t>(experts * code_bytes));
  w.scales = Alloc<uint8_t>(static_cast<size_t>(experts * scale_bytes));
  Check(FillFp8Codes(w.codes.get(), experts * code_bytes, seed), "FillFp8Codes");
  Check(cudaMemset(w.scales.get(), 120, w.scales.bytes()), "cudaMemset");
  std::vector<const uint8_t*> codes, scales;
  for (int64_t e = 0; e < experts; ++e) {
    codes.push_back(w.codes.get() + e * code_bytes);
    scales.push_back(w.scales.get() + e * scale_bytes);
  }
  w.code_pointers = ToDevice(codes);
  w.scale_pointers = ToDevice(scales);
  w.view.format = format;
  w.view.codes = w.code_pointers.get();
  w.view.scales = w.scale_pointers.get();
  w.view.experts = experts;
  w.view.out = out;
  w.view.in = in;
  w.expert_bytes = static_cast<double>(code_bytes + scale_bytes);
  return w;
}

// Host routing of T tokens: 6 distinct experts per token, uniform (the learned gate's bias keeps the real
// load near balanced), grouped by expert stable in pair order, as MoeGroup computes it.
struct Routing {
  std::vector<int32_t> chosen, gather, position;
  std::vector<int64_t> offsets;
  std::vector<float> weights;
  int64_t touched = 0;  // experts with at least one row
};

Routing RandomRouting(std::mt19937_64& rng, int64_t T) {
  const int64_t pairs = T * kTopExperts;
  Routing r;
  r.chosen.resize(static_cast<size_t>(pairs));
  r.gather.resize(static_cast<size_t>(pairs));
  r.position.resize(static_cast<size_t>(pairs));
  r.offsets.assign(static_cast<size_t>(kExperts + 1), 0);
  r.weights.resize(static_cast<size_t>(pairs));
  std::uniform_real_distribution<float> weight(0.1f, 1.0f);
  for (int64_t t = 0; t < T; ++t) SampleDistinct(rng, kExperts, kTopExperts, r.chosen.data() + t * kTopExperts);
  for (auto& w : r.weights) w = weight(rng) * 1.5f / kTopExperts;
  for (const int32_t e : r.chosen) ++r.offsets[static_cast<size_t>(e) + 1];
  for (int64_t e = 0; e < kExperts; ++e) {
    r.touched += r.offsets[static_cast<size_t>(e) + 1] > 0 ? 1 : 0;
    r.offsets[static_cast<size_t>(e) + 1] += r.offsets[static_cast<size_t>(e)];
  }
  std::vector<int64_t> cursor(r.offsets.begin(), r.offsets.end() - 1);
  for (int64_t i = 0; i < pairs; ++i) {
    const int64_t row = cursor[static_cast<size_t>(r.chosen[static_cast<size_t>(i)])]++;
    r.gather[static_cast<size_t>(row)] = static_cast<int32_t>(i / kTopExperts);
    r.position[static_cast<size_t>(i)] = static_cast<int32_t>(row);
  }
  return r;
}

// Routing, grouping, the expert GEMMs, SwiGLU and the combine of one MoE layer, at each T.
// Routed GEMMs (GroupedQuantizedLinear, MXFP4): rows = T x 6 grouped by expert; max_rows_per_expert = T x 6
// as the engine passes it. Bytes = the codes + scales of the experts the routing touches (mean over the
// copies) + x once (w1/w3: the T token rows, gathered; w2: the T x 6 h rows) + y (f32); FLOPs = 2 x rows x
// out x in. At the prefill the FLOPs dominate and frac_gemm_rate compares with the cuBLASLt bf16 rate.
// Shared expert (FP8 block, one expert of T rows): the same counting with its 8 MB weight.
// Rotation: each copy has its own routing (different experts for the small T) and its own activations;
// the shared expert's weights have their own 20 copies.
// Optional filters for profiling runs (ncu): TANDEM_KERNEL_BENCH_GROUPS=patterns,layer,attention,indexer,
// compressor,moe,prefill_experts,head
// and TANDEM_KERNEL_BENCH_TOKENS=1,64,... (both unset: everything); TANDEM_KERNEL_BENCH_PATHS=fused,producer,...
// picks prefill_experts' paths (unset: all; "fused" always runs: the one-pass paths compare with it, the split
// ones with "fused_split" when it is picked).
bool InList(const char* env, const std::string& item) {
  const char* list = std::getenv(env);
  if (!list || !*list) return true;
  const std::string all = std::string(",") + list + ",";
  return all.find("," + item + ",") != std::string::npos;
}
bool WantGroup(const char* group) { return InList("TANDEM_KERNEL_BENCH_GROUPS", group); }
bool WantTokens(int64_t T) { return InList("TANDEM_KERNEL_BENCH_TOKENS", std::to_string(T)); }

void RunMoe(Bench& bench, std::vector<Row>& rows) {
  const cudaStream_t s = bench.stream();
  using Format = QuantizedWeight::Format;
  const ExpertWeights w1 = MakeExperts(Format::kMxfp4, kExperts, kMoeInter, kHidden, 41);
  const ExpertWeights w3 = MakeExperts(Format::kMxfp4, kExperts, kMoeInter, kHidden, 42);
  const ExpertWeights w2 = MakeExperts(Format::kMxfp4, kExperts, kHidden, kMoeInter, 43);
  struct Shared {
    ExpertWeights w1, w3, w2;
  };
  std::vector<Shared> shared;
  const int shared_copies = CopiesFor(static_cast<size_t>(kMoeInter * kHidden));
  for (int c = 0; c < shared_copies; ++c) {
    const uint64_t base = 500 + 3 * static_cast<uint64_t>(c);
    shared.push_back({MakeExperts(Format::kFp8Block, 1, kMoeInter, kHidden, base),
                      MakeExperts(Format::kFp8Block, 1, kMoeInter, kHidden, base + 1),
                      MakeExperts(Format::kFp8Block, 1, kHidden, kMoeInter, base + 2)});
  }
  auto bias = RandomFloats(static_cast<size_t>(kExperts), 44, -0.1f, 0.1f);
  for (const int64_t T : {int64_t{1}, int64_t{16}, int64_t{64}, int64_t{256}, kPrefill}) {
    if (!WantTokens(T)) continue;
    const int64_t P = T * kTopExperts;
    std::mt19937_64 rng(600 + static_cast<uint64_t>(T));
    std::vector<Routing> routing{RandomRouting(rng, T)};
    const double activations = 4.0 * (T * kHidden + 3.0 * P * kMoeInter + P * kHidden);
    const int copies = CopiesFor(static_cast<size_t>(routing[0].touched * w1.expert_bytes + activations));
    while (static_cast<int>(routing.size()) < copies) routing.push_back(RandomRouting(rng, T));
    struct Set {
      DeviceArray<int32_t> chosen, gather, position, route_chosen, group_rows, group_position;
      DeviceArray<int64_t> offsets, group_offsets, shared_offsets;
      DeviceArray<float> combine_weights, logits, route_weights, x, y1, y3, h, y2, sa, sb, shared_out, combined;
    };
    std::vector<Set> sets;
    double touched = 0.0;
    uint64_t seed = 700000 + static_cast<uint64_t>(T);
    for (const Routing& r : routing) {
      touched += static_cast<double>(r.touched) / copies;
      Set set;
      set.chosen = ToDevice(r.chosen);
      set.gather = ToDevice(r.gather);
      set.position = ToDevice(r.position);
      set.offsets = ToDevice(r.offsets);
      set.combine_weights = ToDevice(r.weights);
      set.shared_offsets = ToDevice(std::vector<int64_t>{0, T});
      set.route_chosen = Alloc<int32_t>(static_cast<size_t>(P));
      set.route_weights = Alloc<float>(static_cast<size_t>(P));
      set.group_rows = Alloc<int32_t>(static_cast<size_t>(P));
      set.group_position = Alloc<int32_t>(static_cast<size_t>(P));
      set.group_offsets = Alloc<int64_t>(static_cast<size_t>(kExperts + 1));
      set.logits = RandomFloats(static_cast<size_t>(T * kExperts), ++seed, -3.0f, 3.0f);
      set.x = RandomFloats(static_cast<size_t>(T * kHidden), ++seed);
      set.y1 = Alloc<float>(static_cast<size_t>(P * kMoeInter));
      set.y3 = Alloc<float>(static_cast<size_t>(P * kMoeInter));
      set.h = Alloc<float>(static_cast<size_t>(P * kMoeInter));
      set.y2 = Alloc<float>(static_cast<size_t>(P * kHidden));
      set.sa = Alloc<float>(static_cast<size_t>(T * kMoeInter));
      set.sb = Alloc<float>(static_cast<size_t>(T * kMoeInter));
      set.shared_out = Alloc<float>(static_cast<size_t>(T * kHidden));
      set.combined = Alloc<float>(static_cast<size_t>(T * kHidden));
      sets.push_back(std::move(set));
    }
    auto at = [&](int i) -> const Set& { return sets[static_cast<size_t>(i % copies)]; };
    // MoeRoute (learned gate): bytes = logits + bias + chosen/weights out; FLOPs ~6 per logit (softplus, sqrt,
    // bias, compare).
    const Timing route = bench.Time([&](int i) {
      MoeRouteArgs a;
      a.tokens = T;
      a.experts = kExperts;
      a.k = kTopExperts;
      a.logits = at(i).logits.get();
      a.bias = bias.get();
      a.routed_scaling = 1.5f;
      a.chosen = at(i).route_chosen.get();
      a.weights = at(i).route_weights.get();
      return MoeRoute(a, s);
    });
    Add(rows, "moe_route", T, 0, route, 4.0 * (T * kExperts + kExperts + 2.0 * P), 6.0 * T * kExperts);
    // MoeGroup of the host routing: bytes = chosen in + offsets, rows, position out (three launches).
    const size_t group_workspace_bytes = MoeGroupWorkspaceBytes(T, kTopExperts, kExperts);
    auto group_workspace = Alloc<uint8_t>(group_workspace_bytes);
    const Timing group = bench.Time([&](int i) {
      return MoeGroup(at(i).chosen.get(), T, kTopExperts, kExperts, at(i).group_offsets.get(), at(i).group_rows.get(),
                      at(i).group_position.get(), group_workspace.get(), group_workspace_bytes, s);
    });
    Check(cudaDeviceSynchronize(), "moe group");
    if (ToHost(sets[0].group_offsets) != routing[0].offsets || ToHost(sets[0].group_rows) != routing[0].gather ||
        ToHost(sets[0].group_position) != routing[0].position) {
      Fail("moe_group: grouping differs from the host's stable grouping");
    }
    Add(rows, "moe_group", T, 0, group, 4.0 * 3.0 * P + 8.0 * (kExperts + 1), 0.0);

    const double index_bytes = 8.0 * (kExperts + 1) + 4.0 * P;  // offsets + gather
    const Timing t1 = bench.Time([&](int i) {
      return GroupedQuantizedLinear(w1.view, at(i).x.get(), at(i).gather.get(), at(i).offsets.get(), P, at(i).y1.get(), s);
    });
    const double w13_bytes = touched * w1.expert_bytes + 4.0 * (T * kHidden + P * kMoeInter) + index_bytes;
    Add(rows, "grouped_w1_mxfp4", T, 0, t1, w13_bytes, 2.0 * P * kMoeInter * kHidden);
    const Timing t3 = bench.Time([&](int i) {
      return GroupedQuantizedLinear(w3.view, at(i).x.get(), at(i).gather.get(), at(i).offsets.get(), P, at(i).y3.get(), s);
    });
    Add(rows, "grouped_w3_mxfp4", T, 0, t3, w13_bytes, 2.0 * P * kMoeInter * kHidden);
    // What the decode forward runs: w1 and w3 in one pass with the SwiGLU (bytes: both weights, x, h).
    const Timing t13 = bench.Time([&](int i) {
      return GroupedSwiGluLinear(w1.view, w3.view, at(i).x.get(), at(i).gather.get(), at(i).offsets.get(), P, 10.0f,
                                 at(i).h.get(), s);
    });
    const double w13_fused_bytes = 2.0 * touched * w1.expert_bytes + 4.0 * (T * kHidden + P * kMoeInter) + index_bytes;
    Add(rows, "grouped_w13_swiglu_mxfp4", T, 0, t13, w13_fused_bytes, 4.0 * P * kMoeInter * kHidden);
    // The same with every expert through the f32 GEMV / tiled kernels (the tensor-core unit off): the baseline.
    SetGroupedLinearTensorCores(false);
    const Timing t13_f32 = bench.Time([&](int i) {
      return GroupedSwiGluLinear(w1.view, w3.view, at(i).x.get(), at(i).gather.get(), at(i).offsets.get(), P, 10.0f,
                                 at(i).h.get(), s);
    });
    SetGroupedLinearTensorCores(true);
    Add(rows, "grouped_w13_swiglu_mxfp4_f32", T, 0, t13_f32, w13_fused_bytes, 4.0 * P * kMoeInter * kHidden);
    // SwiGLU of the routed rows into h (the w2 input): bytes = a, b in and h out (12 B per value); FLOPs ~6 per
    // value (clamps, exp, divide, multiply).
    const double count = static_cast<double>(P * kMoeInter);
    const Timing swiglu = bench.Time([&](int i) {
      return SwiGlu(at(i).y1.get(), at(i).y3.get(), P * kMoeInter, 10.0f, at(i).h.get(), s);
    });
    Add(rows, "swiglu_routed", T, 0, swiglu, 12.0 * count, 6.0 * count);
    const Timing t2 = bench.Time([&](int i) {
      return GroupedQuantizedLinear(w2.view, at(i).h.get(), nullptr, at(i).offsets.get(), P, at(i).y2.get(), s);
    });
    const double w2_bytes = touched * w2.expert_bytes + 4.0 * (P * kMoeInter + P * kHidden) + 8.0 * (kExperts + 1);
    Add(rows, "grouped_w2_mxfp4", T, 0, t2, w2_bytes, 2.0 * P * kHidden * kMoeInter);
    SetGroupedLinearTensorCores(false);
    const Timing t2_f32 = bench.Time([&](int i) {
      return GroupedQuantizedLinear(w2.view, at(i).h.get(), nullptr, at(i).offsets.get(), P, at(i).y2.get(), s);
    });
    SetGroupedLinearTensorCores(true);
    Add(rows, "grouped_w2_mxfp4_f32", T, 0, t2_f32, w2_bytes, 2.0 * P * kHidden * kMoeInter);
    Check(cudaDeviceSynchronize(), "routed experts");
    CheckFinite(sets[0].y2.get(), sets[0].y2.size(), "grouped_w2_mxfp4");

    auto shared_at = [&](int i) -> const Shared& { return shared[static_cast<size_t>(i % shared_copies)]; };
    const double shared13_bytes = shared[0].w1.expert_bytes + 4.0 * (T * kHidden + T * kMoeInter);
    const Timing s1 = bench.Time([&](int i) {
      return GroupedQuantizedLinear(shared_at(i).w1.view, at(i).x.get(), nullptr, at(i).shared_offsets.get(), T,
                                    at(i).sa.get(), s);
    });
    Add(rows, "grouped_shared_w1_fp8", T, 0, s1, shared13_bytes, 2.0 * T * kMoeInter * kHidden);
    const Timing s3 = bench.Time([&](int i) {
      return GroupedQuantizedLinear(shared_at(i).w3.view, at(i).x.get(), nullptr, at(i).shared_offsets.get(), T,
                                    at(i).sb.get(), s);
    });
    Add(rows, "grouped_shared_w3_fp8", T, 0, s3, shared13_bytes, 2.0 * T * kMoeInter * kHidden);
    for (const Set& set : sets) {  // the shared expert's h, untimed
      Check(SwiGlu(set.sa.get(), set.sb.get(), T * kMoeInter, 10.0f, set.sa.get(), s), "SwiGlu");
    }
    const Timing s2 = bench.Time([&](int i) {
      return GroupedQuantizedLinear(shared_at(i).w2.view, at(i).sa.get(), nullptr, at(i).shared_offsets.get(), T,
                                    at(i).shared_out.get(), s);
    });
    Add(rows, "grouped_shared_w2_fp8", T, 0, s2, shared[0].w2.expert_bytes + 4.0 * (T * kMoeInter + T * kHidden),
        2.0 * T * kHidden * kMoeInter);
    // MoeCombine: bytes = shared + the 6 routed rows per token + out (f32 [*, 4096]) + position and weights;
    // FLOPs = 2 per routed value + 1 per output.
    const Timing combine = bench.Time([&](int i) {
      return MoeCombine(at(i).shared_out.get(), at(i).y2.get(), at(i).position.get(), at(i).combine_weights.get(), T,
                        kTopExperts, kHidden, at(i).combined.get(), s);
    });
    Check(cudaDeviceSynchronize(), "moe combine");
    CheckFinite(sets[0].combined.get(), sets[0].combined.size(), "moe_combine");
    Add(rows, "moe_combine", T, 0, combine, 4.0 * (2.0 * T * kHidden + P * kHidden) + 8.0 * P,
        2.0 * P * kHidden + 1.0 * T * kHidden);
  }
}

// The prefill's routed experts (GroupedExpertGemm, what the forward runs from prefill_expert_pairs rows on):
// 8192 tokens x 6 = 49152 rows over 256 experts (uniform routing, ~192 rows an expert), w1/w3 stacked (out
// 4096, in 4096) and w2 (out 4096, in 2048). Four paths in the same process: the fused warpgroup-MMA kernel
// and the lanes (per-expert bf16 dequantization + cuBLASLt), each with x in one bf16 pass and as a hi + lo
// pair (split_x, the bf16x2 forward's). Run is not graph-captured (the fused path uploads its row tiles per
// call), so these rows are plain launches between events, median of 5 after 3 warm-ups, no L2 flush (1.1 GB of
// weights pass per call). FLOPs = 2 x rows x out x in (the math; split does twice the MMAs); bytes = the
// touched experts' codes + scales + x (f32) in + y (f32) out. After timing, every fused output must match the
// lanes' (relative L2 under 1e-4, same operands and f32 accumulation, other summation order). Then the fused
// kernel's timing probes (rows `prefill_*_probe_*`: one stage left out; times only).
void RunPrefillExperts(Bench& bench, std::vector<Row>& rows) {
  using Format = QuantizedWeight::Format;
  const int64_t T = kPrefill, P = T * kTopExperts;
  const ExpertWeights w1 = MakeExperts(Format::kMxfp4, kExperts, kMoeInter, kHidden, 51);
  const ExpertWeights w3 = MakeExperts(Format::kMxfp4, kExperts, kMoeInter, kHidden, 52);
  const ExpertWeights w2 = MakeExperts(Format::kMxfp4, kExperts, kHidden, kMoeInter, 53);
  auto host_pointers = [](const ExpertWeights& w, bool codes) {
    std::vector<const uint8_t*> pointers(static_cast<size_t>(kExperts));
    Check(cudaMemcpy(pointers.data(), codes ? w.code_pointers.get() : w.scale_pointers.get(),
                     pointers.size() * sizeof(const uint8_t*), cudaMemcpyDeviceToHost),
          "expert pointers");
    return pointers;
  };
  const auto c1 = host_pointers(w1, true), s1 = host_pointers(w1, false), c3 = host_pointers(w3, true),
             s3 = host_pointers(w3, false), c2 = host_pointers(w2, true), s2 = host_pointers(w2, false);
  const HostExpertWeights stacked[2] = {HostExpertWeights::Of(w1.view, c1.data(), s1.data()),
                                        HostExpertWeights::Of(w3.view, c3.data(), s3.data())};
  const HostExpertWeights down[1] = {HostExpertWeights::Of(w2.view, c2.data(), s2.data())};
  std::mt19937_64 rng(900);
  const Routing routing = RandomRouting(rng, T);
  auto x = RandomFloats(static_cast<size_t>(P * kHidden), 901);
  auto h = RandomFloats(static_cast<size_t>(P * kMoeInter), 902);
  auto y13 = Alloc<float>(static_cast<size_t>(P * 2 * kMoeInter));
  auto y2 = Alloc<float>(static_cast<size_t>(P * kHidden));
  const double touched = static_cast<double>(routing.touched);
  const double w13_bytes = 2.0 * touched * w1.expert_bytes + 4.0 * P * (kHidden + 2 * kMoeInter),
               w13_flops = 4.0 * P * kMoeInter * kHidden;
  const double w2_bytes = touched * w2.expert_bytes + 4.0 * P * (kMoeInter + kHidden),
               w2_flops = 2.0 * P * kHidden * kMoeInter;
  struct Path {
    const char* name;
    bool fused, split;
    int x_cluster = 1;  // the fused kernel's x: 0 by cp.async, else by TMA shared by this many column tiles
    bool registers = false;  // Options::register_weights
    bool producer = false;   // Options::producer_warpgroup
    bool wide = false;       // Options::wide_tiles
  };
  const Path paths[] = {{"fused", true, false},         {"lanes", false, false},
                        {"fused_split", true, true},    {"lanes_split", false, true},
                        {"cp_async", true, false, 0},   {"cp_async_split", true, true, 0},
                        {"tma_c2", true, false, 2},     {"register", true, false, 1, true},
                        {"register_split", true, true, 1, true},
                        {"tma_c4", true, false, 4},     {"tma_c2_split", true, true, 2},
                        {"tma_c4_split", true, true, 4},
                        {"producer", true, false, 1, false, true},
                        {"producer_split", true, true, 1, false, true},
                        {"wide", true, false, 1, false, false, true},
                        {"wide_split", true, true, 1, false, false, true}};
  std::vector<float> fused_y13[2], fused_y2[2];  // [split]
  for (const Path& path : paths) {
    if (std::string(path.name) != "fused" && !InList("TANDEM_KERNEL_BENCH_PATHS", path.name)) continue;
    GroupedExpertGemm::Options options;
    options.max_weight_elements = 2 * kMoeInter * kHidden;
    options.split_x = path.split;
    options.fused_mxfp4 = path.fused;
    options.x_cluster = path.x_cluster;
    options.register_weights = path.registers;
    options.producer_warpgroup = path.producer;
    options.wide_tiles = path.wide;
    auto grouped_or = GroupedExpertGemm::Create(options);
    Check(grouped_or.status(), "GroupedExpertGemm::Create");
    GroupedExpertGemm& grouped = **grouped_or;
    const double w13_us = bench.TimeOnceUs([&] { return grouped.Run(stacked, x.get(), routing.offsets, y13.get(), bench.stream()); }, 5);
    if (path.fused && !grouped.last_run_fused()) {
      std::fprintf(stderr, "  prefill experts: no fused kernel here (it needs an sm_90a build on compute capability 9.0): "
                           "only the lanes rows\n");
      continue;
    }
    Add(rows, std::string("prefill_w13_mxfp4_") + path.name, T, 0, Timing{w13_us, false}, w13_bytes, w13_flops);
    const double w2_us = bench.TimeOnceUs([&] { return grouped.Run(down, h.get(), routing.offsets, y2.get(), bench.stream()); }, 5);
    Add(rows, std::string("prefill_w2_mxfp4_") + path.name, T, 0, Timing{w2_us, false}, w2_bytes, w2_flops);
    Check(cudaDeviceSynchronize(), "prefill experts");
    const std::vector<float> got13 = ToHost(y13), got2 = ToHost(y2);
    auto relative_l2 = [](const std::vector<float>& a, const std::vector<float>& b) {
      double num = 0.0, den = 0.0;
      for (size_t i = 0; i < a.size(); ++i) {
        const double d = static_cast<double>(a[i]) - b[i];
        num += d * d;
        den += static_cast<double>(b[i]) * b[i];
      }
      return std::sqrt(num / std::max(den, 1e-300));
    };
    if (path.registers || path.wide) {
      // Other MMAs (W . x^T): the same products, summed in another order.
      const double e13 = relative_l2(fused_y13[path.split], got13), e2 = relative_l2(fused_y2[path.split], got2);
      std::fprintf(stderr, "  prefill experts %s: vs the default fused kernel relative L2 w13 %.2e, w2 %.2e\n", path.name, e13, e2);
      if (!(e13 < 1e-5) || !(e2 < 1e-5)) Fail("prefill experts: W . x^T (register weights, wide tiles) differs from the weight-tile kernel");
      continue;
    }
    if (path.fused && (path.x_cluster != 1 || path.producer)) {
      // The same MMAs in the same order as the default (x by TMA, one block): the same bits.
      const double e13 = relative_l2(fused_y13[path.split], got13), e2 = relative_l2(fused_y2[path.split], got2);
      std::fprintf(stderr, "  prefill experts %s: vs the default fused kernel relative L2 w13 %.2e, w2 %.2e\n", path.name, e13, e2);
      if (!(e13 == 0.0) || !(e2 == 0.0)) Fail("prefill experts: the x path changed the fused kernel's output");
      continue;
    }
    if (path.fused) {
      fused_y13[path.split] = got13;
      fused_y2[path.split] = got2;
      continue;
    }
    if (fused_y13[path.split].empty()) continue;  // no fused run to compare with
    const double e13 = relative_l2(fused_y13[path.split], got13), e2 = relative_l2(fused_y2[path.split], got2);
    std::fprintf(stderr, "  prefill experts%s: fused vs lanes relative L2 w13 %.2e, w2 %.2e\n", path.split ? " (split)" : "",
                 e13, e2);
    if (!(e13 < 1e-4) || !(e2 < 1e-4)) Fail("prefill experts: the fused kernel's output differs from the lanes'");
  }
  // The forward's inputs: w1/w3's x gathered from the token rows on the way in, w2's x the SwiGLU of the w1/w3
  // output on the way in (ExpertInput: the fused kernel's bf16 x written straight from them), against the two
  // steps they replace (GatherRows / SwiGluStacked into f32, then Run), in the same process. The outputs must
  // be the same bits.
  if (!fused_y13[0].empty()) {
    GroupedExpertGemm::Options options;
    options.max_weight_elements = 2 * kMoeInter * kHidden;
    auto grouped_or = GroupedExpertGemm::Create(options);
    Check(grouped_or.status(), "GroupedExpertGemm::Create (inputs)");
    GroupedExpertGemm& grouped = **grouped_or;
    auto tokens = RandomFloats(static_cast<size_t>(T * kHidden), 903);
    auto gather = ToDevice(routing.gather);
    auto xg = Alloc<float>(static_cast<size_t>(P * kHidden));
    auto hg = Alloc<float>(static_cast<size_t>(P * kMoeInter));
    const float limit = 7.0f;
    const double gather_then = bench.TimeOnceUs([&] {
      const absl::Status gathered = GatherRows(tokens.get(), gather.get(), P, kHidden, xg.get(), bench.stream());
      return gathered.ok() ? grouped.Run(stacked, xg.get(), routing.offsets, y13.get(), bench.stream()) : gathered;
    }, 5);
    const std::vector<float> ref13 = ToHost(y13);
    const double gathered = bench.TimeOnceUs([&] {
      return grouped.Run(stacked, ExpertInput::Gathered(tokens.get(), gather.get()), routing.offsets, y13.get(),
                         bench.stream());
    }, 5);
    if (ToHost(y13) != ref13) Fail("prefill experts: the gathered input's output differs from GatherRows + Run");
    const double swiglu_then = bench.TimeOnceUs([&] {
      const absl::Status h_done = SwiGluStacked(y13.get(), P, kMoeInter, limit, hg.get(), bench.stream());
      return h_done.ok() ? grouped.Run(down, hg.get(), routing.offsets, y2.get(), bench.stream()) : h_done;
    }, 5);
    const std::vector<float> ref2 = ToHost(y2);
    const double swiglu = bench.TimeOnceUs([&] {
      return grouped.Run(down, ExpertInput::SwiGlu(y13.get(), limit), routing.offsets, y2.get(),
                         bench.stream());
    }, 5);
    if (ToHost(y2) != ref2) Fail("prefill experts: the SwiGLU input's output differs from SwiGluStacked + Run");
    Add(rows, "prefill_w13_mxfp4_gather_then_fused", T, 0, Timing{gather_then, false}, w13_bytes, w13_flops);
    Add(rows, "prefill_w13_mxfp4_fused_gathered", T, 0, Timing{gathered, false}, w13_bytes, w13_flops);
    Add(rows, "prefill_w2_mxfp4_swiglu_then_fused", T, 0, Timing{swiglu_then, false}, w2_bytes, w2_flops);
    Add(rows, "prefill_w2_mxfp4_fused_swiglu", T, 0, Timing{swiglu, false}, w2_bytes, w2_flops);
  }
  // Timing probes of the fused kernel (x in one pass): the same launch without its dequantization, its MMAs
  // or its x copies. Their output is not the product (not checked); bytes and FLOPs are the fused rows', so
  // only the times mean anything: differences from `prefill_*_fused` place a step's time.
  if (fused_y13[0].empty()) return;  // no fused kernel here
  const std::pair<const char*, int> probes[] = {{"no_dequant", 1}, {"no_mma", 2}, {"no_x_copy", 3}};
  for (const int x_cluster : {1, 0}) {
    for (const auto& [name, id] : probes) {
      const std::string probe = std::string(x_cluster == 0 ? "cp_async_" : "") + name;
      GroupedExpertGemm::Options options;
      options.max_weight_elements = 2 * kMoeInter * kHidden;
      options.timing_probe = id;
      options.x_cluster = x_cluster;
      auto grouped_or = GroupedExpertGemm::Create(options);
      Check(grouped_or.status(), "GroupedExpertGemm::Create (probe)");
      GroupedExpertGemm& grouped = **grouped_or;
      const double w13_us = bench.TimeOnceUs([&] { return grouped.Run(stacked, x.get(), routing.offsets, y13.get(), bench.stream()); }, 5);
      if (!grouped.last_run_fused()) Fail("prefill expert probes: the lanes served instead of the fused kernel");
      Add(rows, std::string("prefill_w13_mxfp4_probe_") + probe, T, 0, Timing{w13_us, false}, w13_bytes, w13_flops);
      const double w2_us = bench.TimeOnceUs([&] { return grouped.Run(down, h.get(), routing.offsets, y2.get(), bench.stream()); }, 5);
      Add(rows, std::string("prefill_w2_mxfp4_probe_") + probe, T, 0, Timing{w2_us, false}, w2_bytes, w2_flops);
    }
  }
  Check(cudaDeviceSynchronize(), "prefill expert probes");
}

// ---- Output head at decode: hc_head, greedy and sampled picks over the 129280 vocabulary ----
constexpr int64_t kVocab = 129280, kFavourites = 16;
int64_t FavouriteColumn(int64_t j) { return 1000 + 7919 * j; }

// Logits [rows, vocab] of a peaked distribution, as a model gives (so top-p keeps a few ids): uniform in
// [-8, 4], and favourite j of row r at column FavouriteColumn(j) + r with logit 12 + j / 2 (a strided copy).
DeviceArray<float> PeakedLogits(int64_t rows_count, uint64_t seed) {
  if (FavouriteColumn(kFavourites - 1) + rows_count > kVocab) Fail("PeakedLogits: too many rows");
  auto logits = RandomFloats(static_cast<size_t>(rows_count * kVocab), seed, -8.0f, 4.0f);
  for (int64_t j = 0; j < kFavourites; ++j) {
    const std::vector<float> value(static_cast<size_t>(rows_count), 12.0f + 0.5f * static_cast<float>(j));
    Check(cudaMemcpy2D(logits.get() + FavouriteColumn(j), (kVocab + 1) * sizeof(float), value.data(), sizeof(float),
                       sizeof(float), static_cast<size_t>(rows_count), cudaMemcpyHostToDevice),
          "cudaMemcpy2D");
  }
  return logits;
}

// HcHead: bytes = x [T, 4 x 4096] + fn [4, 16384] + y [T, 4096] (f32); FLOPs = fn.x (2 x 4 x 16384) + the rms
// (2 x 16384) + the weighted sum (2 x 4 x 4096) per token.
// ArgmaxRows / SampleRows (temperature 1, top-p 0.95, no top-k): bytes = the logits once + ids (+ params);
// FLOPs ~1 (argmax) and ~2 (sample: key, compare; the radix passes re-read the row from L2) per logit.
void RunHead(Bench& bench, int64_t T, std::vector<Row>& rows) {
  const cudaStream_t s = bench.stream();
  const int64_t MD = kStreams * kHidden;
  const int copies = CopiesFor(static_cast<size_t>(4 * (T * MD + T * kHidden + T * kVocab)));
  struct Set {
    DeviceArray<float> x, y, logits;
    DeviceArray<int32_t> argmax, sampled;
    DeviceArray<SampleRow> params;
  };
  std::vector<Set> sets;
  std::mt19937_64 rng(900 + static_cast<uint64_t>(T));
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  uint64_t seed = 900000 + static_cast<uint64_t>(T);
  for (int c = 0; c < copies; ++c) {
    std::vector<SampleRow> params(static_cast<size_t>(T));
    for (auto& p : params) {
      p.temperature = 1.0f;
      p.top_k = -1;
      p.top_p = 0.95f;
      p.min_p = 0.0f;
      p.u = uniform(rng);
    }
    sets.push_back({RandomFloats(static_cast<size_t>(T * MD), ++seed), Alloc<float>(static_cast<size_t>(T * kHidden)),
                    PeakedLogits(T, ++seed), Alloc<int32_t>(static_cast<size_t>(T)), Alloc<int32_t>(static_cast<size_t>(T)),
                    ToDevice(params)});
  }
  auto fn = RandomFloats(static_cast<size_t>(kStreams * MD), ++seed, -0.01f, 0.01f);
  auto base = RandomFloats(static_cast<size_t>(kStreams), ++seed);
  auto scale = RandomFloats(1, ++seed, 0.5f, 1.5f);
  auto at = [&](int i) -> const Set& { return sets[static_cast<size_t>(i % copies)]; };
  const Timing head = bench.Time([&](int i) {
    return HcHead(fn.get(), base.get(), scale.get(), kStreams, kHidden, 1e-6, 1e-6, at(i).x.get(), T, at(i).y.get(), s);
  });
  Check(cudaDeviceSynchronize(), "hc_head");
  CheckFinite(sets[0].y.get(), sets[0].y.size(), "hc_head");
  Add(rows, "hc_head", T, 0, head, 4.0 * (T * MD + kStreams * MD + T * kHidden),
      2.0 * T * MD * kStreams + 2.0 * T * MD + 2.0 * T * kHidden * kStreams);
  const Timing argmax = bench.Time(
      [&](int i) { return ArgmaxRows(at(i).logits.get(), T, kVocab, at(i).argmax.get(), s); });
  Check(cudaDeviceSynchronize(), "argmax");
  const auto ids = ToHost(sets[0].argmax);
  for (int64_t r = 0; r < T; ++r) {
    if (ids[static_cast<size_t>(r)] != FavouriteColumn(kFavourites - 1) + r) Fail("argmax_rows: wrong id in row " + std::to_string(r));
  }
  Add(rows, "argmax_rows", T, 0, argmax, 4.0 * T * kVocab + 4.0 * T, 1.0 * T * kVocab);
  const size_t workspace_bytes = SampleWorkspaceBytes(T, kVocab);
  auto workspace = Alloc<uint8_t>(workspace_bytes);
  const Timing sample = bench.Time([&](int i) {
    return SampleRows(at(i).logits.get(), T, kVocab, at(i).params.get(), at(i).sampled.get(), workspace.get(),
                      workspace_bytes, s);
  });
  Check(cudaDeviceSynchronize(), "sample");
  for (const int32_t id : ToHost(sets[0].sampled)) {
    if (id < 0 || id >= kVocab) Fail("sample_rows: id " + std::to_string(id) + " out of the vocabulary");
  }
  Add(rows, "sample_rows", T, 0, sample, 4.0 * T * kVocab + (4.0 + sizeof(SampleRow)) * T, 2.0 * T * kVocab);
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
  Check(cudaDeviceSynchronize(), "fill");
  const double copy_us = bench.TimeOnceUs(
      [&] { return CudaStatus(cudaMemcpyAsync(b.get(), a.get(), copy_bytes, cudaMemcpyDeviceToDevice, bench.stream()),
                              "cudaMemcpyAsync", __FILE__, __LINE__); }, 10);
  const double copy_gbps = 2.0 * copy_bytes / copy_us * 1e-3;
  // Ceiling 2: cuBLASLt bf16 GEMM at 8192^3 on random data, bf16 out.
  const int64_t n = 8192;
  auto ga = RandomBf16(static_cast<size_t>(n * n), 2), gb = RandomBf16(static_cast<size_t>(n * n), 3);
  auto gc = Alloc<__nv_bfloat16>(static_cast<size_t>(n * n));
  Check(cudaDeviceSynchronize(), "fill");
  const double gemm_us = bench.TimeOnceUs(
      [&] { return gemm.Linear(ga.get(), n, n, gb.get(), n, gc.get(), Gemm::Output::kBf16, bench.stream()); }, 10);
  const double gemm_tflops = 2.0 * n * n * n / gemm_us * 1e-6;
  std::fprintf(stderr, "ceilings: copy %.0f GB/s, bf16 GEMM %.0f TFLOP/s\n", copy_gbps, gemm_tflops);

  std::vector<Row> rows;
  // What DRAM gives the expert kernels' access patterns: load-only reads of the copy's 2 GiB source (bytes =
  // the buffer; frac_copy_bw is then the pattern's share of the copy rate). Plain launches, median of 5.
  if (WantGroup("patterns")) {
    auto sink = Alloc<uint32_t>(1);
    for (const StreamPattern pattern : kStreamPatterns) {
      const double us = bench.TimeOnceUs(
          [&] { return StreamRead(pattern, reinterpret_cast<const uint8_t*>(a.get()), copy_bytes, sink.get(),
                                  bench.stream()); }, 5);
      Add(rows, std::string("stream_") + StreamPatternName(pattern), 0, 0, Timing{us, false},
          static_cast<double>(copy_bytes), 0.0);
    }
  }
  // One-time: dequantize wq_b (32768 x 1024 FP8) to bf16.
  {
    const int64_t out = 32768, in = 1024;
    auto codes = Alloc<uint8_t>(static_cast<size_t>(out * in));
    auto scales = Alloc<uint8_t>(static_cast<size_t>((out / 128) * (in / 128)));
    Check(FillFp8Codes(codes.get(), out * in, 9), "FillFp8Codes");
    Check(cudaMemset(scales.get(), 127, scales.bytes()), "cudaMemset");
    auto dst = Alloc<__nv_bfloat16>(static_cast<size_t>(out * in));
    const Timing timing = bench.Time(
        [&](int) { return DequantizeFp8Block({codes.get(), scales.get(), out, in}, dst.get(), bench.stream()); });
    Add(rows, "dequant_fp8_wq_b", 0, 0, timing, 3.0 * out * in + static_cast<double>(scales.bytes()), 1.0 * out * in);
  }
  constexpr int64_t kDecode[] = {1, 16, 64, 256};
  constexpr int64_t kAll[] = {1, 16, 64, 256, kPrefill};
  for (const int64_t T : kAll) {
    if (WantGroup("layer") && WantTokens(T)) RunLayerOps(bench, gemm, T, rows);
  }
  const std::vector<uint8_t> key_template = IndexerKeyTemplate();
  for (const int64_t context : {int64_t{4096}, int64_t{32768}}) {
    for (const int64_t T : kDecode) {
      if (!WantTokens(T)) continue;
      if (WantGroup("attention")) RunSparseAttention(bench, T, context, rows);
      if (WantGroup("indexer")) RunIndexer(bench, T, context, key_template, rows);
    }
  }
  if (WantTokens(kPrefill)) {
    if (WantGroup("attention")) RunSparseAttention(bench, kPrefill, kPrefill, rows);
    if (WantGroup("indexer")) RunIndexer(bench, kPrefill, kPrefill, key_template, rows);
  }
  for (const int64_t T : kAll) {
    if (!WantGroup("compressor") || !WantTokens(T)) continue;
    RunCompressor(bench, T, false, rows);
    RunCompressor(bench, T, true, rows);
  }
  if (WantGroup("moe")) RunMoe(bench, rows);
  if (WantGroup("prefill_experts") && WantTokens(kPrefill)) RunPrefillExperts(bench, rows);
  for (const int64_t T : kDecode) {
    if (WantGroup("head") && WantTokens(T)) RunHead(bench, T, rows);
  }

  const std::string kernels_path = out_dir + "/kernels.csv", ceilings_path = out_dir + "/ceilings.csv";
  FILE* csv = std::fopen(kernels_path.c_str(), "w");
  FILE* ceil = std::fopen(ceilings_path.c_str(), "w");
  if (!csv || !ceil) {
    std::fprintf(stderr, "cannot write %s\n", out_dir.c_str());
    return 1;
  }
  std::fprintf(ceil, "device,copy_gbps,gemm_bf16_tflops\n\"%s\",%.1f,%.1f\n", prop.name, copy_gbps, gemm_tflops);
  std::fclose(ceil);
  // The first eleven columns as before; context (0: independent of it) and timing (graph | launches) appended.
  std::fprintf(csv,
               "op,tokens,time_us,bytes,flops,gbps,tflops,frac_copy_bw,frac_gemm_rate,floor_us,frac_of_floor,context,"
               "timing\n");
  std::printf("ceilings on %s: copy %.0f GB/s, cuBLASLt bf16 GEMM %.0f TFLOP/s\n", prop.name, copy_gbps, gemm_tflops);
  std::printf("%-28s %6s %6s %10s %10s %9s %9s %7s %7s %9s\n", "op", "tokens", "ctx", "time_us", "MB", "GB/s", "TFLOP/s",
              "%bw", "%gemm", "%floor");
  for (const Row& r : rows) {
    const double gbps = r.bytes / r.us * 1e-3, tflops = r.flops / r.us * 1e-6;
    const double floor_us = std::max(r.bytes / (copy_gbps * 1e3), r.flops / (gemm_tflops * 1e6));
    std::fprintf(csv, "%s,%lld,%.3f,%.0f,%.0f,%.2f,%.4f,%.4f,%.4f,%.3f,%.4f,%lld,%s\n", r.op.c_str(),
                 static_cast<long long>(r.tokens), r.us, r.bytes, r.flops, gbps, tflops, gbps / copy_gbps,
                 tflops / gemm_tflops, floor_us, floor_us / r.us, static_cast<long long>(r.context),
                 r.graph ? "graph" : "launches");
    std::printf("%-28s %6lld %6lld %10.2f %10.2f %9.0f %9.2f %6.1f%% %6.1f%% %8.1f%%%s\n", r.op.c_str(),
                static_cast<long long>(r.tokens), static_cast<long long>(r.context), r.us, r.bytes * 1e-6, gbps, tflops,
                100 * gbps / copy_gbps, 100 * tflops / gemm_tflops, 100 * floor_us / r.us, r.graph ? "" : "  (launches)");
  }
  std::fclose(csv);
  return 0;
}
