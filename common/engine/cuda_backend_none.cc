// The build without CUDA: --device cuda is refused with the reason.
#include "common/engine/device_backend.h"

namespace tandem::engine {

absl::StatusOr<DeviceBackend> MakeCudaBackend(std::shared_ptr<const model::ModelWeights>, int, const CudaBackendOptions&) {
  return absl::FailedPreconditionError("--device cuda: this build has no CUDA backend (nvcc was not found when it was configured)");
}

absl::StatusOr<std::shared_ptr<void>> PinHostMemory(int, void*, size_t) {
  return absl::FailedPreconditionError("page-locked staging: this build has no CUDA backend");
}

absl::StatusOr<std::unique_ptr<StagingCopier>> MakeCudaStagingCopier(int) {
  return absl::FailedPreconditionError("device staging copies: this build has no CUDA backend");
}

absl::StatusOr<std::unique_ptr<DeviceIpc>> MakeCudaDeviceIpc(int) {
  return absl::FailedPreconditionError("device IPC: this build has no CUDA backend");
}

}  // namespace tandem::engine
