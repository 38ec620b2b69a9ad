// Host entry points of the CUDA kernels (device code lives only in this folder). Each takes host
// buffers, so the parity tests can compare them with the CPU kernels of kernels.h byte for byte.
#pragma once

#include <cstdint>
#include <string>

#include "common/kernels/kernels.h"

namespace tandem::kernels::cuda {

// True when this build has CUDA and a device is visible; `why` says otherwise.
bool DeviceAvailable(std::string* why);

// Quantizes `count` KV vectors ([count, format.dim()] f32) into cache entries laid out as the CPU's
// QuantizeKvEntry writes them ([data | scales] per entry, format.entry_bytes() apart).
bool QuantizeKvEntries(const KvFormat& format, const float* host_x, int64_t count, uint8_t* host_entries);

// y = x / sqrt(mean(x^2) + eps) * weight over `rows` rows of `dim`.
bool RmsNorm(const float* host_x, int64_t rows, int64_t dim, const float* host_weight, float eps, float* host_y);

}  // namespace tandem::kernels::cuda
