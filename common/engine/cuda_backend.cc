#include <cuda_runtime_api.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

#include "common/engine/device_backend.h"
#include "common/kernels/cuda/check.h"
#include "common/kernels/cuda/cuda_model_ops.h"
#include "common/kernels/cuda/cuda_moe.h"
#include "common/model/cuda/device_model.h"

namespace tandem::engine {
namespace {

// The pools' regions: cudaMalloc'd, zeroed, freed together.
class DeviceRegions {
 public:
  explicit DeviceRegions(int device) : device_(device) {}
  ~DeviceRegions() {
    for (void* p : regions_) cudaFree(p);
  }
  absl::StatusOr<uint8_t*> Allocate(int64_t bytes) {
    TANDEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    void* p = nullptr;
    TANDEM_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, static_cast<size_t>(bytes)));
    std::lock_guard lock(mutex_);
    regions_.push_back(p);
    TANDEM_CUDA_RETURN_IF_ERROR(cudaMemset(p, 0, static_cast<size_t>(bytes)));
    return static_cast<uint8_t*>(p);
  }

 private:
  int device_;
  std::mutex mutex_;
  std::vector<void*> regions_;
};

// A device buffer that grows on demand (its contents are not kept when it grows). Callers have synchronized
// the stream that last used it before asking for more.
template <typename T>
class DeviceScratch {
 public:
  DeviceScratch() = default;
  DeviceScratch(const DeviceScratch&) = delete;
  DeviceScratch& operator=(const DeviceScratch&) = delete;
  ~DeviceScratch() {
    if (data_) cudaFree(data_);
  }
  absl::StatusOr<T*> Get(size_t count) {
    if (count > capacity_) {
      T* old = std::exchange(data_, nullptr);
      capacity_ = 0;
      if (old) TANDEM_CUDA_RETURN_IF_ERROR(cudaFree(old));
      const size_t want = std::max(count, size_t{64});
      void* p = nullptr;
      TANDEM_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, want * sizeof(T)));
      data_ = static_cast<T*>(p);
      capacity_ = want;
    }
    return data_;
  }

 private:
  T* data_ = nullptr;
  size_t capacity_ = 0;
};

namespace kc = kernels::cuda;

kc::SampleRow ToSampleRow(const model::RowDraw& draw, int64_t vocab) {
  kc::SampleRow p;
  if (draw.greedy) {
    p.temperature = 0.0;  // SampleRows' greedy rule: the argmax
    p.top_k = 1;
    return p;
  }
  p.temperature = draw.temperature;
  // top_k past the vocabulary keeps it all, as in the sampler.
  p.top_k = draw.top_k > 0 ? static_cast<int32_t>(std::min<int64_t>(draw.top_k, vocab)) : -1;
  p.top_p = draw.top_p;
  p.min_p = draw.min_p;
  p.u = draw.uniform;
  return p;
}

class DeviceRunner final : public model::ForwardRunner {
 public:
  DeviceRunner(std::unique_ptr<model::cuda::DeviceModel> model, int device) : model_(std::move(model)), device_(device) {}
  const model::ModelConfig& config() const override { return model_->config(); }
  absl::Status Forward(std::span<const model::SequenceChunk> batch, model::ForwardResult* result) override {
    // The scheduler thread is not the thread that created the model: select the device here.
    TANDEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    kept_ = false;
    return model_->Forward(batch, result);
  }

  bool keeps_logits() const override { return true; }
  absl::Status ForwardKeepingLogits(std::span<const model::SequenceChunk> batch, model::ForwardResult* result) override {
    TANDEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    kept_ = false;
    TANDEM_RETURN_IF_ERROR(model_->Forward(batch, nullptr));  // no result: nothing is copied to the host
    result->rows = model_->last().rows;
    result->logits.clear();
    result->pre_head_hidden.clear();
    kept_ = true;
    return absl::OkStatus();
  }

  // Rows without edits are drawn in place (one SampleRows over all rows, the rows not drawn set to the cheap
  // argmax); rows with edits are gathered into scratch, kEditedRows at a time, edited there and drawn there.
  absl::Status DrawKept(std::span<const model::RowDraw> draws, std::span<int32_t> ids, std::span<const int64_t> copy_rows,
                        std::span<float> copied) override {
    TANDEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    if (!kept_) return absl::FailedPreconditionError("DrawKept: the last forward did not keep its logits");
    const model::cuda::DeviceForward& f = model_->last();
    const int64_t vocab = config().vocab_size, rows = f.rows;
    if (ids.size() != draws.size() || copied.size() != copy_rows.size() * static_cast<size_t>(vocab)) {
      return absl::InvalidArgumentError(absl::StrCat("DrawKept: ", draws.size(), " draws need as many ids (got ", ids.size(),
                                                      "), ", copy_rows.size(), " copied rows ", copy_rows.size() * vocab,
                                                      " floats (got ", copied.size(), ")"));
    }
    auto bad_row = [&](int64_t row) { return row < 0 || row >= rows; };
    for (const auto& d : draws) {
      if (bad_row(d.row)) return absl::InvalidArgumentError(absl::StrCat("DrawKept: row ", d.row, " of ", rows));
    }
    for (const int64_t row : copy_rows) {
      if (bad_row(row)) return absl::InvalidArgumentError(absl::StrCat("DrawKept: copy row ", row, " of ", rows));
    }
    if (rows > INT_MAX) return absl::InvalidArgumentError("DrawKept: too many rows");
    const cudaStream_t stream = model_->stream();

    // params and ids: [0, rows) drawn in place, then one per edited draw. A row drawn twice without edits
    // goes the edited way the second time (its own params).
    std::vector<kc::SampleRow> params(static_cast<size_t>(rows), ToSampleRow(model::RowDraw{}, vocab));
    std::vector<bool> claimed(static_cast<size_t>(rows), false);
    std::vector<int32_t> gather;        // source row of each edited draw
    std::vector<kc::LogitEdit> edits;   // row: the edited draw's place in its pass
    std::vector<size_t> pass_edits{0};  // edits [pass_edits[p], pass_edits[p + 1]) belong to pass p
    std::vector<int64_t> slot(draws.size());
    bool in_place = false;
    for (size_t k = 0; k < draws.size(); ++k) {
      const model::RowDraw& d = draws[k];
      const kc::SampleRow p = ToSampleRow(d, vocab);
      if (d.edits.empty() && !claimed[static_cast<size_t>(d.row)]) {
        claimed[static_cast<size_t>(d.row)] = true;
        params[static_cast<size_t>(d.row)] = p;
        slot[k] = d.row;
        in_place = true;
        continue;
      }
      const int64_t e = static_cast<int64_t>(gather.size());
      if (e > 0 && e % kEditedRows == 0) pass_edits.push_back(edits.size());
      slot[k] = rows + e;
      gather.push_back(static_cast<int32_t>(d.row));
      params.push_back(p);
      for (const model::LogitEdit& edit : d.edits) {
        kc::LogitEdit out;
        out.row = static_cast<int32_t>(e % kEditedRows);
        out.token = edit.token;
        out.subtract = edit.subtract;
        out.repetition = edit.repetition;
        out.bias = edit.bias;
        out.flags = (edit.penalize ? kc::kEditPenalize : 0u) | (edit.biased ? kc::kEditBias : 0u) |
                    (edit.mask ? kc::kEditMask : 0u);
        edits.push_back(out);
      }
    }
    pass_edits.push_back(edits.size());
    const int64_t edited = static_cast<int64_t>(gather.size());

    std::vector<int32_t> drawn(params.size());
    if (!draws.empty()) {
      TANDEM_ASSIGN_OR_RETURN(kc::SampleRow* dparams, params_.Get(params.size()));
      TANDEM_ASSIGN_OR_RETURN(int32_t* dids, ids_.Get(params.size()));
      const size_t workspace_bytes = std::max(kc::SampleWorkspaceBytes(std::max(rows, kEditedRows), vocab), size_t{1});
      TANDEM_ASSIGN_OR_RETURN(uint8_t* workspace, workspace_.Get(workspace_bytes));
      TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dparams, params.data(), params.size() * sizeof(kc::SampleRow),
                                                  cudaMemcpyHostToDevice, stream));
      if (in_place) {
        TANDEM_RETURN_IF_ERROR(kc::SampleRows(f.logits, rows, vocab, dparams, dids, workspace, workspace_bytes, stream));
      }
      if (edited > 0) {
        TANDEM_ASSIGN_OR_RETURN(int32_t* dgather, gather_.Get(gather.size()));
        TANDEM_ASSIGN_OR_RETURN(kc::LogitEdit* dedits, edits_.Get(std::max<size_t>(edits.size(), 1)));
        TANDEM_ASSIGN_OR_RETURN(float* scratch,
                                edited_logits_.Get(static_cast<size_t>(std::min(edited, kEditedRows) * vocab)));
        TANDEM_CUDA_RETURN_IF_ERROR(
            cudaMemcpyAsync(dgather, gather.data(), gather.size() * sizeof(int32_t), cudaMemcpyHostToDevice, stream));
        if (!edits.empty()) {
          TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dedits, edits.data(), edits.size() * sizeof(kc::LogitEdit),
                                                      cudaMemcpyHostToDevice, stream));
        }
        for (int64_t first = 0, pass = 0; first < edited; first += kEditedRows, ++pass) {
          const int64_t n = std::min(kEditedRows, edited - first);
          const size_t e0 = pass_edits[static_cast<size_t>(pass)], e1 = pass_edits[static_cast<size_t>(pass) + 1];
          TANDEM_RETURN_IF_ERROR(kc::GatherRows(f.logits, dgather + first, n, vocab, scratch, stream));
          TANDEM_RETURN_IF_ERROR(
              kc::ApplyLogitEdits(scratch, n, vocab, dedits + e0, static_cast<int64_t>(e1 - e0), stream));
          TANDEM_RETURN_IF_ERROR(kc::SampleRows(scratch, n, vocab, dparams + rows + first, dids + rows + first, workspace,
                                                workspace_bytes, stream));
        }
      }
      const size_t from = in_place ? 0 : static_cast<size_t>(rows);  // the ids [from, end) were drawn
      TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(drawn.data() + from, dids + from,
                                                  (drawn.size() - from) * sizeof(int32_t), cudaMemcpyDeviceToHost,
                                                  stream));
    }
    for (size_t j = 0; j < copy_rows.size(); ++j) {
      TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(copied.data() + j * static_cast<size_t>(vocab),
                                                  f.logits + copy_rows[j] * vocab, static_cast<size_t>(vocab) * sizeof(float),
                                                  cudaMemcpyDeviceToHost, stream));
    }
    TANDEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    for (size_t k = 0; k < draws.size(); ++k) ids[k] = drawn[static_cast<size_t>(slot[k])];
    return absl::OkStatus();
  }

 private:
  std::unique_ptr<model::cuda::DeviceModel> model_;
  int device_;
  bool kept_ = false;  // the last forward left its logits for DrawKept
  static constexpr int64_t kEditedRows = 32;  // edited rows per pass: bounds the scratch at 32 x vocab floats
  DeviceScratch<kc::SampleRow> params_;
  DeviceScratch<int32_t> ids_, gather_;
  DeviceScratch<kc::LogitEdit> edits_;
  DeviceScratch<float> edited_logits_;
  DeviceScratch<uint8_t> workspace_;
};

}  // namespace

absl::StatusOr<DeviceBackend> MakeCudaBackend(std::shared_ptr<const model::ModelWeights> weights, int device,
                                              const CudaBackendOptions& backend_options) {
  int count = 0;
  TANDEM_CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&count));
  if (device < 0 || device >= count) {
    return absl::InvalidArgumentError(absl::StrCat("--cuda-device ", device, ": this machine has ", count, " CUDA devices"));
  }
  TANDEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  cudaDeviceProp props{};
  TANDEM_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&props, device));
  model::cuda::DeviceModelOptions options;
  options.device = device;
  const CudaDense dense = backend_options.dense;
  options.dense = dense == CudaDense::kF32    ? model::cuda::DenseFormat::kF32
                  : dense == CudaDense::kBf16 ? model::cuda::DenseFormat::kBf16
                                              : model::cuda::DenseFormat::kBf16x2;
  options.graphs = backend_options.graphs;
  options.attention_bf16 = backend_options.attention_bf16;
  options.tune_gemms = backend_options.gemm_tuning;
  TANDEM_ASSIGN_OR_RETURN(auto model, model::cuda::DeviceModel::Create(std::move(weights), options));
  DeviceBackend backend;
  backend.weight_bytes = static_cast<int64_t>(model->weight_bytes());
  backend.device_memory_bytes = static_cast<int64_t>(props.totalGlobalMem);
  backend.device_name = props.name;
  backend.runner = std::make_unique<DeviceRunner>(std::move(model), device);
  auto regions = std::make_shared<DeviceRegions>(device);
  backend.memory = regions;
  backend.allocator = [regions](std::string_view, int64_t bytes) { return regions->Allocate(bytes); };
  backend.copy = [device](void* dst, const void* src, size_t bytes) -> absl::Status {
    TANDEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
    TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault));
    return absl::OkStatus();
  };
  return backend;
}

namespace {

// The staging copies of one engine, in issue order on their own stream.
class CudaStagingCopier final : public StagingCopier {
 public:
  CudaStagingCopier(int device, cudaStream_t stream) : device_(device), stream_(stream) {}
  ~CudaStagingCopier() override {
    cudaSetDevice(device_);
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }
  absl::Status Enqueue(void* dst, const void* src, size_t bytes) override {
    TANDEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_));
    return absl::OkStatus();
  }
  absl::StatusOr<StagingFence> Fence() override {
    TANDEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    cudaEvent_t event = nullptr;
    TANDEM_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    std::shared_ptr<void> owned(event, [](void* e) { cudaEventDestroy(static_cast<cudaEvent_t>(e)); });
    TANDEM_CUDA_RETURN_IF_ERROR(cudaEventRecord(event, stream_));
    return StagingFence([device = device_, owned]() -> absl::Status {
      TANDEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));  // the waiting thread may never have used the device
      TANDEM_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(static_cast<cudaEvent_t>(owned.get())));
      return absl::OkStatus();
    });
  }

 private:
  int device_;
  cudaStream_t stream_;
};

}  // namespace

absl::StatusOr<std::shared_ptr<void>> PinHostMemory(int device, void* base, size_t bytes) {
  TANDEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  if (const cudaError_t err = cudaHostRegister(base, bytes, cudaHostRegisterDefault); err != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it, or the next launch check would report it
    return kernels::cuda::CudaStatus(err, "cudaHostRegister", __FILE__, __LINE__);
  }
  return std::shared_ptr<void>(base, [device](void* p) {
    cudaSetDevice(device);
    cudaHostUnregister(p);
  });
}

absl::StatusOr<std::unique_ptr<StagingCopier>> MakeCudaStagingCopier(int device) {
  TANDEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  cudaStream_t stream = nullptr;
  TANDEM_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  return std::unique_ptr<StagingCopier>(std::make_unique<CudaStagingCopier>(device, stream));
}

namespace {

// A peer's regions opened with cudaIpcOpenMemHandle, closed together.
class CudaDeviceMapping final : public DeviceMapping {
 public:
  explicit CudaDeviceMapping(int device) : device_(device) {}
  ~CudaDeviceMapping() override {
    cudaSetDevice(device_);
    for (uint8_t* p : bases_) cudaIpcCloseMemHandle(p);
  }
  uint8_t* base(size_t region) const override { return bases_.at(region); }
  std::vector<uint8_t*> bases_;

 private:
  int device_;
};

class CudaDeviceIpc final : public DeviceIpc {
 public:
  CudaDeviceIpc(int device, std::string location, std::unique_ptr<StagingCopier> copier)
      : device_(device), location_(std::move(location)), copier_(std::move(copier)) {}
  std::string location() const override { return location_; }
  absl::StatusOr<std::string> Export(void* base) override {
    TANDEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    cudaIpcMemHandle_t handle{};
    if (const cudaError_t err = cudaIpcGetMemHandle(&handle, base); err != cudaSuccess) {
      cudaGetLastError();  // not sticky: clear it
      return kernels::cuda::CudaStatus(err, "cudaIpcGetMemHandle", __FILE__, __LINE__);
    }
    return std::string(reinterpret_cast<const char*>(&handle), sizeof(handle));
  }
  absl::StatusOr<std::unique_ptr<DeviceMapping>> Open(std::span<const std::string> handles) override {
    TANDEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    auto mapping = std::make_unique<CudaDeviceMapping>(device_);
    for (size_t i = 0; i < handles.size(); ++i) {
      if (handles[i].size() != sizeof(cudaIpcMemHandle_t)) {
        return absl::InvalidArgumentError(absl::StrCat("device IPC handle ", i, " has ", handles[i].size(), " bytes, not ",
                                                       sizeof(cudaIpcMemHandle_t)));
      }
      cudaIpcMemHandle_t handle{};
      std::memcpy(&handle, handles[i].data(), sizeof(handle));
      void* p = nullptr;
      // Lazy peer access: the peer's memory may sit on another GPU of this host.
      if (const cudaError_t err = cudaIpcOpenMemHandle(&p, handle, cudaIpcMemLazyEnablePeerAccess); err != cudaSuccess) {
        cudaGetLastError();
        return kernels::cuda::CudaStatus(err, "cudaIpcOpenMemHandle", __FILE__, __LINE__);  // closes those opened
      }
      mapping->bases_.push_back(static_cast<uint8_t*>(p));
    }
    return std::unique_ptr<DeviceMapping>(std::move(mapping));
  }
  StagingCopier& copier() override { return *copier_; }
  absl::Status InvertByte(uint8_t* at) override {
    TANDEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    uint8_t byte = 0;
    TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpy(&byte, at, 1, cudaMemcpyDefault));
    byte = static_cast<uint8_t>(~byte);
    TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpy(at, &byte, 1, cudaMemcpyDefault));
    return absl::OkStatus();
  }

 private:
  int device_;
  std::string location_;
  std::unique_ptr<StagingCopier> copier_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<DeviceIpc>> MakeCudaDeviceIpc(int device) {
  TANDEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  cudaDeviceProp props{};
  TANDEM_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&props, device));
  char bus[32] = {};
  TANDEM_CUDA_RETURN_IF_ERROR(cudaDeviceGetPCIBusId(bus, sizeof(bus), device));
  TANDEM_ASSIGN_OR_RETURN(auto copier, MakeCudaStagingCopier(device));
  return std::unique_ptr<DeviceIpc>(
      std::make_unique<CudaDeviceIpc>(device, absl::StrCat("GPU ", device, " (", props.name, ", ", bus, ")"), std::move(copier)));
}

}  // namespace tandem::engine
