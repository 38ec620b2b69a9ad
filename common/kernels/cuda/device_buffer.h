// An owning device allocation with checked host<->device copies: what tests, benchmarks and callers use
// to hold the buffers the kernels of cuda_ops.h read and write (host code only).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <utility>

#include <cuda_runtime_api.h>

#include "common/kernels/cuda/check.h"

namespace tandem::kernels::cuda {

template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  static absl::StatusOr<DeviceArray> Create(size_t count) {
    DeviceArray array;
    // One spare element so that zero-sized arrays still own a valid pointer.
    TANDEM_CUDA_RETURN_IF_ERROR(cudaMalloc(reinterpret_cast<void**>(&array.ptr_), (count + 1) * sizeof(T)));
    array.count_ = count;
    return array;
  }
  static absl::StatusOr<DeviceArray> FromHost(std::span<const T> host) {
    TANDEM_ASSIGN_OR_RETURN(DeviceArray array, Create(host.size()));
    TANDEM_RETURN_IF_ERROR(array.Upload(host));
    return array;
  }
  ~DeviceArray() { Reset(); }
  DeviceArray(DeviceArray&& other) noexcept { *this = std::move(other); }
  DeviceArray& operator=(DeviceArray&& other) noexcept {
    if (this != &other) {
      Reset();
      ptr_ = std::exchange(other.ptr_, nullptr);
      count_ = std::exchange(other.count_, 0);
    }
    return *this;
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  T* get() const { return ptr_; }
  size_t size() const { return count_; }
  size_t bytes() const { return count_ * sizeof(T); }

  absl::Status Upload(std::span<const T> host) {
    if (host.size() != count_) return absl::InvalidArgumentError("DeviceArray::Upload: size mismatch");
    TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpy(ptr_, host.data(), bytes(), cudaMemcpyHostToDevice));
    return absl::OkStatus();
  }
  absl::Status Download(std::span<T> host) const {
    if (host.size() != count_) return absl::InvalidArgumentError("DeviceArray::Download: size mismatch");
    TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpy(host.data(), ptr_, bytes(), cudaMemcpyDeviceToHost));
    return absl::OkStatus();
  }
  // All bytes 0xff: NaN for f32 and bf16, so an element a kernel forgot to write shows up.
  absl::Status Poison() {
    TANDEM_CUDA_RETURN_IF_ERROR(cudaMemset(ptr_, 0xff, bytes()));
    return absl::OkStatus();
  }

 private:
  void Reset() {
    if (ptr_) cudaFree(ptr_);
    ptr_ = nullptr;
    count_ = 0;
  }
  T* ptr_ = nullptr;
  size_t count_ = 0;
};

}  // namespace tandem::kernels::cuda
