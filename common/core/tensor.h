// An owning, typed, row-major tensor: dtype + shape + 64-byte-aligned bytes. Weights loaded from a
// checkpoint live in these; hot activation buffers use plain std::vector<float>.
#pragma once

#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <span>
#include <string>
#include <vector>

#include "common/core/dtype.h"

namespace tandem {

class Tensor {
 public:
  Tensor() = default;
  Tensor(DType dtype, std::vector<int64_t> shape) : dtype_(dtype), shape_(std::move(shape)) {
    bytes_ = DTypeSize(dtype_) * static_cast<size_t>(numel());
    data_.reset(static_cast<uint8_t*>(::operator new[](bytes_ ? bytes_ : 1, std::align_val_t{64})));
    std::memset(data_.get(), 0, bytes_);
  }

  DType dtype() const { return dtype_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t dim(size_t i) const { return shape_.at(i); }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape_) n *= d;
    return n;
  }
  size_t bytes() const { return bytes_; }
  bool empty() const { return data_ == nullptr; }

  uint8_t* data() { return data_.get(); }
  const uint8_t* data() const { return data_.get(); }
  std::span<const uint8_t> raw() const { return {data_.get(), bytes_}; }
  std::span<uint8_t> raw() { return {data_.get(), bytes_}; }
  template <typename T>
  T* as() { return reinterpret_cast<T*>(data_.get()); }
  template <typename T>
  const T* as() const { return reinterpret_cast<const T*>(data_.get()); }

  std::string ShapeString() const {
    std::string out = "[";
    for (size_t i = 0; i < shape_.size(); ++i) out += (i ? ", " : "") + std::to_string(shape_[i]);
    return out + "]";
  }

 private:
  struct AlignedDelete {
    void operator()(uint8_t* p) const { ::operator delete[](p, std::align_val_t{64}); }
  };
  DType dtype_ = DType::kF32;
  std::vector<int64_t> shape_;
  size_t bytes_ = 0;
  std::unique_ptr<uint8_t[], AlignedDelete> data_;
};

}  // namespace tandem
