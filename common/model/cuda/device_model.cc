// The whole DSV4 forward on the GPU (see device_model.h). Host code only: it uploads the weights, builds
// per forward the address tables of every cache entry and ring row the kernels touch (from the chunk
// states, so paged and plain states work alike), copies them to the device in one transfer, and queues
// the kernels of common/kernels/cuda layer by layer on one stream.
#include "common/model/cuda/device_model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <map>
#include <optional>

#include <cuda_bf16.h>

#include "common/core/dtype.h"
#include "common/kernels/cuda/check.h"
#include "common/kernels/cuda/cuda_attention.h"
#include "common/kernels/cuda/cuda_model_ops.h"
#include "common/kernels/cuda/cuda_moe.h"
#include "common/kernels/cuda/cuda_moe_prefill.h"
#include "common/kernels/cuda/cuda_ops.h"
#include "common/model/cuda/device_graphs.h"

namespace tandem::model::cuda {
namespace kc = ::tandem::kernels::cuda;

namespace {

using Clock = std::chrono::steady_clock;
constexpr size_t kAlign = 256;

size_t AlignUp(size_t n, size_t to = kAlign) { return (n + to - 1) / to * to; }

// Device memory held as long as the model (weights and constants).
class DeviceHeap {
 public:
  DeviceHeap() = default;
  DeviceHeap(const DeviceHeap&) = delete;
  DeviceHeap& operator=(const DeviceHeap&) = delete;
  ~DeviceHeap() {
    for (void* p : blocks_) cudaFree(p);
  }
  template <typename T>
  absl::StatusOr<T*> Upload(const T* host, size_t count) {
    void* p = nullptr;
    TANDEM_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, std::max<size_t>(count * sizeof(T), 16)));
    blocks_.push_back(p);
    bytes_ += count * sizeof(T);
    if (count > 0) TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpy(p, host, count * sizeof(T), cudaMemcpyHostToDevice));
    return static_cast<T*>(p);
  }
  template <typename T>
  absl::StatusOr<T*> Upload(const std::vector<T>& host) {
    return Upload(host.data(), host.size());
  }
  size_t bytes() const { return bytes_; }

 private:
  std::vector<void*> blocks_;
  size_t bytes_ = 0;
};

// Per-forward scratch: a bump allocator over device blocks. Reset (at the start of a forward, with the
// stream idle) folds the blocks the last forward needed into one.
class Arena {
 public:
  Arena() = default;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  ~Arena() { Free(); }

  absl::Status Reset() {
    if (blocks_.size() > 1) {
      size_t total = 0;
      for (const auto& b : blocks_) total += b.bytes;
      Free();
      TANDEM_RETURN_IF_ERROR(Grow(total));
    }
    current_ = 0;
    used_ = 0;
    return absl::OkStatus();
  }

  // Counts the reallocations of the blocks: a captured graph's pointers stay valid while it is unchanged
  // (for the same sequence of Take sizes after a Reset).
  uint64_t generation() const { return generation_; }

  template <typename T>
  absl::StatusOr<T*> Take(size_t count) {
    const size_t bytes = AlignUp(std::max<size_t>(count * sizeof(T), 1));
    while (current_ < blocks_.size() && used_ + bytes > blocks_[current_].bytes) {
      ++current_;
      used_ = 0;
    }
    if (current_ == blocks_.size()) TANDEM_RETURN_IF_ERROR(Grow(std::max<size_t>(bytes, size_t{64} << 20)));
    T* p = reinterpret_cast<T*>(static_cast<uint8_t*>(blocks_[current_].ptr) + used_);
    used_ += bytes;
    return p;
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };
  absl::Status Grow(size_t bytes) {
    void* p = nullptr;
    TANDEM_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, bytes));
    blocks_.push_back({p, bytes});
    ++generation_;
    return absl::OkStatus();
  }
  void Free() {
    if (!blocks_.empty()) ++generation_;
    for (const auto& b : blocks_) cudaFree(b.ptr);
    blocks_.clear();
    current_ = 0;
    used_ = 0;
  }
  std::vector<Block> blocks_;
  size_t current_ = 0;
  size_t used_ = 0;
  uint64_t generation_ = 0;
};

// The fixed device home of a forward's tables and its page-locked host staging: a captured graph reads the
// tables at one address, so each step copies its own there first (outside the graph). Grows only; growing
// bumps generation().
class TableBuffer {
 public:
  TableBuffer() = default;
  TableBuffer(const TableBuffer&) = delete;
  TableBuffer& operator=(const TableBuffer&) = delete;
  ~TableBuffer() { Free(); }

  // Room for `bytes`; `stream` (the last user of the old buffers) is synchronized before they are freed.
  absl::Status Reserve(size_t bytes, cudaStream_t stream) {
    if (bytes <= capacity_) return absl::OkStatus();
    TANDEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    const size_t want = AlignUp(std::max(bytes, capacity_ * 2), size_t{1} << 16);  // before Free() zeroes capacity_
    Free();
    TANDEM_CUDA_RETURN_IF_ERROR(cudaMalloc(&device_, want));
    TANDEM_CUDA_RETURN_IF_ERROR(cudaMallocHost(&host_, want));
    capacity_ = want;
    ++generation_;
    return absl::OkStatus();
  }
  uint8_t* device() const { return static_cast<uint8_t*>(device_); }
  uint8_t* host() const { return static_cast<uint8_t*>(host_); }
  uint64_t generation() const { return generation_; }

 private:
  void Free() {
    if (device_) cudaFree(device_);
    if (host_) cudaFreeHost(host_);
    device_ = host_ = nullptr;
    capacity_ = 0;
  }
  void* device_ = nullptr;
  void* host_ = nullptr;
  size_t capacity_ = 0;
  uint64_t generation_ = 0;
};

// Host-built tables (typed arrays at aligned offsets) copied to the device in one transfer.
class Tables {
 public:
  template <typename T>
  size_t Add(const std::vector<T>& values) {
    const size_t offset = AlignUp(bytes_.size(), 16);
    bytes_.resize(offset + std::max<size_t>(values.size() * sizeof(T), 1));
    if (!values.empty()) std::memcpy(bytes_.data() + offset, values.data(), values.size() * sizeof(T));
    layout_.push_back(static_cast<int64_t>(values.size() * sizeof(T)));
    return offset;
  }
  // Places the tables in `buffer` (the device addresses at() gives are then fixed) before any upload.
  absl::Status Place(TableBuffer& buffer, cudaStream_t stream) {
    TANDEM_RETURN_IF_ERROR(buffer.Reserve(bytes_.size(), stream));
    buffer_ = &buffer;
    return absl::OkStatus();
  }
  // Queues the copy through the page-locked staging; the caller keeps the staging untouched until `stream`
  // has run it (each forward synchronizes before it returns).
  absl::Status Upload(cudaStream_t stream) {
    std::memcpy(buffer_->host(), bytes_.data(), bytes_.size());
    TANDEM_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(buffer_->device(), buffer_->host(), bytes_.size(), cudaMemcpyHostToDevice, stream));
    return absl::OkStatus();
  }
  template <typename T>
  T* at(size_t offset) const {
    return reinterpret_cast<T*>(buffer_->device() + offset);
  }
  // The byte size of every array in Add order: with the offsets it fixes, part of a graph's signature.
  const std::vector<int64_t>& layout() const { return layout_; }

 private:
  std::vector<uint8_t> bytes_;
  std::vector<int64_t> layout_;
  TableBuffer* buffer_ = nullptr;
};

struct Dense {
  int64_t out = 0;
  int64_t in = 0;
  const void* w = nullptr;  // bf16 or f32 [out, in]
  bool f32 = false;
  bool split = false;  // bf16 weight, x as a bf16 hi + lo pair (DenseFormat::kBf16x2)
};

struct Compressor {
  int ratio = 0;
  int64_t dim = 0;
  Dense wkv, wgate;
  const float* ape = nullptr;
  const float* norm = nullptr;
};

struct Experts {
  kc::GroupedWeights w1, w2, w3;
  // The same per-expert device pointers in host arrays (the prefill path launches per expert).
  std::vector<const uint8_t*> codes1, scales1, codes2, scales2, codes3, scales3;
};

struct Layer {
  LayerSpec spec;
  const float* attn_norm = nullptr;
  const float* ffn_norm = nullptr;
  kc::MhcParams hc_attn, hc_ffn;
  const float* sink = nullptr;
  Dense wq_a, wq_b, wkv, wo_a, wo_b;
  const float* q_norm = nullptr;
  const float* kv_norm = nullptr;
  std::optional<Compressor> compressor, index_compressor;
  Dense index_wq_b, index_weights;
  Dense gate;
  const float* bias = nullptr;
  const int32_t* tid2eid = nullptr;
  Experts routed;
  // The shared expert, dequantized once (cuBLASLt at any batch); w1 and w3 stacked into one [2I, D] weight
  // (rows [0, I) are w1, [I, 2I) w3: one GEMM, then SwiGluStacked).
  Dense shared_w13, shared_w2;
};

// Per-chunk geometry inside a batch.
struct ChunkGeometry {
  SequenceState* state;
  int64_t offset, count, start;
  int64_t end() const { return start + count; }
};

}  // namespace

struct DeviceModel::Impl {
  std::shared_ptr<const ModelWeights> weights;
  DeviceModelOptions options;
  cudaStream_t stream = nullptr;
  std::unique_ptr<kc::Gemm> gemm;
  std::unique_ptr<kc::GroupedExpertGemm> expert_gemm;  // prefill: dequantize each expert, cuBLASLt its rows
  DeviceHeap heap;
  Arena arena;
  std::vector<Layer> layers;
  const uint16_t* embed = nullptr;
  Dense head;
  const float* norm = nullptr;
  const float* hc_head_fn = nullptr;
  const float* hc_head_base = nullptr;
  const float* hc_head_scale = nullptr;
  // The MTP draft layer (when the weights have it): its decoder layer (sliding window only, as on the CPU),
  // the e / h projections and norms, and its own hc_head and final norm; the embedding and head are shared.
  struct Mtp {
    std::vector<Layer> layer;  // one
    Dense e_proj, h_proj;
    const float *enorm = nullptr, *hnorm = nullptr, *norm = nullptr;
    const float *hc_fn = nullptr, *hc_base = nullptr, *hc_scale = nullptr;
  };
  std::optional<Mtp> mtp;
  const double* rope_plain = nullptr;
  const double* rope_compressed = nullptr;
  int64_t max_dense_in = 0;
  int64_t max_dense_out = 0;
  float* split_yb = nullptr;  // this forward's Gemm::LinearSplit output scratch (kBf16x2)
  DeviceForward last;
  TableBuffer table_buffer;
  GraphCache graphs;
  std::vector<int64_t> graph_signature;  // the last graph step's (kept to reuse its allocation)
  bool in_flight = false;  // a forward queued work and has not synchronized since (it failed part-way)

  ~Impl() {
    if (stream) cudaStreamSynchronize(stream);
    graphs.Clear();
    for (cudaEvent_t e : events) cudaEventDestroy(e);
    if (stream) cudaStreamDestroy(stream);
  }

  const ModelConfig& config() const { return weights->config; }

  // ---- Upload ----
  absl::StatusOr<Dense> UploadDense(const DenseWeight& w, bool force_f32) {
    Dense d;
    d.out = w.out;
    d.in = w.in;
    d.f32 = force_f32 || options.dense == DenseFormat::kF32;
    if (d.f32) {
      TANDEM_ASSIGN_OR_RETURN(d.w, heap.Upload(w.values));
    } else {
      std::vector<uint16_t> bits(w.values.size());
      for (size_t i = 0; i < bits.size(); ++i) bits[i] = FloatToBf16(w.values[i]);
      TANDEM_ASSIGN_OR_RETURN(d.w, heap.Upload(bits));
      d.split = options.dense == DenseFormat::kBf16x2;
      max_dense_in = std::max(max_dense_in, w.in);
      max_dense_out = std::max(max_dense_out, w.out);
    }
    return d;
  }

  // A packed (FP8/MXFP4) matrix dequantized exactly on the host, then uploaded as a dense layer.
  absl::StatusOr<Dense> UploadPacked(const PackedWeight& w) { return UploadPackedStacked({&w}); }

  // Packed matrices of one input width, their rows stacked in order into one dense layer.
  absl::StatusOr<Dense> UploadPackedStacked(std::initializer_list<const PackedWeight*> parts) {
    if (parts.size() == 0) return absl::InvalidArgumentError("UploadPackedStacked: no weights");
    DenseWeight dense;
    dense.in = (*parts.begin())->view.in;
    for (const PackedWeight* w : parts) {
      if (w->view.in != dense.in) {
        return absl::InvalidArgumentError(absl::StrCat("stacked weights differ in input width: ", w->view.in, " vs ", dense.in));
      }
      dense.out += w->view.out;
    }
    dense.values.resize(static_cast<size_t>(dense.out * dense.in));
    int64_t row = 0;
    for (const PackedWeight* w : parts) {
      kernels::DequantizeRows(w->view, 0, w->view.out, dense.values.data() + row * dense.in);
      row += w->view.out;
    }
    return UploadDense(dense, false);
  }

  absl::StatusOr<kc::MhcParams> UploadMhc(const MhcWeights& w) {
    kc::MhcParams p;
    TANDEM_ASSIGN_OR_RETURN(p.fn, heap.Upload(w.fn));
    TANDEM_ASSIGN_OR_RETURN(p.base, heap.Upload(w.base));
    TANDEM_ASSIGN_OR_RETURN(p.scale, heap.Upload(w.scale));
    return p;
  }

  absl::StatusOr<Compressor> UploadCompressor(const CompressorWeights& w) {
    Compressor c;
    c.ratio = w.ratio;
    c.dim = w.dim;
    TANDEM_ASSIGN_OR_RETURN(c.wkv, UploadDense(w.wkv, false));
    TANDEM_ASSIGN_OR_RETURN(c.wgate, UploadDense(w.wgate, false));
    TANDEM_ASSIGN_OR_RETURN(c.ape, heap.Upload(w.ape));
    TANDEM_ASSIGN_OR_RETURN(c.norm, heap.Upload(w.norm));
    return c;
  }

  // One matrix (w1, w2 or w3) of every expert in `experts`, as device arrays of per-expert pointers.
  absl::StatusOr<kc::GroupedWeights> UploadGrouped(const std::vector<const PackedWeight*>& experts,
                                                   std::vector<const uint8_t*>* host_codes,
                                                   std::vector<const uint8_t*>* host_scales) {
    kc::GroupedWeights g;
    g.format = experts.front()->view.format;
    g.experts = static_cast<int64_t>(experts.size());
    g.out = experts.front()->view.out;
    g.in = experts.front()->view.in;
    std::vector<const uint8_t*> codes, scales;
    for (const PackedWeight* e : experts) {
      TANDEM_ASSIGN_OR_RETURN(const uint8_t* c, heap.Upload(e->codes.data(), e->codes.bytes()));
      TANDEM_ASSIGN_OR_RETURN(const uint8_t* s, heap.Upload(e->scales.data(), e->scales.bytes()));
      codes.push_back(c);
      scales.push_back(s);
    }
    TANDEM_ASSIGN_OR_RETURN(g.codes, heap.Upload(codes));
    TANDEM_ASSIGN_OR_RETURN(g.scales, heap.Upload(scales));
    *host_codes = std::move(codes);
    *host_scales = std::move(scales);
    return g;
  }

  absl::StatusOr<Experts> UploadExperts(const std::vector<const ExpertWeights*>& experts) {
    Experts out;
    std::vector<const PackedWeight*> w1, w2, w3;
    for (const ExpertWeights* e : experts) {
      w1.push_back(&e->w1);
      w2.push_back(&e->w2);
      w3.push_back(&e->w3);
    }
    TANDEM_ASSIGN_OR_RETURN(out.w1, UploadGrouped(w1, &out.codes1, &out.scales1));
    TANDEM_ASSIGN_OR_RETURN(out.w2, UploadGrouped(w2, &out.codes2, &out.scales2));
    TANDEM_ASSIGN_OR_RETURN(out.w3, UploadGrouped(w3, &out.codes3, &out.scales3));
    return out;
  }

  absl::StatusOr<Layer> UploadLayer(const LayerWeights& w) {
    Layer l;
    l.spec = w.spec;
    TANDEM_ASSIGN_OR_RETURN(l.attn_norm, heap.Upload(w.attn_norm));
    TANDEM_ASSIGN_OR_RETURN(l.ffn_norm, heap.Upload(w.ffn_norm));
    TANDEM_ASSIGN_OR_RETURN(l.hc_attn, UploadMhc(w.hc_attn));
    TANDEM_ASSIGN_OR_RETURN(l.hc_ffn, UploadMhc(w.hc_ffn));
    const auto& a = w.attn;
    TANDEM_ASSIGN_OR_RETURN(l.sink, heap.Upload(a.attn_sink));
    TANDEM_ASSIGN_OR_RETURN(l.wq_a, UploadDense(a.wq_a, false));
    TANDEM_ASSIGN_OR_RETURN(l.wq_b, UploadDense(a.wq_b, false));
    TANDEM_ASSIGN_OR_RETURN(l.wkv, UploadDense(a.wkv, false));
    TANDEM_ASSIGN_OR_RETURN(l.wo_a, UploadDense(a.wo_a, false));
    TANDEM_ASSIGN_OR_RETURN(l.wo_b, UploadDense(a.wo_b, false));
    TANDEM_ASSIGN_OR_RETURN(l.q_norm, heap.Upload(a.q_norm));
    TANDEM_ASSIGN_OR_RETURN(l.kv_norm, heap.Upload(a.kv_norm));
    if (a.compressor) {
      TANDEM_ASSIGN_OR_RETURN(l.compressor, UploadCompressor(*a.compressor));
    }
    if (a.indexer) {
      TANDEM_ASSIGN_OR_RETURN(l.index_compressor, UploadCompressor(a.indexer->compressor));
      TANDEM_ASSIGN_OR_RETURN(l.index_wq_b, UploadDense(a.indexer->wq_b, false));
      // The indexer's head weights pick the top-k: kept in f32 like the router gate.
      TANDEM_ASSIGN_OR_RETURN(l.index_weights, UploadDense(a.indexer->weights_proj, true));
    }
    const auto& f = w.ffn;
    TANDEM_ASSIGN_OR_RETURN(l.gate, UploadDense(f.gate, true));
    if (w.spec.hash_routed) {
      TANDEM_ASSIGN_OR_RETURN(l.tid2eid, heap.Upload(f.tid2eid));
    } else {
      TANDEM_ASSIGN_OR_RETURN(l.bias, heap.Upload(f.bias));
    }
    std::vector<const ExpertWeights*> routed;
    for (const auto& e : f.experts) routed.push_back(&e);
    TANDEM_ASSIGN_OR_RETURN(l.routed, UploadExperts(routed));
    if (f.shared.w1.view.out != f.shared.w3.view.out) {
      return absl::InvalidArgumentError(absl::StrCat("shared expert: w1 has ", f.shared.w1.view.out, " rows, w3 ",
                                                     f.shared.w3.view.out));
    }
    TANDEM_ASSIGN_OR_RETURN(l.shared_w13, UploadPackedStacked({&f.shared.w1, &f.shared.w3}));
    TANDEM_ASSIGN_OR_RETURN(l.shared_w2, UploadPacked(f.shared.w2));
    return l;
  }

  absl::Status Upload() {
    const auto& w = *weights;
    const auto& c = config();
    TANDEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(options.device));
    TANDEM_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    TANDEM_ASSIGN_OR_RETURN(gemm, kc::Gemm::Create(kc::Gemm::kDefaultWorkspaceBytes, options.tune_gemms));
    kc::GroupedExpertGemm::Options expert_options;
    expert_options.max_weight_elements = 2 * c.moe_intermediate_size * c.hidden_size;  // w1 and w3 stacked
    expert_options.split_x = options.dense != DenseFormat::kBf16;  // f32 runs get the closest of the two
    expert_options.fused_mxfp4 = options.fused_prefill_experts;
    expert_options.wide_tiles = true;  // the fastest form of the fused kernel (cuda_moe_prefill.h)
    TANDEM_ASSIGN_OR_RETURN(expert_gemm, kc::GroupedExpertGemm::Create(expert_options));
    for (const auto& layer : w.layers) {
      TANDEM_ASSIGN_OR_RETURN(Layer l, UploadLayer(layer));
      layers.push_back(std::move(l));
    }
    // A pipeline stage holds the embedding when it is the first (or has the MTP layer), the head when last.
    if (w.is_first_stage() || w.mtp) {
      TANDEM_ASSIGN_OR_RETURN(embed, heap.Upload(w.embed.as<uint16_t>(), static_cast<size_t>(w.embed.numel())));
    }
    if (w.is_last_stage()) {
      TANDEM_ASSIGN_OR_RETURN(head, UploadDense(w.head, false));
      TANDEM_ASSIGN_OR_RETURN(norm, heap.Upload(w.norm));
      TANDEM_ASSIGN_OR_RETURN(hc_head_fn, heap.Upload(w.hc_head.fn));
      TANDEM_ASSIGN_OR_RETURN(hc_head_base, heap.Upload(w.hc_head.base));
      TANDEM_ASSIGN_OR_RETURN(hc_head_scale, heap.Upload(w.hc_head.scale));
    }
    if (w.mtp) {
      Mtp m;
      TANDEM_ASSIGN_OR_RETURN(Layer layer, UploadLayer(w.mtp->layer));
      layer.spec.compress_ratio = 0;  // the CPU runs the MTP layer over its window only
      layer.compressor.reset();
      layer.index_compressor.reset();
      m.layer.push_back(std::move(layer));
      TANDEM_ASSIGN_OR_RETURN(m.e_proj, UploadDense(w.mtp->e_proj, false));
      TANDEM_ASSIGN_OR_RETURN(m.h_proj, UploadDense(w.mtp->h_proj, false));
      TANDEM_ASSIGN_OR_RETURN(m.enorm, heap.Upload(w.mtp->enorm));
      TANDEM_ASSIGN_OR_RETURN(m.hnorm, heap.Upload(w.mtp->hnorm));
      TANDEM_ASSIGN_OR_RETURN(m.norm, heap.Upload(w.mtp->norm));
      TANDEM_ASSIGN_OR_RETURN(m.hc_fn, heap.Upload(w.mtp->hc_head.fn));
      TANDEM_ASSIGN_OR_RETURN(m.hc_base, heap.Upload(w.mtp->hc_head.base));
      TANDEM_ASSIGN_OR_RETURN(m.hc_scale, heap.Upload(w.mtp->hc_head.scale));
      mtp = std::move(m);
    }
    TANDEM_ASSIGN_OR_RETURN(rope_plain, heap.Upload(RopeInverseFrequencies(c.qk_rope_head_dim, c.rope_theta, nullptr)));
    TANDEM_ASSIGN_OR_RETURN(rope_compressed, heap.Upload(RopeInverseFrequencies(c.qk_rope_head_dim, c.compress_rope_theta,
                                                                                &c.rope_scaling)));
    return absl::OkStatus();
  }

  // ---- Forward ----
  // y[rows, w.out] = x[rows, w.in] . W^T (weight rows from `weight`, default w.w); x contiguous.
  absl::Status Linear(const Dense& w, const float* x, int64_t rows, float* y, __nv_bfloat16* xb,
                      const void* weight = nullptr, int64_t out = 0) {
    const void* wp = weight ? weight : w.w;
    const int64_t n = out > 0 ? out : w.out;
    if (w.f32) return gemm->LinearF32(x, rows, w.in, static_cast<const float*>(wp), n, y, stream);
    if (w.split) {
      return gemm->LinearSplit(x, rows, w.in, static_cast<const __nv_bfloat16*>(wp), n, y, xb, split_yb, stream);
    }
    TANDEM_RETURN_IF_ERROR(kc::FloatToBf16(x, rows * w.in, xb, stream));
    return gemm->Linear(xb, rows, w.in, static_cast<const __nv_bfloat16*>(wp), n, y, kc::Gemm::Output::kF32, stream);
  }

  absl::Status CheckBatch(std::span<const SequenceChunk> batch, bool draft, int64_t* total) const {
    const auto& c = config();
    *total = 0;
    if (batch.empty()) return absl::InvalidArgumentError("empty batch");
    for (size_t i = 0; i < batch.size(); ++i) {
      const auto& chunk = batch[i];
      if (!chunk.state) return absl::InvalidArgumentError(absl::StrCat("batch chunk ", i, ": no state"));
      if (chunk.tokens.empty()) return absl::InvalidArgumentError(absl::StrCat("batch chunk ", i, ": no tokens"));
      for (int32_t token : chunk.tokens) {
        if (token < 0 || token >= c.vocab_size) {
          return absl::InvalidArgumentError(absl::StrCat("batch chunk ", i, ": token id ", token,
                                                         " outside the vocabulary [0, ", c.vocab_size, ")"));
        }
      }
      const int64_t end = (draft ? chunk.state->mtp_length() : chunk.state->length()) +
                          static_cast<int64_t>(chunk.tokens.size());
      if (end > c.max_position_embeddings) {
        return absl::OutOfRangeError(absl::StrCat("batch chunk ", i, ": positions up to ", end,
                                                  " exceed max_position_embeddings ", c.max_position_embeddings));
      }
      TANDEM_RETURN_IF_ERROR(chunk.state->Reserve(end));
      *total += static_cast<int64_t>(chunk.tokens.size());
    }
    return absl::OkStatus();
  }

  // Scratch of one forward (device pointers into the arena).
  struct Scratch {
    float *x, *y, *post, *comb, *qr, *q, *kv, *o, *group, *zg, *z, *out;
    void* hc_workspace;
    size_t hc_workspace_bytes;
    uint8_t* new_entries;
    float *ckv, *cscore, *crows;
    float *iq, *iw;
    int32_t* selected;
    void* index_workspace;
    size_t index_workspace_bytes;
    float *gate_logits, *route_weights, *ea, *eb2, *routed, *sa, *sb, *shared_out;
    int32_t *chosen, *group_rows, *group_position;
    int64_t* group_offsets;
    void* group_workspace;
    size_t group_workspace_bytes;
    __nv_bfloat16* xb;
    // The grouped wo_a as one batched GEMM (bf16 weights, up to kBatchedWoaRows tokens): o in bf16 (hi and
    // lo rows for bf16x2), and the stacked [2T, G * R] products before AddRowHalves.
    __nv_bfloat16* o_bf16;
    float* z_halves;
    uint8_t* dummy;
  };
  static constexpr int64_t kBatchedWoaRows = 512;

  // Address tables of one layer (offsets into Tables).
  struct LayerTables {
    size_t window = 0, ring_src = 0, ring_dst = 0;  // RefRun tables
    int64_t window_runs = 0, ring_runs = 0, ring_count = 0;
    size_t compressed = 0, keys = 0;
    int64_t compressed_runs = 0, key_runs = 0;
    struct Kind {
      size_t emit_rows = 0, emit_index = 0, emit_kv = 0, emit_key = 0, persist_src = 0, persist_dst = 0;
      int64_t emits = 0, persists = 0;
    } attention, indexer;
  };

  // pad_bound > 0 (a graph step: the most emits the chunks can make) pads the emits, the extra ones with no
  // rows (nothing read), index 0 and the `dummy` output: C4 to the bound (its count is then a function of the
  // chunk sizes alone), C128 (whose 128 row pointers per emit would make a big table) to a bucket of 8.
  void BuildCompressorTables(const std::vector<ChunkGeometry>& chunks, int layer_id, int ratio, CompressorKind kind,
                             const float* tmp_rows, int64_t row_stride, int64_t pad_bound, uint8_t* dummy,
                             Tables& tables, LayerTables::Kind* out) {
    const int64_t ring = CompressorRing(ratio), per_emit = ratio == 4 ? 8 : ratio;
    std::vector<const float*> emit_rows;
    std::vector<int64_t> emit_index;
    std::vector<kc::KvRef> emit_kv;
    std::vector<uint8_t*> emit_key;
    std::vector<const float*> persist_src;
    std::vector<float*> persist_dst;
    for (const auto& chunk : chunks) {
      auto row_of = [&](int64_t q) -> const float* {
        // This forward's rows sit in the scratch (row_stride floats apart, as CompressorWriteRows wrote them).
        if (q >= chunk.start) return tmp_rows + (chunk.offset + q - chunk.start) * row_stride;
        return chunk.state->compressor_row(layer_id, kind, q);
      };
      for (int64_t p = chunk.start; p < chunk.end(); ++p) {
        if ((p + 1) % ratio != 0) continue;
        const int64_t index = p / ratio;
        for (int64_t r = 0; r < per_emit; ++r) {
          const int64_t q = p - per_emit + 1 + r;
          emit_rows.push_back(ratio == 4 && r < 4 && index == 0 ? nullptr : row_of(q));
        }
        emit_index.push_back(index);
        if (kind == CompressorKind::kAttention) {
          const KvSlot slot = chunk.state->compressed_kv(layer_id, index);
          emit_kv.push_back({slot.data, slot.scales});
        } else {
          emit_key.push_back(chunk.state->indexer_key(layer_id, index));
        }
      }
      for (int64_t q = std::max(chunk.start, chunk.end() - ring); q < chunk.end(); ++q) {
        persist_src.push_back(row_of(q));
        persist_dst.push_back(chunk.state->compressor_row(layer_id, kind, q));
      }
    }
    const int64_t emits = static_cast<int64_t>(emit_index.size());
    const int64_t pad_to = ratio == 4 ? pad_bound : std::min(pad_bound, BucketUp(emits, 8));
    for (int64_t e = emits; e < pad_to; ++e) {
      emit_rows.insert(emit_rows.end(), static_cast<size_t>(per_emit), nullptr);
      emit_index.push_back(0);
      if (kind == CompressorKind::kAttention) {
        emit_kv.push_back({dummy, dummy + kernels::KvFormat{config().nope_dim(), config().qk_rope_head_dim}.data_bytes()});
      } else {
        emit_key.push_back(dummy);
      }
    }
    out->emits = static_cast<int64_t>(emit_index.size());
    out->persists = static_cast<int64_t>(persist_src.size());
    out->emit_rows = tables.Add(emit_rows);
    out->emit_index = tables.Add(emit_index);
    out->emit_kv = tables.Add(emit_kv);
    out->emit_key = tables.Add(emit_key);
    out->persist_src = tables.Add(persist_src);
    out->persist_dst = tables.Add(persist_dst);
  }

  absl::Status RunCompressor(const Compressor& comp, bool indexer, const LayerTables::Kind& t, const Tables& tables,
                             const float* y, int64_t T, const int64_t* positions, const float* const* tmp_row_ptrs,
                             const Scratch& s) {
    const auto& c = config();
    kc::CompressorShape shape;
    shape.ratio = comp.ratio;
    shape.dim = comp.dim;
    shape.rope_dim = c.qk_rope_head_dim;
    shape.eps = static_cast<float>(c.rms_norm_eps);
    TANDEM_RETURN_IF_ERROR(Linear(comp.wkv, y, T, s.ckv, s.xb));
    TANDEM_RETURN_IF_ERROR(Linear(comp.wgate, y, T, s.cscore, s.xb));
    TANDEM_RETURN_IF_ERROR(kc::CompressorWriteRows(shape, s.ckv, s.cscore, comp.ape, positions,
                                                   const_cast<float* const*>(tmp_row_ptrs), T, stream));
    if (t.emits > 0) {
      TANDEM_RETURN_IF_ERROR(kc::CompressorEmit(shape, tables.at<const float* const>(t.emit_rows),
                                                tables.at<const int64_t>(t.emit_index), t.emits, comp.norm,
                                                rope_compressed, indexer ? nullptr : tables.at<const kc::KvRef>(t.emit_kv),
                                                indexer ? tables.at<uint8_t* const>(t.emit_key) : nullptr, stream));
    }
    if (t.persists > 0) {
      TANDEM_RETURN_IF_ERROR(kc::CopyFloatRows(tables.at<const float* const>(t.persist_src),
                                               tables.at<float* const>(t.persist_dst), t.persists, 2 * shape.width(),
                                               stream));
    }
    return absl::OkStatus();
  }

  // draft_hidden (host, [T, hc_mult * hidden]) set: one MTP step (Dsv4Model::ForwardMtp's contract) instead
  // of the main layers. A stage after the first takes its streams from stage_input; one before the last
  // (head_too false) leaves them in stage_output when given.
  absl::Status Forward(std::span<const SequenceChunk> batch, ForwardResult* result, ForwardTrace* trace, bool head_too,
                       std::span<const float> draft_hidden = {}, const HiddenStates* stage_input = nullptr,
                       HiddenStates* stage_output = nullptr) {
    const auto& c = config();
    const bool draft = !draft_hidden.empty();
    const bool first = weights->is_first_stage();
    if (draft && !mtp) return absl::FailedPreconditionError("this model was loaded without its MTP layer");
    // The hidden inputs' sizes first: CheckBatch reserves the states' capacity.
    int64_t T = 0;
    for (const auto& chunk : batch) T += static_cast<int64_t>(chunk.tokens.size());
    if (draft && static_cast<int64_t>(draft_hidden.size()) != T * c.hc_dim()) {
      return absl::InvalidArgumentError(absl::StrCat("MTP needs ", T, " hidden rows of ", c.hc_dim(), " floats"));
    }
    if (!draft && first && stage_input) {
      return absl::InvalidArgumentError("the first pipeline stage embeds tokens and takes no hidden input");
    }
    if (!draft && !first &&
        (!stage_input || stage_input->tokens != T || static_cast<int64_t>(stage_input->values.size()) != T * c.hc_dim())) {
      return absl::InvalidArgumentError(absl::StrCat("stage [", weights->begin_layer, ", ", weights->end_layer,
                                                     ") needs hidden states for ", T, " tokens"));
    }
    const auto started = Clock::now();
    TANDEM_RETURN_IF_ERROR(CheckBatch(batch, draft, &T));
    const std::vector<Layer>& run_layers = draft ? mtp->layer : layers;
    // A forward that failed part-way may have left work queued that reads the arena and the table staging.
    if (in_flight) {
      TANDEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
      in_flight = false;
    }
    TANDEM_RETURN_IF_ERROR(arena.Reset());
    // A step that may replay a CUDA graph: decode-sized, nothing read back or timed between its launches
    // (no trace, no profile), no prefill expert path (it reads the group offsets on the host). Its
    // creeping sizes are bucketed and its emit and run counts padded (below), so steps repeat a signature.
    const bool graph_step = options.graphs && !trace && !options.profile && T <= options.graph_max_tokens &&
                            T * c.num_experts_per_tok < options.prefill_expert_pairs;
    const int64_t M = c.hc_mult, D = c.hidden_size, MD = c.hc_dim(), H = c.num_attention_heads, hd = c.head_dim;
    const int64_t rd = c.qk_rope_head_dim, nope = c.nope_dim(), W = c.sliding_window;
    const int64_t E = c.n_routed_experts, k = c.num_experts_per_tok, I = c.moe_intermediate_size;
    const int64_t G = c.o_groups, R = c.o_lora_rank, group_in = H / G * hd;
    const int64_t nh = c.index_n_heads, id = c.index_head_dim, topk = c.index_topk;
    const kernels::KvFormat format{nope, rd};
    const int64_t entry = format.entry_bytes();
    const int64_t width_att = 2 * hd, width_idx = 2 * id;  // c * d at most (ratio 4)

    // Geometry, token ids, positions, logit rows.
    std::vector<ChunkGeometry> chunks;
    std::vector<int32_t> ids, head_rows;
    std::vector<int64_t> positions;
    int64_t max_end = 0;
    for (const auto& chunk : batch) {
      const int64_t start = draft ? chunk.state->mtp_length() : chunk.state->length();
      const int64_t count = static_cast<int64_t>(chunk.tokens.size());
      const int64_t offset = static_cast<int64_t>(ids.size());
      chunks.push_back({chunk.state, offset, count, start});
      ids.insert(ids.end(), chunk.tokens.begin(), chunk.tokens.end());
      for (int64_t i = 0; i < count; ++i) positions.push_back(start + i);
      if (chunk.all_logits) {
        for (int64_t i = 0; i < count; ++i) head_rows.push_back(static_cast<int32_t>(offset + i));
      } else {
        head_rows.push_back(static_cast<int32_t>(offset + count - 1));
      }
      max_end = std::max(max_end, start + count);
    }
    const int64_t rows_out = static_cast<int64_t>(head_rows.size());

    // Scratch.
    Scratch s{};
    kc::MhcShape mhc;
    mhc.streams = M;
    mhc.hidden = D;
    mhc.sinkhorn_iters = c.hc_sinkhorn_iters;
    mhc.hc_eps = c.hc_eps;
    mhc.rms_norm_eps = c.rms_norm_eps;
    // The indexer takes it as an upper bound of every token's visible count (grid, score row pitch and the
    // workspace); the counts themselves come from the tables, so a bucketed bound gives the same choices.
    const int64_t max_visible = graph_step ? BucketUp(max_end / 4, 64) : max_end / 4;
    TANDEM_ASSIGN_OR_RETURN(s.x, arena.Take<float>(T * MD));
    TANDEM_ASSIGN_OR_RETURN(s.y, arena.Take<float>(T * D));
    TANDEM_ASSIGN_OR_RETURN(s.post, arena.Take<float>(T * M));
    TANDEM_ASSIGN_OR_RETURN(s.comb, arena.Take<float>(T * M * M));
    s.hc_workspace_bytes = kc::HcPreWorkspaceBytes(mhc, T);
    TANDEM_ASSIGN_OR_RETURN(s.hc_workspace, arena.Take<uint8_t>(s.hc_workspace_bytes));
    TANDEM_ASSIGN_OR_RETURN(s.qr, arena.Take<float>(T * c.q_lora_rank));
    TANDEM_ASSIGN_OR_RETURN(s.q, arena.Take<float>(T * H * hd));
    TANDEM_ASSIGN_OR_RETURN(s.kv, arena.Take<float>(T * hd));
    TANDEM_ASSIGN_OR_RETURN(s.new_entries, arena.Take<uint8_t>(T * entry));
    TANDEM_ASSIGN_OR_RETURN(s.ckv, arena.Take<float>(T * std::max(width_att, width_idx)));
    TANDEM_ASSIGN_OR_RETURN(s.cscore, arena.Take<float>(T * std::max(width_att, width_idx)));
    TANDEM_ASSIGN_OR_RETURN(s.crows, arena.Take<float>(T * 2 * std::max(width_att, width_idx)));
    TANDEM_ASSIGN_OR_RETURN(s.iq, arena.Take<float>(T * nh * id));
    TANDEM_ASSIGN_OR_RETURN(s.iw, arena.Take<float>(T * nh));
    TANDEM_ASSIGN_OR_RETURN(s.selected, arena.Take<int32_t>(T * std::max<int64_t>(topk, 1)));
    s.index_workspace_bytes = kc::IndexerWorkspaceBytes(T, std::max<int64_t>(max_visible, 1));
    TANDEM_ASSIGN_OR_RETURN(s.index_workspace, arena.Take<uint8_t>(s.index_workspace_bytes));
    TANDEM_ASSIGN_OR_RETURN(s.o, arena.Take<float>(T * H * hd));
    TANDEM_ASSIGN_OR_RETURN(s.group, arena.Take<float>(T * group_in));
    TANDEM_ASSIGN_OR_RETURN(s.zg, arena.Take<float>(T * R));
    TANDEM_ASSIGN_OR_RETURN(s.z, arena.Take<float>(T * G * R));
    s.o_bf16 = nullptr;
    s.z_halves = nullptr;
    if (!layers.empty() && !layers[0].wo_a.f32 && T <= kBatchedWoaRows) {
      TANDEM_ASSIGN_OR_RETURN(s.o_bf16, arena.Take<__nv_bfloat16>(2 * T * H * hd));
      TANDEM_ASSIGN_OR_RETURN(s.z_halves, arena.Take<float>(2 * T * G * R));
    }
    TANDEM_ASSIGN_OR_RETURN(s.out, arena.Take<float>(T * D));
    TANDEM_ASSIGN_OR_RETURN(s.gate_logits, arena.Take<float>(T * E));
    TANDEM_ASSIGN_OR_RETURN(s.route_weights, arena.Take<float>(T * k));
    TANDEM_ASSIGN_OR_RETURN(s.chosen, arena.Take<int32_t>(T * k));
    TANDEM_ASSIGN_OR_RETURN(s.group_rows, arena.Take<int32_t>(T * k));
    TANDEM_ASSIGN_OR_RETURN(s.group_position, arena.Take<int32_t>(T * k));
    TANDEM_ASSIGN_OR_RETURN(s.group_offsets, arena.Take<int64_t>(E + 1));
    s.group_workspace_bytes = kc::MoeGroupWorkspaceBytes(T, k, E);
    TANDEM_ASSIGN_OR_RETURN(s.group_workspace, arena.Take<uint8_t>(s.group_workspace_bytes));
    TANDEM_ASSIGN_OR_RETURN(s.ea, arena.Take<float>(T * k * I));
    TANDEM_ASSIGN_OR_RETURN(s.routed, arena.Take<float>(T * k * std::max(D, I)));
    s.eb2 = nullptr;
    if (T * k >= options.prefill_expert_pairs) {
      TANDEM_ASSIGN_OR_RETURN(s.eb2, arena.Take<float>(T * k * 2 * I));
    }
    TANDEM_ASSIGN_OR_RETURN(s.sa, arena.Take<float>(T * 2 * I));  // the shared expert's stacked gate | up
    TANDEM_ASSIGN_OR_RETURN(s.sb, arena.Take<float>(T * I));       // its SwiGLU
    TANDEM_ASSIGN_OR_RETURN(s.shared_out, arena.Take<float>(T * D));
    const int64_t dense_rows = std::max<int64_t>(draft ? T * M : T, rows_out);
    const int64_t dense_in = std::max<int64_t>(max_dense_in, 1);
    split_yb = nullptr;
    if (options.dense == DenseFormat::kBf16x2) {
      TANDEM_ASSIGN_OR_RETURN(s.xb, arena.Take<__nv_bfloat16>(kc::Gemm::SplitScratchElements(dense_rows, dense_in)));
      const int64_t stacked_rows = std::min<int64_t>(dense_rows, kc::Gemm::kSplitStackRows);
      TANDEM_ASSIGN_OR_RETURN(split_yb, arena.Take<float>(2 * stacked_rows * std::max<int64_t>(max_dense_out, 1)));
    } else {
      TANDEM_ASSIGN_OR_RETURN(s.xb, arena.Take<__nv_bfloat16>(dense_rows * dense_in));
    }
    float *head_x = nullptr, *head_h = nullptr, *logits = nullptr;
    if (head_too) {  // ForwardLayers needs no head scratch (rows x vocab floats)
      TANDEM_ASSIGN_OR_RETURN(head_x, arena.Take<float>(rows_out * MD));
      TANDEM_ASSIGN_OR_RETURN(head_h, arena.Take<float>(rows_out * D));
      TANDEM_ASSIGN_OR_RETURN(logits, arena.Take<float>(rows_out * c.vocab_size));
    }
    // The padded compressor emits' output (an attention entry or an indexer key, never read).
    TANDEM_ASSIGN_OR_RETURN(s.dummy, arena.Take<uint8_t>(static_cast<size_t>(std::max(entry, kernels::IndexerKeyBytes(id)))));
    float* draft_rows = nullptr;  // the MTP step's hidden input [T * M, D]
    if (draft) {
      TANDEM_ASSIGN_OR_RETURN(draft_rows, arena.Take<float>(T * MD));
    }

    // Tables shared by every layer.
    Tables tables;
    const size_t t_ids = tables.Add(ids), t_positions = tables.Add(positions), t_head_rows = tables.Add(head_rows);
    std::vector<int64_t> window_begin(T), c4_begin(T), c128_begin(T);
    std::vector<int32_t> window_count(T), c4_count(T), c128_count(T);
    std::vector<const float*> rows_att(T), rows_idx(T);
    {
      int64_t window_base = 0, c4_base = 0, c128_base = 0;
      for (const auto& chunk : chunks) {
        const int64_t first = std::max<int64_t>(0, chunk.start - W + 1);
        for (int64_t i = 0; i < chunk.count; ++i) {
          const int64_t t = chunk.offset + i, p = chunk.start + i;
          const int64_t lo = std::max(first, p - W + 1);
          window_begin[t] = window_base + (lo - first);
          window_count[t] = static_cast<int32_t>(p - lo + 1);
          c4_begin[t] = c4_base;
          c4_count[t] = static_cast<int32_t>((p + 1) / 4);
          c128_begin[t] = c128_base;
          c128_count[t] = static_cast<int32_t>((p + 1) / 128);
          rows_att[t] = s.crows + t * 2 * width_att;
          rows_idx[t] = s.crows + t * 2 * width_idx;
        }
        window_base += chunk.end() - first;
        c4_base += chunk.end() / 4;
        c128_base += chunk.end() / 128;
      }
    }
    const size_t t_window_begin = tables.Add(window_begin), t_window_count = tables.Add(window_count);
    const size_t t_c4_begin = tables.Add(c4_begin), t_c4_count = tables.Add(c4_count);
    const size_t t_c128_begin = tables.Add(c128_begin), t_c128_count = tables.Add(c128_count);
    const size_t t_rows_att = tables.Add(rows_att), t_rows_idx = tables.Add(rows_idx);

    // Tables of each layer.
    std::vector<LayerTables> layer_tables(run_layers.size());
    int64_t max_window = 0, max_ring = 0, max_compressed = 0;
    for (size_t li = 0; li < run_layers.size(); ++li) {
      const Layer& layer = run_layers[li];
      const int lid = layer.spec.layer_id, ratio = layer.spec.compress_ratio;
      LayerTables& lt = layer_tables[li];
      // Runs, expanded into address tables on the device right before the layer runs.
      std::vector<kc::RefRun> window, ring_src, ring_dst, compressed, keys;
      std::vector<EntryRun> runs;
      int64_t window_at = 0, ring_at = 0, compressed_at = 0;
      const int64_t entry_data = format.data_bytes();
      for (const auto& chunk : chunks) {
        const EntryRun ring = chunk.state->WindowRing(lid, W);
        const int64_t first = std::max<int64_t>(0, chunk.start - W + 1);
        uint8_t* fresh = s.new_entries + chunk.offset * entry;
        if (chunk.start > first) {
          window.push_back({window_at, chunk.start - first, ring.first + first, W, ring.data, ring.data_stride,
                            ring.scales, ring.scale_stride});
        }
        window.push_back({window_at + chunk.start - first, chunk.count, 0, 0, fresh, entry, fresh + entry_data, entry});
        window_at += chunk.end() - first;
        const int64_t kept = std::max<int64_t>(0, chunk.count - W);
        ring_src.push_back({ring_at, chunk.count - kept, 0, 0, fresh + kept * entry, entry, fresh + kept * entry + entry_data,
                            entry});
        ring_dst.push_back({ring_at, chunk.count - kept, ring.first + chunk.start + kept, W, ring.data, ring.data_stride,
                            ring.scales, ring.scale_stride});
        ring_at += chunk.count - kept;
        if (ratio > 0) {
          const int64_t n = chunk.end() / ratio;
          runs.clear();
          chunk.state->CompressedKvRuns(lid, n, &runs);
          for (const auto& r : runs) {
            compressed.push_back({compressed_at + r.first, r.count, 0, 0, r.data, r.data_stride, r.scales, r.scale_stride});
          }
          if (ratio == 4) {
            runs.clear();
            chunk.state->IndexerKeyRuns(lid, n, &runs);
            for (const auto& r : runs) keys.push_back({compressed_at + r.first, r.count, 0, 0, r.data, r.data_stride, nullptr, 0});
          }
          compressed_at += n;
        }
      }
      if (graph_step) {
        // Zero-count runs (no-op blocks) up to a bucket: a paged state's run count grows a page at a time.
        for (auto* list : {&window, &compressed, &keys}) {
          list->resize(static_cast<size_t>(BucketUp(static_cast<int64_t>(list->size()), 8)), kc::RefRun{});
        }
      }
      lt.window = tables.Add(window);
      lt.window_runs = static_cast<int64_t>(window.size());
      lt.ring_src = tables.Add(ring_src);
      lt.ring_dst = tables.Add(ring_dst);
      lt.ring_runs = static_cast<int64_t>(ring_src.size());
      lt.ring_count = ring_at;
      lt.compressed = tables.Add(compressed);
      lt.compressed_runs = static_cast<int64_t>(compressed.size());
      lt.keys = tables.Add(keys);
      lt.key_runs = static_cast<int64_t>(keys.size());
      max_window = std::max(max_window, window_at);
      max_ring = std::max(max_ring, ring_at);
      max_compressed = std::max(max_compressed, compressed_at);
      // The most emits the chunks can make (one per ratio tokens, rounded up), for a graph step's padding.
      auto emit_bound = [&](int r) -> int64_t {
        if (!graph_step) return 0;
        int64_t bound = 0;
        for (const auto& chunk : chunks) bound += (chunk.count + r - 1) / r;
        return bound;
      };
      if (ratio > 0) {
        BuildCompressorTables(chunks, lid, ratio, CompressorKind::kAttention, s.crows, 2 * width_att, emit_bound(ratio),
                              s.dummy, tables, &lt.attention);
      }
      if (ratio == 4) {
        BuildCompressorTables(chunks, lid, ratio, CompressorKind::kIndexer, s.crows, 2 * width_idx, emit_bound(ratio),
                              s.dummy, tables, &lt.indexer);
      }
    }
    if (graph_step) {  // arena sizes that creep with the context: bucketed, so later Takes keep their addresses
      max_window = BucketUp(max_window, 64);
      max_ring = BucketUp(max_ring, 64);
      max_compressed = BucketUp(max_compressed, 64);
    }
    // Uploads (outside any graph): the tables to their fixed home, the hidden inputs to the arena.
    in_flight = true;
    TANDEM_RETURN_IF_ERROR(tables.Place(table_buffer, stream));
    TANDEM_RETURN_IF_ERROR(tables.Upload(stream));
    if (!draft && !first) {
      TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(s.x, stage_input->values.data(), stage_input->values.size() * sizeof(float),
                                                  cudaMemcpyHostToDevice, stream));
    } else if (draft) {
      TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(draft_rows, draft_hidden.data(), draft_hidden.size() * sizeof(float),
                                                  cudaMemcpyHostToDevice, stream));
    }
    if (options.profile) {
      profile_ms["host: address tables"] += std::chrono::duration<double, std::milli>(Clock::now() - started).count();
    }
    TANDEM_RETURN_IF_ERROR(Mark(nullptr));
    // The expanded tables of the layer being run (reused layer after layer, in stream order).
    kc::KvRef *d_window = nullptr, *d_ring_src = nullptr, *d_ring_dst = nullptr, *d_compressed = nullptr;
    uint8_t** d_keys = nullptr;
    TANDEM_ASSIGN_OR_RETURN(d_window, arena.Take<kc::KvRef>(static_cast<size_t>(max_window)));
    TANDEM_ASSIGN_OR_RETURN(d_ring_src, arena.Take<kc::KvRef>(static_cast<size_t>(max_ring)));
    TANDEM_ASSIGN_OR_RETURN(d_ring_dst, arena.Take<kc::KvRef>(static_cast<size_t>(max_ring)));
    TANDEM_ASSIGN_OR_RETURN(d_compressed, arena.Take<kc::KvRef>(static_cast<size_t>(max_compressed)));
    TANDEM_ASSIGN_OR_RETURN(d_keys, arena.Take<uint8_t*>(static_cast<size_t>(max_compressed)));
    const int64_t* d_positions = tables.at<const int64_t>(t_positions);
    const int32_t* d_ids = tables.at<const int32_t>(t_ids);
    // Split-KV scratch when the batch leaves SMs idle (small decode batches): the most any layer's split
    // needs (it depends on the token count and the layer's kind only), taken before any launch.
    const kc::AttentionMath attention_math = options.attention_bf16 ? kc::AttentionMath::kBf16 : kc::AttentionMath::kF32;
    size_t attention_workspace_bytes = 0;
    for (const Layer& L : run_layers) {
      kc::SparseAttentionArgs probe;
      probe.format = format;
      probe.math = attention_math;
      probe.tokens = T;
      probe.heads = H;
      if (L.spec.compress_ratio > 0) probe.compressed = d_compressed;
      if (L.spec.compress_ratio == 4) {
        probe.selected = s.selected;
        probe.topk = topk;
      }
      attention_workspace_bytes = std::max(attention_workspace_bytes, kc::SparseAttentionWorkspaceBytes(probe));
    }
    uint8_t* attention_workspace = nullptr;
    if (attention_workspace_bytes > 0) {
      TANDEM_ASSIGN_OR_RETURN(attention_workspace, arena.Take<uint8_t>(attention_workspace_bytes));
    }

    // The device work of the step: launches only (a graph step neither synchronizes nor copies to the host
    // in here), queued eagerly or captured into / replayed from a CUDA graph.
    const float eps = static_cast<float>(c.rms_norm_eps);
    auto enqueue = [&]() -> absl::Status {
      if (!draft && first) {
        TANDEM_RETURN_IF_ERROR(kc::EmbedTokens(embed, c.vocab_size, D, d_ids, T, M, s.x, stream));
      } else if (draft) {
        // x[t, m] = h_proj(hnorm(hidden[t, m])) + e_proj(enorm(embed(token t))).
        float* h = draft_rows;
        TANDEM_RETURN_IF_ERROR(kc::EmbedTokens(embed, c.vocab_size, D, d_ids, T, 1, s.y, stream));
        TANDEM_RETURN_IF_ERROR(kc::RmsNorm(s.y, T, D, mtp->enorm, eps, s.y, stream));
        TANDEM_RETURN_IF_ERROR(Linear(mtp->e_proj, s.y, T, s.out, s.xb));
        TANDEM_RETURN_IF_ERROR(kc::RmsNorm(h, T * M, D, mtp->hnorm, eps, h, stream));
        TANDEM_RETURN_IF_ERROR(Linear(mtp->h_proj, h, T * M, s.x, s.xb));
        TANDEM_RETURN_IF_ERROR(kc::AddToStreams(s.out, T, M, D, s.x, stream));
      }
      TANDEM_RETURN_IF_ERROR(Mark("embed"));

      for (size_t li = 0; li < run_layers.size(); ++li) {
        const Layer& L = run_layers[li];
        const LayerTables& lt = layer_tables[li];
        const int ratio = L.spec.compress_ratio;
        const double* inv_freq = ratio > 0 ? rope_compressed : rope_plain;
        const std::string prefix =
            !trace ? std::string() : draft ? std::string("mtp.0.") : absl::StrCat("layers.", L.spec.layer_id, ".");

        // ---- Attention ----
        TANDEM_RETURN_IF_ERROR(kc::ExpandKvRefs(tables.at<const kc::RefRun>(lt.window), lt.window_runs, d_window, stream));
        TANDEM_RETURN_IF_ERROR(kc::ExpandKvRefs(tables.at<const kc::RefRun>(lt.ring_src), lt.ring_runs, d_ring_src, stream));
        TANDEM_RETURN_IF_ERROR(kc::ExpandKvRefs(tables.at<const kc::RefRun>(lt.ring_dst), lt.ring_runs, d_ring_dst, stream));
        TANDEM_RETURN_IF_ERROR(
            kc::ExpandKvRefs(tables.at<const kc::RefRun>(lt.compressed), lt.compressed_runs, d_compressed, stream));
        TANDEM_RETURN_IF_ERROR(kc::ExpandPointers(tables.at<const kc::RefRun>(lt.keys), lt.key_runs, d_keys, stream));
        TANDEM_RETURN_IF_ERROR(Mark("address tables (expand runs)"));
        TANDEM_RETURN_IF_ERROR(kc::HcPre(mhc, L.hc_attn, s.x, T, s.y, s.post, s.comb, s.hc_workspace,
                                         s.hc_workspace_bytes, stream));
        TANDEM_RETURN_IF_ERROR(kc::RmsNorm(s.y, T, D, L.attn_norm, eps, s.y, stream));
        TANDEM_RETURN_IF_ERROR(Mark("mhc pre + norm"));
        TANDEM_RETURN_IF_ERROR(Linear(L.wq_a, s.y, T, s.qr, s.xb));
        TANDEM_RETURN_IF_ERROR(kc::RmsNorm(s.qr, T, c.q_lora_rank, L.q_norm, eps, s.qr, stream));
        TANDEM_RETURN_IF_ERROR(Linear(L.wq_b, s.qr, T, s.q, s.xb));
        TANDEM_RETURN_IF_ERROR(kc::RmsNorm(s.q, T * H, hd, nullptr, eps, s.q, stream));
        TANDEM_RETURN_IF_ERROR(kc::ApplyRope(s.q, T, H * hd, H, hd, nope, rd, d_positions, inv_freq, false, stream));
        TANDEM_RETURN_IF_ERROR(Linear(L.wkv, s.y, T, s.kv, s.xb));
        TANDEM_RETURN_IF_ERROR(kc::RmsNorm(s.kv, T, hd, L.kv_norm, eps, s.kv, stream));
        TANDEM_RETURN_IF_ERROR(kc::ApplyRope(s.kv, T, hd, 1, hd, nope, rd, d_positions, inv_freq, false, stream));
        TANDEM_RETURN_IF_ERROR(kc::QuantizeKvEntries(format, s.kv, T, s.new_entries, stream));
        TANDEM_RETURN_IF_ERROR(Mark("attn: q and kv projections"));

        if (L.compressor) {
          TANDEM_RETURN_IF_ERROR(RunCompressor(*L.compressor, false, lt.attention, tables, s.y, T, d_positions,
                                               tables.at<const float* const>(t_rows_att), s));
        }
        TANDEM_RETURN_IF_ERROR(Mark("attn: compressor"));
        if (ratio == 4) {
          TANDEM_RETURN_IF_ERROR(RunCompressor(*L.index_compressor, true, lt.indexer, tables, s.y, T, d_positions,
                                               tables.at<const float* const>(t_rows_idx), s));
          TANDEM_RETURN_IF_ERROR(Linear(L.index_wq_b, s.qr, T, s.iq, s.xb));
          TANDEM_RETURN_IF_ERROR(kc::ApplyRope(s.iq, T, nh * id, nh, id, id - rd, rd, d_positions, inv_freq, false, stream));
          TANDEM_RETURN_IF_ERROR(kc::Hadamard(s.iq, T * nh, id, stream));
          TANDEM_RETURN_IF_ERROR(Linear(L.index_weights, s.y, T, s.iw, s.xb));
          TANDEM_RETURN_IF_ERROR(kc::Scale(s.iw, T * nh,
                                           static_cast<float>(1.0 / std::sqrt(static_cast<double>(id * nh))), stream));
          kc::IndexerArgs ix;
          ix.tokens = T;
          ix.heads = nh;
          ix.dim = id;
          ix.topk = topk;
          ix.q = s.iq;
          ix.weights = s.iw;
          ix.keys = d_keys;
          ix.key_begin = tables.at<const int64_t>(t_c4_begin);
          ix.visible = tables.at<const int32_t>(t_c4_count);
          ix.max_visible = static_cast<int32_t>(max_visible);
          ix.selected = s.selected;
          TANDEM_RETURN_IF_ERROR(kc::IndexerTopK(ix, s.index_workspace, s.index_workspace_bytes, stream));
          if (trace) {
            std::vector<int32_t> host(static_cast<size_t>(T * topk));
            TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host.data(), s.selected, host.size() * sizeof(int32_t),
                                                        cudaMemcpyDeviceToHost, stream));
            TANDEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
            trace->Append(prefix + "attn.indexer.topk", topk, host);
          }
        }

        TANDEM_RETURN_IF_ERROR(Mark("attn: indexer (compressor, q, scores, top-k)"));
        kc::SparseAttentionArgs at;
        at.format = format;
        at.tokens = T;
        at.heads = H;
        at.q = s.q;
        at.sink = L.sink;
        at.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
        at.math = attention_math;
        at.window = d_window;
        at.window_begin = tables.at<const int64_t>(t_window_begin);
        at.window_count = tables.at<const int32_t>(t_window_count);
        if (ratio > 0) {
          at.compressed = d_compressed;
          at.compressed_begin = tables.at<const int64_t>(ratio == 4 ? t_c4_begin : t_c128_begin);
          at.compressed_count = tables.at<const int32_t>(ratio == 4 ? t_c4_count : t_c128_count);
          if (ratio == 4) {
            at.selected = s.selected;
            at.topk = topk;
          }
        }
        at.o = s.o;
        at.workspace = attention_workspace;
        at.workspace_bytes = attention_workspace_bytes;
        TANDEM_RETURN_IF_ERROR(kc::SparseAttention(at, stream));
        TANDEM_RETURN_IF_ERROR(Mark("attn: sparse attention"));
        if (lt.ring_count > 0) {
          TANDEM_RETURN_IF_ERROR(kc::CopyKvEntries(format, d_ring_src, d_ring_dst, lt.ring_count, stream));
        }
        TANDEM_RETURN_IF_ERROR(kc::ApplyRope(s.o, T, H * hd, H, hd, nope, rd, d_positions, inv_freq, true, stream));
        // Grouped low-rank output: group g's heads through wo_a rows [g*R, (g+1)*R), then wo_b. Decode-sized
        // batches: one batched GEMM over the column blocks of o (hi and lo stacked as rows for bf16x2); else,
        // and in f32, group by group.
        const size_t wo_a_elem = L.wo_a.f32 ? sizeof(float) : sizeof(__nv_bfloat16);
        if (s.o_bf16 && !L.wo_a.f32) {
          const auto* wo_a = static_cast<const __nv_bfloat16*>(L.wo_a.w);
          if (L.wo_a.split) {
            TANDEM_RETURN_IF_ERROR(kc::FloatToBf16Split(s.o, T * H * hd, s.o_bf16, s.o_bf16 + T * H * hd, stream));
            TANDEM_RETURN_IF_ERROR(gemm->LinearBatched(s.o_bf16, 2 * T, group_in, H * hd, group_in, wo_a, R, R * group_in,
                                                       s.z_halves, G * R, R, G, stream));
            TANDEM_RETURN_IF_ERROR(kc::AddRowHalves(s.z_halves, T, G * R, s.z, stream));
          } else {
            TANDEM_RETURN_IF_ERROR(kc::FloatToBf16(s.o, T * H * hd, s.o_bf16, stream));
            TANDEM_RETURN_IF_ERROR(
                gemm->LinearBatched(s.o_bf16, T, group_in, H * hd, group_in, wo_a, R, R * group_in, s.z, G * R, R, G, stream));
          }
        }
        for (int64_t g = 0; g < G && !(s.o_bf16 && !L.wo_a.f32); ++g) {
          TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(s.group, group_in * sizeof(float), s.o + g * group_in,
                                                        H * hd * sizeof(float), group_in * sizeof(float), T,
                                                        cudaMemcpyDeviceToDevice, stream));
          const void* wg = static_cast<const uint8_t*>(L.wo_a.w) + g * R * group_in * wo_a_elem;
          TANDEM_RETURN_IF_ERROR(Linear(L.wo_a, s.group, T, s.zg, s.xb, wg, R));
          TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(s.z + g * R, G * R * sizeof(float), s.zg, R * sizeof(float),
                                                        R * sizeof(float), T, cudaMemcpyDeviceToDevice, stream));
        }
        TANDEM_RETURN_IF_ERROR(Linear(L.wo_b, s.z, T, s.out, s.xb));
        TANDEM_RETURN_IF_ERROR(Mark("attn: window store + output projection"));
        TANDEM_RETURN_IF_ERROR(kc::HcPost(mhc, s.out, s.post, s.comb, T, s.x, stream));
        TANDEM_RETURN_IF_ERROR(Mark("mhc post"));

        // ---- MoE ----
        TANDEM_RETURN_IF_ERROR(kc::HcPre(mhc, L.hc_ffn, s.x, T, s.y, s.post, s.comb, s.hc_workspace,
                                         s.hc_workspace_bytes, stream));
        TANDEM_RETURN_IF_ERROR(kc::RmsNorm(s.y, T, D, L.ffn_norm, eps, s.y, stream));
        TANDEM_RETURN_IF_ERROR(Mark("mhc pre + norm"));
        TANDEM_RETURN_IF_ERROR(Linear(L.gate, s.y, T, s.gate_logits, s.xb));
        kc::MoeRouteArgs route;
        route.tokens = T;
        route.experts = E;
        route.k = k;
        route.logits = s.gate_logits;
        route.bias = L.bias;
        route.tid2eid = L.tid2eid;
        route.token_ids = d_ids;
        route.routed_scaling = static_cast<float>(c.routed_scaling_factor);
        route.chosen = s.chosen;
        route.weights = s.route_weights;
        TANDEM_RETURN_IF_ERROR(kc::MoeRoute(route, stream));
        if (trace) {
          std::vector<int32_t> host(static_cast<size_t>(T * k));
          TANDEM_CUDA_RETURN_IF_ERROR(
              cudaMemcpyAsync(host.data(), s.chosen, host.size() * sizeof(int32_t), cudaMemcpyDeviceToHost, stream));
          TANDEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
          trace->Append(prefix + "ffn.experts", k, host);
        }
        TANDEM_RETURN_IF_ERROR(kc::MoeGroup(s.chosen, T, k, E, s.group_offsets, s.group_rows, s.group_position,
                                            s.group_workspace, s.group_workspace_bytes, stream));
        TANDEM_RETURN_IF_ERROR(Mark("moe: gate, routing, grouping"));
        const float limit = static_cast<float>(c.swiglu_limit);
        if (T * k >= options.prefill_expert_pairs) {
          // Many rows per expert: grouped GEMMs (the fused MXFP4 kernel on Hopper, else cuBLASLt per expert).
          std::vector<int64_t> offsets(static_cast<size_t>(E + 1));
          TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(offsets.data(), s.group_offsets, offsets.size() * sizeof(int64_t),
                                                      cudaMemcpyDeviceToHost, stream));
          TANDEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
          // x grouped [T*k, D] (gathered from y on the way in), then h = SwiGLU of the stacked w1/w3 output [T*k, 2I]
          // (computed on the way into the w2 GEMM): neither is written in f32 when the fused kernel serves.
          const kc::HostExpertWeights stacked[2] = {
              kc::HostExpertWeights::Of(L.routed.w1, L.routed.codes1.data(), L.routed.scales1.data()),
              kc::HostExpertWeights::Of(L.routed.w3, L.routed.codes3.data(), L.routed.scales3.data())};
          TANDEM_RETURN_IF_ERROR(expert_gemm->Run(stacked, kc::ExpertInput::Gathered(s.y, s.group_rows), offsets,
                                                  s.eb2, stream));
          const kc::HostExpertWeights down[1] = {
              kc::HostExpertWeights::Of(L.routed.w2, L.routed.codes2.data(), L.routed.scales2.data())};
          TANDEM_RETURN_IF_ERROR(
              expert_gemm->Run(down, kc::ExpertInput::SwiGlu(s.eb2, limit), offsets, s.routed, stream));
        } else {
          TANDEM_RETURN_IF_ERROR(kc::GroupedSwiGluLinear(L.routed.w1, L.routed.w3, s.y, s.group_rows, s.group_offsets, T * k,
                                                         limit, s.ea, stream));
          TANDEM_RETURN_IF_ERROR(kc::GroupedQuantizedLinear(L.routed.w2, s.ea, nullptr, s.group_offsets, T * k, s.routed, stream));
        }
        TANDEM_RETURN_IF_ERROR(Mark("moe: routed experts"));
        TANDEM_RETURN_IF_ERROR(Linear(L.shared_w13, s.y, T, s.sa, s.xb));  // sa [T, 2I] = [x.w1^T | x.w3^T]
        TANDEM_RETURN_IF_ERROR(kc::SwiGluStacked(s.sa, T, I, limit, s.sb, stream));
        TANDEM_RETURN_IF_ERROR(Linear(L.shared_w2, s.sb, T, s.shared_out, s.xb));
        TANDEM_RETURN_IF_ERROR(Mark("moe: shared expert"));
        TANDEM_RETURN_IF_ERROR(kc::MoeCombine(s.shared_out, s.routed, s.group_position, s.route_weights, T, k, D, s.out, stream));
        TANDEM_RETURN_IF_ERROR(kc::HcPost(mhc, s.out, s.post, s.comb, T, s.x, stream));
        TANDEM_RETURN_IF_ERROR(Mark("moe: combine + mhc post"));
      }

      if (head_too) {
        TANDEM_RETURN_IF_ERROR(kc::GatherRows(s.x, tables.at<const int32_t>(t_head_rows), rows_out, MD, head_x, stream));
        TANDEM_RETURN_IF_ERROR(kc::HcHead(draft ? mtp->hc_fn : hc_head_fn, draft ? mtp->hc_base : hc_head_base,
                                          draft ? mtp->hc_scale : hc_head_scale, M, D, c.hc_eps, c.rms_norm_eps, head_x,
                                          rows_out, head_h, stream));
        TANDEM_RETURN_IF_ERROR(kc::RmsNorm(head_h, rows_out, D, draft ? mtp->norm : norm, eps, head_h, stream));
        TANDEM_RETURN_IF_ERROR(Linear(head, head_h, rows_out, logits, s.xb));
        TANDEM_RETURN_IF_ERROR(Mark("head"));
      }
      return absl::OkStatus();
    };

    if (graph_step) {
      // Every host value a launch of `enqueue` reads, other than the model's own constants: counts, the
      // bucketed sizes, the table layout (which fixes every table address) and the arena's Take sizes
      // (which fix every scratch address, given the arena's generation, checked through the epoch).
      graph_signature.clear();
      auto& sig = graph_signature;
      sig.insert(sig.end(), {int64_t{head_too}, int64_t{draft}, int64_t{first}, T, rows_out,
                             static_cast<int64_t>(chunks.size()), int64_t{attention_math == kc::AttentionMath::kBf16},
                             int64_t{kc::GroupedLinearTensorCores()}, kc::WideAttentionMinTokens(),
                             int64_t{kc::WgmmaAttention()}});
      for (const auto& chunk : chunks) sig.push_back(chunk.count);
      for (const LayerTables& lt : layer_tables) {
        sig.insert(sig.end(), {lt.window_runs, lt.ring_runs, lt.ring_count, lt.compressed_runs, lt.key_runs,
                               lt.attention.emits, lt.attention.persists, lt.indexer.emits, lt.indexer.persists});
      }
      sig.insert(sig.end(), {max_visible, max_window, max_ring, max_compressed,
                             static_cast<int64_t>(attention_workspace_bytes), static_cast<int64_t>(s.index_workspace_bytes)});
      sig.push_back(static_cast<int64_t>(tables.layout().size()));
      sig.insert(sig.end(), tables.layout().begin(), tables.layout().end());
      graphs.SetEpoch(arena.generation() + table_buffer.generation());  // either reallocating drops every graph
      TANDEM_RETURN_IF_ERROR(graphs.Run(sig, stream, enqueue));
    } else {
      graphs.CountEager();
      TANDEM_RETURN_IF_ERROR(enqueue());
    }

    // Read-back (outside any graph).
    if (!head_too) {
      last = {0, nullptr, s.x, T};
      if (stage_output) {
        stage_output->tokens = T;
        stage_output->values.resize(static_cast<size_t>(T * MD));
        TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(stage_output->values.data(), s.x, stage_output->values.size() * sizeof(float),
                                                    cudaMemcpyDeviceToHost, stream));
      }
    } else {
      last = {rows_out, logits, s.x, T};
      if (result) {
        result->rows = rows_out;
        result->logits.resize(static_cast<size_t>(rows_out * c.vocab_size));
        result->pre_head_hidden.resize(static_cast<size_t>(T * MD));
        TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(result->logits.data(), logits, result->logits.size() * sizeof(float),
                                                    cudaMemcpyDeviceToHost, stream));
        TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(result->pre_head_hidden.data(), s.x,
                                                    result->pre_head_hidden.size() * sizeof(float),
                                                    cudaMemcpyDeviceToHost, stream));
      }
    }
    TANDEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    in_flight = false;
    TANDEM_RETURN_IF_ERROR(CollectProfile());
    Advance(batch, draft);
    return absl::OkStatus();
  }
  static void Advance(std::span<const SequenceChunk> batch, bool draft) {
    for (const auto& chunk : batch) {
      const int64_t n = static_cast<int64_t>(chunk.tokens.size());
      if (draft) {
        chunk.state->set_mtp_length(chunk.state->mtp_length() + n);
      } else {
        chunk.state->set_length(chunk.state->length() + n);
      }
    }
  }

  // ---- Optional per-op timing: an event after each group of launches, summed per label ----
  absl::Status Mark(const char* label) {
    if (!options.profile) return absl::OkStatus();
    if (marks.size() == events.size()) {
      cudaEvent_t event = nullptr;
      TANDEM_CUDA_RETURN_IF_ERROR(cudaEventCreate(&event));
      events.push_back(event);
    }
    TANDEM_CUDA_RETURN_IF_ERROR(cudaEventRecord(events[marks.size()], stream));
    marks.push_back(label);
    return absl::OkStatus();
  }
  absl::Status CollectProfile() {
    for (size_t i = 1; i < marks.size(); ++i) {
      float ms = 0;
      TANDEM_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, events[i - 1], events[i]));
      profile_ms[marks[i]] += ms;
    }
    marks.clear();
    return absl::OkStatus();
  }
  std::vector<cudaEvent_t> events;
  std::vector<const char*> marks;
  std::map<std::string, double> profile_ms;
};

DeviceModel::DeviceModel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
DeviceModel::~DeviceModel() = default;

absl::StatusOr<std::unique_ptr<DeviceModel>> DeviceModel::Create(std::shared_ptr<const ModelWeights> weights,
                                                                 const DeviceModelOptions& options) {
  if (!weights) return absl::InvalidArgumentError("DeviceModel: no weights");
  TANDEM_RETURN_IF_ERROR(kc::DeviceAvailable());
  auto impl = std::make_unique<Impl>();
  impl->weights = std::move(weights);
  impl->options = options;
  GraphCache::Options graph_options;
  graph_options.max_graphs = std::max(options.max_graphs, 1);
  graph_options.max_signatures = 4 * graph_options.max_graphs;
  impl->graphs.Configure(graph_options);
  TANDEM_RETURN_IF_ERROR(impl->Upload());
  return std::unique_ptr<DeviceModel>(new DeviceModel(std::move(impl)));
}

const ModelConfig& DeviceModel::config() const { return impl_->config(); }
cudaStream_t DeviceModel::stream() const { return impl_->stream; }
size_t DeviceModel::weight_bytes() const { return impl_->heap.bytes(); }
const DeviceForward& DeviceModel::last() const { return impl_->last; }

absl::Status DeviceModel::Forward(std::span<const SequenceChunk> batch, ForwardResult* result, ForwardTrace* trace) {
  const auto& w = *impl_->weights;
  if (!w.is_first_stage() || !w.is_last_stage()) {
    return absl::InvalidArgumentError(absl::StrCat("this model is the pipeline stage [", w.begin_layer, ", ", w.end_layer,
                                                   "): call ForwardStage"));
  }
  return impl_->Forward(batch, result, trace, /*head_too=*/true);
}

absl::Status DeviceModel::ForwardStage(std::span<const SequenceChunk> batch, const HiddenStates* input,
                                       HiddenStates* output, ForwardResult* result, ForwardTrace* trace) {
  const bool last = impl_->weights->is_last_stage();
  if (last && !result) return absl::InvalidArgumentError("the last pipeline stage needs a result");
  if (!last && !output) return absl::InvalidArgumentError("a non-final pipeline stage needs an output");
  return impl_->Forward(batch, result, trace, /*head_too=*/last, {}, input, output);
}

absl::Status DeviceModel::ForwardMtp(std::span<const SequenceChunk> batch, std::span<const float> hidden,
                                     ForwardResult* result, ForwardTrace* trace) {
  if (hidden.empty()) return absl::InvalidArgumentError("MTP needs the target's hidden rows");
  return impl_->Forward(batch, result, trace, /*head_too=*/true, hidden);
}

absl::Status DeviceModel::ForwardLayers(std::span<const SequenceChunk> batch) {
  if (!impl_->weights->is_first_stage()) return absl::InvalidArgumentError("ForwardLayers embeds: first stage only");
  return impl_->Forward(batch, nullptr, nullptr, /*head_too=*/false);
}

void DeviceModel::SetProfiling(bool on) { impl_->options.profile = on; }
void DeviceModel::SetGraphs(bool on) { impl_->options.graphs = on; }
void DeviceModel::SetAttentionBf16(bool on) { impl_->options.attention_bf16 = on; }
GraphStats DeviceModel::graph_stats() const { return impl_->graphs.stats(); }
std::map<std::string, double> DeviceModel::TakeProfile() { return std::exchange(impl_->profile_ms, {}); }

absl::StatusOr<std::vector<int32_t>> DeviceModel::ArgmaxLast() {
  const DeviceForward& f = impl_->last;
  if (!f.logits) return absl::FailedPreconditionError("ArgmaxLast before any Forward");
  TANDEM_ASSIGN_OR_RETURN(int32_t* ids, impl_->arena.Take<int32_t>(static_cast<size_t>(f.rows)));
  TANDEM_RETURN_IF_ERROR(kc::ArgmaxRows(f.logits, f.rows, config().vocab_size, ids, impl_->stream));
  std::vector<int32_t> host(static_cast<size_t>(f.rows));
  TANDEM_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(host.data(), ids, host.size() * sizeof(int32_t), cudaMemcpyDeviceToHost, impl_->stream));
  TANDEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(impl_->stream));
  return host;
}

}  // namespace tandem::model::cuda
