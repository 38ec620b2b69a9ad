// The GPU side of an engine (--device cuda): the device forward as a ForwardRunner, and the cache pools'
// memory in device memory (allocated zeroed, written through cudaMemcpy). Built from cuda_backend.cc
// when the build has CUDA; otherwise MakeCudaBackend says so.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "common/cache/pools.h"
#include "common/core/status.h"
#include "common/engine/staging.h"
#include "common/model/forward.h"

namespace tandem::engine {

struct DeviceBackend {
  std::unique_ptr<model::ForwardRunner> runner;
  cache::RegionAllocator allocator;   // pool regions on the device
  cache::RegionCopy copy;             // how the pools write them
  std::shared_ptr<void> memory;       // owns the regions: keep it alive longer than the pools
  int64_t device_memory_bytes = 0;    // the device's total memory (for --mem-fraction-static)
  int64_t weight_bytes = 0;           // weights resident on the device
  std::string device_name;
};

// How the GPU runs the dense layers (--cuda-dense): weights are bf16 (exact for the checkpoint's FP8 and bf16
// tensors) and activations enter each GEMM as a bf16 hi + lo pair (~16 significant bits; the default), as
// one bf16 (faster prefill, ~8 bits), or everything in f32 (closest to the CPU forward, slowest).
enum class CudaDense { kBf16x2, kBf16, kF32 };
// "bf16x2", "bf16", "f32".
absl::StatusOr<CudaDense> ParseCudaDense(std::string_view name);
// --cuda-graphs: "on" (decode steps replay CUDA graphs of their launches) or "off".
absl::StatusOr<bool> ParseCudaGraphs(std::string_view name);
// --cuda-attention: "f32" (f32-exact products; false) or "bf16" (q and the softmax probabilities rounded to
// bf16, f32 sums, all 64 heads from one read of each cache entry; true).
absl::StatusOr<bool> ParseCudaAttention(std::string_view name);
// --cuda-gemm-tuning: "on" (each cuBLASLt GEMM shape times its candidate algorithms on first use and keeps the
// fastest; the default) or "off" (every shape takes cuBLASLt's first heuristic candidate: engines on the same
// GPU model and library run the same kernels for the same batch shapes, so the same batch gives bit-identical
// logits on each; speed: not measured).
absl::StatusOr<bool> ParseCudaGemmTuning(std::string_view name);

// How a CUDA backend runs the forward (the --cuda-* flags; model::cuda::DeviceModelOptions).
struct CudaBackendOptions {
  CudaDense dense = CudaDense::kBf16x2;
  bool graphs = false;          // decode steps replay CUDA graphs (DeviceModelOptions::graphs)
  bool attention_bf16 = false;  // DeviceModelOptions::attention_bf16
  bool gemm_tuning = true;      // DeviceModelOptions::tune_gemms
};

// Uploads `weights` to CUDA device `device` and prepares its pool memory.
absl::StatusOr<DeviceBackend> MakeCudaBackend(std::shared_ptr<const model::ModelWeights> weights, int device,
                                              const CudaBackendOptions& options = {});

// The PD staging of a --device cuda engine (staging.h): its host copy of the pools page-locked, so the copies
// to and from it are DMA and asynchronous. PinHostMemory page-locks `bytes` at `base` (memory the transport
// allocated) with cudaHostRegister; the handle unlocks it (cudaHostUnregister) when released.
absl::StatusOr<std::shared_ptr<void>> PinHostMemory(int device, void* base, size_t bytes);
// Copies on a non-blocking stream of their own, fenced by CUDA events. They read what the forward wrote: it
// returns only once its own stream has synchronised.
absl::StatusOr<std::unique_ptr<StagingCopier>> MakeCudaStagingCopier(int device);
// Device IPC for PD with a peer process on this host (staging.h): exports, mappings and device-to-device
// copies on a non-blocking stream of its own.
absl::StatusOr<std::unique_ptr<DeviceIpc>> MakeCudaDeviceIpc(int device);

}  // namespace tandem::engine
