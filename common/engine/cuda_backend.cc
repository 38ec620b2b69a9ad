#include <cuda_runtime_api.h>

#include <mutex>
#include <vector>

#include "common/engine/device_backend.h"
#include "common/kernels/cuda/check.h"
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

class DeviceRunner final : public model::ForwardRunner {
 public:
  DeviceRunner(std::unique_ptr<model::cuda::DeviceModel> model, int device) : model_(std::move(model)), device_(device) {}
  const model::ModelConfig& config() const override { return model_->config(); }
  absl::Status Forward(std::span<const model::SequenceChunk> batch, model::ForwardResult* result) override {
    // The scheduler thread is not the thread that created the model: select the device here.
    TANDEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    return model_->Forward(batch, result);
  }

 private:
  std::unique_ptr<model::cuda::DeviceModel> model_;
  int device_;
};

}  // namespace

absl::StatusOr<DeviceBackend> MakeCudaBackend(std::shared_ptr<const model::ModelWeights> weights, int device,
                                              CudaDense dense) {
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
  options.dense = dense == CudaDense::kF32    ? model::cuda::DenseFormat::kF32
                  : dense == CudaDense::kBf16 ? model::cuda::DenseFormat::kBf16
                                              : model::cuda::DenseFormat::kBf16x2;
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

}  // namespace tandem::engine
