// The DSV4 forward on one GPU: the same function as Dsv4Model (NUMERICS.md) over a batch of sequence
// chunks whose states live in device memory (DeviceSequenceState, or the engine's paged pools on a
// device region). Weights are uploaded once from the CPU-loaded ModelWeights: dense layers as bf16 for
// cuBLASLt (exact: they come from FP8/bf16 checkpoints) or f32, routed experts kept packed (MXFP4/FP8)
// and multiplied straight from that format. All work is queued on the model's stream; Forward
// synchronizes once at its end. Decode steps may replay CUDA graphs of their launches (options.graphs).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <span>
#include <vector>

#include <cuda_runtime_api.h>

#include "common/core/status.h"
#include "common/model/cuda/device_graphs.h"
#include "common/model/forward.h"

namespace tandem::model::cuda {

// Dense weights are bf16 in both bf16 formats (exact for the checkpoint's FP8-with-ue8m0 and bf16 tensors);
// what differs is how the f32 activations enter each GEMM.
enum class DenseFormat {
  kBf16x2,  // x = hi + lo, two bf16s (~16 significant bits), f32 accumulation: the serving default
  kBf16,    // x rounded to one bf16 (~8 bits): half the prefill GEMM work, visibly less exact
  kF32,     // f32 GEMMs throughout (closest to the CPU forward; for parity runs)
};

struct DeviceModelOptions {
  DenseFormat dense = DenseFormat::kBf16x2;
  // Sparse attention with q and the probabilities rounded to bf16 (kernels::cuda::AttentionMath::kBf16: up to
  // 2^-8 relative per weight, the 64-head kernel from 8 tokens); false: f32-exact products (AttentionMath::kF32).
  bool attention_bf16 = false;
  int device = 0;
  // From this many (token, expert) pairs in one forward, the routed experts run as grouped GEMMs
  // (kernels::cuda::GroupedExpertGemm) instead of the GEMV kernel over the packed weights: on Hopper one
  // warpgroup-MMA kernel dequantizing MXFP4 in shared memory (fused_prefill_experts), else per-expert bf16
  // copies through cuBLASLt.
  int64_t prefill_expert_pairs = 2048;
  bool fused_prefill_experts = true;
  // false: the dense GEMMs take cuBLASLt's first heuristic algorithm for each shape instead of the fastest
  // of its candidates timed on first use, so two models (two processes, two pipeline stages) given the same
  // batches compute the same bits; the timed pick may differ between them (another summation order).
  bool tune_gemms = true;
  // Time every group of launches with CUDA events (and the host's table building) for TakeProfile.
  bool profile = false;
  // Decode-sized steps (at most graph_max_tokens tokens, no trace, not profiled, below prefill_expert_pairs)
  // replay CUDA graphs of their launches, one per step signature (device_graphs.h): a signature's first
  // step runs eagerly, its second is captured, later ones replay. Same results as eager launches.
  bool graphs = false;
  int64_t graph_max_tokens = 256;
  int max_graphs = 32;  // graphs kept (LRU; evicted ones are destroyed)
};

// What one Forward leaves on the device (valid until the next Forward).
struct DeviceForward {
  int64_t rows = 0;              // logit rows, as ForwardResult::rows
  const float* logits = nullptr;  // [rows, vocab]
  const float* hidden = nullptr;  // [tokens, hc_mult * hidden]: the streams before hc_head
  int64_t tokens = 0;
};

class DeviceModel {
 public:
  // Uploads every weight of a ModelWeights: a whole model or one pipeline stage (its layers; the embedding on
  // the first, the head on the last), the MTP layer too when it was loaded.
  static absl::StatusOr<std::unique_ptr<DeviceModel>> Create(std::shared_ptr<const ModelWeights> weights,
                                                             const DeviceModelOptions& options = {});
  ~DeviceModel();
  DeviceModel(const DeviceModel&) = delete;
  DeviceModel& operator=(const DeviceModel&) = delete;

  const ModelConfig& config() const;
  cudaStream_t stream() const;
  // Bytes of weights held on the device.
  size_t weight_bytes() const;

  // Dsv4Model::Forward's contract for the whole model (a stage: InvalidArgument, use ForwardStage): every
  // chunk's state advances by its tokens.
  // When `result` is given, the logits and pre-head streams are copied to it (host); `trace` gets the
  // expert and indexer choices as on the CPU.
  absl::Status Forward(std::span<const SequenceChunk> batch, ForwardResult* result, ForwardTrace* trace = nullptr);
  // Dsv4Model::Forward's contract for a pipeline stage: the first embeds (input null), later ones take the
  // previous stage's streams; the last fills `result`, earlier ones `output` (host copies).
  absl::Status ForwardStage(std::span<const SequenceChunk> batch, const HiddenStates* input, HiddenStates* output,
                            ForwardResult* result, ForwardTrace* trace = nullptr);
  // One MTP draft step per chunk token (Dsv4Model::ForwardMtp's contract): chunk.tokens are the next tokens,
  // `hidden` (host, [tokens, hc_mult * hidden]) the target's pre-head streams of the positions before them;
  // positions continue from state->mtp_length(), which advances. FailedPrecondition without an MTP layer.
  absl::Status ForwardMtp(std::span<const SequenceChunk> batch, std::span<const float> hidden, ForwardResult* result,
                          ForwardTrace* trace = nullptr);
  // The embedding and the decoder layers only (no head, no logits): what a per-layer benchmark times.
  absl::Status ForwardLayers(std::span<const SequenceChunk> batch);
  // The device outputs of the last Forward.
  const DeviceForward& last() const;
  void SetProfiling(bool on);
  // Turns the CUDA graphs of decode steps on or off (DeviceModelOptions::graphs); graphs already captured
  // are kept for when they are on again.
  void SetGraphs(bool on);
  // Switches DeviceModelOptions::attention_bf16 (part of a graph's signature: each math has its graphs).
  void SetAttentionBf16(bool on);
  // Counts of the steps since creation: captured, replayed, run eagerly (device_graphs.h).
  GraphStats graph_stats() const;
  // Milliseconds per op group summed over the forwards since the last call (profile mode only).
  std::map<std::string, double> TakeProfile();
  // Greedy next tokens of the last Forward's logit rows (argmax on the device, ids copied back).
  absl::StatusOr<std::vector<int32_t>> ArgmaxLast();

 private:
  struct Impl;
  explicit DeviceModel(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tandem::model::cuda
