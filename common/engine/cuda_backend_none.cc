// The build without CUDA: --device cuda is refused with the reason.
#include "common/engine/device_backend.h"

namespace tandem::engine {

absl::StatusOr<DeviceBackend> MakeCudaBackend(std::shared_ptr<const model::ModelWeights>, int, CudaDense) {
  return absl::FailedPreconditionError("--device cuda: this build has no CUDA backend (nvcc was not found when it was configured)");
}

}  // namespace tandem::engine
